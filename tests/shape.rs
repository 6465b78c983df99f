//! Shape ops (concat, narrow, stack, flatten, permute, index_select; kernels/shape.cu)
//! against index-arithmetic references (also at the RPN head's size), f64 gradient
//! checks and error cases, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::gradcheck;
use kestrel::ops::shape::{concat, flatten, index_select, narrow, permute, stack};
use kestrel::{DType, Device, Result, Tensor};

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * dims[d + 1];
    }
    s
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = i % dims[d];
        i /= dims[d];
    }
    idx
}

fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    idx.iter().zip(strides(dims)).map(|(i, s)| i * s).sum()
}

/// A shape op as a gather: output element `i` is element `src[i].1` of input `src[i].0`.
struct Gather {
    out_dims: Vec<usize>,
    src: Vec<(usize, usize)>,
}

fn concat_ref(dims: &[Vec<usize>], dim: usize) -> Gather {
    let mut out_dims = dims[0].clone();
    out_dims[dim] = dims.iter().map(|d| d[dim]).sum();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            let mut k = 0;
            while idx[dim] >= dims[k][dim] {
                idx[dim] -= dims[k][dim];
                k += 1;
            }
            (k, ravel(&idx, &dims[k]))
        })
        .collect();
    Gather { out_dims, src }
}

fn narrow_ref(dims: &[usize], dim: usize, start: usize, len: usize) -> Gather {
    let mut out_dims = dims.to_vec();
    out_dims[dim] = len;
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            idx[dim] += start;
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

fn permute_ref(dims: &[usize], perm: &[usize]) -> Gather {
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let o = unravel(i, &out_dims);
            let mut idx = vec![0; dims.len()];
            for (a, &p) in perm.iter().enumerate() {
                idx[p] = o[a];
            }
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

fn index_select_ref(dims: &[usize], dim: usize, ids: &[i64]) -> Gather {
    let mut out_dims = dims.to_vec();
    out_dims[dim] = ids.len();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            idx[dim] = ids[idx[dim]] as usize;
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

/// Check a shape op on `device` against its gather: f32 values and gradients (the
/// scatter-add of a random upstream gradient), and i64 values when `ints` is given.
fn check_gather(
    what: &str,
    device: Device,
    in_dims: &[Vec<usize>],
    g: &Gather,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let what = format!("{what} on {device}");
    let values: Vec<Vec<f64>> = in_dims
        .iter()
        .enumerate()
        .map(|(k, d)| randn(100 + k as u64, d.iter().product()))
        .collect();
    let inputs: Vec<Tensor> = values
        .iter()
        .zip(in_dims)
        .map(|(v, d)| f32_on(v, d, device))
        .collect();
    let n_out = g.src.len();
    let gy = randn(200, n_out);
    let wrt: Vec<usize> = (0..inputs.len()).collect();
    let (y, grads) = run_with_grads(&op, &inputs, &wrt, Some(f32_on(&gy, &g.out_dims, device)));
    assert_eq!(y.dims(), &g.out_dims[..], "{what}: output shape");
    let want: Vec<f32> = g.src.iter().map(|&(k, j)| values[k][j] as f32).collect();
    assert_eq!(y.to_vec::<f32>().unwrap(), want, "{what}: values");
    let mut want_g: Vec<Vec<f64>> = in_dims
        .iter()
        .map(|d| vec![0.0; d.iter().product()])
        .collect();
    for (i, &(k, j)) in g.src.iter().enumerate() {
        want_g[k][j] += gy[i] as f32 as f64;
    }
    for (k, gk) in grads.iter().enumerate() {
        assert_eq!(gk.dims(), &in_dims[k][..], "{what}: gradient {k} shape");
        assert_vec_close(
            &format!("{what}: gradient {k}"),
            &gk.to_vec().unwrap(),
            &want_g[k],
            1e-6,
        );
    }
    // The same gather on i64 tensors (labels, indices) is exact.
    let ints: Vec<Tensor> = in_dims
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let n: usize = d.iter().product();
            let v: Vec<i64> = (0..n as i64)
                .map(|j| j * 1_000_003 + k as i64 - (1 << 40))
                .collect();
            Tensor::from_vec_i64(v, d.clone())
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect();
    let yi = op(&ints).unwrap();
    assert_eq!(yi.dtype(), DType::I64, "{what}: i64 output dtype");
    let want_i: Vec<i64> = g
        .src
        .iter()
        .map(|&(k, j)| j as i64 * 1_000_003 + k as i64 - (1 << 40))
        .collect();
    assert_eq!(yi.to_vec_i64().unwrap(), want_i, "{what}: i64 values");
}

fn check_shape_ops_on(device: Device) {
    // concat along each axis, including inputs of different sizes and an empty one.
    let dims = [vec![2, 3, 4], vec![2, 1, 4], vec![2, 0, 4], vec![2, 5, 4]];
    check_gather("concat dim 1", device, &dims, &concat_ref(&dims, 1), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 1)
    });
    let dims = [vec![3, 2, 4], vec![1, 2, 4]];
    check_gather("concat dim 0", device, &dims, &concat_ref(&dims, 0), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 0)
    });
    let dims = [vec![2, 3, 1], vec![2, 3, 4]];
    check_gather("concat dim 2", device, &dims, &concat_ref(&dims, 2), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 2)
    });
    for (dim, start, len) in [(0, 1, 2), (1, 2, 3), (2, 0, 1), (1, 5, 0)] {
        let d = vec![3, 5, 4];
        check_gather(
            &format!("narrow dim {dim} start {start} len {len}"),
            device,
            std::slice::from_ref(&d),
            &narrow_ref(&d, dim, start, len),
            |xs| narrow(&xs[0], dim, start, len),
        );
    }
    let perms: [(Vec<usize>, Vec<usize>); 5] = [
        (vec![2, 12, 5, 7], vec![0, 2, 3, 1]), // RPN head [N, A*4, H, W] -> [N, H, W, A*4]
        (vec![3, 4], vec![1, 0]),
        (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
        (vec![1, 6, 1, 5], vec![3, 2, 1, 0]),
        (vec![4, 3, 2], vec![0, 1, 2]),
    ];
    for (d, perm) in perms {
        check_gather(
            &format!("permute {d:?} by {perm:?}"),
            device,
            std::slice::from_ref(&d),
            &permute_ref(&d, &perm),
            |xs| permute(&xs[0], &perm),
        );
    }
    let d = vec![6, 3, 2];
    for (dim, ids) in [
        (0, vec![5i64, 0, 2, 2, 5, 1]),
        (1, vec![2, 0]),
        (2, vec![1, 1, 1]),
        (0, vec![]),
    ] {
        let idx = i64_on(&ids, device);
        check_gather(
            &format!("index_select dim {dim} {ids:?}"),
            device,
            std::slice::from_ref(&d),
            &index_select_ref(&d, dim, &ids),
            |xs| index_select(&xs[0], dim, &idx),
        );
    }
    // stack = concat of unsqueezed inputs; flatten keeps the order.
    let dims = [vec![2, 3], vec![2, 3], vec![2, 3]];
    let unsqueezed: Vec<Vec<usize>> = dims.iter().map(|_| vec![2, 1, 3]).collect();
    let g = concat_ref(&unsqueezed, 1);
    check_gather("stack dim 1", device, &dims, &g, |xs| {
        stack(&xs.iter().collect::<Vec<_>>(), 1)
    });
    let d = vec![2, 3, 4, 5];
    let g = Gather {
        out_dims: vec![2, 60],
        src: (0..120).map(|i| (0, i)).collect(),
    };
    check_gather(
        "flatten 1..=3",
        device,
        std::slice::from_ref(&d),
        &g,
        |xs| flatten(&xs[0], 1, 3),
    );
}

