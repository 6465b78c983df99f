//! Top-k and per-level top-k (kernels/topk.cu) against torch (fixture ops/detection),
//! a sort-based reference, ties, NaN and edge cases.

mod common;

use common::*;
use kestrel::ops::topk;
use kestrel::{Device, Tensor};

fn check_topk_fixture_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let p = case_params(&f, "topk");
    assert_eq!(
        p["dim"].as_i64(),
        Some(1),
        "topk fixture is over the last dim"
    );
    let k = p["k"].as_u64().unwrap() as usize;
    let (v, i) = topk::topk(&on(&f.tensor("topk.input").unwrap(), device), k).unwrap();
    assert_eq!(i.device(), device);
    assert_eq!(
        ints(&i),
        ints(&f.int_tensor("topk.indices").unwrap()),
        "{device} topk indices"
    );
    assert_close(
        &format!("{device} topk values"),
        &v,
        &f.tensor("topk.values").unwrap(),
        1e-6,
    );
}

crate::device_tests! {
    topk_matches_torch => check_topk_fixture_on;
}

/// Top-k by a full sort (the obvious definition): descending, NaN first, ties by index.
fn topk_by_sort(v: &[f32], k: usize) -> Vec<i64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        let key = |x: f32| if x.is_nan() { f32::INFINITY } else { x };
        let (na, nb) = (v[a].is_nan(), v[b].is_nan());
        nb.cmp(&na)
            .then(key(v[b]).partial_cmp(&key(v[a])).unwrap())
            .then(a.cmp(&b))
    });
    idx.into_iter().take(k).map(|i| i as i64).collect()
}

/// Per-level top-k on random rows: the sampled-threshold path, the exact radix path
/// (many equal values) and short levels, against a full sort.
fn check_topk_levels_on(device: Device) {
    let levels = [20000usize, 5000, 1300, 300, 77];
    let a: usize = levels.iter().sum();
    let k = 1000;
    let kinds = [
        (41u64, "random"),
        (42, "ties"),
        (43, "nan"),
        (44, "constant"),
        (45, "unsampled"),
    ];
    for (seed, kind) in kinds {
        let mut v: Vec<f32> = common::randn(seed, 2 * a)
            .iter()
            .map(|x| (x * 4.0) as f32)
            .collect();
        match kind {
            "ties" => v.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0),
            "nan" => v.iter_mut().step_by(97).for_each(|x| *x = f32::NAN),
            "constant" => v.iter_mut().for_each(|x| *x = 0.25),
            // The CUDA kernel samples every (len / 2048)-th element (9th here): make
            // those the smallest so that its threshold fails and the exact select runs.
            "unsampled" => v.iter_mut().step_by(9).for_each(|x| *x = -10.0),
            _ => {}
        }
        let (vals, idx) =
            topk::topk_levels(&on(&f32_t(v.clone(), &[2, a]), device), &levels, k).unwrap();
        let out_row: usize = levels.iter().map(|&l| l.min(k)).sum();
        assert_eq!(idx.dims(), &[2, out_row]);
        let (idx, vals) = (ints(&idx), floats(&vals));
        let mut pos = 0;
        for r in 0..2 {
            let mut off = 0;
            for &l in &levels {
                let row = &v[r * a + off..r * a + off + l];
                let want: Vec<i64> = topk_by_sort(row, k)
                    .into_iter()
                    .map(|i| i + off as i64)
                    .collect();
                let n = want.len();
                assert_eq!(
                    &idx[pos..pos + n],
                    &want[..],
                    "{device} {kind} row {r} level of {l}"
                );
                for (j, &c) in want.iter().enumerate() {
                    let x = v[r * a + c as usize];
                    assert!(vals[pos + j] == x || (x.is_nan() && vals[pos + j].is_nan()));
                }
                pos += n;
                off += l;
            }
        }
    }
}

crate::device_tests! {
    topk_levels => check_topk_levels_on;
}

fn check_topk_edge_cases_on(device: Device) {
    let run = |v: Vec<f32>, k: usize| {
        let n = v.len();
        let (vals, idx) = topk::topk(&on(&f32_t(v, &[1, n]), device), k).unwrap();
        (floats(&vals), ints(&idx))
    };
    // All values equal: the first k indices.
    assert_eq!(run(vec![0.5; 9], 4).1, vec![0, 1, 2, 3]);
    // NaN ranks first, then +inf; -0.0 ties with +0.0 by index.
    let (v, i) = run(
        vec![0.0, f32::NAN, -0.0, f32::INFINITY, 1.0, f32::NEG_INFINITY],
        6,
    );
    assert_eq!(i, vec![1, 3, 4, 0, 2, 5]);
    assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[5] == f32::NEG_INFINITY);
    // k = 0, k = C, one element.
    assert_eq!(run(vec![1.0, 2.0], 0).1, Vec::<i64>::new());
    assert_eq!(
        run(vec![1.0, 3.0, 2.0], 3),
        (vec![3.0, 2.0, 1.0], vec![1, 2, 0])
    );
    assert_eq!(run(vec![7.0], 1).1, vec![0]);
    // Levels shorter than k keep everything; an empty level contributes nothing.
    let x = on(&f32_t(vec![1.0, 5.0, 3.0, 2.0, 9.0], &[1, 5]), device);
    let (_, i) = topk::topk_levels(&x, &[2, 0, 3], 2).unwrap();
    assert_eq!(ints(&i), vec![1, 0, 4, 2]);
    // No rows.
    let (_, i) = topk::topk(&on(&f32_t(vec![], &[0, 5]), device), 2).unwrap();
    assert_eq!(i.dims(), &[0, 2]);
}

crate::device_tests! {
    topk_edge_cases => check_topk_edge_cases_on;
}

#[test]
fn topk_rejects_bad_input() {
    let x = f32_t(vec![0.0; 6], &[2, 3]);
    assert!(topk::topk(&x, 4).is_err(), "k larger than the row");
    assert!(topk::topk(&f32_t(vec![0.0; 6], &[6]), 1).is_err());
    assert!(
        topk::topk_levels(&x, &[1, 1], 1).is_err(),
        "levels do not sum to the row"
    );
    assert!(topk::topk(&i64_t(vec![0; 6]).reshape_detached([2, 3]).unwrap(), 1).is_err());
}

/// f64 on the CPU: values and indices, largest first, ties to the lower index, NaN
/// first (the order src/ops/topk.rs documents).
#[test]
fn topk_f64_values_and_indices() {
    let x = Tensor::from_vec(
        vec![0.5f64, -1.0, 3.25, 2.0, 1e-300, 2.0, -0.0, f64::NAN, 7.0],
        [3, 3],
    )
    .unwrap();
    let (v, i) = topk::topk(&x, 2).unwrap();
    assert_eq!(v.dtype(), kestrel::DType::F64);
    assert_eq!(v.dims(), [3, 2]);
    let v = v.to_vec::<f64>().unwrap();
    assert_eq!(v[..4], [3.25, 0.5, 2.0, 2.0]);
    assert!(v[4].is_nan() && v[5] == 7.0, "{v:?}");
    assert_eq!(ints(&i), [2, 0, 0, 2, 1, 2]);
}
