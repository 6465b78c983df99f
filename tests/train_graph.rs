//! A captured training step (issue 14 item 7, training): the small fixture model's
//! transform, backbone, FPN and RPN head forward replay as graph A, their backward
//! as graph B, the RoI heads and losses run eagerly in between
//! (`detection::graphed_train`). On the emulated device: replayed steps over two
//! alternating batches give the eager steps' losses, gradients and updated weights
//! bit for bit; a replayed step launches the graphs instead of the dense part's
//! kernels, allocates nothing from the driver, synchronises never and reads nothing
//! back; a read-back during a training capture is an error naming it.

mod common;

use common::Pixels;
use kestrel::autograd::Tape;
use kestrel::detection::graphed_train::{GraphedTrainer, TrainStep};
use kestrel::detection::transform::{transform_uploaded, upload_u8};
use kestrel::detection::{FasterRcnn, Target};
use kestrel::device::error_flags;
use kestrel::device::graph::capture;
use kestrel::optim::Sgd;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// The tests measure the device's cache and counters.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sgd() -> Sgd {
    common::recipe_sgd()
}

/// The fixture batch and a perturbed copy of it (same sizes, other pixels).
fn two_batches() -> (Vec<Pixels>, Vec<Pixels>, Vec<Target>) {
    let (a, targets) = common::fixture_training_pixels();
    let b = common::perturbed_pixels(&a, 5);
    (a, b, targets)
}

/// One eager step on the u8 path (what the graph replaces): losses and their
/// total, the gradients of every trainable parameter, then SGD in place.
fn eager_step(
    m: &mut FasterRcnn,
    imgs: &[Pixels],
    targets: &[Target],
    sgd: &mut Sgd,
    rng: &mut Rng,
) -> (Vec<Tensor>, Vec<Option<Tensor>>) {
    let _defer = error_flags::defer();
    let device = m
        .params
        .get(&m.params.trainable_names()[0])
        .unwrap()
        .device();
    let names = m.params.trainable_names();
    let tape = Tape::new();
    for n in &names {
        tape.watch(m.params.get(n).unwrap());
    }
    let batch = upload_u8(&common::u8_views(imgs), &m.config.transform, device).unwrap();
    let (mut losses, grads) = {
        let ctx = m.ctx(true);
        let guard = tape.activate();
        let losses = m.losses_uploaded(&ctx, &batch, targets, rng).unwrap();
        let mut total = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            total = kestrel::ops::add(&total, l).unwrap();
        }
        drop(guard);
        let grads = tape.backward(&total).unwrap();
        let mut v: Vec<Tensor> = losses.into_iter().map(|(_, t)| t).collect();
        v.push(total);
        (v, grads)
    };
    drop(tape);
    let mut params: Vec<Tensor> = names.iter().map(|n| m.params.take(n).unwrap()).collect();
    let g: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
    drop(grads);
    let gr: Vec<Option<&Tensor>> = g.iter().map(Option::as_ref).collect();
    sgd.step_optional(&mut params, &gr).unwrap();
    for (n, t) in names.iter().zip(params) {
        m.params.put(n, t).unwrap();
    }
    losses.shrink_to_fit();
    (losses, g)
}

/// One replayed step, then SGD on the fixed gradients.
fn graphed_step(
    t: &mut GraphedTrainer,
    m: &mut FasterRcnn,
    imgs: &[Pixels],
    targets: &[Target],
    sgd: &mut Sgd,
    rng: &mut Rng,
) -> TrainStep {
    let _defer = error_flags::defer();
    let step = t
        .forward_backward(m, &common::u8_views(imgs), targets, rng)
        .unwrap();
    t.update(m, &step, |p, g, fixed| sgd.step_fixed_grads(p, g, fixed))
        .unwrap();
    step
}

use common::bits;

