//! Gradient buckets on the device: with parameters on the emulated device, the
//! reducer concatenates each bucket's gradients into one device buffer, the in-process
//! group all-reduces the ranks' device buffers (each rank adds them on its device in
//! rank order), and the averages are sliced back on the device. Shown with 2 and 4
//! ranks:
//!
//! - the averaged gradients equal the host average (rank order, f32, / W) of the
//!   ranks' own unreduced device gradients, bit for bit (W = 2, 4: `1 / W` is exact);
//! - the backward pass with the reducer does no more host copies (either way) on the
//!   training thread than the same backward without it: the reduction adds none
//!   (the host-staged version added one read-back per bucket and one upload per
//!   parameter);
//! - buckets are launched during backward.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::emulated;
use kestrel::autograd::Tape;
use kestrel::dist::{local_group, Comm, GradReducer};
use kestrel::runner::GradSync;
use kestrel::{Device, Tensor};

use common::dist_mlp::{forward, input, weights, D, LAYERS};

/// (htod, dtoh) on this thread during one backward, with or without the reducer;
/// the gradients before and after reduction.
struct Pass {
    copies: (u64, u64),
    own: Vec<Vec<f32>>,
    reduced: Option<Vec<Vec<f32>>>,
    during_backward: bool,
}

fn one_pass(dev: Device, rank: usize, reducer: Option<&mut GradReducer>) -> Pass {
    let ws = weights(7, dev);
    let x = input(100 + rank as u64, dev);
    let tape = Tape::new();
    ws.iter().for_each(|w| tape.watch(w));
    let loss = {
        let _a = tape.activate();
        forward(&ws, &x).unwrap()
    };
    let seed = Tensor::full(loss.shape().clone(), 1.0, loss.dtype(), dev).unwrap();
    let log = reducer.as_ref().map(|r| r.launch_log());
    let scope = dev.counters();
    let mut reducer = reducer;
    if let Some(r) = reducer.as_deref_mut() {
        r.attach(&tape, &ws).unwrap();
    }
    let g = tape.backward_with(&loss, seed).unwrap();
    let mut grads: Vec<Option<Tensor>> = ws.iter().map(|w| g.get(w).cloned()).collect();
    let own_t = grads.clone();
    if let Some(r) = reducer.as_deref_mut() {
        r.finish(&mut grads).unwrap();
    }
    let d = scope.delta();
    let host = |v: &[Option<Tensor>]| -> Vec<Vec<f32>> {
        v.iter()
            .map(|t| t.as_ref().unwrap().to_vec::<f32>().unwrap())
            .collect()
    };
    let during_backward = log.is_none_or(|l| {
        let l = l.lock().unwrap();
        !l.is_empty() && l.iter().all(|b| b.ops_done.is_some())
    });
    Pass {
        copies: (d.htod, d.dtoh),
        own: host(&own_t),
        reduced: reducer.is_some().then(|| host(&grads)),
        during_backward,
    }
}

#[test]
fn device_buckets_reduce_without_host_copies_emulated() {
    let dev = emulated();
    for world in [2usize, 4] {
        let comms = local_group(world, Duration::from_secs(60)).unwrap();
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                std::thread::spawn(move || {
                    let comm: Comm = Arc::new(c);
                    let plain = one_pass(dev, rank, None);
                    // One parameter per bucket: four device buckets.
                    let mut reducer = GradReducer::new(comm.clone(), 100);
                    comm.barrier().unwrap();
                    let synced = one_pass(dev, rank, Some(&mut reducer));
                    (plain, synced)
                })
            })
            .collect();
        let results: Vec<(Pass, Pass)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        // The reference: the ranks' own device gradients averaged on the host, in rank
        // order, as the CPU collectives do.
        let mut want = vec![vec![0.0f32; D * D]; LAYERS];
        for (_, s) in &results {
            for (w, g) in want.iter_mut().zip(&s.own) {
                w.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        want.iter_mut()
            .for_each(|w| w.iter_mut().for_each(|v| *v /= world as f32));
        for (rank, (plain, synced)) in results.iter().enumerate() {
            assert_eq!(
                plain.own, synced.own,
                "rank {rank}: same backward both times"
            );
            assert_eq!(
                synced.reduced.as_ref().unwrap(),
                &want,
                "rank {rank} of {world}: device-reduced gradients vs host average"
            );
            assert_eq!(
                synced.copies, plain.copies,
                "rank {rank} of {world}: (htod, dtoh) during backward with the reducer vs \
                 without: the reduction must add no host copies"
            );
            assert!(
                synced.during_backward,
                "rank {rank}: buckets launched during backward"
            );
            println!(
                "world {world} rank {rank}: (htod, dtoh) during backward {:?} without, {:?} with the reducer",
                plain.copies, synced.copies
            );
        }
    }
}
