//! The runner and its hooks: hook order, LR schedules against hand-computed values,
//! resume bit for bit, checkpoint atomicity, the NaN guard, gradient clipping,
//! accumulation, EMA, evaluation, logging.
//!
//! The model is a linear regression `y = x·w + b` built from kestrel::ops on a fixed
//! synthetic dataset, trained by a plain momentum SGD written here (the real one lives
//! in kestrel::optim).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use kestrel::rng::Rng;
use kestrel::runner::hooks::{
    CheckpointHook, EmaHook, EvalHook, IterTimerHook, LoggerHook, LrPolicy, LrUpdaterHook,
    NanGuardHook, OptimizerHook, Warmup,
};
use kestrel::runner::{
    epoch_permutation, parse_losses, DataLoader, Hook, Mode, Model, Optimizer, Priority, Runner,
    Schedule, VecLoader,
};
use kestrel::{ops, Error, Result, Tensor};

// ---- test model, optimizer, data ----------------------------------------------------

const D: usize = 3;
type Sample = (Vec<f32>, f32);

/// y = x·w + b; loss_mse = mean over the batch of rng-weighted squared errors (the
/// weights come from the runner's stream, so a resume must restore it).
#[derive(Clone)]
struct LinReg {
    w: Tensor,
    b: Tensor,
    calls: usize,
    nan_at_call: Option<usize>,
}

impl LinReg {
    fn new() -> Self {
        LinReg {
            w: Tensor::from_vec(vec![0.1f32, -0.2, 0.05], [D]).unwrap(),
            b: Tensor::from_vec(vec![0.0f32], [1]).unwrap(),
            calls: 0,
            nan_at_call: None,
        }
    }
}

impl Model for LinReg {
    type Batch = Vec<Sample>;

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![("w".into(), self.w.clone()), ("b".into(), self.b.clone())]
    }

    fn set_params(&mut self, p: Vec<Tensor>) -> Result<()> {
        let [w, b]: [Tensor; 2] = p
            .try_into()
            .map_err(|_| Error::invalid("LinReg", "two parameters"))?;
        self.w = w;
        self.b = b;
        Ok(())
    }

    fn train_step(&mut self, batch: &Vec<Sample>, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        self.calls += 1;
        let b = ops::reshape(&self.b, Vec::<usize>::new())?;
        let mut total: Option<Tensor> = None;
        for (x, y) in batch {
            let xt = Tensor::from_vec(x.clone(), [D])?;
            let pred = ops::add(&ops::sum(&ops::mul(&xt, &self.w)?)?, &b)?;
            let r = ops::add(&pred, &Tensor::from_vec(vec![-*y], Vec::<usize>::new())?)?;
            let sq = ops::scale(&ops::mul(&r, &r)?, 0.5 + rng.uniform())?;
            total = Some(match total {
                Some(t) => ops::add(&t, &sq)?,
                None => sq,
            });
        }
        let mut loss = ops::scale(&total.expect("non-empty batch"), 1.0 / batch.len() as f64)?;
        if self.nan_at_call == Some(self.calls) {
            loss = ops::scale(&loss, f64::NAN)?;
        }
        let w_abs: f32 = self.w.to_vec::<f32>()?.iter().map(|v| v.abs()).sum();
        Ok(vec![
            ("loss_mse".into(), loss),
            ("w_l1".into(), Tensor::from_vec(vec![w_abs], [1])?),
        ])
    }

    fn num_samples(&self, batch: &Vec<Sample>) -> usize {
        batch.len()
    }
}

/// Plain SGD with momentum and weight decay, PyTorch's update:
/// d = g + wd * p; buf = momentum * buf + d (buf = d at first); p -= lr * buf.
struct TestSgd {
    lr: f64,
    momentum: f32,
    weight_decay: f32,
    bufs: Vec<Option<Vec<f32>>>,
    steps: Rc<RefCell<usize>>,
}

impl TestSgd {
    fn new(lr: f64, momentum: f32, weight_decay: f32) -> Self {
        TestSgd {
            lr,
            momentum,
            weight_decay,
            bufs: Vec::new(),
            steps: Rc::new(RefCell::new(0)),
        }
    }
}

impl Optimizer for TestSgd {
    fn step(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        *self.steps.borrow_mut() += 1;
        self.bufs.resize(params.len(), None);
        let lr = self.lr as f32;
        for ((p, g), buf) in params.iter_mut().zip(grads).zip(self.bufs.iter_mut()) {
            let Some(g) = g else { continue };
            let pv = p.to_vec::<f32>()?;
            let gv = g.to_vec::<f32>()?;
            let d: Vec<f32> = gv
                .iter()
                .zip(&pv)
                .map(|(g, p)| g + self.weight_decay * p)
                .collect();
            let b = match buf.take() {
                Some(b) if self.momentum != 0.0 => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| self.momentum * b + d)
                    .collect(),
                _ => d,
            };
            let np: Vec<f32> = pv.iter().zip(&b).map(|(p, b)| p - lr * b).collect();
            *p = Tensor::from_vec(np, p.shape().clone())?;
            *buf = Some(b);
        }
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        self.bufs
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.as_ref().map(|b| {
                    (
                        format!("momentum_buffer.{i}"),
                        Tensor::from_slice(b, [b.len()]).unwrap(),
                    )
                })
            })
            .collect()
    }
    fn load_state(&mut self, s: Vec<(String, Tensor)>) -> Result<()> {
        self.bufs.clear();
        for (n, t) in s {
            let i: usize = n
                .strip_prefix("momentum_buffer.")
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| Error::invalid("TestSgd", format!("unknown state {n}")))?;
            if self.bufs.len() <= i {
                self.bufs.resize(i + 1, None);
            }
            self.bufs[i] = Some(t.to_vec::<f32>()?);
        }
        Ok(())
    }
}