fn assert_bits(what: &str, got: &Tensor, w: &[u32]) {
    let g = bits(got);
    assert_eq!(g.len(), w.len(), "{what}: sizes");
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        panic!(
            "{what}: element {i} of {} differs: graphed {} eager {}",
            g.len(),
            f32::from_bits(g[i]),
            f32::from_bits(w[i])
        );
    }
}

/// Three steps over batches a, b, a: the graphed trainer and an eager copy of the
/// same model (same seed for the sampling; the eager steps run first) agree bit for bit on every loss, every
/// parameter's gradient and every weight after SGD; the two batches' losses differ
/// (the replay read the new pixels). The last step (both warm) is counted: the
/// graphed one is two graph launches, one pinned upload of the images and one of
/// the targets, no driver allocation, no synchronisation, no read-back, and the
/// operations it launches itself are the (third) eager step's less the graphs' nodes (plus
/// the seed copies it adds, less the optimizer's staging copies it saves). Last, a
/// parameter moved out of the buffer the graphs read is an error at the next step.
/// (One test: building the trainer costs a few steps on the emulated device.)
#[test]
fn replayed_training_steps_equal_eager_steps_bit_for_bit_and_talk_to_the_host_only_to_upload_emulated(
) {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let (a, b, targets) = two_batches();
    let mut eager = common::fixture_model(device);
    let mut graphed = common::fixture_model(device);
    let mut trainer = GraphedTrainer::new(&graphed, &common::u8_views(&a), &targets).unwrap();
    let sizes = trainer.sizes();
    eprintln!("graphs: {sizes:?}");
    let names = trainer.names().to_vec();
    assert_eq!(names, eager.params.trainable_names());
    let (mut sgd_e, mut sgd_g) = (sgd(), sgd());
    let (mut rng_e, mut rng_g) = (Rng::new(3), Rng::new(3));
    let batches = [&a, &b, &a];
    // The eager steps first (interleaved, each would churn the other's cache):
    // their losses, gradients and weights kept as bits.
    let mut want = Vec::new();
    let mut e = Default::default();
    for imgs in batches {
        let c = device.counters();
        let (losses, grads) = eager_step(&mut eager, imgs, &targets, &mut sgd_e, &mut rng_e);
        e = c.delta();
        let grads: Vec<Option<Vec<u32>>> = grads.iter().map(|g| g.as_ref().map(bits)).collect();
        let weights: Vec<Vec<u32>> = names
            .iter()
            .map(|n| bits(eager.params.get(n).unwrap()))
            .collect();
        want.push((losses.iter().map(bits).collect::<Vec<_>>(), grads, weights));
    }
    let mut totals = Vec::new();
    let mut g = Default::default();
    for (k, imgs) in batches.into_iter().enumerate() {
        let c = device.counters();
        let got = graphed_step(
            &mut trainer,
            &mut graphed,
            imgs,
            &targets,
            &mut sgd_g,
            &mut rng_g,
        );
        g = c.delta();
        let (want_losses, want_grads, want_weights) = &want[k];
        for (i, (name, l)) in got.losses.iter().enumerate() {
            assert_bits(&format!("step {k} {name}"), l, &want_losses[i]);
        }
        assert_bits(&format!("step {k} total"), &got.total, &want_losses[4]);
        totals.push(got.total.to_vec::<f32>().unwrap()[0]);
        let mut with_grad = 0;
        for (n, (g, w)) in names.iter().zip(got.grads.iter().zip(want_grads)) {
            match (g, w) {
                (Some(g), Some(w)) => {
                    assert_bits(&format!("step {k} grad {n}"), g, w);
                    with_grad += 1;
                }
                (None, None) => {}
                _ => panic!("step {k}: {n} has a gradient on one side only"),
            }
        }
        assert!(with_grad > sizes.fixed_grads, "the heads' gradients too");
        for (n, w) in names.iter().zip(want_weights) {
            let got = graphed.params.get(n).unwrap();
            assert_bits(&format!("step {k} weight {n} after SGD"), got, w);
        }
        eprintln!("step {k}: total loss {} (graphed = eager)", totals[k]);
    }
    assert_ne!(
        totals[0], totals[1],
        "batches a and b should give different losses"
    );

    eprintln!("eager step (emulated, third step): {e}");
    eprintln!("graphed step (emulated, third step): {g}");
    assert_eq!(g.graph_replays, 2, "{g}");
    assert_eq!((g.driver_allocs, g.syncs, g.dtoh), (0, 0, 0), "{g}");
    assert_eq!(
        (g.htod, g.htod_pinned),
        (2, 1),
        "images (pinned) and targets: {g}"
    );
    assert_eq!(
        (e.htod, e.htod_pinned),
        (2, 1),
        "the eager step uploads the same: {e}"
    );
    assert!(
        sizes.forward_nodes > 0 && sizes.backward_nodes > 0,
        "{sizes:?}"
    );
    let n = |v: usize| v as u64;
    assert_eq!(
        g.launches
            + g.memsets
            + g.dtod
            + n(sizes.forward_nodes + sizes.backward_nodes + sizes.fixed_grads),
        e.launches + e.memsets + e.dtod + n(sizes.seeds),
        "graphs {sizes:?}\neager {e}\ngraphed {g}"
    );
    assert!(
        g.launches * 2 < e.launches,
        "the dense part is most of the step's launches: eager {e}, graphed {g}"
    );

    // An update that is not in place: the first parameter gets a new buffer.
    let mut rng = Rng::new(0);
    let step = trainer
        .forward_backward(&graphed, &common::u8_views(&a), &targets, &mut rng)
        .unwrap();
    assert!(trainer.reads_params_of(&graphed));
    trainer
        .update(&mut graphed, &step, |p, _, _| {
            p[0] = p[0].to_device(Device::Cpu)?.to_device(device)?;
            Ok(())
        })
        .unwrap();
    assert!(!trainer.reads_params_of(&graphed));
    let err = trainer
        .forward_backward(&graphed, &common::u8_views(&a), &targets, &mut rng)
        .err()
        .expect("a moved parameter")
        .to_string();
    assert!(err.contains("moved to another buffer"), "{err}");
}

