//! `kestrel bench --ops` on the CPU: every distinct convolution of ResNet-50-FPN at
//! 800x1216 (scripts/resnet50_fpn_layers.txt) beside the square GEMM of the same
//! FLOPs, and one SGD step over the detector's trainable parameters.
//!
//! The conv and its GEMM alternate (conv, GEMM, conv, GEMM, ...) and each keeps its
//! fastest run: on a shared machine the two see the same load, so their ratio holds
//! even where the absolute GFLOP/s do not.

use std::time::Instant;

use crate::detection::FasterRcnn;
use crate::ops::conv2d::{conv2d_output_size, Conv2dParams};
use crate::ops::linear::matmul;
use crate::ops::{self, Epilogue};

use crate::rng::Rng;
use crate::{Error, Result, Tensor};

/// The layer table (shared with benches/tc_conv.rs and scripts/bench_tc_torch.py).
const LAYERS: &str = include_str!("../../scripts/resnet50_fpn_layers.txt");

/// One conv line of the table: name, Cin, H, W, Cout, kernel, stride, padding.
struct ConvShape {
    name: String,
    cin: usize,
    hw: (usize, usize),
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

/// The layers of the table; `KESTREL_BENCH_OPS_LAYERS` (names separated by commas)
/// keeps only those, for a quick look at a few shapes.
fn conv_shapes() -> Vec<ConvShape> {
    let only = std::env::var("KESTREL_BENCH_OPS_LAYERS").ok();
    let keep = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    };
    LAYERS
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.first() != Some(&"conv") || f.len() < 11 {
                return None;
            }
            let n = |i: usize| f[i].parse::<usize>().ok();
            Some(ConvShape {
                name: f[1].to_string(),
                cin: n(3)?,
                hw: (n(4)?, n(5)?),
                cout: n(6)?,
                k: n(7)?,
                stride: n(8)?,
                pad: n(9)?,
            })
        })
        .filter(|l| keep(&l.name))
        .collect()
}

fn uniform(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, shape.to_vec())
}

/// Seconds of the fastest of `reps` calls of each of `a` and `b`, called alternately.
fn interleaved(
    reps: usize,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
    // One untimed call each: the pool and the caches warm up.
    a()?;
    b()?;
    for _ in 0..reps {
        let t = Instant::now();
        a()?;
        ta = ta.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b()?;
        tb = tb.min(t.elapsed().as_secs_f64());
    }
    Ok((ta, tb))
}

/// Prints, per layer shape, the fused conv's GFLOP/s (bias + ReLU epilogue, as the
/// inference path runs it), the square GEMM's of the same FLOPs and their ratio;
/// then the RPN head's joint 3x3 + 1x1 row, the shapes under 60% and the
/// FLOP-weighted ratio (the RPN's standalone 1x1 rows are shown but not counted:
/// inference runs them in the joint row).
pub fn conv_table(reps: usize) -> Result<()> {
    println!(
        "conv2d vs square GEMM of the same FLOPs (CPU, {} threads, fastest of {reps} interleaved runs)",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>24} {:>8} {:>9} {:>6} {:>9} {:>6}",
        "layer", "Cin>Cout k/s HxW", "GFLOP", "conv GF/s", "n", "gemm GF/s", "ratio"
    );
    let (mut below, mut conv_s, mut gemm_s) = (Vec::new(), 0.0, 0.0);
    for (i, l) in conv_shapes().iter().enumerate() {
        let p = Conv2dParams::new(l.stride, l.pad, 1);
        let (oh, ow) = conv2d_output_size(l.hw, (l.k, l.k), &p)
            .ok_or_else(|| Error::invalid("bench --ops", format!("{}: no output", l.name)))?;
        let flops = 2.0 * (l.cout * l.cin * l.k * l.k * oh * ow) as f64;
        let x = uniform(&[1, l.cin, l.hw.0, l.hw.1], i as u64)?;
        let w = uniform(&[l.cout, l.cin, l.k, l.k], 100 + i as u64)?;
        let b = uniform(&[l.cout], 200 + i as u64)?;
        // The square product with (about) the same FLOPs: n³ = flops / 2.
        let n = ((flops / 2.0).cbrt().round() as usize).max(1);
        let ga = uniform(&[n, n], 300 + i as u64)?;
        let gb = uniform(&[n, n], 400 + i as u64)?;
        let ep = Epilogue {
            shift: Some(&b),
            relu: true,
            ..Default::default()
        };
        let (tc, tg) = interleaved(
            reps,
            || ops::conv2d_fused(&x, &w, &p, &ep).map(drop),
            || matmul(&ga, &gb).map(drop),
        )?;
        let gflops_g = 2.0 * (n * n * n) as f64 / tg / 1e9;
        let gflops_c = flops / tc / 1e9;
        let ratio = gflops_c / gflops_g;
        // The RPN's 1x1 convs run inside the 3x3 conv's tiles on the CPU (the
        // rpn.joint row): their standalone rows are shown, not counted.
        let standalone = is_rpn_1x1(&l.name);
        if ratio < 0.6 && !standalone {
            below.push(l.name.clone());
        }
        if !standalone {
            conv_s += tc;
            gemm_s += tg * flops / (2.0 * (n * n * n) as f64);
        }
        println!(
            "{:<22} {:>24} {:>8.2} {:>9.1} {:>6} {:>9.1} {:>5.0}%",
            l.name,
            format!(
                "{}>{} {}/{} {}x{}",
                l.cin, l.cout, l.k, l.stride, l.hw.0, l.hw.1
            ),
            flops / 1e9,
            gflops_c,
            n,
            gflops_g,
            100.0 * ratio
        );
    }
    let (tc, tg, below_joint) = rpn_joint_row(reps)?;
    conv_s += tc;
    gemm_s += tg;
    if below_joint {
        below.push("rpn.joint.p2".into());
    }
    println!(
        "all shapes: conv {:.0} ms, square GEMMs of the same FLOPs {:.0} ms ({:.0}%); under 60%: {}",
        conv_s * 1e3,
        gemm_s * 1e3,
        100.0 * gemm_s / conv_s,
        if below.is_empty() {
            "none".to_string()
        } else {
            below.join(", ")
        }
    );
    Ok(())
}