/// Large enough for the CPU permute to split the output into several chunks.
fn check_permute_several_chunks_on(device: Device) {
    let d = vec![2, 12, 40, 64];
    for perm in [[0, 2, 3, 1], [3, 0, 2, 1]] {
        let g = permute_ref(&d, &perm);
        check_gather(
            "permute, several chunks",
            device,
            std::slice::from_ref(&d),
            &g,
            |xs| permute(&xs[0], &perm),
        );
    }
}

/// The RPN head's regression output at its real size, NCHW -> NHWC.
fn check_permute_rpn_head_size_on(device: Device) {
    let d = vec![1, 12, 200, 304];
    let g = permute_ref(&d, &[0, 2, 3, 1]);
    check_gather(
        "permute rpn head",
        device,
        std::slice::from_ref(&d),
        &g,
        |xs| permute(&xs[0], &[0, 2, 3, 1]),
    );
}

crate::device_tests! {
    shape_ops_match_reference => check_shape_ops_on;
    permute_several_chunks => check_permute_several_chunks_on;
    permute_rpn_head_size => check_permute_rpn_head_size_on;
}

#[test]
fn gradcheck_shape_ops() {
    for seed in 0..3u64 {
        let a = rand_t(seed, &[2, 3, 4]);
        let b = rand_t(seed + 10, &[2, 2, 4]);
        let c = rand_t(seed + 20, &[2, 3, 4]);
        let idx = Tensor::from_vec_i64(vec![2, 0, 2, 1], [4]).unwrap();
        type Case<'a> = (
            &'a str,
            Vec<Tensor>,
            Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>,
        );
        let checks: Vec<Case> = vec![
            (
                "concat",
                vec![a.clone(), b.clone()],
                Box::new(|xs| concat(&[&xs[0], &xs[1]], 1)),
            ),
            (
                "narrow",
                vec![a.clone()],
                Box::new(|xs| narrow(&xs[0], 2, 1, 2)),
            ),
            (
                "permute",
                vec![a.clone()],
                Box::new(|xs| permute(&xs[0], &[2, 0, 1])),
            ),
            (
                "index_select",
                vec![a.clone()],
                Box::new(|xs| index_select(&xs[0], 1, &idx)),
            ),
            (
                "stack",
                vec![a.clone(), c.clone()],
                Box::new(|xs| stack(&[&xs[0], &xs[1]], 3)),
            ),
            (
                "flatten",
                vec![a.clone()],
                Box::new(|xs| flatten(&xs[0], 0, 1)),
            ),
        ];
        for (name, inputs, f) in checks {
            let wrt: Vec<usize> = (0..inputs.len()).collect();
            let r = gradcheck(f, &inputs, &wrt, seed, 1e-6, 1e-7);
            assert!(r.is_ok(), "{name} seed {seed}: {}", r.unwrap_err());
        }
    }
}

