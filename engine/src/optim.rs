//! AdamW with `torch.optim.AdamW` semantics, moments in f32 keyed by parameter name, and
//! `torch.nn.utils.clip_grad_norm_`'s global-norm clipping.
//!
//! candle-nn's AdamW keeps its moments private (no exact resume) and has no clipping.

use crate::error::{EngineError, Result};
use candle_core::{DType, Tensor, Var};
use hearth_api::{AdamParams, OptimStepOutput};
use std::collections::BTreeMap;

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// Exponential average of gradients.
    pub m: Tensor,
    /// Exponential average of squared gradients.
    pub v: Tensor,
}

/// The optimizer state: moments by parameter name and the step counter.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Moments by parameter name (created on a parameter's first step).
    pub moments: BTreeMap<String, Moments>,
    /// Steps taken.
    pub step: u64,
}

/// Checks every field of `p` before anything is touched.
pub fn validate(p: &AdamParams) -> Result<()> {
    let bad = |field: &'static str, value: f64, reason: &'static str| {
        Err(EngineError::InvalidParam { field, value: value.to_string(), reason })
    };
    if !(p.learning_rate.is_finite() && p.learning_rate >= 0.0) {
        return bad("learning_rate", p.learning_rate, "must be finite and non-negative");
    }
    for (field, beta) in [("beta1", p.beta1), ("beta2", p.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return bad(field, beta, "must be in [0, 1)");
        }
    }
    for (field, value) in [("eps", p.eps), ("weight_decay", p.weight_decay), ("grad_clip_norm", p.grad_clip_norm)] {
        if !(value.is_finite() && value >= 0.0) {
            return bad(field, value, "must be finite and non-negative");
        }
    }
    Ok(())
}

/// Global L2 norm of all gradients, accumulated in f64.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.values() {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

impl AdamW {
    /// Applies one step to `params` using `grads` (same names); parameters without a gradient
    /// are skipped, as in torch. Validates first; on error nothing changes.
    pub fn step(&mut self, params: &[(String, Var)], grads: &BTreeMap<String, Tensor>, p: &AdamParams) -> Result<OptimStepOutput> {
        validate(p)?;
        if grads.is_empty() {
            return Err(EngineError::NoGradients);
        }
        let grad_norm = global_norm(grads)?;
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFiniteLoss { op: "optim_step", value: grad_norm });
        }
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
        let clip = if p.grad_clip_norm > 0.0 { (p.grad_clip_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        let step = self.step + 1;
        let bias1 = 1.0 - p.beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - p.beta2.powi(step as i32)).sqrt();
        let step_size = p.learning_rate / bias1;
        // Compute every update first, then commit, so a failure midway changes nothing.
        let mut updates = Vec::with_capacity(grads.len());
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let dtype = var.dtype();
            let g = if clip < 1.0 { (g * clip)? } else { g.clone() }.to_dtype(DType::F32)?;
            let (m, v) = match self.moments.get(name) {
                Some(mo) => (mo.m.clone(), mo.v.clone()),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = (&m + ((&g - &m)? * (1.0 - p.beta1))?)?; // torch: exp_avg.lerp_(grad, 1 - beta1)
            let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + p.eps)?;
            let param = var.as_tensor().to_dtype(DType::F32)?;
            let param = (param * (1.0 - p.learning_rate * p.weight_decay))?;
            let param = (param - ((&m / &denom)? * step_size)?)?.to_dtype(dtype)?;
            updates.push((name.clone(), var, param, Moments { m, v }));
        }
        for (name, var, param, moments) in updates {
            var.set(&param)?;
            self.moments.insert(name, moments);
        }
        self.step = step;
        Ok(OptimStepOutput { step, learning_rate: p.learning_rate, grad_norm })
    }
}
