//! SyncBatchNorm (`kestrel::dist::sync_batch_norm`, `norm = "sync_bn"`) with 2 and 4
//! ranks, one thread per rank over the in-process group, on the CPU and the emulated
//! device:
//!
//! - the ranks together equal plain batch norm on the concatenated batch in one
//!   process: outputs, running statistics (identical on every rank), input gradients,
//!   and weight/bias gradients summed over the ranks (the gradient reducer then
//!   averages them), against `ops::norm::batch_norm` in f32 on the same device and
//!   against the same in f64 on the CPU (tolerances at the assertions);
//! - ranks with different batch sizes, including a rank with no images (torch's rule:
//!   it joins the collectives with a zero count, gets an empty output, no weight/bias
//!   gradient);
//! - an f64 finite-difference check of the gradient of the loss summed over ranks;
//! - errors: one value per channel over all ranks, ranks with different channels.

mod common;

use std::time::Duration;

use common::*;
use kestrel::autograd::Tape;
use kestrel::dist::{local_group, set_sync_bn_group, sync_batch_norm, Comm, CommStream};
use kestrel::ops::norm::{batch_norm, BatchNormConfig};
use kestrel::{DType, Device, Result, Tensor};

const C: usize = 3;
const HW: [usize; 2] = [3, 2];
const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

fn cfg() -> BatchNormConfig {
    BatchNormConfig {
        training: true,
        momentum: MOMENTUM,
        eps: EPS,
    }
}

fn shape(n: usize) -> Vec<usize> {
    vec![n, C, HW[0], HW[1]]
}

/// Rank `r`'s input and upstream gradient, f64 on the host. Offsets per channel make
/// the mean large against the spread, which a sum-of-squares variance would not
/// survive in f32.
fn rank_data(r: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let per = n * C * HW[0] * HW[1];
    let plane = HW[0] * HW[1];
    let x = randn(10 + r as u64, per)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v * 2.0 + 5.0 * ((i / plane) % C) as f64 - 3.0)
        .collect();
    (x, randn(50 + r as u64, per))
}

/// weight, bias, running_mean, running_var.
fn channel_params() -> [Vec<f64>; 4] {
    [
        vec![1.5, -0.5, 0.8],
        vec![0.1, 0.2, -0.3],
        vec![0.2, -0.1, 0.4],
        vec![1.0, 2.0, 0.5],
    ]
}

fn on(v: &[f64], shape: &[usize], dtype: DType, dev: Device) -> Tensor {
    let t = match dtype {
        DType::F64 => Tensor::from_vec(v.to_vec(), shape.to_vec()).unwrap(),
        _ => Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            shape.to_vec(),
        )
        .unwrap(),
    };
    t.to_device(dev).unwrap()
}

/// What one rank (or the one-process reference) computes.
#[derive(Clone, Debug)]
struct Out {
    y: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    gx: Vec<f64>,
    /// `None`: no gradient (a rank with no images).
    gw: Option<Vec<f64>>,
    gb: Option<Vec<f64>>,
    /// Emulated kernels this rank's thread launched.
    launched: Vec<String>,
}

/// Forward and backward of `norm` on x (shaped for `n` images) with upstream `gy`.
fn run_norm(
    n: usize,
    x: &[f64],
    gy: &[f64],
    dtype: DType,
    dev: Device,
    norm: impl Fn(&Tensor, &[Tensor; 4]) -> Result<kestrel::ops::norm::BatchNormOutput>,
) -> Result<Out> {
    let s = shape(n);
    let xt = on(x, &s, dtype, dev);
    let ps = channel_params().map(|v| on(&v, &[C], dtype, dev));
    let tape = Tape::new();
    for t in [&xt, &ps[0], &ps[1]] {
        tape.watch(t);
    }
    let out = {
        let _a = tape.activate();
        norm(&xt, &ps)?
    };
    let g = tape.backward_with(&out.y, on(gy, &s, dtype, dev))?;
    let v = |t: &Tensor| t.to_vec::<f64>().unwrap();
    Ok(Out {
        y: v(&out.y),
        running_mean: v(&out.running_mean),
        running_var: v(&out.running_var),
        gx: g.get(&xt).map(v).unwrap_or_else(|| vec![0.0; x.len()]),
        gw: g.get(&ps[0]).map(v),
        gb: g.get(&ps[1]).map(v),
        launched: kestrel::device::emu::take_thread_launches(),
    })
}

