//! `ops::conv2d_frozen_bn_act` (src/ops/fused/frozen_bn.rs), the recorded conv with a
//! frozen BatchNorm, the residual add and ReLU in its epilogue, by which a ResNet's
//! trainable blocks train on the CPU:
//! - its output and every gradient (x, w, residual) equal the unfused recorded chain
//!   conv2d -> frozen_batch_norm -> add -> relu bit for bit (the same arithmetic in
//!   the same order), with and without the residual and ReLU;
//! - its backward passes a float64 gradient check (central differences);
//! - bad inputs are errors (a tracked scale, bf16, a residual of the wrong shape);
//! - a ResNet body trained through it (frozen norms) gives the outputs and the
//!   gradients of the same body forced onto the unfused ops (its norms' tensors
//!   watched), bit for bit, recording one op per conv, and the same bits run to run.
//!
//! Cost: well under a second in the test profile.

mod common;

use kestrel::autograd::{gradcheck, Tape};
use kestrel::nn::resnet::{BlockKind, ResNet, ResNetConfig};
use kestrel::nn::{Ctx, NormKind, ParamStore};
use kestrel::ops::conv2d::{conv2d, Conv2dParams};
use kestrel::ops::{self, conv2d_frozen_bn_act};
use kestrel::{DType, Tensor};

const EPS: f64 = 1e-5;

/// A frozen norm over `c` channels: (weight, bias, running_mean, running_var).
fn frozen_norm(seed: u64, c: usize, dtype: DType) -> [Tensor; 4] {
    let r = |s: u64, f: fn(f64) -> f64| {
        let v: Vec<f64> = common::randn(seed * 10 + s, c).into_iter().map(f).collect();
        common::f64_t(v, &[c]).to_dtype(dtype).unwrap()
    };
    [
        r(1, |x| 1.0 + 0.3 * x),
        r(2, |x| 0.2 * x),
        r(3, |x| 0.3 * x),
        r(4, |x| x.abs() + 0.5),
    ]
}

fn rand(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    common::rand_t(seed, shape).to_dtype(dtype).unwrap()
}

/// The op and the unfused chain on the same inputs: `inputs` = [x, w, residual].
fn fused(
    i: &[Tensor],
    st: (&Tensor, &Tensor),
    res: bool,
    relu: bool,
    p: &Conv2dParams,
) -> kestrel::Result<Tensor> {
    conv2d_frozen_bn_act(&i[0], &i[1], st, res.then_some(&i[2]), relu, p)
}

fn unfused(
    i: &[Tensor],
    n: &[Tensor; 4],
    res: bool,
    relu: bool,
    p: &Conv2dParams,
) -> kestrel::Result<Tensor> {
    let h = conv2d(&i[0], &i[1], None, p)?;
    let mut h = ops::frozen_batch_norm(&h, &n[0], &n[1], &n[2], &n[3], EPS)?;
    if res {
        h = ops::add(&h, &i[2])?;
    }
    if relu {
        h = ops::relu(&h)?;
    }
    Ok(h)
}

fn variants() -> Vec<(usize, Conv2dParams, bool, bool)> {
    let mut v = Vec::new();
    for (k, p) in [
        (3, Conv2dParams::new(1, 1, 1)),
        (1, Conv2dParams::new(2, 0, 1)),
        (1, Conv2dParams::default()),
    ] {
        for (res, relu) in [(true, true), (false, true), (true, false), (false, false)] {
            v.push((k, p, res, relu));
        }
    }
    v
}

#[test]
fn equals_the_unfused_chain_and_its_gradients_bit_for_bit() {
    let (n, cin, cout, h, w) = (2, 5, 7, 9, 8);
    for (k, p, res, relu) in variants() {
        let what = format!("k{k} {p:?} residual {res} relu {relu}");
        let (oh, ow) = ops::conv2d::conv2d_output_size((h, w), (k, k), &p).unwrap();
        let inputs = [
            rand(1, &[n, cin, h, w], DType::F32),
            rand(2, &[cout, cin, k, k], DType::F32),
            rand(3, &[n, cout, oh, ow], DType::F32),
        ];
        let norm = frozen_norm(4, cout, DType::F32);
        let (s, t) = ops::fold_frozen_bn(&norm[0], &norm[1], &norm[2], &norm[3], EPS).unwrap();
        let gy = rand(5, &[n, cout, oh, ow], DType::F32);
        let wrt: Vec<usize> = if res { vec![0, 1, 2] } else { vec![0, 1] };
        let (yf, gf) = common::run_with_grads(
            |i| fused(i, (&s, &t), res, relu, &p),
            &inputs,
            &wrt,
            Some(gy.clone()),
        );
        let (yu, gu) = common::run_with_grads(
            |i| unfused(i, &norm, res, relu, &p),
            &inputs,
            &wrt,
            Some(gy),
        );
        let y = yu.to_vec::<f32>().unwrap();
        assert_eq!(yf.to_vec::<f32>().unwrap(), y, "{what}: output");
        if relu {
            assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0), "{what}");
        }
        for ((a, b), name) in gf.iter().zip(&gu).zip(["x", "w", "residual"]) {
            let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
            assert!(b.iter().any(|&v| v != 0.0), "{what}: d{name} is all zero");
            assert_eq!(a, b, "{what}: d{name}");
        }
    }
}