/// Per layer shape, the backward's two products beside the forward: dL/dx
/// (`conv2d_backward_input`) and dL/dw (`conv2d_backward_weight`) in GFLOP/s
/// (each has the forward's FLOPs), fastest of `reps` interleaved runs, and the
/// square GEMM of the same FLOPs; then the FLOP-weighted totals. The stem's dL/dx is
/// not shown (its input is the image, which needs no gradient).
pub fn conv_backward_table(reps: usize) -> Result<()> {
    use crate::ops::conv2d::{conv2d_backward_input, conv2d_backward_weight};
    println!(
        "conv2d backward vs square GEMM of the same FLOPs (CPU, {} threads, fastest of {reps} interleaved runs)",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>24} {:>8} {:>9} {:>6} {:>9} {:>6} {:>6}",
        "layer", "Cin>Cout k/s HxW", "GFLOP", "gemm GF/s", "dgrad", "GF/s", "wgrad", "GF/s"
    );
    let (mut td_all, mut tw_all, mut tg_all) = (0.0, 0.0, 0.0);
    for (i, l) in conv_shapes().iter().enumerate() {
        if is_rpn_1x1(&l.name) {
            continue;
        }
        let p = Conv2dParams::new(l.stride, l.pad, 1);
        let (oh, ow) = conv2d_output_size(l.hw, (l.k, l.k), &p)
            .ok_or_else(|| Error::invalid("bench --ops", format!("{}: no output", l.name)))?;
        let flops = 2.0 * (l.cout * l.cin * l.k * l.k * oh * ow) as f64;
        let x = uniform(&[1, l.cin, l.hw.0, l.hw.1], i as u64)?;
        let w = uniform(&[l.cout, l.cin, l.k, l.k], 100 + i as u64)?;
        let gy = uniform(&[1, l.cout, oh, ow], 500 + i as u64)?;
        let n = ((flops / 2.0).cbrt().round() as usize).max(1);
        let ga = uniform(&[n, n], 300 + i as u64)?;
        let gb = uniform(&[n, n], 400 + i as u64)?;
        let stem = l.name == "stem";
        let (td, tg) = if stem {
            (
                f64::NAN,
                interleaved(reps, || Ok(()), || matmul(&ga, &gb).map(drop))?.1,
            )
        } else {
            interleaved(
                reps,
                || conv2d_backward_input(&gy, &w, x.dims(), &p).map(drop),
                || matmul(&ga, &gb).map(drop),
            )?
        };
        let (tw, _) = interleaved(
            reps,
            || conv2d_backward_weight(&x, &gy, w.dims(), &p).map(drop),
            || Ok(()),
        )?;
        let gg = 2.0 * (n * n * n) as f64 / tg / 1e9;
        let scale = flops / (2.0 * (n * n * n) as f64);
        if !stem {
            td_all += td;
            tg_all += tg * scale;
        }
        tw_all += tw;
        tg_all += tg * scale;
        println!(
            "{:<22} {:>24} {:>8.2} {:>9.1} {:>5.0}% {:>6.1} {:>5.0}% {:>6.1}",
            l.name,
            format!(
                "{}>{} {}/{} {}x{}",
                l.cin, l.cout, l.k, l.stride, l.hw.0, l.hw.1
            ),
            flops / 1e9,
            gg,
            100.0 * flops / td / 1e9 / gg,
            flops / td / 1e9,
            100.0 * flops / tw / 1e9 / gg,
            flops / tw / 1e9,
        );
    }
    println!(
        "all shapes: dgrad {:.0} ms, wgrad {:.0} ms, square GEMMs of the same FLOPs {:.0} ms ({:.0}%)",
        td_all * 1e3,
        tw_all * 1e3,
        tg_all * 1e3,
        100.0 * tg_all / (td_all + tw_all)
    );
    Ok(())
}