/// 10 points of y = x·(1, -2, 0.5) + 0.3 + noise, fixed by a seed.
fn dataset() -> Vec<Sample> {
    let mut rng = Rng::new(7);
    (0..10)
        .map(|_| {
            let x: Vec<f32> = (0..D).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            let y = x[0] - 2.0 * x[1] + 0.5 * x[2] + 0.3 + 0.05 * rng.normal() as f32;
            (x, y)
        })
        .collect()
}

/// Shuffled batches of 3: 4 batches per epoch, the last of one sample.
fn loader() -> Box<dyn DataLoader<Batch = Vec<Sample>>> {
    Box::new(VecLoader::new(dataset(), 3, true, 11).unwrap())
}

/// A fresh directory per call (tests run in parallel threads of one process).
fn tmp_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("kestrel-runner-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn runner(dir: &Path, schedule: Schedule, lr: f64) -> Runner<LinReg> {
    let mut r = Runner::new(
        LinReg::new(),
        Box::new(TestSgd::new(lr, 0.9, 1e-4)),
        dir,
        schedule,
        5,
    );
    r.log.quiet = true;
    r.set_train_loader(loader());
    r
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn param_bits<M: Model>(r: &Runner<M>) -> Vec<(String, Vec<u32>)> {
    r.model
        .params()
        .iter()
        .map(|(n, t)| (n.clone(), bits(t)))
        .collect()
}

/// Records `name@stage` into a shared list.
struct Recorder {
    name: &'static str,
    log: Rc<RefCell<Vec<String>>>,
    priority: Priority,
}

impl Recorder {
    fn push(&self, stage: &str) {
        self.log.borrow_mut().push(format!("{}@{stage}", self.name));
    }
}

impl<M: Model> Hook<M> for Recorder {
    fn name(&self) -> String {
        self.name.to_string()
    }
    fn priority(&self) -> Priority {
        self.priority
    }
    fn before_run(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("before_run");
        Ok(())
    }
    fn after_run(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("after_run");
        Ok(())
    }
    fn before_train_epoch(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("before_train_epoch");
        Ok(())
    }
    fn after_train_epoch(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("after_train_epoch");
        Ok(())
    }
    fn before_train_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        self.push(&format!("before_train_iter{}", r.iter()));
        Ok(())
    }
    fn after_train_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        self.push(&format!("after_train_iter{}", r.iter()));
        Ok(())
    }
    fn before_val_epoch(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("before_val_epoch");
        Ok(())
    }
    fn after_val_epoch(&mut self, _: &mut Runner<M>) -> Result<()> {
        self.push("after_val_epoch");
        Ok(())
    }
    fn before_val_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        self.push(&format!("before_val_iter{}", r.inner_iter()));
        Ok(())
    }
    fn after_val_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        self.push(&format!("after_val_iter{}", r.inner_iter()));
        Ok(())
    }
}

/// Records the optimizer's learning rate before each training iteration.
struct LrProbe(Rc<RefCell<Vec<f64>>>);

impl<M: Model> Hook<M> for LrProbe {
    fn priority(&self) -> Priority {
        Priority::LOWEST
    }
    fn before_train_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        self.0.borrow_mut().push(r.current_lr());
        Ok(())
    }
}

/// Fails the run after iteration `at` (1-based) has finished all its hooks, as a
/// killed process would stop.
struct Crash {
    at: usize,
}

impl<M: Model> Hook<M> for Crash {
    fn priority(&self) -> Priority {
        Priority::LOWEST
    }
    fn after_train_iter(&mut self, r: &mut Runner<M>) -> Result<()> {
        if r.iter() + 1 == self.at {
            return Err(Error::Training(format!(
                "simulated crash after iteration {}",
                self.at
            )));
        }
        Ok(())
    }
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "[{i}] got {g}, want {w} (all: {got:?})"
        );
    }
}

// ---- hook order ---------------------------------------------------------------------

#[test]
fn hooks_run_in_priority_order_ties_in_registration_order() {
    let dir = tmp_dir("order");
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Epochs(1), 0.01);
    let rec = |name, priority| Recorder {
        name,
        log: log.clone(),
        priority,
    };
    r.register_hook(rec("low", Priority::LOW));
    r.register_hook(rec("normal_a", Priority::NORMAL));
    r.register_hook(rec("highest", Priority::HIGHEST));
    r.register_hook(rec("normal_b", Priority::NORMAL));
    r.register_hook(rec("lowest", Priority::LOWEST));
    r.register_hook(rec("very_high", Priority::VERY_HIGH));
    r.register_hook_with_priority(rec("p45", Priority::NORMAL), Priority(45));
    r.register_hook(OptimizerHook::new());

    let order: Vec<(String, u8)> = r.hook_order().into_iter().map(|(n, p)| (n, p.0)).collect();
    let want: Vec<(String, u8)> = [
        ("highest", 0),
        ("very_high", 10),
        ("OptimizerHook", 40),
        ("p45", 45),
        ("normal_a", 50),
        ("normal_b", 50),
        ("low", 70),
        ("lowest", 100),
    ]
    .iter()
    .map(|(n, p)| (n.to_string(), *p))
    .collect();
    assert_eq!(order, want);
    let text = r.hook_order_text();
    assert!(text.contains("(VERY_HIGH   ) very_high"), "{text}");
    assert!(text.contains("(45          ) p45"), "{text}");

    r.run(&[(Mode::Train, 1)]).unwrap();
    let calls = log.borrow();
    let at = |stage: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.ends_with(&format!("@{stage}")))
            .map(|c| c.split('@').next().unwrap().to_string())
            .collect()
    };
    let names = [
        "highest",
        "very_high",
        "p45",
        "normal_a",
        "normal_b",
        "low",
        "lowest",
    ];
    for stage in [
        "before_run",
        "before_train_epoch",
        "after_train_iter0",
        "after_run",
    ] {
        assert_eq!(at(stage), names, "stage {stage}");
    }
    // The order is printed at the start of the run (log.txt mirrors stdout).
    let txt = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(
        txt.contains("Hooks, in the order they run:\n(HIGHEST     ) highest"),
        "{txt}"
    );
}

