//! Device graphs (issue 14 item 7): capture and replay on the emulated device (and
//! on CUDA, ignored without one). During a capture a synchronisation, a read-back,
//! a host copy or a driver allocation is an error naming it; a replay gives exactly
//! the eager result, on the same buffers; the blocks a graph uses are not handed to
//! anyone else while it lives; and the small fixture model's whole inference,
//! replayed as one graph, equals `FasterRcnn::detect` bit for bit,
//! at one upload, one graph launch and one download per batch.

mod common;

use kestrel::detection::graphed::GraphedDetector;
use kestrel::detection::transform::ImageU8;
use kestrel::detection::{Detections, FasterRcnn, FasterRcnnConfig};
use kestrel::device::graph::capture;
use kestrel::io::TensorFile;
use kestrel::{Device, Tensor};

/// The model tests measure the device's cache and counters.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn vec_on(v: Vec<f32>, device: Device) -> Tensor {
    let n = v.len();
    Tensor::from_vec(v, [n]).unwrap().to_device(device).unwrap()
}

use common::bits;

/// relu(x) * 2 + x through three kernels, allocating its intermediates.
fn small_region(x: &Tensor) -> kestrel::Result<Tensor> {
    let r = kestrel::ops::relu(x)?;
    let s = kestrel::ops::add(&r, &r)?;
    kestrel::ops::add(&s, x)
}

/// A captured region replays on new input data with the eager result, bit for bit,
/// costing one graph launch and nothing else; capture itself ran nothing.
fn check_replay_equals_eager(device: Device) {
    let x = vec_on(
        (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect(),
        device,
    );
    small_region(&x).unwrap(); // warm the cache
    let c = device.counters();
    let (g, y) = capture(device, || small_region(&x)).unwrap();
    let d = c.delta();
    assert_eq!(g.nodes(), 3, "three kernels recorded");
    assert_eq!(
        (d.driver_allocs, d.dtoh, d.htod, d.syncs),
        (0, 0, 0, 0),
        "{d}"
    );
    for step in 0..3u32 {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7 + step as usize * 13) % 101) as f32 - 50.5)
            .collect();
        let fresh = vec_on(v.clone(), device);
        // New data into the captured input buffer, then replay.
        x.gpu()
            .unwrap()
            .dev
            .backend
            .copy_htod(bytemuck_f32(&v), &x.gpu().unwrap().buf)
            .unwrap();
        let c = device.counters();
        g.replay().unwrap();
        let d = c.delta();
        assert_eq!(d.graph_replays, 1, "{d}");
        assert_eq!(
            (
                d.launches,
                d.htod,
                d.dtoh,
                d.syncs,
                d.driver_allocs + d.cached_allocs
            ),
            (0, 0, 0, 0, 0),
            "a replay is one graph launch: {d}"
        );
        assert_eq!(
            bits(&y),
            bits(&small_region(&fresh).unwrap()),
            "step {step}"
        );
    }
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; the byte view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

crate::device_tests! {
    replay_equals_eager_bit_for_bit(emulated, cuda) => check_replay_equals_eager;
}

/// Each forbidden call during a capture is an error naming it (and the kernel
/// before it); the capture is discarded and the device works normally afterwards.
#[test]
fn forbidden_calls_during_capture_are_named_errors_emulated() {
    let device = common::emulated();
    let x = vec_on(vec![1.0, -2.0, 3.0], device);
    small_region(&x).unwrap();
    fn err<T>(r: kestrel::Result<(kestrel::device::graph::Graph, T)>) -> String {
        match r {
            Ok(_) => panic!("the capture should have failed"),
            Err(e) => e.to_string(),
        }
    }
    let e = err(capture(device, || kestrel::ops::relu(&x)?.to_vec::<f32>()));
    assert!(
        e.contains("device-to-host copy of 12 bytes") && e.contains("relu_fwd_f32"),
        "{e}"
    );
    let e = err(capture(device, || {
        Tensor::from_vec(vec![1.0f32; 4], [4])?.to_device(device)
    }));
    assert!(e.contains("host-to-device copy of 16 bytes"), "{e}");
    let e = err(capture(device, || {
        kestrel::device::emu::gpu_device()?.backend.synchronize()
    }));
    assert!(e.contains("a synchronisation during capture"), "{e}");
    // A size no test uses: the cache cannot hold it, so the driver would be asked.
    let e = err(capture(device, || {
        kestrel::device::emu::gpu_device()?.alloc(7_777_777 * 3)
    }));
    assert!(e.contains("driver allocation of 23333331 bytes"), "{e}");
    // Not capturing any more: everything works again.
    assert_eq!(
        kestrel::ops::relu(&x).unwrap().to_vec::<f32>().unwrap(),
        vec![1.0, 0.0, 3.0]
    );
    assert!(
        capture(Device::Cpu, || Ok(())).is_err(),
        "the CPU has no graphs"
    );
}