/// A read-back inside a captured training forward is an error naming the copy and
/// the kernel before it; the trainer refuses a CPU model.
#[test]
fn forbidden_calls_in_a_training_capture_are_named_errors_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let (a, _, targets) = two_batches();
    let m = common::fixture_model(device);
    let input = upload_u8(&common::u8_views(&a), &m.config.transform, device).unwrap();
    // A fresh tape per run: the eager run's blocks are back in the cache for the
    // capture.
    let run = || -> kestrel::Result<Vec<f32>> {
        let tape = Tape::new();
        for n in m.params.trainable_names() {
            tape.watch(m.params.get(&n)?);
        }
        let _g = tape.activate();
        let il = transform_uploaded(&input)?;
        let (features, _) = m.dense_forward(&m.ctx(true), &il, &mut |_| Ok(()))?;
        features[4].to_vec::<f32>()
    };
    // Warm the cache until a run takes nothing from the driver (the first run's
    // one-time tables change what is free when).
    let mut eager = run().unwrap();
    for _ in 0..3 {
        let c = device.counters();
        eager = run().unwrap();
        if c.delta().driver_allocs == 0 {
            break;
        }
    }
    let err = match capture(device, run) {
        Ok(_) => panic!("the capture should have failed"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("device-to-host copy of {} bytes", eager.len() * 4))
            && err.contains("after kernel")
            && !err.contains("after kernel none"),
        "{err}"
    );
    eprintln!("refused in capture: {err}");
    // The device works normally afterwards.
    assert_eq!(run().unwrap().len(), eager.len());

    let cpu = common::fixture_model(Device::Cpu);
    let e = GraphedTrainer::new(&cpu, &common::u8_views(&a), &targets)
        .err()
        .expect("a CPU model has no graphs")
        .to_string();
    assert!(e.contains("GraphedTrainer") && e.contains("CPU"), "{e}");
}