#[test]
fn priority_names_and_values_are_mmcvs() {
    let want = [
        ("HIGHEST", 0),
        ("VERY_HIGH", 10),
        ("HIGH", 30),
        ("ABOVE_NORMAL", 40),
        ("NORMAL", 50),
        ("BELOW_NORMAL", 60),
        ("LOW", 70),
        ("VERY_LOW", 90),
        ("LOWEST", 100),
    ];
    for (name, v) in want {
        assert_eq!(Priority::from_name(name), Some(Priority(v)));
        assert_eq!(Priority(v).name(), Some(name));
    }
    // Default priorities of the shipped hooks (mmcv's, EMA mmdet's 49).
    let p = |h: &dyn Hook<LinReg>| h.priority().0;
    assert_eq!(p(&LrUpdaterHook::new(LrPolicy::Fixed, true)), 10);
    assert_eq!(p(&NanGuardHook::new()), 30);
    assert_eq!(p(&OptimizerHook::new()), 40);
    assert_eq!(p(&EmaHook::new(0.5)), 49);
    assert_eq!(p(&CheckpointHook::new(1, true)), 50);
    assert_eq!(p(&IterTimerHook::new()), 70);
    assert_eq!(p(&LoggerHook::new(1)), 90);
}

#[test]
fn stages_follow_mmcv_epoch_runner_with_val_phase() {
    let dir = tmp_dir("stages");
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Epochs(1), 0.01);
    r.set_train_loader(Box::new(VecLoader::new(dataset(), 5, false, 0).unwrap()));
    r.set_val_loader(Box::new(VecLoader::new(dataset(), 6, false, 0).unwrap()));
    r.register_hook(OptimizerHook::new());
    r.register_hook(Recorder {
        name: "r",
        log: log.clone(),
        priority: Priority::NORMAL,
    });
    r.run(&[(Mode::Train, 1), (Mode::Val, 1)]).unwrap();
    let calls: Vec<String> = log.borrow().iter().map(|c| c[2..].to_string()).collect();
    let want = [
        "before_run",
        "before_train_epoch",
        "before_train_iter0",
        "after_train_iter0",
        "before_train_iter1",
        "after_train_iter1",
        "after_train_epoch",
        "before_val_epoch",
        "before_val_iter0",
        "after_val_iter0",
        "before_val_iter1",
        "after_val_iter1",
        "after_val_epoch",
        "after_run",
    ];
    assert_eq!(calls, want);
    assert_eq!((r.epoch(), r.iter()), (1, 2));
}

// ---- parse_losses -------------------------------------------------------------------

#[test]
fn parse_losses_sums_entries_named_loss_and_logs_all() {
    let losses = vec![
        (
            "loss_cls".to_string(),
            Tensor::from_vec(vec![0.5f32], Vec::<usize>::new()).unwrap(),
        ),
        // non-scalar: averaged, (1 + 2 + 3 + 6) / 4 = 3
        (
            "loss_box".to_string(),
            Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 6.0], [2, 2]).unwrap(),
        ),
        // not a loss: logged, not summed
        (
            "acc".to_string(),
            Tensor::from_vec(vec![0.75f32], [1]).unwrap(),
        ),
    ];
    let (total, vars) = parse_losses(losses).unwrap();
    assert_eq!(total.item().unwrap(), 3.5);
    assert_eq!(
        vars,
        vec![
            ("loss_cls".to_string(), 0.5),
            ("loss_box".to_string(), 3.0),
            ("acc".to_string(), 0.75),
            ("loss".to_string(), 3.5)
        ]
    );
    let err = parse_losses(vec![("acc".into(), Tensor::scalar(1.0))]).unwrap_err();
    assert!(err.to_string().contains("no value named `*loss*`"), "{err}");
    let err = parse_losses(vec![("loss".into(), Tensor::scalar(1.0))]).unwrap_err();
    assert!(err.to_string().contains("`loss`"), "{err}");
}

// ---- LR schedules -------------------------------------------------------------------

#[test]
fn lr_policies_match_hand_computed_values() {
    // step [16, 22], gamma 0.1, base 0.02: 0.02 before 16, 0.002 from 16, 0.0002 from 22.
    let step = LrPolicy::Step {
        steps: vec![16, 22],
        gamma: 0.1,
        min_lr: None,
    };
    let got: Vec<f64> = [0, 15, 16, 21, 22, 25]
        .iter()
        .map(|&e| step.lr(0.02, e, 26))
        .collect();
    assert_close(&got, &[0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002], 1e-12);
    // step with a floor: 1.0 * 0.1 = 0.1 floored to 0.5.
    let floored = LrPolicy::Step {
        steps: vec![1],
        gamma: 0.1,
        min_lr: Some(0.5),
    };
    assert_close(&[floored.lr(1.0, 1, 2)], &[0.5], 0.0);
    // step every 3, gamma 0.5: progress 7 -> 7 / 3 = 2 -> 1.0 * 0.25.
    let every = LrPolicy::StepEvery {
        every: 3,
        gamma: 0.5,
        min_lr: None,
    };
    assert_close(&[every.lr(1.0, 7, 10)], &[0.25], 1e-15);
    // cosine, base 0.1, min 0, 10 long: 0 -> 0.1; 5 -> 0.05 * (cos(pi/2) + 1) = 0.05;
    // 10 -> 0; and 2 of 8 -> 0.05 * (cos(pi/4) + 1) = 0.05 * 1.7071067811865475
    // = 0.08535533905932738.
    let cos = LrPolicy::Cosine {
        min_lr: 0.0,
        min_lr_ratio: None,
    };
    let got = [
        cos.lr(0.1, 0, 10),
        cos.lr(0.1, 5, 10),
        cos.lr(0.1, 10, 10),
        cos.lr(0.1, 2, 8),
    ];
    assert_close(&got, &[0.1, 0.05, 0.0, 0.08535533905932738], 1e-12);
    // cosine to 10% of base 0.1 at half way: 0.01 + 0.5 * 0.09 * 1 = 0.055.
    let cos_ratio = LrPolicy::Cosine {
        min_lr: 0.0,
        min_lr_ratio: Some(0.1),
    };
    assert_close(&[cos_ratio.lr(0.1, 5, 10)], &[0.055], 1e-12);
    // poly power 1: 0.1 * (1 - 3/10) = 0.07; power 2 at 5/10: 0.1 * 0.25 = 0.025;
    // power 2 with min 0.01: 0.09 * 0.25 + 0.01 = 0.0325.
    let p1 = LrPolicy::Poly {
        power: 1.0,
        min_lr: 0.0,
    };
    let p2 = LrPolicy::Poly {
        power: 2.0,
        min_lr: 0.0,
    };
    let p2m = LrPolicy::Poly {
        power: 2.0,
        min_lr: 0.01,
    };
    let got = [p1.lr(0.1, 3, 10), p2.lr(0.1, 5, 10), p2m.lr(0.1, 5, 10)];
    assert_close(&got, &[0.07, 0.025, 0.0325], 1e-12);
    assert_eq!(LrPolicy::Fixed.lr(0.3, 7, 10), 0.3);
}

