//! The collective interface on its CPU implementations: the in-process group (one
//! thread per rank) and TCP (threads standing in for processes, over localhost).
//! Results are checked against sums written out independently; failures (a rank that
//! never arrives, dies or calls another collective) must be errors naming the rank,
//! within the timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kestrel::data::{InMemory, Loader, LoaderConfig, Sample, Shard};
use kestrel::dist::{local_group, Collective, ReduceOp, Rendezvous, TcpComm};

/// Run `f(rank, comm)` on one thread per communicator; results in rank order.
fn on_threads<C, T, F>(comms: Vec<C>, f: F) -> Vec<T>
where
    C: Collective + 'static,
    T: Send + 'static,
    F: Fn(usize, C) -> T + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank r's vector: r * 10 + i + 0.25.
fn values(r: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (r * 10 + i) as f32 + 0.25).collect()
}

fn check_collectives<C: Collective + 'static>(comms: Vec<C>) {
    let w = comms.len();
    let out = on_threads(comms, move |r, c| {
        let mut sum = values(r, 5);
        c.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
        let mut avg = values(r, 5);
        c.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
        let mut b = values(r, 3);
        c.broadcast(&mut b, w - 1).unwrap();
        // Lengths differ by rank.
        let g = c.all_gather(&values(r, r + 1)).unwrap();
        c.barrier().unwrap();
        (sum, avg, b, g)
    });
    for (sum, avg, b, g) in out {
        for i in 0..5 {
            // sum over r of (10 r + i + 0.25), exact in f32 at these sizes.
            let want: f32 = (0..w).map(|r| (r * 10 + i) as f32 + 0.25).sum();
            assert_eq!(sum[i], want, "sum[{i}] with {w} ranks");
            assert_eq!(avg[i], want / w as f32, "avg[{i}] with {w} ranks");
        }
        assert_eq!(b, values(w - 1, 3), "broadcast from the last rank");
        for (r, part) in g.iter().enumerate() {
            assert_eq!(part, &values(r, r + 1), "all_gather part of rank {r}");
        }
    }
}

#[test]
fn local_group_collectives_2_and_4_ranks() {
    for w in [1, 2, 4] {
        check_collectives(local_group(w, Duration::from_secs(20)).unwrap());
    }
}

