//! `forward` and `forward_backward`.

use super::Run;
use crate::batch::{self, Batch};
use crate::error::{EngineError, Result};
use crate::loss::LossTerms;
use crate::recompute;
use candle_core::{DType, Tensor};
use hearth_api::{ForwardBackwardInput, ForwardBackwardOutput, LossFn, LossFnOutput};
use std::collections::BTreeMap;

impl Run {
    fn batch(&self, input: &ForwardBackwardInput) -> Result<Batch> {
        let cfg = &self.base.config;
        batch::validate(&input.data, &input.loss_fn, cfg.vocab_size, cfg.max_position_embeddings)?;
        Batch::new(&input.data, crate::model::wide(self.base.dtype), &self.base.device)
    }

    /// Loss and per-datum target logprobs without gradients. Changes nothing. Records no graph
    /// and computes the loss in chunks of positions (see [`crate::recompute`]).
    pub fn forward(&self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        crate::kernels::in_pool_for(&self.base.device, || self.forward_here(input))
    }

    fn forward_here(&self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        let batch = self.batch(input)?;
        let (b, t) = batch.ids.dims2()?;
        recompute::check_indexable(&self.model, b, t)?;
        let (terms, _) = recompute::run(&self.model, &batch, &input.loss_fn, None).map_err(recompute::classify)?;
        output(&batch, &terms, &input.loss_fn)
    }

    /// Loss, per-datum target logprobs, and gradients added to the accumulated ones.
    /// A non-finite loss accumulates nothing and is an error. Activations are recomputed when
    /// [`Run::recompute`] says so for this batch's size.
    pub fn forward_backward(&mut self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        crate::kernels::in_pool_for(&self.base.device.clone(), || self.forward_backward_here(input))
    }

    fn forward_backward_here(&mut self, input: &ForwardBackwardInput) -> Result<ForwardBackwardOutput> {
        let batch = self.batch(input)?;
        let (b, t) = batch.ids.dims2()?;
        let recomputed = self.recompute.plan(&self.model, b, t)?;
        let (terms, grads) = self.gradients(&batch, &input.loss_fn, recomputed).map_err(recompute::classify)?;
        let out = output(&batch, &terms, &input.loss_fn)?;
        let loss = out.metrics.get("loss:sum").copied().unwrap_or(f64::NAN);
        if !loss.is_finite() {
            return Err(EngineError::NonFiniteLoss { op: "forward_backward", value: loss });
        }
        let mut updated = BTreeMap::new();
        for (name, g) in grads {
            let g = match self.grads.get(&name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            updated.insert(name, g);
        }
        self.grads.extend(updated);
        Ok(out)
    }
}

impl Run {
    /// Loss terms and this batch's gradients by parameter name, recomputed or from the whole graph.
    fn gradients(
        &self,
        batch: &Batch,
        loss_fn: &LossFn,
        recomputed: bool,
    ) -> Result<(LossTerms, BTreeMap<String, Tensor>)> {
        if recomputed {
            recompute::run(&self.model, batch, loss_fn, Some(&self.params))
        } else {
            recompute::run_whole_graph(&self.model, batch, loss_fn, &self.params)
        }
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