#[test]
fn warmups_match_hand_computed_values() {
    // linear, regular 0.02, 1000 iterations from 0.001:
    //   iter 0:   k = 1 * 0.999 = 0.999        -> 0.02 * 0.001    = 2e-5
    //   iter 500: k = 0.5 * 0.999 = 0.4995     -> 0.02 * 0.5005   = 0.01001
    //   iter 999: k = 0.001 * 0.999 = 0.000999 -> 0.02 * 0.999001 = 0.01998002
    let lin: Vec<f64> = [0, 500, 999]
        .iter()
        .map(|&i| Warmup::Linear.lr(0.02, i, 1000, 0.001))
        .collect();
    assert_close(&lin, &[2e-5, 0.01001, 0.01998002], 1e-12);
    // constant: 0.02 * 0.001 at any warmup iteration.
    let c: Vec<f64> = [0, 500, 999]
        .iter()
        .map(|&i| Warmup::Constant.lr(0.02, i, 1000, 0.001))
        .collect();
    assert_close(&c, &[2e-5, 2e-5, 2e-5], 1e-12);
    // exp: 0.02 * 0.001^(1 - i/1000): i 0 -> 2e-5; i 500 -> 0.02 * 0.0316227766016838
    // = 6.32455532033676e-4.
    let e: Vec<f64> = [0, 500]
        .iter()
        .map(|&i| Warmup::Exp.lr(0.02, i, 1000, 0.001))
        .collect();
    assert_close(&e, &[2e-5, 6.32455532033676e-4], 1e-12);
}

#[test]
fn lr_hook_by_epoch_with_linear_warmup_sets_mmcv_rates() {
    // 4 batches per epoch, 3 epochs, base 1.0, step at epoch 2, linear warmup over 3
    // iterations from 0.1:
    //   iter 0: k = (1 - 0/3) * 0.9 = 0.9 -> 0.1
    //   iter 1: k = (2/3) * 0.9 = 0.6     -> 0.4
    //   iter 2: k = (1/3) * 0.9 = 0.3     -> 0.7
    //   iter 3..7: regular 1.0; epoch 2 (iters 8..11): 0.1
    let dir = tmp_dir("lr_epoch");
    let lrs = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Epochs(3), 1.0);
    r.register_hook(
        LrUpdaterHook::new(
            LrPolicy::Step {
                steps: vec![2],
                gamma: 0.1,
                min_lr: None,
            },
            true,
        )
        .with_warmup(Warmup::Linear, 3, 0.1),
    );
    r.register_hook(LrProbe(lrs.clone()));
    r.run(&[(Mode::Train, 1)]).unwrap();
    let want = [0.1, 0.4, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1];
    assert_close(&lrs.borrow(), &want, 1e-12);
}

#[test]
fn lr_hook_by_iter_cosine_with_exp_warmup() {
    // 6 iterations, base 1.0, cosine to 0; exp warmup over 2 iterations from 0.01.
    // regular(i) = 0.5 * (1 + cos(pi * i / 6))
    //   iter 0: 1.0 * 0.01^(1 - 0)   = 0.01
    //   iter 1: 0.9330127018922194 * 0.01^(1 - 1/2) = 0.09330127018922194
    //   iter 2..5: 0.75, 0.5, 0.25, 0.06698729810778065
    let dir = tmp_dir("lr_cos");
    let lrs = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Iters(6), 1.0);
    r.register_hook(
        LrUpdaterHook::new(
            LrPolicy::Cosine {
                min_lr: 0.0,
                min_lr_ratio: None,
            },
            false,
        )
        .with_warmup(Warmup::Exp, 2, 0.01),
    );
    r.register_hook(LrProbe(lrs.clone()));
    r.run(&[(Mode::Train, 1)]).unwrap();
    let want = [
        0.01,
        0.09330127018922194,
        0.75,
        0.5,
        0.25,
        0.06698729810778065,
    ];
    assert_close(&lrs.borrow(), &want, 1e-12);
}

#[test]
fn lr_hook_by_iter_poly_with_constant_warmup() {
    // 4 iterations, base 1.0, poly power 2: (1 - i/4)^2 = 1, 0.5625, 0.25, 0.0625;
    // constant warmup for 1 iteration at 0.5: iter 0 -> 0.5.
    let dir = tmp_dir("lr_poly");
    let lrs = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Iters(4), 1.0);
    r.register_hook(
        LrUpdaterHook::new(
            LrPolicy::Poly {
                power: 2.0,
                min_lr: 0.0,
            },
            false,
        )
        .with_warmup(Warmup::Constant, 1, 0.5),
    );
    r.register_hook(LrProbe(lrs.clone()));
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_close(&lrs.borrow(), &[0.5, 0.5625, 0.25, 0.0625], 1e-12);
}