/// A rank that never calls: the others fail within the timeout, naming it.
#[test]
fn local_group_missing_rank_is_named_within_timeout() {
    let mut comms = local_group(3, Duration::from_millis(300)).unwrap();
    let silent = comms.pop().unwrap(); // rank 2 never calls (but stays alive)
    let t0 = Instant::now();
    let errs = on_threads(comms, |_, c| c.barrier().unwrap_err().to_string());
    let took = t0.elapsed();
    for e in errs {
        assert!(e.contains("rank 2 did not arrive"), "{e}");
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(silent);
}

/// A rank that stops (its communicator dropped, or aborted with a reason) makes the
/// others' collective fail at once, naming it and the reason.
#[test]
fn local_group_dead_rank_is_named() {
    let comms = local_group(4, Duration::from_secs(60)).unwrap();
    let t0 = Instant::now();
    let out = on_threads(comms, |r, c| {
        let mut v = vec![1.0f32; 4];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        match r {
            1 => {
                c.abort("out of memory in the forward pass");
                None
            }
            3 => {
                drop(c);
                None
            }
            _ => Some(c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()),
        }
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    for e in out.into_iter().flatten() {
        assert!(
            e.contains("rank 1 failed: out of memory") || e.contains("rank 3 left the group"),
            "{e}"
        );
    }
}

#[test]
fn local_group_mismatched_collectives_are_an_error() {
    let comms = local_group(2, Duration::from_secs(20)).unwrap();
    let out = on_threads(comms, |r, c| {
        let mut v = vec![0.0f32; 2 + r];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
    });
    for e in out {
        assert!(
            e.contains("rank 1 called all_reduce(Sum) of 3 values"),
            "{e}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rdv(world: usize, rank: usize, port: u16) -> Rendezvous {
    Rendezvous {
        world_size: world,
        rank,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn tcp_group(world: usize, timeout: Duration) -> Vec<TcpComm> {
    let port = free_port();
    let hs: Vec<_> = (0..world)
        .map(|r| std::thread::spawn(move || TcpComm::connect(&rdv(world, r, port), timeout)))
        .collect();
    hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

#[test]
fn tcp_collectives_2_and_4_ranks() {
    for w in [1, 2, 4] {
        check_collectives(tcp_group(w, Duration::from_secs(20)));
    }
}

#[test]
fn tcp_rank_that_never_connects_is_named() {
    let port = free_port();
    let t0 = Instant::now();
    // Ranks 0 and 1 of 3 come; rank 2 never does.
    let hs: Vec<_> = (0..2)
        .map(|r| {
            std::thread::spawn(move || {
                TcpComm::connect(&rdv(3, r, port), Duration::from_millis(800))
                    .err()
                    .map(|e| e.to_string())
            })
        })
        .collect();
    for h in hs {
        let e = h.join().unwrap().expect("an error");
        assert!(e.contains("rank 2 did not arrive"), "{e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

#[test]
fn tcp_dead_rank_is_named() {
    let comms = tcp_group(3, Duration::from_secs(30));
    let t0 = Instant::now();
    let out = on_threads(comms, |r, c| {
        c.barrier().unwrap();
        if r == 2 {
            drop(c); // the process died: its socket closes
            return None;
        }
        let mut v = vec![1.0f32; 3];
        Some(c.all_reduce(&mut v, ReduceOp::Avg).unwrap_err().to_string())
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    for e in out.into_iter().flatten() {
        assert!(e.contains("rank 2 closed its connection"), "{e}");
    }
}

/// DistributedSampler through the loader: the shards of an epoch are equally long,
/// cover the dataset, overlap only in the padding, and follow the epoch's shuffle.
#[test]
fn sharded_loader_covers_the_epoch() {
    let n: usize = 11;
    let samples: Vec<Sample> = (0..n)
        .map(|i| Sample {
            image: vec![0; 3 * 4 * 4],
            height: 4,
            width: 4,
            boxes: vec![],
            labels: vec![],
            image_id: i as i64,
        })
        .collect();
    let ds = Arc::new(InMemory(samples));
    let cfg = LoaderConfig {
        batch_size: 2,
        workers: 0,
        ..LoaderConfig::default()
    };
    let full = Loader::new(ds.clone(), cfg.clone()).unwrap();
    for w in [2usize, 4] {
        for epoch in [0u64, 3] {
            let order = full.order(epoch);
            let mut seen = Vec::new();
            for r in 0..w {
                let l = Loader::new(ds.clone(), cfg.clone())
                    .unwrap()
                    .sharded(Shard::new(r, w).unwrap())
                    .unwrap();
                let mine = l.order(epoch);
                assert_eq!(mine.len(), n.div_ceil(w), "rank {r} of {w}");
                // Position r, r + w, ... of the padded order.
                let want: Vec<usize> = (r..n.div_ceil(w) * w)
                    .step_by(w)
                    .map(|i| order[i % n])
                    .collect();
                assert_eq!(mine, want, "rank {r} of {w}, epoch {epoch}");
                assert_eq!(l.batches_per_epoch(), n.div_ceil(w).div_ceil(2));
                let b = l.load_batch(epoch, 0).unwrap();
                assert_eq!(b.indices, mine[..2].to_vec());
                seen.extend(mine);
            }
            seen.sort();
            seen.dedup();
            assert_eq!(
                seen,
                (0..n).collect::<Vec<_>>(),
                "the shards cover the dataset"
            );
        }
    }
    assert!(Loader::new(ds, cfg)
        .unwrap()
        .sharded(Shard {
            rank: 4,
            world_size: 4,
            drop_last: false
        })
        .is_err());
}
