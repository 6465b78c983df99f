//! The tape frees memory as the backward pass goes (src/autograd): a saved tensor
//! is dropped once its op's backward ran, an intermediate gradient once its producer
//! read it. Measured with the emulated device's memory figures (one test in this
//! binary, so nothing else allocates meanwhile).

mod common;

use kestrel::autograd::Tape;
use kestrel::ops;
use kestrel::Tensor;

#[test]
fn backward_holds_a_bounded_number_of_gradients_emulated() {
    let device = common::emulated();
    let n = 256 * 1024; // 1 MiB of f32 per tensor
    let bytes = (n * 4) as u64;
    let depth = 12;
    let x = Tensor::from_vec((0..n).map(|i| (i % 7) as f32 - 3.0).collect(), [n])
        .unwrap()
        .to_device(device)
        .unwrap();
    let tape = Tape::new();
    tape.watch(&x);
    let loss = {
        let _g = tape.activate();
        // A chain whose every link saves its output: `depth` MiB held by the tape.
        let mut y = ops::relu(&x).unwrap();
        for _ in 1..depth {
            y = ops::relu(&y).unwrap();
        }
        ops::sum(&y).unwrap()
    };
    let before = device.memory().allocated;
    device.reset_peak_memory();
    let grads = tape.backward(&loss).unwrap();
    let m = device.memory();
    let rise = m.peak_allocated - before;
    eprintln!(
        "backward through {depth} relus of {bytes} B: peak rise {rise} B, held after {} B (before {before} B)",
        m.allocated
    );
    // Kept: the saved outputs shrink as the pass goes; at most the incoming and the
    // outgoing gradient of a link (plus the seed and small scalars) are live at once
    // beyond them. Holding every intermediate gradient would rise by `depth` MiB.
    assert!(rise <= 3 * bytes, "peak rose {rise} B (> 3 x {bytes} B)");
    // After: the gradient of x only; the saved tensors are gone.
    assert!(
        m.allocated <= before - (depth as u64 - 2) * bytes,
        "{} B still held (before backward: {before} B)",
        m.allocated
    );
    let g = grads.expect(&x).unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f32> = (0..n)
        .map(|i| if (i % 7) as f32 - 3.0 > 0.0 { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(g, want);
    assert_eq!(
        grads.len(),
        1,
        "only the watched tensor's gradient is returned"
    );
}