#[test]
fn lr_hook_warmup_by_epochs() {
    // warmup of 1 epoch = 4 iterations, linear from 0.2, base 1.0, fixed policy:
    // k = (1 - i/4) * 0.8: i 0..3 -> 0.2, 0.4, 0.6, 0.8; then 1.0.
    let dir = tmp_dir("lr_wepoch");
    let lrs = Rc::new(RefCell::new(Vec::new()));
    let mut r = runner(&dir, Schedule::Epochs(2), 1.0);
    r.register_hook(
        LrUpdaterHook::new(LrPolicy::Fixed, true)
            .with_warmup(Warmup::Linear, 1, 0.2)
            .with_warmup_epochs(1),
    );
    r.register_hook(LrProbe(lrs.clone()));
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_close(
        &lrs.borrow(),
        &[0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0],
        1e-12,
    );
}

// ---- resume -------------------------------------------------------------------------

fn step_warmup_hook(by_epoch: bool, steps: Vec<usize>) -> LrUpdaterHook {
    LrUpdaterHook::new(
        LrPolicy::Step {
            steps,
            gamma: 0.1,
            min_lr: None,
        },
        by_epoch,
    )
    .with_warmup(Warmup::Linear, 5, 0.1)
}

/// Iteration-based: momentum SGD, warmup + step, shuffled data, rng-weighted loss.
fn iter_runner(dir: &Path, max_iters: usize) -> Runner<LinReg> {
    let mut r = runner(dir, Schedule::Iters(max_iters), 0.1);
    r.register_training_hooks(
        Some(step_warmup_hook(false, vec![8, 14])),
        OptimizerHook::new(),
        Some(CheckpointHook::new(7, false)),
        Some(3),
    );
    r
}

#[test]
fn resume_mid_epoch_iter_based_is_bit_exact() {
    let full_dir = tmp_dir("resume_full");
    let mut full = iter_runner(&full_dir, 20);
    full.run(&[(Mode::Train, 1)]).unwrap();

    // Stop after k = 7 (mid-epoch: 4 batches per epoch), then a new runner resumes.
    let dir = tmp_dir("resume_part");
    let mut first = iter_runner(&dir, 7);
    first.run(&[(Mode::Train, 1)]).unwrap();
    assert!(dir.join("iter_7.safetensors").is_file());
    let mut second = iter_runner(&dir, 20);
    let used = second.resume_latest().unwrap().expect("latest exists");
    assert_eq!(used, dir.join("iter_7.safetensors"));
    assert_eq!((second.iter(), second.epoch()), (7, 1));
    second.run(&[(Mode::Train, 1)]).unwrap();

    assert_eq!(second.iter(), 20);
    assert_eq!(param_bits(&second), param_bits(&full));
    // The training stream continued too.
    assert_eq!(second.rng.state(), full.rng.state());
    // And the weights moved: the test is not vacuous.
    assert_ne!(
        param_bits(&second),
        param_bits(&iter_runner(&tmp_dir("resume_init"), 1))
    );
}

/// Epoch-based with everything stateful: momentum, weight decay, warmup + step by
/// epoch, accumulation over 2 iterations, gradient clipping, EMA, a val phase.
fn epoch_runner(dir: &Path) -> Runner<LinReg> {
    let mut r = runner(dir, Schedule::Epochs(4), 0.2);
    r.set_val_loader(Box::new(VecLoader::new(dataset(), 4, false, 0).unwrap()));
    r.register_training_hooks(
        Some(step_warmup_hook(true, vec![2, 3])),
        OptimizerHook::new()
            .with_cumulative_iters(2)
            .with_grad_clip(1.0, 2.0),
        Some(CheckpointHook::new(1, false)),
        Some(2),
    );
    r.register_hook(EmaHook::new(0.3));
    r
}

#[test]
fn resume_after_crash_epoch_based_with_accumulation_and_ema_is_bit_exact() {
    let wf = [(Mode::Train, 1), (Mode::Val, 1)];
    let full_dir = tmp_dir("crash_full");
    let mut full = epoch_runner(&full_dir);
    full.run(&wf).unwrap();
    assert_eq!(full.iter(), 16);

    // Crash after iteration 7: epoch 2 (index 1), batch 3 of 4, halfway through an
    // accumulation pair (iterations 7 and 8 make one step).
    let dir = tmp_dir("crash_part");
    let mut first = epoch_runner(&dir);
    first.register_hook(Crash { at: 7 });
    let err = first.run(&wf).unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    assert!(
        first.grads.iter().any(Option::is_some),
        "gradients pending at the crash"
    );

    let mut second = epoch_runner(&dir);
    second.resume_latest().unwrap().expect("latest exists");
    assert_eq!((second.epoch(), second.iter()), (1, 7));
    second.run(&wf).unwrap();

    assert_eq!(second.iter(), 16);
    assert_eq!(param_bits(&second), param_bits(&full));
    let ema = |r: &Runner<LinReg>| -> Vec<(String, Vec<u32>)> {
        r.extra_tensors
            .iter()
            .map(|(n, t)| (n.clone(), bits(t)))
            .collect()
    };
    assert_eq!(ema(&second).len(), 2);
    assert_eq!(ema(&second), ema(&full));
}

// ---- checkpoints --------------------------------------------------------------------

