//! conv2d forward on the layer shapes of ResNet-50 + FPN for an 800x1216 image
//! (batch 1, f32), beside the square 1024³ f32 GEMM as the machine's reference speed.
//! Named `conv2d/<device>/<shape>` and `gemm/<device>/1024`; throughput is in
//! FLOP/s (criterion's "elem/s"), and a table of GFLOP/s and of each conv's ratio to
//! the GEMM of its device is printed at the end.
//!
//! `cargo bench --bench conv` (add a filter such as `conv2d/cpu/layer1` to run fewer).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kestrel::ops::conv2d::{conv2d_forward, conv2d_output_size, Conv2dParams};
use kestrel::ops::linear::matmul;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// One convolution layer: name, Cin, Cout, kernel, stride, padding, input H x W.
struct Layer {
    name: &'static str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    hw: (usize, usize),
}

const fn layer(
    name: &'static str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    hw: (usize, usize),
) -> Layer {
    Layer {
        name,
        cin,
        cout,
        k,
        stride,
        pad: k / 2,
        hw,
    }
}

/// ResNet-50 + FPN on an 800x1216 input: the stem, the 1x1 / 3x3 / 1x1 convs of one
/// bottleneck per stage (input widths of a block after the first), the FPN laterals
/// and output convs at their extreme sizes.
const LAYERS: &[Layer] = &[
    layer("stem_7x7s2_3-64_800x1216", 3, 64, 7, 2, (800, 1216)),
    layer("layer1_1x1_64-64_200x304", 64, 64, 1, 1, (200, 304)),
    layer("layer1_3x3_64-64_200x304", 64, 64, 3, 1, (200, 304)),
    layer("layer1_1x1_64-256_200x304", 64, 256, 1, 1, (200, 304)),
    layer("layer2_1x1_512-128_100x152", 512, 128, 1, 1, (100, 152)),
    layer("layer2_3x3_128-128_100x152", 128, 128, 3, 1, (100, 152)),
    layer("layer2_1x1_128-512_100x152", 128, 512, 1, 1, (100, 152)),
    layer("layer3_1x1_1024-256_50x76", 1024, 256, 1, 1, (50, 76)),
    layer("layer3_3x3_256-256_50x76", 256, 256, 3, 1, (50, 76)),
    layer("layer3_1x1_256-1024_50x76", 256, 1024, 1, 1, (50, 76)),
    layer("layer4_1x1_2048-512_25x38", 2048, 512, 1, 1, (25, 38)),
    layer("layer4_3x3_512-512_25x38", 512, 512, 3, 1, (25, 38)),
    layer("layer4_1x1_512-2048_25x38", 512, 2048, 1, 1, (25, 38)),
    layer("fpn_lateral_1x1_2048-256_25x38", 2048, 256, 1, 1, (25, 38)),
    layer(
        "fpn_lateral_1x1_256-256_200x304",
        256,
        256,
        1,
        1,
        (200, 304),
    ),
    layer("fpn_out_3x3_256-256_200x304", 256, 256, 3, 1, (200, 304)),
];

impl Layer {
    fn params(&self) -> Conv2dParams {
        Conv2dParams::new(self.stride, self.pad, 1)
    }
    /// Multiply-adds times two.
    fn flops(&self) -> u64 {
        let (oh, ow) = conv2d_output_size(self.hw, (self.k, self.k), &self.params())
            .expect("bench layers fit their inputs");
        2 * (self.cout * self.cin * self.k * self.k * oh * ow) as u64
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, shape.to_vec()).expect("sizes match")
}

/// Seconds per iteration of every sample, by benchmark id, for the final table.
static SAMPLES: Mutex<Vec<(String, u64, Vec<f64>)>> = Mutex::new(Vec::new());

fn record(id: &str, flops: u64, secs_per_iter: f64) {
    let mut s = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    match s.iter_mut().find(|(i, _, _)| i == id) {
        Some((_, _, v)) => v.push(secs_per_iter),
        None => s.push((id.to_string(), flops, vec![secs_per_iter])),
    }
}

/// The square 1024³ product of a device: the speed each conv is compared with. The
/// machines these benches run on are often shared, so one reference run is timed
/// after every conv sample (recorded as `<conv id>#ref`) and each ratio compares
/// samples taken in the same window.
struct Reference<'a> {
    run: Box<dyn FnMut() + 'a>,
    flops: u64,
}