fn plain(x: &Tensor, p: &[Tensor; 4]) -> Result<kestrel::ops::norm::BatchNormOutput> {
    batch_norm(x, &p[0], &p[1], &p[2], &p[3], cfg())
}

fn synced(x: &Tensor, p: &[Tensor; 4]) -> Result<kestrel::ops::norm::BatchNormOutput> {
    sync_batch_norm(x, &p[0], &p[1], &p[2], &p[3], cfg())
}

/// Each rank `r` runs `f(r)` on its own thread with the SyncBatchNorm group installed.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let comms = local_group(world, Duration::from_secs(30)).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let comm: Comm = std::sync::Arc::new(c);
                set_sync_bn_group(Some(CommStream::new(comm)));
                let out = f(r);
                set_sync_bn_group(None);
                out
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn concat(parts: impl Iterator<Item = Vec<f64>>) -> Vec<f64> {
    parts.flatten().collect()
}

/// The ranks' data concatenated along N.
fn whole_batch(sizes: &[usize]) -> (usize, Vec<f64>, Vec<f64>) {
    let data: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(r, &n)| rank_data(r, n))
        .collect();
    (
        sizes.iter().sum(),
        concat(data.iter().map(|d| d.0.clone())),
        concat(data.iter().map(|d| d.1.clone())),
    )
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    rel_err(a, b)
}