#[test]
fn checkpoint_write_killed_midway_leaves_previous_checkpoint_intact() {
    let dir = tmp_dir("atomic");
    let ckpt_runner = |max| {
        let mut r = runner(&dir, Schedule::Iters(max), 0.1);
        r.register_training_hooks(
            None,
            OptimizerHook::new(),
            Some(CheckpointHook::new(2, false)),
            None,
        );
        r
    };
    let mut a = ckpt_runner(2);
    a.run(&[(Mode::Train, 1)]).unwrap();
    let good = dir.join("iter_2.safetensors");
    let good_bytes = std::fs::read(&good).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap().trim(),
        "iter_2.safetensors"
    );

    // 1. A crash between writing and renaming leaves half-written temporary files
    //    (the names kestrel::io::write_atomic uses) and nothing else.
    let pid = std::process::id();
    std::fs::write(
        dir.join(format!(".iter_4.safetensors.tmp-{pid}")),
        &good_bytes[..good_bytes.len() / 2],
    )
    .unwrap();
    std::fs::write(dir.join(format!(".latest.tmp-{pid}")), b"iter_").unwrap();
    let mut b = ckpt_runner(4);
    let used = b.resume_latest().unwrap().unwrap();
    assert_eq!(used, good);
    assert_eq!(b.iter(), 2);
    assert_eq!(param_bits(&b), param_bits(&a));

    // 2. A failure injected into the write path (the temporary file cannot be
    //    created): the run stops with the I/O error, the new checkpoint does not
    //    exist, `latest` still names the previous one, which still loads.
    let tmp = dir.join(format!(".iter_4.safetensors.tmp-{pid}"));
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let err = b.run(&[(Mode::Train, 1)]).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("iter_4.safetensors"), "{err}");
    assert!(!dir.join("iter_4.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap().trim(),
        "iter_2.safetensors"
    );
    assert_eq!(std::fs::read(&good).unwrap(), good_bytes);
    let mut c = ckpt_runner(4);
    c.resume_latest().unwrap();
    assert_eq!(param_bits(&c), param_bits(&a));

    // 3. What a non-atomic writer would leave (a truncated file) is refused with an
    //    error naming the file, not loaded as garbage.
    let torn = dir.join("torn.safetensors");
    std::fs::write(&torn, &good_bytes[..good_bytes.len() - 7]).unwrap();
    let err = ckpt_runner(4).resume(&torn).unwrap_err();
    assert!(err.to_string().contains("torn.safetensors"), "{err}");

    // 4. With the obstacle gone the run completes and `latest` moves on.
    std::fs::remove_dir(&tmp).unwrap();
    c.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap().trim(),
        "iter_4.safetensors"
    );
}