/// The backward's mask pass (one branch-free loop per case: both outputs, the
/// residual's only, the convolution's only, with and without ReLU) on planes whose
/// sizes are not multiples of a vector width (13x11, 7x6), in f32 and f64, with
/// signed zeros in the incoming gradient: the gradients equal the unfused chain's
/// bit for bit (compared as bits, so +0 and -0 differ).
#[test]
fn mask_pass_equals_the_unfused_chain_bit_for_bit_on_ragged_planes() {
    let (n, cin, cout, h, w) = (2, 3, 5, 13, 11);
    for dtype in [DType::F32, DType::F64] {
        for (k, p, res, relu) in variants() {
            let wrts: &[&[usize]] = if res {
                &[&[0, 1, 2], &[2], &[1]]
            } else {
                &[&[0, 1], &[1]]
            };
            for &wrt in wrts {
                let what = format!("{dtype:?} k{k} {p:?} residual {res} relu {relu} wrt {wrt:?}");
                let (oh, ow) = ops::conv2d::conv2d_output_size((h, w), (k, k), &p).unwrap();
                let inputs = [
                    rand(31, &[n, cin, h, w], dtype),
                    rand(32, &[cout, cin, k, k], dtype),
                    rand(33, &[n, cout, oh, ow], dtype),
                ];
                let norm = frozen_norm(34, cout, dtype);
                let (s, t) =
                    ops::fold_frozen_bn(&norm[0], &norm[1], &norm[2], &norm[3], EPS).unwrap();
                // Every 5th incoming gradient a negative zero.
                let g: Vec<f64> = common::randn(35, n * cout * oh * ow)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| if i % 5 == 0 { -0.0 } else { v })
                    .collect();
                let gy = common::f64_t(g, &[n, cout, oh, ow])
                    .to_dtype(dtype)
                    .unwrap();
                let run = |f: &dyn Fn(&[Tensor]) -> kestrel::Result<Tensor>| {
                    common::run_with_grads(f, &inputs, wrt, Some(gy.clone())).1
                };
                let gf = run(&|i| fused(i, (&s, &t), res, relu, &p));
                let gu = run(&|i| unfused(i, &norm, res, relu, &p));
                for ((a, b), i) in gf.iter().zip(&gu).zip(wrt) {
                    let bits = |t: &Tensor| -> Vec<u64> {
                        let v = t.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(bits(a), bits(b), "{what}: gradient of input {i}");
                }
            }
        }
    }
}

#[test]
fn gradcheck_f64_with_and_without_residual_and_relu() {
    let (n, cin, cout, h, w) = (1, 3, 4, 5, 6);
    for (seed, (k, p, res, relu)) in variants().into_iter().enumerate() {
        let (oh, ow) = ops::conv2d::conv2d_output_size((h, w), (k, k), &p).unwrap();
        let inputs = [
            rand(10, &[n, cin, h, w], DType::F64),
            rand(11, &[cout, cin, k, k], DType::F64),
            rand(12, &[n, cout, oh, ow], DType::F64),
        ];
        let norm = frozen_norm(13, cout, DType::F64);
        let (s, t) = ops::fold_frozen_bn(&norm[0], &norm[1], &norm[2], &norm[3], EPS).unwrap();
        let wrt: Vec<usize> = if res { vec![0, 1, 2] } else { vec![0, 1] };
        let f = |i: &[Tensor]| fused(i, (&s, &t), res, relu, &p);
        let r = gradcheck(f, &inputs, &wrt, seed as u64 + 20, 1e-6, 1e-6)
            .unwrap_or_else(|e| panic!("k{k} {p:?} residual {res} relu {relu}: {e}"));
        assert!(r.checked > 0);
    }
}