// ------------------------------------------------------------------ shape op errors

fn check_shape_errors_on(device: Device) {
    let a = f32_on(&randn(1, 24), &[2, 3, 4], device);
    let b = f32_on(&randn(2, 12), &[3, 4], device);
    let c = f32_on(&randn(3, 16), &[2, 2, 4], device);
    assert_err_mentions(concat(&[], 0), &["concat"]);
    assert_err_mentions(concat(&[&a, &b], 0), &["concat", "[2, 3, 4]", "[3, 4]"]);
    assert_err_mentions(concat(&[&a, &c], 2), &["concat", "[2, 2, 4]"]);
    assert_err_mentions(concat(&[&a, &c], 3), &["concat", "dim 3"]);
    let ints = i64_on(&[1; 16], device)
        .reshape_detached([2, 2, 4])
        .unwrap();
    assert_err_mentions(concat(&[&a, &ints], 1), &["concat", "i64"]);
    assert_err_mentions(narrow(&a, 1, 2, 2), &["narrow", "[2, 3, 4]"]);
    assert_err_mentions(narrow(&a, 3, 0, 1), &["narrow", "dim 3"]);
    assert_err_mentions(narrow(&a, 0, usize::MAX, 2), &["narrow"]);
    assert_err_mentions(permute(&a, &[0, 1]), &["permute", "[2, 3, 4]"]);
    assert_err_mentions(permute(&a, &[0, 1, 1]), &["permute", "[0, 1, 1]"]);
    assert_err_mentions(permute(&a, &[0, 1, 3]), &["permute"]);
    assert_err_mentions(
        index_select(&a, 1, &i64_on(&[0, 3], device)),
        &["index_select", "idx[1]", "[0, 3)", "[2, 3, 4]"],
    );
    assert_err_mentions(
        index_select(&a, 0, &i64_on(&[-1], device)),
        &["index_select", "idx[0]"],
    );
    assert_err_mentions(
        index_select(&a, 3, &i64_on(&[0], device)),
        &["index_select", "dim 3"],
    );
    let float_idx = f32_on(&[0.0], &[1], device);
    assert_err_mentions(index_select(&a, 0, &float_idx), &["index_select", "i64"]);
    assert_err_mentions(stack(&[&a, &c], 0), &["stack", "[2, 3, 4]", "[2, 2, 4]"]);
    assert_err_mentions(stack(&[&a], 4), &["stack", "dim 4"]);
    assert_err_mentions(flatten(&a, 2, 1), &["flatten"]);
    assert_err_mentions(flatten(&a, 0, 3), &["flatten", "[2, 3, 4]"]);
    if device != Device::Cpu {
        let a = f32_on(&[1.0, 2.0], &[2], device);
        let b = f32_on(&[1.0, 2.0], &[2], Device::Cpu);
        assert_err_mentions(concat(&[&a, &b], 0), &["concat", "different devices"]);
        assert_err_mentions(
            index_select(&a, 0, &i64_on(&[0], Device::Cpu)),
            &["index_select", "different devices"],
        );
    }
}

crate::device_tests! {
    shape_errors => check_shape_errors_on;
}