/// The RPN head's objectness and box-delta 1x1 convs (256 -> 3 and 256 -> 12):
/// inference on the CPU runs them inside the 3x3 conv's output tiles.
fn is_rpn_1x1(name: &str) -> bool {
    name.starts_with("rpn.cls.") || name.starts_with("rpn.bbox.")
}

/// The RPN head at P2 (200x304) as CPU inference runs it: the 3x3 conv with bias
/// and ReLU, then objectness and deltas as one 15-channel 1x1 conv on each output
/// tile (`conv2d_relu_pointwise_cpu`), beside the square GEMM of the same FLOPs.
/// Prints the row; returns (conv seconds, square-GEMM seconds scaled to the conv's
/// FLOPs, under 60%).
fn rpn_joint_row(reps: usize) -> Result<(f64, f64, bool)> {
    let (c, (h, w), a) = (256, (200, 304), 3);
    let p = Conv2dParams::new(1, 1, 1);
    let flops = 2.0 * ((c * c * 9 + 5 * a * c) * h * w) as f64;
    let x = uniform(&[1, c, h, w], 900)?;
    let w3 = uniform(&[c, c, 3, 3], 901)?;
    let b3 = uniform(&[c], 902)?;
    let w2 = uniform(&[5 * a, c, 1, 1], 903)?;
    let b2 = uniform(&[5 * a], 904)?;
    let n = ((flops / 2.0).cbrt().round() as usize).max(1);
    let ga = uniform(&[n, n], 905)?;
    let gb = uniform(&[n, n], 906)?;
    let (tc, tg) = interleaved(
        reps,
        || {
            crate::ops::conv2d::conv2d_relu_pointwise_cpu(
                &x,
                (&w3, Some(&b3)),
                &p,
                (&w2, Some(&b2)),
                &[a, 4 * a],
            )
            .map(drop)
        },
        || matmul(&ga, &gb).map(drop),
    )?;
    let gflops_g = 2.0 * (n * n * n) as f64 / tg / 1e9;
    let gflops_c = flops / tc / 1e9;
    let ratio = gflops_c / gflops_g;
    println!(
        "{:<22} {:>24} {:>8.2} {:>9.1} {:>6} {:>9.1} {:>5.0}%",
        "rpn.joint.p2",
        format!("{c}>{c}>{} 3+1 {h}x{w}", 5 * a),
        flops / 1e9,
        gflops_c,
        n,
        gflops_g,
        100.0 * ratio
    );
    Ok((tc, tg * flops / (2.0 * (n * n * n) as f64), ratio < 0.6))
}

/// One SGD step (momentum 0.9, weight decay 1e-4, as torchvision's recipe) over
/// every trainable parameter of `model`, with seeded gradients: the fastest of
/// `reps` steps after one that creates the momentum buffers.
pub fn sgd_time(model: &FasterRcnn, reps: usize) -> Result<()> {
    let names = model.params.trainable_names();
    let mut params: Vec<Tensor> = names
        .iter()
        .map(|n| model.params.get(n).cloned())
        .collect::<Result<_>>()?;
    let grads: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, p)| uniform(p.dims(), 500 + i as u64))
        .collect::<Result<_>>()?;
    let count: usize = params.iter().map(|p| p.numel()).sum();
    let mut sgd = super::bench::bench_sgd()?;
    sgd.step(&mut params, &grads)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        sgd.step(&mut params, &grads)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "sgd step: {} tensors, {:.1} M parameters, {:.1} ms (fastest of {reps}, {} threads, momentum + weight decay)",
        params.len(),
        count as f64 / 1e6,
        best * 1e3,
        rayon::current_num_threads()
    );
    Ok(())
}