/// The graph's blocks stay its own: eager work between replays (which allocates
/// and frees plenty) does not overwrite the graph's outputs or intermediates.
#[test]
fn eager_work_between_replays_does_not_touch_the_graphs_blocks_emulated() {
    common::on_emulated(|device| {
        let x = vec_on((0..4096).map(|i| i as f32 * 0.01 - 20.0).collect(), device);
        small_region(&x).unwrap();
        let (g, y) = capture(device, || small_region(&x)).unwrap();
        g.replay().unwrap();
        let want = bits(&y);
        // Same sizes as the graph's blocks: a shared cache would hand them out here.
        for k in 0..4 {
            let z = vec_on(vec![k as f32 + 0.5; 4096], device);
            let _ = small_region(&z).unwrap();
        }
        assert_eq!(bits(&y), want, "eager work overwrote the graph's output");
        g.replay().unwrap();
        assert_eq!(bits(&y), want, "replay after eager work");
    });
}

// ------------------------------------------------------------ the small model

fn load_model(device: Device) -> FasterRcnn {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let cfg = FasterRcnnConfig::from_params(&params).unwrap();
    let mut m = FasterRcnn::load(cfg, &path).unwrap();
    m.to_device(device).unwrap();
    m
}

fn fixture_images() -> Vec<(Vec<u8>, usize, usize)> {
    common::fixture_pixels()
}

fn views(imgs: &[(Vec<u8>, usize, usize)]) -> Vec<ImageU8<'_>> {
    common::u8_views(imgs)
}

fn eager(m: &FasterRcnn, imgs: &[(Vec<u8>, usize, usize)], device: Device) -> Vec<Detections> {
    let t: Vec<Tensor> = imgs
        .iter()
        .map(|(d, h, w)| {
            kestrel::detection::transform::image_from_u8(d, *h, *w)
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect();
    kestrel::autograd::no_grad(|| m.detect(&t)).unwrap()
}

fn assert_same_detections(what: &str, got: &[Detections], want: &[Detections]) {
    assert_eq!(got.len(), want.len(), "{what}: images");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let gb: Vec<[u32; 4]> = g.boxes.iter().map(|b| b.map(f32::to_bits)).collect();
        let wb: Vec<[u32; 4]> = w.boxes.iter().map(|b| b.map(f32::to_bits)).collect();
        let gs: Vec<u32> = g.scores.iter().map(|s| s.to_bits()).collect();
        let ws: Vec<u32> = w.scores.iter().map(|s| s.to_bits()).collect();
        assert_eq!(g.labels, w.labels, "{what}: image {i} labels");
        assert_eq!(gb, wb, "{what}: image {i} boxes");
        assert_eq!(gs, ws, "{what}: image {i} scores");
    }
}

/// The fixture batch and a perturbed copy (same sizes): the whole inference
/// replayed as one graph gives `detect`'s detections bit for bit, the second
/// batch's differ from the first's (so the replay really read the new images), and
/// a replay costs one pinned upload, one graph launch and one download, nothing
/// else.
fn check_model(device: Device) {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let m = load_model(device);
    let a = fixture_images();
    let b = common::perturbed_pixels(&a, 5);
    let want_a = eager(&m, &a, device);
    let want_b = eager(&m, &b, device);
    assert!(
        want_a.iter().map(|d| d.scores.len()).sum::<usize>() > 0,
        "no detections to compare"
    );
    let mut g = GraphedDetector::new(&m, &views(&a)).unwrap();
    eprintln!("captured graph: {} nodes", g.graph_nodes());
    for (what, imgs, want) in [
        ("a", &a, &want_a),
        ("b", &b, &want_b),
        ("a again", &a, &want_a),
    ] {
        let c = device.counters();
        let got = g.detect(&views(imgs)).unwrap();
        let d = c.delta();
        eprintln!("graphed inference of batch {what} ({device}): {d}");
        assert_eq!(
            (
                d.htod,
                d.htod_pinned,
                d.graph_replays,
                d.launches,
                d.dtoh,
                d.syncs,
                d.driver_allocs,
                d.cached_allocs,
            ),
            (1, 1, 1, 0, 1, 0, 0, 0),
            "graphed inference of batch {what}: {d}"
        );
        assert_same_detections(what, &got, want);
    }
    assert_ne!(
        want_a.iter().map(|d| d.scores.clone()).collect::<Vec<_>>(),
        want_b.iter().map(|d| d.scores.clone()).collect::<Vec<_>>(),
        "the two batches should give different detections"
    );
}

crate::device_tests! {
    graphed_inference_equals_detect_bit_for_bit(emulated, cuda) => check_model;
}