#[test]
fn refuses_a_tracked_scale_bf16_and_bad_shapes() {
    let p = Conv2dParams::new(1, 1, 1);
    let x = rand(1, &[1, 2, 4, 4], DType::F32);
    let w = rand(2, &[3, 2, 3, 3], DType::F32);
    let norm = frozen_norm(3, 3, DType::F32);
    let (s, t) = ops::fold_frozen_bn(&norm[0], &norm[1], &norm[2], &norm[3], EPS).unwrap();
    let tape = Tape::new();
    tape.watch(&s);
    tape.watch(&x);
    {
        let _g = tape.activate();
        common::assert_err(
            "tracked scale",
            conv2d_frozen_bn_act(&x, &w, (&s, &t), None, true, &p),
            "conv2d_frozen_bn_act",
        );
    }
    let (xb, wb) = (
        x.to_dtype(DType::BF16).unwrap(),
        w.to_dtype(DType::BF16).unwrap(),
    );
    common::assert_err(
        "bf16",
        conv2d_frozen_bn_act(&xb, &wb, (&s, &t), None, true, &p),
        "conv2d_frozen_bn_act",
    );
    let bad = rand(4, &[1, 3, 4, 5], DType::F32);
    assert!(conv2d_frozen_bn_act(&x, &w, (&s, &t), Some(&bad), true, &p).is_err());
    let short = rand(5, &[2], DType::F32);
    assert!(conv2d_frozen_bn_act(&x, &w, (&short, &t), None, true, &p).is_err());
}

/// A store for `net`: random conv weights, random frozen statistics (positive var).
fn random_store(net: &ResNet, seed: u64) -> ParamStore {
    let mut specs = Vec::new();
    net.specs(&mut specs);
    let mut store = ParamStore::init(&specs, seed).unwrap();
    for (i, s) in specs.iter().enumerate() {
        if s.shape.dims().len() != 1 {
            continue;
        }
        let c = s.shape.numel();
        let f = frozen_norm(seed * 100 + i as u64, c, DType::F32);
        let k = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .position(|k| s.name.ends_with(k))
            .unwrap();
        store.set(&s.name, f[k].clone()).unwrap();
    }
    store
}

#[test]
fn resnet_training_forward_fuses_and_matches_the_unfused_ops() {
    let cfg = ResNetConfig {
        block: BlockKind::Bottleneck,
        layers: [1, 2, 1, 1],
        width_per_group: 16,
        norm: NormKind::Frozen { eps: EPS },
        trainable_layers: 5,
    };
    let net = ResNet::new("", cfg).unwrap();
    let store = random_store(&net, 7);
    let ctx = Ctx::new(&store, true);
    let x = rand(8, &[2, 3, 64, 96], DType::F32);
    let mut specs = Vec::new();
    net.specs(&mut specs);
    let convs: Vec<&str> = specs
        .iter()
        .filter(|s| s.shape.dims().len() == 4)
        .map(|s| s.name.as_str())
        .collect();
    let norms: Vec<&str> = specs
        .iter()
        .filter(|s| s.shape.dims().len() == 1 && s.name.ends_with(".weight"))
        .map(|s| s.name.as_str())
        .collect();
    // `watch_norms` forces every layer onto the unfused ops: a watched norm weight
    // is a trained affine, which the fused op refuses.
    let run = |watch_norms: bool| {
        let tape = Tape::new();
        tape.watch(&x);
        for n in &convs {
            tape.watch(store.get(n).unwrap());
        }
        if watch_norms {
            for n in &norms {
                tape.watch(store.get(n).unwrap());
            }
        }
        let outs = {
            let _g = tape.activate();
            net.forward_unfused(&ctx, &x).unwrap()
        };
        let recorded = tape.len();
        // A loss that reaches every stage output.
        let seeds: Vec<(&Tensor, Tensor)> = outs
            .iter()
            .enumerate()
            .map(|(i, o)| (o, rand(30 + i as u64, o.dims(), DType::F32)))
            .collect();
        let grads = tape.backward_seeded(seeds).unwrap();
        let mut g = vec![grads.expect(&x).unwrap().to_vec::<f32>().unwrap()];
        for n in &convs {
            g.push(
                grads
                    .expect(store.get(n).unwrap())
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap(),
            );
        }
        (outs, recorded, g)
    };
    let (fo, frec, fg) = run(false);
    let (uo, urec, ug) = run(true);
    // Run to run, the same bits.
    let (fo2, _, fg2) = run(false);
    assert!(fo
        .iter()
        .zip(&fo2)
        .all(|(a, b)| a.to_vec::<f32>().unwrap() == b.to_vec::<f32>().unwrap()));
    assert_eq!(fg, fg2, "gradients of a second fused run");
    // One op per conv and the stem's max pool.
    assert_eq!(frec, convs.len() + 1, "ops recorded by the fused forward");
    assert!(
        urec > 3 * convs.len(),
        "the unfused forward records {urec} ops"
    );
    for (i, (a, b)) in fo.iter().zip(&uo).enumerate() {
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "C{}",
            i + 2
        );
    }
    for ((a, b), name) in fg
        .iter()
        .zip(&ug)
        .zip(std::iter::once("x").chain(convs.clone()))
    {
        assert!(b.iter().any(|&v| v != 0.0), "d{name} is all zero");
        assert_eq!(a, b, "d{name}");
    }
}
