//! Criterion benches of the ops, named `<op>/<device>/<shape>`.

use criterion::{criterion_group, criterion_main, Criterion};
use kestrel::{ops, Tensor};

fn elementwise(c: &mut Criterion) {
    let n = 1 << 20;
    let x = Tensor::from_vec((0..n).map(|i| (i as f32).sin()).collect::<Vec<f32>>(), [n]).unwrap();
    c.bench_function("relu/cpu/1M", |b| b.iter(|| ops::relu(&x).unwrap()));
    c.bench_function("sum/cpu/1M", |b| b.iter(|| ops::sum(&x).unwrap()));
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
