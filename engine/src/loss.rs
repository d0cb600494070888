//! Tinker's loss functions, as sums over tokens.
//!
//! | loss | per-token term |
//! |---|---|
//! | `cross_entropy` | −w · log p(target) |
//! | `importance_sampling` | −(p/q) · A |
//! | `ppo` | −min(r·A, clip(r, lo, hi)·A), r = p/q |
//! | `cispo` | −sg(clip(r, lo, hi)) · log p · A |
//! | `dro` | −(log p · A − β/2 · (log p − log q)²) |

use crate::batch::Batch;
use crate::error::Result;
use crate::kernels::{add_const, mul_const};
use crate::model::{log_softmax_last_dim, wide};
use candle_core::{Tensor, D};
use hearth_api::LossFn;

/// Per-token results of a loss over a padded batch.
#[derive(Debug)]
pub struct LossTerms {
    /// (B, T) log-probability of each target under the current weights.
    pub target_logprobs: Tensor,
    /// (B, T) each position's loss term (zero on padding).
    pub per_token: Tensor,
}

impl LossTerms {
    /// The scalar loss: the sum over every token of every datum.
    pub fn total(&self) -> Result<Tensor> {
        Ok(self.per_token.sum_all()?)
    }
}

/// Computes the loss terms from logits (B, T, V).
pub fn compute(logits: &Tensor, batch: &Batch, loss: &LossFn) -> Result<LossTerms> {
    let logits = logits.to_dtype(wide(logits.dtype()))?; // f32 for a bf16 model
    let target_logprobs = if crate::kernels::applies(&logits) {
        crate::kernels::target_logprobs(&logits, &batch.targets)? // (B,T,V) -> (B,T), no log-softmax copy
    } else {
        let logp = log_softmax_last_dim(&logits)?; // (B,T,V)
        logp.gather(&batch.targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?
        // (B,T,1) -> (B,T)
    };
    let per_token = match loss {
        LossFn::CrossEntropy => mul_const(&target_logprobs, &batch.weights)?.neg()?,
        LossFn::ImportanceSampling => {
            let ratio = add_const(&target_logprobs, &batch.logprobs.neg()?)?.exp()?;
            mul_const(&ratio, &batch.advantages)?.neg()?
        }
        LossFn::Ppo(cfg) => {
            let ratio = add_const(&target_logprobs, &batch.logprobs.neg()?)?.exp()?;
            let clipped = ratio.clamp(cfg.clip_low_threshold as f64, cfg.clip_high_threshold as f64)?;
            let unclipped_term = mul_const(&ratio, &batch.advantages)?;
            let clipped_term = mul_const(&clipped, &batch.advantages)?;
            unclipped_term.minimum(&clipped_term)?.neg()?
        }
        LossFn::Cispo(cfg) => {
            // the clipped ratio is a constant coefficient (stop-gradient)
            let ratio = add_const(&target_logprobs.detach(), &batch.logprobs.neg()?)?.exp()?;
            let coef =
                (ratio.clamp(cfg.clip_low_threshold as f64, cfg.clip_high_threshold as f64)? * &batch.advantages)?;
            mul_const(&target_logprobs, &coef)?.neg()?
        }
        LossFn::Dro(cfg) => {
            let log_ratio = add_const(&target_logprobs, &batch.logprobs.neg()?)?;
            // padding has q = 0 but log p ≠ 0: masked, unlike the other terms, which vanish there
            let penalty = mul_const(&(log_ratio.sqr()? * (0.5 * cfg.beta as f64))?, &batch.mask)?;
            (mul_const(&target_logprobs, &batch.advantages)? - penalty)?.neg()?
        }
    };
    Ok(LossTerms { target_logprobs, per_token })
}