/// Bench `f` as `group/name` with `flops` per call; `sync` waits for the device.
fn bench(
    c: &mut Criterion,
    (group, name): (&str, &str),
    flops: u64,
    f: &mut dyn FnMut(),
    sync: &dyn Fn(),
    mut reference: Option<&mut Reference<'_>>,
) {
    let id = format!("{group}/{name}");
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::from_parameter(name), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            sync();
            let el = t.elapsed();
            record(&id, flops, el.as_secs_f64() / iters as f64);
            if let Some(r) = reference.as_deref_mut() {
                let t = Instant::now();
                (r.run)();
                sync();
                record(&format!("{id}#ref"), r.flops, t.elapsed().as_secs_f64());
            }
            el
        })
    });
    g.finish();
}

fn conv_benches(c: &mut Criterion, dev: Device, tag: &str, sync: &dyn Fn(), r: &mut Reference<'_>) {
    for (i, l) in LAYERS.iter().enumerate() {
        let x = random(&[1, l.cin, l.hw.0, l.hw.1], i as u64)
            .to_device(dev)
            .unwrap();
        let w = random(&[l.cout, l.cin, l.k, l.k], 100 + i as u64)
            .to_device(dev)
            .unwrap();
        let b = random(&[l.cout], 200 + i as u64).to_device(dev).unwrap();
        let p = l.params();
        let mut run = || {
            conv2d_forward(&x, &w, Some(&b), &p).unwrap();
        };
        let group = format!("conv2d/{tag}");
        bench(
            c,
            (&group, l.name),
            l.flops(),
            &mut run,
            sync,
            Some(&mut *r),
        );
    }
}

const GEMM_N: usize = 1024;

/// Operands of the square product.
fn square_operands(dev: Device) -> (Tensor, Tensor) {
    let a = random(&[GEMM_N, GEMM_N], 1).to_device(dev).unwrap();
    let b = random(&[GEMM_N, GEMM_N], 2).to_device(dev).unwrap();
    (a, b)
}

/// The gemm crate's square product on all threads: the CPU reference.
fn gemm_cpu_reference<'a>(a: &'a [f32], b: &'a [f32], d: &'a mut [f32]) -> Reference<'a> {
    let n = GEMM_N;
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let run = move || {
        // SAFETY: three dense n x n row-major matrices (column stride 1, row stride n).
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                d.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    Reference {
        run: Box::new(run),
        flops: 2 * (n * n * n) as u64,
    }
}

/// Our SGEMM kernel on the square product: the CUDA reference.
fn gemm_cuda_reference<'a>(a: &'a Tensor, b: &'a Tensor) -> Reference<'a> {
    Reference {
        run: Box::new(move || {
            matmul(a, b).unwrap();
        }),
        flops: 2 * (GEMM_N * GEMM_N * GEMM_N) as u64,
    }
}

/// The fastest sample: on a machine shared with other work, the least disturbed one.
fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// GFLOP/s (best sample) of each bench, and each conv's ratio to the reference
/// product timed beside it.
fn print_table() {
    let s = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let gflops = |f: u64, v: &[f64]| f as f64 / best(v) / 1e9;
    println!(
        "\n{:<48} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "bench", "GFLOP", "ms", "GFLOP/s", "ref GF/s", "ratio"
    );
    for (id, f, v) in s.iter().filter(|(id, _, _)| !id.ends_with("#ref")) {
        let g = gflops(*f, v);
        let r = s.iter().find(|(r, _, _)| *r == format!("{id}#ref"));
        let (rg, ratio) = match r {
            Some((_, rf, rv)) => {
                let rg = gflops(*rf, rv);
                (format!("{rg:.1}"), format!("{:.0}%", 100.0 * g / rg))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{id:<48} {:>8.2} {:>9.2} {g:>9.1} {rg:>9} {ratio:>7}",
            *f as f64 / 1e9,
            best(v) * 1e3
        );
    }
    println!(
        "(threads: {}; best sample of each; ref = the device's {GEMM_N}³ GEMM timed after each sample)",
        rayon::current_num_threads()
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (a, b) = square_operands(Device::Cpu);
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let mut d = vec![0f32; GEMM_N * GEMM_N];
    let mut r = gemm_cpu_reference(&a, &b, &mut d);
    let flops = r.flops;
    bench(
        &mut c,
        ("gemm/cpu", "1024"),
        flops,
        &mut r.run,
        &|| {},
        None,
    );
    conv_benches(&mut c, Device::Cpu, "cpu", &|| {}, &mut r);
    if let Ok(gpu) = kestrel::device::gpu::device(0) {
        let sync = move || gpu.backend.synchronize().expect("device synchronize");
        let dev = Device::Cuda(0);
        let (a, b) = square_operands(dev);
        let mut r = gemm_cuda_reference(&a, &b);
        let flops = r.flops;
        bench(
            &mut c,
            ("gemm/cuda", "1024"),
            flops,
            &mut r.run,
            &sync,
            None,
        );
        conv_benches(&mut c, dev, "cuda", &sync, &mut r);
    }
    c.final_summary();
    print_table();
}
