//! Bucketed gradient averaging during backward, on small models with 2 and 4 ranks
//! (threads over the in-process group): buckets are launched while backward still
//! runs, in bucket order, and the gradients (and, through the Runner, the weights
//! with clipping and accumulation) equal a single process averaging the ranks'
//! gradients itself. With accumulation the ranks reduce only in the last micro-step's
//! backward (DDP's `no_sync`), and the weights equal one process that sums each rank's
//! micro-batches and averages the sums.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kestrel::autograd::Tape;
use kestrel::dist::{distribute_runner, local_group, BucketLaunch, Comm, DistOptions, GradReducer};
use kestrel::ops;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::runner::{hooks, GradSync, Mode, Model, Runner, Schedule, VecLoader};
use kestrel::{Result, Tensor};

const D: usize = 6;
const LAYERS: usize = 4;

fn weights() -> Vec<Tensor> {
    let mut rng = Rng::new(7);
    (0..LAYERS)
        .map(|_| {
            let v: Vec<f32> = (0..D * D).map(|_| rng.range(-0.5, 0.5) as f32).collect();
            Tensor::from_vec(v, [D, D]).unwrap()
        })
        .collect()
}

fn input(rank: usize) -> Tensor {
    let mut rng = Rng::new(100 + rank as u64);
    let v: Vec<f32> = (0..3 * D).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, [3, D]).unwrap()
}

/// sum(relu(... relu(x W0ᵀ) ... W3ᵀ)²): LAYERS linear layers, each param used once.
fn forward(ws: &[Tensor], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for w in ws {
        h = ops::relu(&ops::linear::linear(&h, w, None)?)?;
    }
    ops::sum(&ops::mul(&h, &h)?)
}

/// One rank's backward with the reducer attached; returns the averaged gradients.
fn rank_backward(reducer: &mut GradReducer, rank: usize) -> Vec<Option<Tensor>> {
    let ws = weights();
    let tape = Tape::new();
    ws.iter().for_each(|w| tape.watch(w));
    let loss = {
        let _a = tape.activate();
        forward(&ws, &input(rank)).unwrap()
    };
    reducer.attach(&tape, &ws).unwrap();
    let g = tape.backward(&loss).unwrap();
    let mut grads: Vec<Option<Tensor>> = ws.iter().map(|w| g.get(w).cloned()).collect();
    reducer.finish(&mut grads).unwrap();
    grads
}

/// The reference: each rank's gradients on its own (no reducer), averaged here.
fn reference_average(world: usize) -> Vec<Vec<f32>> {
    let ws = weights();
    let per_rank: Vec<Vec<Vec<f32>>> = (0..world)
        .map(|r| {
            let tape = Tape::new();
            ws.iter().for_each(|w| tape.watch(w));
            let loss = {
                let _a = tape.activate();
                forward(&ws, &input(r)).unwrap()
            };
            let g = tape.backward(&loss).unwrap();
            ws.iter()
                .map(|w| g.expect(w).unwrap().to_vec::<f32>().unwrap())
                .collect()
        })
        .collect();
    (0..LAYERS)
        .map(|p| {
            (0..D * D)
                .map(|i| {
                    let mut s = 0.0f32;
                    for g in &per_rank {
                        s += g[p][i];
                    }
                    s / world as f32
                })
                .collect()
        })
        .collect()
}

#[test]
fn buckets_launch_during_backward_in_order() {
    for world in [2usize, 4] {
        let comms = local_group(world, Duration::from_secs(30)).unwrap();
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                std::thread::spawn(move || {
                    // One parameter (144 bytes) per bucket.
                    let mut reducer = GradReducer::new(Arc::new(c) as Comm, 100);
                    let log = reducer.launch_log();
                    let grads = rank_backward(&mut reducer, rank);
                    let buckets = reducer.buckets().to_vec();
                    let launches = log.lock().unwrap().clone();
                    (grads, buckets, launches)
                })
            })
            .collect();
        let want = reference_average(world);
        for (rank, h) in handles.into_iter().enumerate() {
            let (grads, buckets, launches) = h.join().unwrap();
            // Reverse parameter order, one per bucket.
            assert_eq!(buckets, vec![vec![3], vec![2], vec![1], vec![0]]);
            let order: Vec<usize> = launches.iter().map(|l| l.bucket).collect();
            assert_eq!(order, vec![0, 1, 2, 3], "rank {rank}: launch order");
            let done: Vec<usize> = launches
                .iter()
                .map(|l| l.ops_done.expect("launched during backward, not after it"))
                .collect();
            let total = launches[0].ops_total;
            // The backward of the last layer (linear + relu, and the loss's mul and
            // sum) completes W3's gradient: bucket 0 goes out after a few of the
            // pass's closures, long before its end; later buckets follow layer by layer.
            assert!(
                done.windows(2).all(|w| w[0] < w[1]),
                "rank {rank}: launches at closures {done:?} of {total}"
            );
            assert!(
                done[0] <= total / 2 && done[2] < total,
                "rank {rank}: launches at closures {done:?} of {total}"
            );
            for (p, g) in grads.iter().enumerate() {
                let got = g.as_ref().unwrap().to_vec::<f32>().unwrap();
                assert_eq!(
                    got, want[p],
                    "rank {rank} of {world}: averaged grad of W{p}"
                );
            }
        }
    }
}

