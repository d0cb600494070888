//! Validation and padding of a batch of datums.
//!
//! Every check runs before any tensor work, so a rejected batch changes nothing.

use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use hearth_api::{Datum, LossFn};

/// A validated, right-padded batch. Padded positions have target 0 and zero weight/advantage,
/// so they contribute nothing to any loss.
#[derive(Debug)]
pub struct Batch {
    /// (B, T) u32 input ids.
    pub ids: Tensor,
    /// (B, T) u32 target ids.
    pub targets: Tensor,
    /// (B, T) cross-entropy weights (zero on padding).
    pub weights: Tensor,
    /// (B, T) sampler logprobs (zero on padding).
    pub logprobs: Tensor,
    /// (B, T) advantages (zero on padding).
    pub advantages: Tensor,
    /// (B, T) 1 on real positions, 0 on padding (for terms that are not zero by themselves there).
    pub mask: Tensor,
    /// Real length of each datum.
    pub lens: Vec<usize>,
}

/// Checks `data` against the loss and the model; the first problem found is returned.
pub fn validate(data: &[Datum], loss: &LossFn, vocab_size: usize, max_len: usize) -> Result<()> {
    if data.is_empty() {
        return Err(EngineError::EmptyBatch);
    }
    if let LossFn::Dro(cfg) = loss {
        if !(cfg.beta.is_finite() && cfg.beta >= 0.0) {
            return Err(EngineError::InvalidParam {
                field: "beta",
                value: cfg.beta.to_string(),
                reason: "must be finite and non-negative",
            });
        }
    }
    if let LossFn::Ppo(cfg) | LossFn::Cispo(cfg) = loss {
        let (lo, hi) = (cfg.clip_low_threshold, cfg.clip_high_threshold);
        if !(lo.is_finite() && lo > 0.0 && lo <= 1.0) {
            return Err(EngineError::InvalidParam {
                field: "clip_low_threshold",
                value: lo.to_string(),
                reason: "must be in (0, 1]",
            });
        }
        if !(hi.is_finite() && hi >= 1.0) {
            return Err(EngineError::InvalidParam {
                field: "clip_high_threshold",
                value: hi.to_string(),
                reason: "must be finite and at least 1",
            });
        }
    }
    let required = loss.required_inputs();
    for (i, datum) in data.iter().enumerate() {
        let n = datum.model_input.len();
        if n == 0 {
            return Err(EngineError::EmptyDatum { datum: i });
        }
        if n > max_len {
            return Err(EngineError::SequenceTooLong { datum: i, len: n, max: max_len });
        }
        check_ids(&datum.model_input, &format!("data[{i}].model_input"), vocab_size)?;
        let inputs = &datum.loss_fn_inputs;
        let fields: [(&'static str, Option<usize>); 4] = [
            ("target_tokens", inputs.target_tokens.as_ref().map(Vec::len)),
            ("weights", inputs.weights.as_ref().map(Vec::len)),
            ("logprobs", inputs.logprobs.as_ref().map(Vec::len)),
            ("advantages", inputs.advantages.as_ref().map(Vec::len)),
        ];
        for (field, len) in fields {
            match len {
                None if required.contains(&field) => {
                    return Err(EngineError::MissingInput {
                        datum: i,
                        field,
                        loss: loss.name(),
                        required: required.join(", "),
                    })
                }
                Some(len) if len != n => return Err(EngineError::LengthMismatch { datum: i, field, len, expected: n }),
                _ => {}
            }
        }
        if let Some(t) = &inputs.target_tokens {
            check_ids(t, &format!("data[{i}].loss_fn_inputs.target_tokens"), vocab_size)?;
        }
        for (field, values) in
            [("weights", &inputs.weights), ("logprobs", &inputs.logprobs), ("advantages", &inputs.advantages)]
        {
            if let Some((position, &value)) = values.iter().flatten().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(EngineError::NonFinite { datum: i, field, position, value });
            }
        }
    }
    Ok(())
}

/// Checks a token sequence fed to the model: non-empty, within the context, ids in the vocabulary.
pub fn check_tokens(tokens: &[u32], field: &str, vocab_size: usize, max_len: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(EngineError::InvalidParam { field: "tokens", value: "[]".into(), reason: "must not be empty" });
    }
    if tokens.len() > max_len {
        return Err(EngineError::InvalidParam {
            field: "tokens",
            value: format!("{} tokens", tokens.len()),
            reason: "longer than the model's context (max_position_embeddings)",
        });
    }
    check_ids(tokens, field, vocab_size)
}

fn check_ids(ids: &[u32], field: &str, vocab_size: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
        Some((position, &id)) => {
            Err(EngineError::TokenOutOfRange { field: field.to_string(), position, id, vocab_size })
        }
        None => Ok(()),
    }
}

impl Batch {
    /// Pads validated data to the longest datum. Float arrays use `dtype`.
    pub fn new(data: &[Datum], dtype: DType, device: &Device) -> Result<Self> {
        let lens: Vec<usize> = data.iter().map(|d| d.model_input.len()).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        let b = data.len();
        let pad_u32 = |get: &dyn Fn(&Datum) -> Option<&Vec<u32>>| -> Result<Tensor> {
            let mut out = vec![0u32; b * t];
            for (i, d) in data.iter().enumerate() {
                if let Some(v) = get(d) {
                    out[i * t..i * t + v.len()].copy_from_slice(v);
                }
            }
            Ok(Tensor::from_vec(out, (b, t), device)?)
        };
        let pad_f32 = |get: &dyn Fn(&Datum) -> Option<&Vec<f32>>| -> Result<Tensor> {
            let mut out = vec![0f32; b * t];
            for (i, d) in data.iter().enumerate() {
                if let Some(v) = get(d) {
                    out[i * t..i * t + v.len()].copy_from_slice(v);
                }
            }
            Ok(Tensor::from_vec(out, (b, t), device)?.to_dtype(dtype)?)
        };
        Ok(Batch {
            ids: pad_u32(&|d| Some(&d.model_input))?,
            targets: pad_u32(&|d| d.loss_fn_inputs.target_tokens.as_ref())?,
            weights: pad_f32(&|d| d.loss_fn_inputs.weights.as_ref())?,
            logprobs: pad_f32(&|d| d.loss_fn_inputs.logprobs.as_ref())?,
            advantages: pad_f32(&|d| d.loss_fn_inputs.advantages.as_ref())?,
            mask: {
                let mut m = vec![0f32; b * t];
                for (i, &len) in lens.iter().enumerate() {
                    m[i * t..i * t + len].fill(1.0);
                }
                Tensor::from_vec(m, (b, t), device)?.to_dtype(dtype)?
            },
            lens,
        })
    }

    /// Positions start..start+len of every datum (the loss of each position depends on that
    /// position alone, so a batch's loss is the sum of its slices' losses).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Batch> {
        Ok(Batch {
            ids: self.ids.narrow(1, start, len)?.contiguous()?,
            targets: self.targets.narrow(1, start, len)?.contiguous()?,
            weights: self.weights.narrow(1, start, len)?.contiguous()?,
            logprobs: self.logprobs.narrow(1, start, len)?.contiguous()?,
            advantages: self.advantages.narrow(1, start, len)?.contiguous()?,
            mask: self.mask.narrow(1, start, len)?.contiguous()?,
            lens: self.lens.iter().map(|&l| l.saturating_sub(start).min(len)).collect(),
        })
    }
}
