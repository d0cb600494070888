//! `forward` and `forward_backward`.

use super::TrainingSession;
use crate::batch::{self, Batch};
use crate::error::{EngineError, Result};
use crate::loss::{self, LossTerms};
use candle_core::{DType, Tensor};
use hearth_api::{ForwardBackwardInput, ForwardBackwardOutput, LossFn, LossFnOutput};
use std::collections::BTreeMap;

impl TrainingSession {
    fn run_loss(&self, input: &ForwardBackwardInput) -> Result<(Batch, LossTerms)> {
        let cfg = &self.base.config;
        batch::validate(&input.data, &input.loss_fn, cfg.vocab_size, cfg.max_position_embeddings)?;
        let batch = Batch::new(&input.data, self.base.dtype, &self.base.device)?;
        let logits = self.model.forward(&batch.ids)?;
        let terms = loss::compute(&logits, &batch, &input.loss_fn)?;
        Ok((batch, terms))
    }

    /// Loss and per-datum target logprobs without gradients. Changes nothing.
    pub fn forward(&self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        let (batch, terms) = self.run_loss(input)?;
        output(&batch, &terms, &input.loss_fn)
    }

    /// Loss, per-datum target logprobs, and gradients added to the accumulated ones.
    /// A non-finite loss accumulates nothing and is an error.
    pub fn forward_backward(&mut self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        let (batch, terms) = self.run_loss(input)?;
        let out = output(&batch, &terms, &input.loss_fn)?;
        let loss = out.metrics.get("loss:sum").copied().unwrap_or(f64::NAN);
        if !loss.is_finite() {
            return Err(EngineError::NonFiniteLoss { op: "forward_backward", value: loss });
        }
        let grads = terms.total()?.backward()?;
        let mut updated = BTreeMap::new();
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = match self.grads.get(name) {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            };
            updated.insert(name.clone(), g);
        }
        self.grads.extend(updated);
        Ok(out)
    }
}

fn output(batch: &Batch, terms: &LossTerms, loss_fn: &LossFn) -> Result<ForwardBackwardOutput> {
    let logprobs = terms.target_logprobs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let per_datum = terms.per_token.to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?;
    let loss_fn_outputs = logprobs
        .into_iter()
        .zip(&per_datum)
        .zip(&batch.lens)
        .map(|((mut lp, &loss), &len)| {
            lp.truncate(len);
            LossFnOutput { logprobs: lp, loss: loss as f32 }
        })
        .collect();
    let mut metrics = BTreeMap::new();
    metrics.insert("loss:sum".to_string(), per_datum.iter().sum());
    metrics.insert("tokens:sum".to_string(), batch.lens.iter().sum::<usize>() as f64);
    if let LossFn::CrossEntropy = loss_fn {
        metrics.insert("weights:sum".to_string(), sum_f64(&batch.weights)?);
    }
    Ok(ForwardBackwardOutput { loss_fn_outputs, metrics })
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}