// ---- through the Runner: clipping and accumulation ------------------------------

/// y = x Wᵀ + b, loss = mean((y - t)²), on rows of [x (4) | t (2)].
struct Regression {
    w: Tensor,
    b: Tensor,
}

impl Model for Regression {
    type Batch = Vec<Vec<f32>>;
    fn params(&self) -> Vec<(String, Tensor)> {
        vec![("w".into(), self.w.clone()), ("b".into(), self.b.clone())]
    }
    fn set_params(&mut self, p: Vec<Tensor>) -> Result<()> {
        self.w = p[0].clone();
        self.b = p[1].clone();
        Ok(())
    }
    fn train_step(&mut self, batch: &Self::Batch, _: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let n = batch.len();
        let x: Vec<f32> = batch.iter().flat_map(|r| r[..4].to_vec()).collect();
        let neg_t: Vec<f32> = batch
            .iter()
            .flat_map(|r| r[4..].iter().map(|v| -v))
            .collect();
        let y = ops::linear::linear(&Tensor::from_vec(x, [n, 4])?, &self.w, Some(&self.b))?;
        let d = ops::add(&y, &Tensor::from_vec(neg_t, [n, 2])?)?;
        Ok(vec![("loss_mse".into(), ops::mean(&ops::mul(&d, &d)?)?)])
    }
}

fn regression() -> Regression {
    Regression {
        w: Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 0.05, 0.1, -0.1, 0.2], [2, 4]).unwrap(),
        b: Tensor::from_vec(vec![0.0f32, 0.1], [2]).unwrap(),
    }
}

fn rows(seed: u64, n: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (0..6).map(|_| rng.range(-2.0, 2.0) as f32).collect())
        .collect()
}

const STEPS: usize = 6;
const ACCUM: usize = 2;
const MAX_NORM: f64 = 0.5;

fn sgd() -> Box<Sgd> {
    Box::new(
        Sgd::new(SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-3,
            ..SgdConfig::default()
        })
        .unwrap(),
    )
}

/// Rank `r`'s shard: its own rows, two per batch, in order.
fn shard(r: usize) -> Vec<Vec<f32>> {
    rows(1000 + r as u64, 2 * STEPS)
}

fn run_rank(comm: Comm, dir: std::path::PathBuf) -> (Vec<Vec<f32>>, Vec<BucketLaunch>) {
    let mut runner = Runner::new(regression(), sgd(), dir, Schedule::Iters(STEPS), 0);
    runner.log.quiet = true;
    runner.set_train_loader(Box::new(
        VecLoader::new(shard(comm.rank()), 2, false, 0).unwrap(),
    ));
    runner.register_hook(
        hooks::OptimizerHook::new()
            .with_grad_clip(MAX_NORM, 2.0)
            .with_cumulative_iters(ACCUM),
    );
    let log = distribute_runner(&mut runner, comm, &DistOptions::default()).unwrap();
    runner.run(&[(Mode::Train, 1)]).unwrap();
    let w = runner
        .model
        .params()
        .iter()
        .map(|(_, t)| t.to_vec::<f32>().unwrap())
        .collect();
    let launches = log.lock().unwrap().clone();
    (w, launches)
}

