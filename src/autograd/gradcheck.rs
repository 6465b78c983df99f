//! Finite-difference gradient checks (f64, central differences).

use super::Tape;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Outcome of [`gradcheck`].
#[derive(Debug, Clone)]
pub struct GradcheckReport {
    /// Largest |analytic - numeric| over all checked elements.
    pub max_abs_err: f64,
    /// Largest |analytic - numeric| / max(1, |numeric|).
    pub max_rel_err: f64,
    /// Elements compared.
    pub checked: usize,
}

/// Check the backward of `f` at `inputs` (f64 CPU tensors) against central
/// differences of `L = sum(f(x) * gy)` with a random `gy` from `seed`.
///
/// Every element of every input listed in `wrt` is perturbed by `eps`. Fails with
/// an error listing the worst element when the error exceeds `tol` (relative to
/// max(1, |numeric|)).
pub fn gradcheck<F>(
    f: F,
    inputs: &[Tensor],
    wrt: &[usize],
    seed: u64,
    eps: f64,
    tol: f64,
) -> Result<GradcheckReport>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    for (i, t) in inputs.iter().enumerate() {
        if t.dtype() != DType::F64 || t.device().is_cuda() {
            return Err(Error::invalid(
                "gradcheck",
                format!("input {i} must be an f64 CPU tensor"),
            ));
        }
    }
    let tape = Tape::new();
    for &i in wrt {
        tape.watch(&inputs[i]);
    }
    let y = {
        let _g = tape.activate();
        f(inputs)?
    };
    let mut rng = Rng::new(seed);
    let gy: Vec<f64> = (0..y.numel()).map(|_| rng.normal()).collect();
    let grads = tape.backward_with(&y, Tensor::from_vec(gy.clone(), y.shape().clone())?)?;

    let loss_at = |xs: &[Tensor]| -> Result<f64> {
        let y = super::no_grad(|| f(xs))?;
        Ok(y.to_vec::<f64>()?.iter().zip(&gy).map(|(a, b)| a * b).sum())
    };
    let mut report = GradcheckReport {
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        checked: 0,
    };
    let mut worst = String::new();
    for &i in wrt {
        let analytic = match grads.get(&inputs[i]) {
            Some(g) => g.to_vec::<f64>()?,
            None => vec![0.0; inputs[i].numel()],
        };
        let base = inputs[i].to_vec::<f64>()?;
        for k in 0..base.len() {
            let mut xs = inputs.to_vec();
            let mut p = base.clone();
            p[k] = base[k] + eps;
            xs[i] = Tensor::from_vec(p.clone(), inputs[i].shape().clone())?;
            let lp = loss_at(&xs)?;
            p[k] = base[k] - eps;
            xs[i] = Tensor::from_vec(p, inputs[i].shape().clone())?;
            let lm = loss_at(&xs)?;
            let numeric = (lp - lm) / (2.0 * eps);
            let abs = (analytic[k] - numeric).abs();
            let rel = abs / numeric.abs().max(1.0);
            report.checked += 1;
            report.max_abs_err = report.max_abs_err.max(abs);
            if rel > report.max_rel_err {
                report.max_rel_err = rel;
                worst = format!(
                    "input {i} element {k}: analytic {} numeric {numeric}",
                    analytic[k]
                );
            }
        }
    }
    if report.max_rel_err > tol {
        return Err(Error::Autograd(format!(
            "gradcheck failed (seed {seed}): max rel err {:.3e} > {tol:.1e} at {worst}",
            report.max_rel_err
        )));
    }
    Ok(report)
}
