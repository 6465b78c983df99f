//! linear and matmul (kernels/matmul.cu): parity with PyTorch (fixture ops/linear),
//! the definition in f64, f64 gradient checks, and error cases, on the CPU, the
//! emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::{gradcheck, Tape};
use kestrel::ops::linear::{linear, matmul};
use kestrel::{DType, Device, Error, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

/// Every linear fixture case on `dev`.
fn check_linear_on(dev: Device) {
    let f = fixture("ops/linear.safetensors");
    let names = cases(&f);
    assert!(!names.is_empty(), "linear fixture has no cases");
    for case in names {
        let get = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let on = |n: &str| get(n).to_device(dev).unwrap();
        let (x, w, b, gy) = (on("x"), on("w"), on("b"), on("gy"));
        let tape = Tape::new();
        for t in [&x, &w, &b] {
            tape.watch(t);
        }
        let y = {
            let _g = tape.activate();
            linear(&x, &w, Some(&b)).unwrap()
        };
        assert_eq!(y.device(), dev, "{case}: output device");
        assert_close(&format!("linear {case} y"), &y, &get("y"), FWD_TOL);
        let grads = tape.backward_with(&y, gy).unwrap();
        assert_close(
            &format!("linear {case} gx"),
            grads.expect(&x).unwrap(),
            &get("gx"),
            GRAD_TOL,
        );
        assert_close(
            &format!("linear {case} gw"),
            grads.expect(&w).unwrap(),
            &get("gw"),
            GRAD_TOL,
        );
        assert_close(
            &format!("linear {case} gb"),
            grads.expect(&b).unwrap(),
            &get("gb"),
            GRAD_TOL,
        );
    }
}

crate::device_tests! {
    linear_matches_torch => check_linear_on;
}

// ---------------------------------------------------------------------------------
// Gradient checks (f64, central differences)
// ---------------------------------------------------------------------------------

#[test]
fn linear_gradcheck() {
    for (seed, (n, fin, fout)) in [(1, 4, 3), (5, 7, 2), (3, 1, 6)].into_iter().enumerate() {
        let s = 1000 + seed as u64 * 10;
        let inputs = [
            rand_t(s, &[n, fin]),
            rand_t(s + 1, &[fout, fin]),
            rand_t(s + 2, &[fout]),
        ];
        gradcheck(
            |t| linear(&t[0], &t[1], Some(&t[2])),
            &inputs,
            &[0, 1, 2],
            s + 3,
            1e-6,
            1e-6,
        )
        .unwrap_or_else(|e| panic!("linear [{n}, {fin}] -> {fout}: {e}"));
        gradcheck(
            |t| linear(&t[0], &t[1], None),
            &inputs[..2],
            &[0, 1],
            s + 4,
            1e-6,
            1e-6,
        )
        .unwrap_or_else(|e| panic!("linear without bias [{n}, {fin}] -> {fout}: {e}"));
    }
}

#[test]
fn matmul_gradcheck() {
    for (seed, (m, k, n)) in [(3, 4, 5), (1, 6, 2), (4, 1, 3)].into_iter().enumerate() {
        let s = 2000 + seed as u64 * 10;
        let inputs = [rand_t(s, &[m, k]), rand_t(s + 1, &[k, n])];
        gradcheck(
            |t| matmul(&t[0], &t[1]),
            &inputs,
            &[0, 1],
            s + 2,
            1e-6,
            1e-6,
        )
        .unwrap_or_else(|e| panic!("matmul [{m}, {k}] @ [{k}, {n}]: {e}"));
    }
}

/// matmul against the definition (f32 on `dev`).
fn check_matmul_on(dev: Device) {
    let (m, k, n) = (37, 70, 29);
    let (a, b) = (rand_t(1, &[m, k]), rand_t(2, &[k, n]));
    let (av, bv) = (a.to_vec::<f64>().unwrap(), b.to_vec::<f64>().unwrap());
    let want: Vec<f64> = (0..m * n)
        .map(|i| (0..k).map(|l| av[i / n * k + l] * bv[l * n + i % n]).sum())
        .collect();
    let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap();
    let y = matmul(&on(&a), &on(&b)).unwrap();
    assert_eq!(y.dims(), [m, n]);
    assert_tensor_close("matmul", &y, &want, FWD_TOL);
}

/// linear forward and backward at sizes past the small-tile threshold (both sides of
/// the product over 64), so the 128x128-tile GEMMs run: y = x w^T + b (nt),
/// gx = gy w (nn), gw = gy^T x (tn), against f64 sums written here.
fn check_linear_large_on(dev: Device) {
    let (n, fin, fout) = (130, 70, 150);
    let (x, w, gy) = (
        rand_t(11, &[n, fin]),
        rand_t(12, &[fout, fin]),
        rand_t(13, &[n, fout]),
    );
    let (xv, wv, gv) = (
        x.to_vec::<f64>().unwrap(),
        w.to_vec::<f64>().unwrap(),
        gy.to_vec::<f64>().unwrap(),
    );
    let y: Vec<f64> = (0..n * fout)
        .map(|i| {
            (0..fin)
                .map(|l| xv[i / fout * fin + l] * wv[i % fout * fin + l])
                .sum()
        })
        .collect();
    let gx: Vec<f64> = (0..n * fin)
        .map(|i| {
            (0..fout)
                .map(|o| gv[i / fin * fout + o] * wv[o * fin + i % fin])
                .sum()
        })
        .collect();
    let gw: Vec<f64> = (0..fout * fin)
        .map(|i| {
            (0..n)
                .map(|r| gv[r * fout + i / fin] * xv[r * fin + i % fin])
                .sum()
        })
        .collect();
    let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap();
    let (xd, wd) = (on(&x), on(&w));
    let tape = Tape::new();
    tape.watch(&xd);
    tape.watch(&wd);
    let yd = {
        let _g = tape.activate();
        linear(&xd, &wd, None).unwrap()
    };
    assert_eq!(yd.dims(), [n, fout]);
    assert_tensor_close("linear large y", &yd, &y, FWD_TOL);
    let grads = tape.backward_with(&yd, on(&gy)).unwrap();
    assert_tensor_close("linear large gx", grads.expect(&xd).unwrap(), &gx, GRAD_TOL);
    assert_tensor_close("linear large gw", grads.expect(&wd).unwrap(), &gw, GRAD_TOL);
}

crate::device_tests! {
    matmul_matches_definition => check_matmul_on;
    linear_large_matches_definition => check_linear_large_on;
}

// ---------------------------------------------------------------------------------
// Tape behaviour and errors
// ---------------------------------------------------------------------------------

fn shape_err(r: kestrel::Result<Tensor>, what: &str, op: &str) {
    match r {
        Err(e @ Error::Shape { .. }) => {
            assert!(
                e.to_string().contains(op),
                "{what}: error does not name {op}: {e}"
            )
        }
        Err(e) => panic!("{what}: expected a shape error, got {e}"),
        Ok(t) => panic!(
            "{what}: expected an error, got a tensor of shape {}",
            t.shape()
        ),
    }
}

#[test]
fn linear_and_matmul_reject_bad_inputs() {
    let x = rand_t(1, &[2, 5]);
    let w = rand_t(2, &[3, 5]);
    shape_err(
        linear(&x, &rand_t(2, &[3, 4]), None),
        "feature mismatch",
        "linear",
    );
    shape_err(linear(&rand_t(1, &[5]), &w, None), "rank-1 input", "linear");
    shape_err(
        linear(&rand_t(1, &[1, 2, 5]), &w, None),
        "rank-3 input",
        "linear",
    );
    shape_err(
        linear(&x, &w, Some(&rand_t(3, &[4]))),
        "bias length",
        "linear",
    );
    let w32 = w.to_dtype(DType::F32).unwrap();
    assert!(
        matches!(linear(&x, &w32, None), Err(Error::DType { .. })),
        "mixed dtypes"
    );
    shape_err(matmul(&x, &rand_t(2, &[4, 3])), "inner mismatch", "matmul");
    shape_err(matmul(&x, &rand_t(2, &[5])), "rank-1 operand", "matmul");
}