#[test]
fn checkpoint_hook_keeps_the_newest_and_can_skip_optimizer_state() {
    let dir = tmp_dir("keep");
    let mut r = runner(&dir, Schedule::Iters(5), 0.1);
    let mut ck = CheckpointHook::new(1, false).max_keep(2);
    ck.save_optimizer = false;
    r.register_training_hooks(None, OptimizerHook::new(), Some(ck), None);
    r.run(&[(Mode::Train, 1)]).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    assert_eq!(files, ["iter_4.safetensors", "iter_5.safetensors"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap().trim(),
        "iter_5.safetensors"
    );
    let f = kestrel::io::TensorFile::open(dir.join("iter_5.safetensors")).unwrap();
    assert_eq!(f.names(), ["b", "w"], "weights only, under their own names");
    let meta = kestrel::runner::read_checkpoint_meta(&f).unwrap();
    assert_eq!(meta.point.iter, 5);
    assert!(!meta.has_optimizer);
    assert_eq!(
        meta.meta["hook_msgs"]["last_ckpt"].as_str().unwrap(),
        dir.join("iter_5.safetensors").to_string_lossy()
    );
}

// ---- NaN guard ----------------------------------------------------------------------

#[test]
fn nan_guard_saves_checkpoint_and_names_loss_and_iteration() {
    let dir = tmp_dir("nan");
    let mut r = runner(&dir, Schedule::Iters(10), 0.1);
    r.model.nan_at_call = Some(3);
    r.register_training_hooks(None, OptimizerHook::new(), None, None);
    r.register_hook(NanGuardHook::new());
    let err = r.run(&[(Mode::Train, 1)]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Training(_)), "{msg}");
    assert!(msg.contains("`loss_mse` is NaN at iteration 3"), "{msg}");
    let ckpt = dir.join("nan_iter_3.safetensors");
    assert!(msg.contains(&ckpt.display().to_string()), "{msg}");
    // The NaN never reached the weights: the guard runs before the optimizer hook.
    for (_, p) in r.model.params() {
        assert!(p.to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
    // The checkpoint holds the state after iteration 2 and resumes at iteration 3.
    let mut two = runner(&tmp_dir("nan_ref"), Schedule::Iters(2), 0.1);
    two.register_training_hooks(None, OptimizerHook::new(), None, None);
    two.run(&[(Mode::Train, 1)]).unwrap();
    let mut back = runner(&dir, Schedule::Iters(10), 0.1);
    back.resume(&ckpt).unwrap();
    assert_eq!(back.iter(), 2);
    assert_eq!(param_bits(&back), param_bits(&two));
    // `latest` was not moved to it.
    assert!(!dir.join("latest").exists());
}

// ---- optimizer hook: clipping, accumulation -----------------------------------------

/// loss = Σ_i w_i · c_i over two parameters, so dL/dw_i = c_i exactly.
#[derive(Clone)]
struct Dot {
    w1: Tensor,
    w2: Tensor,
}

impl Model for Dot {
    type Batch = Vec<Vec<f32>>;
    fn params(&self) -> Vec<(String, Tensor)> {
        vec![
            ("w1".into(), self.w1.clone()),
            ("w2".into(), self.w2.clone()),
        ]
    }
    fn set_params(&mut self, p: Vec<Tensor>) -> Result<()> {
        self.w1 = p[0].clone();
        self.w2 = p[1].clone();
        Ok(())
    }
    fn train_step(&mut self, batch: &Vec<Vec<f32>>, _: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        // The batch holds one item: [c1a, c1b, c2].
        let c = &batch[0];
        let c1 = Tensor::from_vec(c[..2].to_vec(), [2])?;
        let c2 = Tensor::from_vec(c[2..].to_vec(), [1])?;
        let l = ops::add(
            &ops::sum(&ops::mul(&self.w1, &c1)?)?,
            &ops::sum(&ops::mul(&self.w2, &c2)?)?,
        )?;
        Ok(vec![("loss_dot".into(), l)])
    }
}

fn dot_runner(
    items: Vec<Vec<f32>>,
    iters: usize,
    hook: OptimizerHook,
) -> (Runner<Dot>, Rc<RefCell<usize>>) {
    let model = Dot {
        w1: Tensor::from_vec(vec![0.0f32, 0.0], [2]).unwrap(),
        w2: Tensor::from_vec(vec![0.0f32], [1]).unwrap(),
    };
    let opt = TestSgd::new(1.0, 0.0, 0.0);
    let steps = opt.steps.clone();
    let mut r = Runner::new(
        model,
        Box::new(opt),
        tmp_dir("dot"),
        Schedule::Iters(iters),
        0,
    );
    r.log.quiet = true;
    r.set_train_loader(Box::new(VecLoader::new(items, 1, false, 0).unwrap()));
    r.register_hook(hook);
    (r, steps)
}

fn weights(r: &Runner<Dot>) -> Vec<f32> {
    r.model
        .params()
        .iter()
        .flat_map(|(_, t)| t.to_vec::<f32>().unwrap())
        .collect()
}

#[test]
fn gradient_clipping_by_total_norm_as_torch() {
    // Gradients (3, 4) and (12): total 2-norm sqrt(9 + 16 + 144) = 13.
    // max_norm 6.5: coefficient 6.5 / (13 + 1e-6) = 0.49999996153846454; with SGD at
    // lr 1 from zero the weights are -coef * (3, 4, 12).
    let (mut r, _) = dot_runner(
        vec![vec![3.0, 4.0, 12.0]],
        1,
        OptimizerHook::new().with_grad_clip(6.5, 2.0),
    );
    r.register_hook(LoggerHook::new(1));
    r.run(&[(Mode::Train, 1)]).unwrap();
    let coef = 0.49999996153846454f64;
    let want: Vec<f64> = [3.0, 4.0, 12.0].iter().map(|g| -g * coef).collect();
    let got: Vec<f64> = weights(&r).iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 1e-6);
    // The norm before clipping is logged.
    let line = std::fs::read_to_string(r.work_path("log.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["grad_norm"].as_f64().unwrap(), 13.0);

    // Below the threshold nothing changes: exactly -(3, 4, 12).
    let (mut r, _) = dot_runner(
        vec![vec![3.0, 4.0, 12.0]],
        1,
        OptimizerHook::new().with_grad_clip(100.0, 2.0),
    );
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(weights(&r), [-3.0, -4.0, -12.0]);

    // Infinity norm: max |g| = 12; max_norm 6 -> coef 6 / (12 + 1e-6) = 0.49999995833333...
    let (mut r, _) = dot_runner(
        vec![vec![3.0, 4.0, 12.0]],
        1,
        OptimizerHook::new().with_grad_clip(6.0, f64::INFINITY),
    );
    r.run(&[(Mode::Train, 1)]).unwrap();
    let coef = 6.0 / (12.0 + 1e-6);
    let got: Vec<f64> = weights(&r).iter().map(|&v| v as f64).collect();
    assert_close(&got, &[-3.0 * coef, -4.0 * coef, -12.0 * coef], 1e-6);
}

#[test]
fn gradient_accumulation_steps_every_n_and_divides_the_remainder() {
    // Five iterations with gradients x0..x4, accumulated over 2, SGD lr 1 from zero:
    //   iterations 0, 1: loss / 2 -> step with (x0 + x1) / 2 = (2, 3, 1)
    //   iterations 2, 3: loss / 2 -> step with (x2 + x3) / 2 = (6, 7, 1)
    //   iteration 4 (the remainder 5 % 2 = 1): loss / 1 -> step with x4 = (9, 10, 1)
    //   weights: -(2 + 6 + 9, 3 + 7 + 10, 3) = (-17, -20, -3); three steps.
    let items = vec![
        vec![1.0, 2.0, 1.0],
        vec![3.0, 4.0, 1.0],
        vec![5.0, 6.0, 1.0],
        vec![7.0, 8.0, 1.0],
        vec![9.0, 10.0, 1.0],
    ];
    let hook = OptimizerHook::new().with_cumulative_iters(2);
    assert_eq!(
        (0..5).map(|i| hook.loss_factor(i, 5)).collect::<Vec<_>>(),
        [2, 2, 2, 2, 1]
    );
    let (mut r, steps) = dot_runner(items, 5, hook);
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(weights(&r), [-17.0, -20.0, -3.0]);
    assert_eq!(*steps.borrow(), 3);
}

// ---- EMA and evaluation -------------------------------------------------------------

#[test]
fn ema_follows_the_weights_and_eval_uses_it() {
    // Gradient (1, 0, 0) every iteration, SGD lr 1 from zero: w1[0] = -1, -2, -3.
    // EMA with momentum 0.5 from 0:
    //   -0.5, 0.5 * -0.5 + 0.5 * -2 = -1.25, 0.5 * -1.25 + 0.5 * -3 = -2.125.
    let items = vec![vec![1.0, 0.0, 0.0]; 3];
    let (mut r, _) = dot_runner(items, 3, OptimizerHook::new());
    r.register_hook(EmaHook::new(0.5));
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    let eval = EvalHook::new(
        move |r: &mut Runner<Dot>| {
            let w = r.model.params()[0].1.to_vec::<f32>()?[0] as f64;
            s.borrow_mut().push(w);
            // A score that is best at the last evaluation.
            Ok(vec![("score".to_string(), -w)])
        },
        1,
        false,
    )
    .save_best("score");
    r.register_hook(eval);
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(
        r.extra_tensors["ema.w1"].to_vec::<f32>().unwrap(),
        [-2.125, 0.0]
    );
    // The evaluation saw the averaged weights; the model keeps its own.
    assert_eq!(*seen.borrow(), [-0.5, -1.25, -2.125]);
    assert_eq!(weights(&r)[0], -3.0);
    assert_eq!(r.metrics, [("score".to_string(), 2.125)]);
    // Best checkpoint: only the latest best remains, recorded in meta.
    let best = r.work_path("best_score_iter_3.safetensors");
    assert!(best.is_file());
    assert!(!r.work_path("best_score_iter_2.safetensors").exists());
    assert_eq!(r.meta["hook_msgs"]["best_score"].as_f64(), Some(2.125));

    // mmdet's ExpMomentumEMA momentum: (1 - 0.0002) * exp(-(1 + iter) / 2000) + 0.0002
    //   iter 0:  0.9998 * exp(-1/2000)   + 0.0002 = 0.9995002249541735
    //   iter 99: 0.9998 * exp(-100/2000) + 0.0002 = 0.9512391786158139
    let e = EmaHook::exp_momentum(0.0002, 2000);
    assert_close(
        &[e.momentum_at(0), e.momentum_at(99)],
        &[0.9995002249541735, 0.9512391786158139],
        1e-14,
    );
}

// ---- logging, data ------------------------------------------------------------------

#[test]
fn logger_writes_text_and_json_lines_with_timer_values() {
    let dir = tmp_dir("logger");
    let mut r = runner(&dir, Schedule::Epochs(2), 0.05);
    r.set_val_loader(Box::new(VecLoader::new(dataset(), 5, false, 0).unwrap()));
    r.register_training_hooks(None, OptimizerHook::new(), None, Some(2));
    r.run(&[(Mode::Train, 1), (Mode::Val, 1)]).unwrap();
    let txt = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(
        txt.contains("Epoch [1][2/4]\tlr: 5.000e-02, eta: "),
        "{txt}"
    );
    assert!(txt.contains("Epoch(val) [1][2]\t"), "{txt}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Per epoch: iterations 2 and 4 (train), then the val epoch.
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["train", "train", "val", "train", "train", "val"]);
    let t = &lines[0];
    for k in [
        "epoch",
        "iter",
        "lr",
        "time",
        "data_time",
        "loss_mse",
        "w_l1",
        "loss",
    ] {
        assert!(t.get(k).is_some(), "{k} missing from {t}");
    }
    assert_eq!(
        (t["epoch"].as_u64(), t["iter"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(t["time"].as_f64().unwrap() >= t["data_time"].as_f64().unwrap());
    assert!(t["data_time"].as_f64().unwrap() >= 0.0);
    // Values, not only keys: the constant rate, `loss` = the sum of the `loss*` entries
    // (one here), w_l1 > 0 once trained, and the text log shows the JSON's numbers.
    for (i, l) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l["mode"] == "train")
    {
        assert_eq!(l["lr"].as_f64(), Some(0.05), "line {i}: {l}");
        let (mse, loss) = (l["loss_mse"].as_f64().unwrap(), l["loss"].as_f64().unwrap());
        assert!(mse.is_finite() && mse > 0.0, "line {i}: {l}");
        assert!(
            (loss - mse).abs() <= 1e-9 * mse,
            "line {i}: loss != loss_mse: {l}"
        );
        assert!(l["w_l1"].as_f64().unwrap() > 0.0, "line {i}: {l}");
        for k in ["loss_mse", "w_l1", "loss"] {
            let shown = format!("{k}: {:.4}", l[k].as_f64().unwrap());
            assert!(
                txt.contains(&shown),
                "log.txt lacks `{shown}` of line {i}:\n{txt}"
            );
        }
    }
    let val = lines[2]["loss_mse"].as_f64().unwrap();
    assert!(val.is_finite() && val > 0.0, "val loss {val}");
    assert!(
        txt.contains(&format!("loss_mse: {val:.4}")),
        "log.txt lacks the val loss {val:.4}:\n{txt}"
    );
}

#[test]
fn data_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch() {
    let a = epoch_permutation(10, 3, 0);
    assert_eq!(a, epoch_permutation(10, 3, 0));
    assert_ne!(a, epoch_permutation(10, 3, 1));
    assert_ne!(a, epoch_permutation(10, 4, 0));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());

    let items: Vec<usize> = (0..10).collect();
    let mut full = VecLoader::new(items.clone(), 3, true, 9).unwrap();
    full.start(2, 0).unwrap();
    let all: Vec<Vec<usize>> =
        std::iter::from_fn(|| full.next_batch().map(|b| b.unwrap())).collect();
    assert_eq!(all.len(), 4);
    let mut late = VecLoader::new(items, 3, true, 9).unwrap();
    late.start(2, 2).unwrap();
    let rest: Vec<Vec<usize>> =
        std::iter::from_fn(|| late.next_batch().map(|b| b.unwrap())).collect();
    assert_eq!(rest, all[2..]);
}

#[test]
fn bad_runner_setup_is_an_error_not_a_panic() {
    let dir = tmp_dir("bad");
    let mut r = runner(&dir, Schedule::Epochs(1), 0.1);
    let err = r.run(&[(Mode::Val, 1)]).unwrap_err();
    assert!(err.to_string().contains("no training phase"), "{err}");
    let err = r.run(&[(Mode::Train, 1), (Mode::Val, 1)]).unwrap_err();
    assert!(err.to_string().contains("no validation loader"), "{err}");
    // A checkpoint of another model is refused, naming the tensor.
    let (mut d, _) = dot_runner(vec![vec![1.0, 1.0, 1.0]], 1, OptimizerHook::new());
    d.register_hook(CheckpointHook::new(1, false));
    d.run(&[(Mode::Train, 1)]).unwrap();
    let ckpt = d.work_path("iter_1.safetensors");
    let err = r.resume(&ckpt).unwrap_err();
    assert!(err.to_string().contains("schedule Iters(1)"), "{err}");
    let mut r2 = runner(&dir, Schedule::Iters(1), 0.1);
    let err = r2.resume(&ckpt).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    // A backward without a training step.
    assert!(r.backward(1.0).is_err());
}
