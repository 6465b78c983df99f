//! NCCL on a real GPU (built only with `--features nccl`; staged and run by
//! `scripts/gpu_check.sh`). A world of one on `cuda:0`: the gradient buckets go
//! through NCCL's communication stream ordered by CUDA events
//! (`kestrel::dist::BucketQueues`), and
//!
//! - the averaged gradients equal the rank's own (the mean over one rank), bit for bit
//!   (`ncclAvg` over one rank is a copy), which fails if the compute stream read the
//!   bucket before NCCL wrote it back or if a bucket's slices were misplaced;
//! - the reduction adds no host copy on the training thread (device-resident).
//!
//! The emulated twin of the ordering is tests/dist_queues.rs (2 and 4 ranks).
#![cfg(feature = "nccl")]

use std::time::Duration;

use kestrel::autograd::Tape;
use kestrel::dist::{Comm, GradReducer, NcclComm, Rendezvous, TcpComm};
use kestrel::ops;
use kestrel::rng::Rng;
use kestrel::runner::GradSync;
use kestrel::{Device, Tensor};

#[test]
#[ignore = "needs a CUDA device"]
fn nccl_world_of_one_reduces_on_the_device() {
    let dev = Device::Cuda(0);
    let rdv = Rendezvous {
        world_size: 1,
        rank: 0,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 29541,
    };
    let tcp = TcpComm::connect(&rdv, Duration::from_secs(60)).unwrap();
    let comm: Comm = std::sync::Arc::new(NcclComm::new(tcp, 0).unwrap());
    assert!(comm.bucket_queues().is_some());
    let mut rng = Rng::new(5);
    let ws: Vec<Tensor> = (0..4)
        .map(|_| {
            let v: Vec<f32> = (0..64 * 64).map(|_| rng.range(-0.5, 0.5) as f32).collect();
            Tensor::from_vec(v, [64, 64])
                .unwrap()
                .to_device(dev)
                .unwrap()
        })
        .collect();
    let xv: Vec<f32> = (0..8 * 64).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let x = Tensor::from_vec(xv, [8, 64])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let run = |reducer: Option<&mut GradReducer>| {
        let tape = Tape::new();
        ws.iter().for_each(|w| tape.watch(w));
        let loss = {
            let _a = tape.activate();
            let mut h = x.clone();
            for w in &ws {
                h = ops::relu(&ops::linear::linear(&h, w, None).unwrap()).unwrap();
            }
            ops::sum(&ops::mul(&h, &h).unwrap()).unwrap()
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
        let host: Vec<Vec<f32>> = grads
            .iter()
            .map(|t| t.as_ref().unwrap().to_vec::<f32>().unwrap())
            .collect();
        (host, (d.htod, d.dtoh))
    };
    let (own, plain) = run(None);
    // One parameter per bucket: four buckets through NCCL.
    let mut reducer = GradReducer::new(comm.clone(), 100);
    let (avg, synced) = run(Some(&mut reducer));
    assert_eq!(
        avg, own,
        "NCCL average over one rank vs the rank's own gradients"
    );
    assert_eq!(
        synced, plain,
        "(htod, dtoh) with the NCCL reduction vs without: must add none"
    );
    println!("NCCL world of one: 4 device buckets, (htod, dtoh) {synced:?} with and without");
}