/// The reference written without the runner, in the order of DDP with `no_sync`:
/// per micro-step, each rank's gradient of loss / ACCUM, summed over the ACCUM
/// micro-steps on that rank alone; at the step, the ranks' sums averaged (added in
/// rank order, divided by the world size), clipped to total 2-norm MAX_NORM, then one
/// SGD step.
fn reference(world: usize) -> Vec<Vec<f32>> {
    let mut model = regression();
    let mut opt = sgd();
    let mut rng = Rng::new(0);
    let mut acc: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None, None]; world];
    for step in 0..STEPS {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let batch = shard(r)[2 * step..2 * step + 2].to_vec();
            let tape = Tape::new();
            let params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
            params.iter().for_each(|p| tape.watch(p));
            let loss = {
                let _a = tape.activate();
                model.train_step(&batch, &mut rng).unwrap().remove(0).1
            };
            let seed = Tensor::full(
                loss.shape().clone(),
                1.0 / ACCUM as f64,
                loss.dtype(),
                loss.device(),
            )
            .unwrap();
            let g = tape.backward_with(&loss, seed).unwrap();
            for (p, slot) in params.iter().zip(acc_r.iter_mut()) {
                let v = g.expect(p).unwrap().to_vec::<f32>().unwrap();
                *slot = Some(match slot.take() {
                    Some(prev) => prev.iter().zip(&v).map(|(a, b)| a + b).collect(),
                    None => v,
                });
            }
        }
        if (step + 1) % ACCUM == 0 {
            let mut g: Vec<Vec<f32>> = vec![vec![0.0; 8], vec![0.0; 2]];
            for acc_r in acc.iter_mut() {
                for (a, slot) in g.iter_mut().zip(acc_r.iter_mut()) {
                    let v = slot.take().unwrap();
                    a.iter_mut().zip(v).for_each(|(x, y)| *x += y);
                }
            }
            g.iter_mut()
                .for_each(|a| a.iter_mut().for_each(|x| *x /= world as f32));
            let total = g
                .iter()
                .map(|v| {
                    v.iter()
                        .map(|&x| (x as f64) * (x as f64))
                        .sum::<f64>()
                        .sqrt()
                })
                .map(|n| n * n)
                .sum::<f64>()
                .sqrt();
            let coef = (MAX_NORM / (total + 1e-6)).min(1.0);
            let grads: Vec<Option<Tensor>> = g
                .iter()
                .zip([vec![2usize, 4], vec![2usize]])
                .map(|(v, shape)| {
                    let t = Tensor::from_vec(v.clone(), shape).unwrap();
                    Some(if coef < 1.0 {
                        ops::scale(&t, coef).unwrap()
                    } else {
                        t
                    })
                })
                .collect();
            let mut params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
            kestrel::runner::Optimizer::step(opt.as_mut(), &mut params, &grads).unwrap();
            model.set_params(params).unwrap();
        }
    }
    model
        .params()
        .iter()
        .map(|(_, t)| t.to_vec::<f32>().unwrap())
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn runner_with_clipping_and_accumulation_matches_reference() {
    let tmp = std::env::temp_dir().join(format!("kestrel-dist-reg-{}", std::process::id()));
    for world in [2usize, 4] {
        let comms = local_group(world, Duration::from_secs(30)).unwrap();
        let results = Arc::new(Mutex::new(vec![(Vec::new(), Vec::new()); world]));
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let (results, dir) = (results.clone(), tmp.join(format!("w{world}")));
                std::thread::spawn(move || {
                    let w = run_rank(Arc::new(c), dir);
                    results.lock().unwrap()[r] = w;
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        let results = results.lock().unwrap().clone();
        let want = reference(world);
        for (r, (got, launches)) in results.iter().enumerate() {
            assert_eq!(
                got, &results[0].0,
                "rank {r} ended with other weights than rank 0"
            );
            // The runner clips in f64 from the same f32 gradients; the same arithmetic
            // in the same order: equal to the last bit (tolerance 0).
            let d = max_abs_diff(got, &want);
            assert!(d == 0.0, "world {world}: max |Δw| {d:e}\n{got:?}\n{want:?}");
            // no_sync: one reduction (one bucket: two small parameters) per optimizer
            // step, not per micro-step, and it goes out during the last backward.
            assert_eq!(
                launches.len(),
                STEPS / ACCUM,
                "rank {r}: bucket launches {launches:?}"
            );
            assert!(
                launches.iter().all(|l| l.ops_done.is_some()),
                "rank {r}: a bucket launched after backward: {launches:?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
}
