//! The stream/event order of device gradient buckets, on emulated devices with 2 and
//! 4 ranks (the order NCCL's communication stream relies on; see
//! `kestrel::dist::BucketQueues`):
//!
//! - for every rank and bucket: the ready event is recorded on the compute queue
//!   before the communication queue waits for it, the all-reduce starts only after
//!   that wait, the done event is recorded after the all-reduce ends, and the
//!   compute queue waits for it before the optimizer runs (a mark the test sets
//!   just before its SGD update); the communication queue handles the buckets in
//!   bucket order, the same on every rank;
//! - buckets are handed over during backward;
//! - with each all-reduce held back 30 ms (a slow link), the SGD update still reads
//!   the averages: the updated weights equal `w - lr * mean_r(g_r)` computed on the
//!   host from the ranks' own gradients, bit for bit (W = 2, 4: `1 / W` is exact);
//! - the reduction adds no host copy on the training thread.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::emulated;
use kestrel::autograd::Tape;
use kestrel::dist::{local_group, Collective, Comm, GradReducer, Queue, QueueEntry, QueueStep};
use kestrel::ops;
use kestrel::runner::GradSync;
use kestrel::{Device, Tensor};

use common::dist_mlp::{forward, input, weights, D, LAYERS};
const LR: f32 = 0.125;

struct RankResult {
    own: Vec<Vec<f32>>,
    before: Vec<Vec<f32>>,
    after: Vec<Vec<f32>>,
    copies_plain: (u64, u64),
    copies_synced: (u64, u64),
    during_backward: bool,
}

fn host(v: &[Tensor]) -> Vec<Vec<f32>> {
    v.iter().map(|t| t.to_vec::<f32>().unwrap()).collect()
}

/// One backward with the reducer, then the "optimizer" (marked in the queue log):
/// `w - LR * g` on the device.
fn rank_step(dev: Device, comm: Comm, mark: impl Fn(&str)) -> RankResult {
    let ws = weights(11, dev);
    let x = input(200 + comm.rank() as u64, dev);
    let pass = |reducer: Option<&mut GradReducer>| {
        let tape = Tape::new();
        ws.iter().for_each(|w| tape.watch(w));
        let loss = {
            let _a = tape.activate();
            forward(&ws, &x).unwrap()
        };
        let seed = Tensor::full(loss.shape().clone(), 1.0, loss.dtype(), dev).unwrap();
        let scope = dev.counters();
        let mut reducer = reducer;
        if let Some(r) = &mut reducer {
            r.attach(&tape, &ws).unwrap();
        }
        let g = tape.backward_with(&loss, seed).unwrap();
        let mut grads: Vec<Option<Tensor>> = ws.iter().map(|w| g.get(w).cloned()).collect();
        if let Some(r) = &mut reducer {
            r.finish(&mut grads).unwrap();
        }
        let d = scope.delta();
        (
            grads.into_iter().map(Option::unwrap).collect::<Vec<_>>(),
            (d.htod, d.dtoh),
        )
    };
    let (own, copies_plain) = pass(None);
    // One parameter per bucket: four device buckets.
    let mut reducer = GradReducer::new(comm.clone(), 100);
    comm.barrier().unwrap();
    let (reduced, copies_synced) = pass(Some(&mut reducer));
    mark("optimizer");
    let after: Vec<Tensor> = ws
        .iter()
        .zip(&reduced)
        .map(|(w, g)| ops::add(w, &ops::scale(g, -(LR as f64)).unwrap()).unwrap())
        .collect();
    let launches = reducer.launch_log();
    let during_backward = {
        let l = launches.lock().unwrap();
        l.len() == LAYERS && l.iter().all(|b| b.ops_done.is_some())
    };
    RankResult {
        own: host(&own),
        before: host(&ws),
        after: host(&after),
        copies_plain,
        copies_synced,
        during_backward,
    }
}

fn position(log: &[QueueEntry], rank: usize, bucket: Option<usize>, step: &QueueStep) -> usize {
    let hits: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.rank == rank && e.bucket == bucket && &e.step == step)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "rank {rank} bucket {bucket:?}: {step:?} logged {} times",
        hits.len()
    );
    hits[0]
}

#[test]
fn bucket_queues_order_and_values_emulated() {
    let dev = emulated();
    for world in [2usize, 4] {
        let comms = local_group(world, Duration::from_secs(60)).unwrap();
        let log = comms[0].queues().log();
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                c.queues().set_delay(Duration::from_millis(30));
                let q = c.queues();
                let rank = c.rank();
                std::thread::spawn(move || {
                    let comm: Comm = Arc::new(c);
                    rank_step(dev, comm, |m| q.log().mark(rank, m))
                })
            })
            .collect();
        let results: Vec<RankResult> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let log = log.entries();

        // Order, per rank and bucket.
        use QueueStep::*;
        let chain = [
            (Queue::Compute, ReadyRecorded),
            (Queue::Comm, ReadyWaited),
            (Queue::Comm, ReduceStart),
            (Queue::Comm, ReduceEnd),
            (Queue::Comm, DoneRecorded),
            (Queue::Compute, DoneWaited),
        ];
        for rank in 0..world {
            let opt = position(&log, rank, None, &Mark("optimizer".into()));
            let mut prev_start = None;
            for b in 0..LAYERS {
                let mut prev = None;
                for (queue, step) in &chain {
                    let i = position(&log, rank, Some(b), step);
                    assert_eq!(log[i].queue, *queue, "rank {rank} bucket {b}: {step:?}");
                    if let Some((p, ps)) = prev {
                        assert!(
                            p < i,
                            "rank {rank} bucket {b}: {ps:?} (at {p}) must come before {step:?} (at {i})"
                        );
                    }
                    prev = Some((i, step.clone()));
                }
                let done_waited = prev.unwrap().0;
                assert!(
                    done_waited < opt,
                    "rank {rank}: the optimizer (at {opt}) ran before bucket {b}'s done event was waited for (at {done_waited})"
                );
                let start = position(&log, rank, Some(b), &ReduceStart);
                if let Some(p) = prev_start {
                    assert!(p < start, "rank {rank}: bucket {b} reduced out of order");
                }
                prev_start = Some(start);
            }
        }
        assert_eq!(
            log.len(),
            world * (LAYERS * chain.len() + 1),
            "nothing else logged"
        );

        // Values: w - LR * mean(g), the mean in rank order in f32 as the group adds.
        let mut mean = vec![vec![0.0f32; D * D]; LAYERS];
        for r in &results {
            for (m, g) in mean.iter_mut().zip(&r.own) {
                m.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        mean.iter_mut()
            .for_each(|m| m.iter_mut().for_each(|v| *v /= world as f32));
        for (rank, r) in results.iter().enumerate() {
            let want: Vec<Vec<f32>> = r
                .before
                .iter()
                .zip(&mean)
                .map(|(w, g)| w.iter().zip(g).map(|(w, g)| w + g * -LR).collect())
                .collect();
            assert_eq!(
                r.after, want,
                "rank {rank} of {world}: updated weights vs w - lr * host mean of the ranks' gradients"
            );
            assert_ne!(
                r.own, mean,
                "rank {rank}: the shards must differ, or the check could not fail"
            );
            assert_eq!(
                r.copies_synced, r.copies_plain,
                "rank {rank} of {world}: (htod, dtoh) with the queued reduction vs without"
            );
            assert!(
                r.during_backward,
                "rank {rank}: buckets launched during backward"
            );
        }
        println!(
            "world {world}: {} queue steps in order; (htod, dtoh) per backward {:?} with and without",
            log.len(),
            results[0].copies_synced
        );
    }
}