/// The ranks of `sizes` against one process on the whole batch: plain batch norm in
/// f32 on `dev`, and in f64 on the CPU.
fn check_world(dev: Device, sizes: &[usize]) {
    let world = sizes.len();
    let sz = sizes.to_vec();
    let ranks = on_ranks(world, move |r| {
        let (x, gy) = rank_data(r, sz[r]);
        run_norm(sz[r], &x, &gy, DType::F32, dev, synced).unwrap()
    });
    let (n, x, gy) = whole_batch(sizes);
    let want32 = run_norm(n, &x, &gy, DType::F32, dev, plain).unwrap();
    let want64 = run_norm(n, &x, &gy, DType::F64, Device::Cpu, plain).unwrap();

    // The running statistics are computed from the same merged numbers on every rank.
    for (r, o) in ranks.iter().enumerate() {
        assert_eq!(
            o.running_mean, ranks[0].running_mean,
            "rank {r} running_mean"
        );
        assert_eq!(o.running_var, ranks[0].running_var, "rank {r} running_var");
        if sizes[r] == 0 {
            assert!(o.y.is_empty(), "rank {r}: empty output for no images");
            assert!(
                o.gw.is_none() && o.gb.is_none(),
                "rank {r}: torch gives no gw/gb"
            );
        }
        if dev != Device::Cpu && sizes[r] > 0 {
            for k in [
                "batch_norm_stats_partial_f32",
                "batch_norm_grad_partial_f32",
                "batch_norm_bwd_x_f32",
            ] {
                assert!(
                    o.launched.iter().any(|l| l == k),
                    "rank {r} did not launch {k}: {:?}",
                    o.launched
                );
            }
        }
    }
    let y = concat(ranks.iter().map(|o| o.y.clone()));
    let gx = concat(ranks.iter().map(|o| o.gx.clone()));
    let sum = |f: &dyn Fn(&Out) -> Option<Vec<f64>>| -> Vec<f64> {
        let mut s = vec![0.0; C];
        for o in &ranks {
            if let Some(v) = f(o) {
                s.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
        }
        s
    };
    let gw = sum(&|o| o.gw.clone());
    let gb = sum(&|o| o.gb.clone());
    let got = [
        ("y", y),
        ("running_mean", ranks[0].running_mean.clone()),
        ("running_var", ranks[0].running_var.clone()),
        ("gx", gx),
        ("gw (sum over ranks)", gw),
        ("gb (sum over ranks)", gb),
    ];
    let want = |o: &Out| {
        [
            o.y.clone(),
            o.running_mean.clone(),
            o.running_var.clone(),
            o.gx.clone(),
            o.gw.clone().unwrap(),
            o.gb.clone().unwrap(),
        ]
    };
    // f32 plain BN on the same device: the same formulas, the sums in another order
    // (per rank, then merged) — a few f32 ulps. f64 on the CPU: f32 rounding only.
    for ((name, g), (w32, w64)) in got.iter().zip(want(&want32).iter().zip(want(&want64))) {
        let (e32, e64) = (max_rel(g, w32), max_rel(g, &w64));
        println!(
            "{dev:?} sizes {sizes:?} {name}: rel err {e32:.2e} vs f32 plain, {e64:.2e} vs f64"
        );
        assert!(
            e32 <= 1e-6,
            "{name}: rel err {e32:.3e} > 1e-6 against f32 plain BN"
        );
        assert!(
            e64 <= 1e-5,
            "{name}: rel err {e64:.3e} > 1e-5 against f64 plain BN"
        );
    }
}

#[test]
fn two_and_four_ranks_equal_plain_bn_on_the_whole_batch_cpu() {
    check_world(Device::Cpu, &[2, 2]);
    check_world(Device::Cpu, &[1, 1, 1, 1]);
}

#[test]
fn different_batch_sizes_and_an_empty_rank_cpu() {
    check_world(Device::Cpu, &[3, 1]);
    check_world(Device::Cpu, &[1, 2, 0, 3]);
    check_world(Device::Cpu, &[0, 2]);
}

#[test]
fn two_and_four_ranks_equal_plain_bn_on_the_whole_batch_emulated() {
    let dev = emulated();
    check_world(dev, &[2, 2]);
    check_world(dev, &[1, 2, 1, 3]);
}

#[test]
fn an_empty_rank_emulated() {
    check_world(emulated(), &[2, 0, 1, 0]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn two_and_four_ranks_equal_plain_bn_on_the_whole_batch_cuda() {
    let dev = cuda();
    check_world(dev, &[2, 2]);
    check_world(dev, &[1, 2, 0, 3]);
}

/// sum over ranks of sum(y_r * gy_r), each rank's x perturbed as given, in f64.
fn total_loss(sizes: &[usize], xs: Vec<Vec<f64>>, params: [Vec<f64>; 2]) -> f64 {
    let sz = sizes.to_vec();
    let parts = on_ranks(sizes.len(), move |r| {
        let s = shape(sz[r]);
        let x = on(&xs[r], &s, DType::F64, Device::Cpu);
        let [_, _, rm, rv] = channel_params().map(|v| on(&v, &[C], DType::F64, Device::Cpu));
        let w = on(&params[0], &[C], DType::F64, Device::Cpu);
        let b = on(&params[1], &[C], DType::F64, Device::Cpu);
        let y = sync_batch_norm(&x, &w, &b, &rm, &rv, cfg()).unwrap().y;
        let gy = rank_data(r, sz[r]).1;
        y.to_vec::<f64>()
            .unwrap()
            .iter()
            .zip(gy)
            .map(|(a, b)| a * b)
            .sum::<f64>()
    });
    parts.iter().sum()
}

#[test]
fn gradient_of_the_loss_over_all_ranks_matches_finite_differences_f64() {
    for sizes in [vec![2, 1], vec![1, 0, 2, 1]] {
        let sz = sizes.clone();
        let analytic = on_ranks(sizes.len(), move |r| {
            let (x, gy) = rank_data(r, sz[r]);
            run_norm(sz[r], &x, &gy, DType::F64, Device::Cpu, synced).unwrap()
        });
        let xs: Vec<Vec<f64>> = sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| rank_data(r, n).0)
            .collect();
        let [w, b, _, _] = channel_params();
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        let mut check = |what: String, num: f64, ana: f64| {
            let e = (num - ana).abs() / ana.abs().max(1.0);
            worst = worst.max(e);
            assert!(e < 1e-6, "{what}: numeric {num:.9} vs analytic {ana:.9}");
        };
        for r in 0..sizes.len() {
            for i in 0..xs[r].len() {
                let at = |d: f64| {
                    let mut p = xs.clone();
                    p[r][i] += d;
                    total_loss(&sizes, p, [w.clone(), b.clone()])
                };
                let num = (at(h) - at(-h)) / (2.0 * h);
                check(
                    format!("{sizes:?} dx rank {r} [{i}]"),
                    num,
                    analytic[r].gx[i],
                );
            }
        }
        for (k, name) in [(0usize, "weight"), (1, "bias")] {
            for c in 0..C {
                let at = |d: f64| {
                    let mut p = [w.clone(), b.clone()];
                    p[k][c] += d;
                    total_loss(&sizes, xs.clone(), p)
                };
                let num = (at(h) - at(-h)) / (2.0 * h);
                // The loss over all ranks: each rank contributes its own gw / gb.
                let ana: f64 = analytic
                    .iter()
                    .filter_map(|o| if k == 0 { o.gw.as_ref() } else { o.gb.as_ref() })
                    .map(|g| g[c])
                    .sum();
                check(format!("{sizes:?} d{name}[{c}]"), num, ana);
            }
        }
        println!("{sizes:?}: worst relative difference {worst:.2e}");
    }
}

#[test]
fn one_value_per_channel_over_all_ranks_is_an_error_on_every_rank() {
    let errs = on_ranks(2, |r| {
        let n = if r == 0 { 1 } else { 0 };
        let x = Tensor::zeros([n, C, 1, 1], DType::F32, Device::Cpu).unwrap();
        let p = Tensor::full([C], 1.0, DType::F32, Device::Cpu).unwrap();
        sync_batch_norm(&x, &p, &p, &p, &p, cfg())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    for e in errs {
        assert!(
            e.contains("sync_batch_norm") && e.contains("more than one value"),
            "{e}"
        );
    }
}

#[test]
fn ranks_with_different_channels_are_an_error() {
    let errs = on_ranks(2, |r| {
        let c = 2 + r;
        let x = Tensor::zeros([2, c, 2, 2], DType::F32, Device::Cpu).unwrap();
        let p = Tensor::full([c], 1.0, DType::F32, Device::Cpu).unwrap();
        sync_batch_norm(&x, &p, &p, &p, &p, cfg())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    for e in errs {
        assert!(e.contains("sync_batch_norm") && e.contains("rank"), "{e}");
    }
}

#[test]
fn without_a_group_it_is_plain_batch_norm() {
    let (x, gy) = rank_data(0, 2);
    let a = run_norm(2, &x, &gy, DType::F32, Device::Cpu, synced).unwrap();
    let b = run_norm(2, &x, &gy, DType::F32, Device::Cpu, plain).unwrap();
    assert_eq!(a.y, b.y);
    assert_eq!(a.gx, b.gx);
    assert_eq!(a.running_var, b.running_var);
}

#[test]
fn sync_bn_is_a_backbone_norm_and_the_layer_reduces_over_ranks() {
    use kestrel::nn::resnet::ResNetConfig;
    use kestrel::nn::{Ctx, Norm2d, NormKind, ParamStore};
    let c: ResNetConfig =
        toml::from_str("depth = 18\nnorm = \"sync_bn\"\nbn_momentum = 0.05\nbn_eps = 1e-3")
            .unwrap();
    assert_eq!(
        c.norm,
        NormKind::SyncBatch {
            eps: 1e-3,
            momentum: 0.05
        }
    );
    // The layer in training mode: two ranks' outputs are plain batch norm of the
    // concatenated batch (not of each rank's own images).
    let sizes = [2usize, 1];
    let ranks = on_ranks(2, move |r| {
        let layer = Norm2d {
            name: "bn".into(),
            c: C,
            kind: NormKind::SyncBatch {
                eps: EPS,
                momentum: MOMENTUM,
            },
        };
        let mut specs = Vec::new();
        layer.specs(&mut specs);
        let mut store = ParamStore::init(&specs, 0).unwrap();
        let p = channel_params();
        for (name, v) in ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .zip(p)
        {
            store
                .set(&format!("bn.{name}"), on(&v, &[C], DType::F32, Device::Cpu))
                .unwrap();
        }
        let x = on(
            &rank_data(r, sizes[r]).0,
            &shape(sizes[r]),
            DType::F32,
            Device::Cpu,
        );
        let ctx = Ctx::new(&store, true);
        let y = layer.forward(&ctx, &x).unwrap().to_vec::<f64>().unwrap();
        let updates = ctx.take_buffer_updates();
        assert_eq!(updates.len(), 2, "running statistics updated");
        y
    });
    let (n, x, gy) = whole_batch(&sizes);
    let want = run_norm(n, &x, &gy, DType::F32, Device::Cpu, plain).unwrap();
    let got = concat(ranks.into_iter());
    let e = rel_err(&got, &want.y);
    assert!(
        e <= 1e-6,
        "Norm2d sync_bn vs plain BN on the whole batch: {e:.3e}"
    );
}
