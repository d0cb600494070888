//! `sample`: KV-cache generation from the run's current weights.
//!
//! One prefill of the prompt (batch 1) is shared by all `num_samples` sequences, which then
//! decode as one batch. Reported logprobs are the model's own (temperature 1, unfiltered), so
//! they equal what `forward` gives for the same sequence.

use super::TrainingSession;
use crate::batch::check_tokens;
use crate::error::{EngineError, Result};
use crate::model::{KvCache, Model};
use crate::rng::Rng;
use candle_core::{DType, Tensor};
use hearth_api::{LoraConfig, SampleInput, SampleOutput, SampledSequence, SamplingParams, Stop, StopReason, TrainingConfig};

/// Most sequences one call may generate.
pub const MAX_SAMPLES: usize = 256;

fn validate(p: &SamplingParams, num_samples: usize) -> Result<()> {
    let bad = |field: &'static str, value: String, reason: &'static str| Err(EngineError::InvalidParam { field, value, reason });
    if num_samples == 0 || num_samples > MAX_SAMPLES {
        return bad("num_samples", num_samples.to_string(), "must be between 1 and 256");
    }
    if p.max_tokens == 0 {
        return bad("max_tokens", "0".into(), "must be at least 1");
    }
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return bad("temperature", p.temperature.to_string(), "must be finite and non-negative");
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad("top_p", p.top_p.to_string(), "must be in (0, 1]");
    }
    Ok(())
}

/// Raw log-softmax of one row of logits.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    row.iter().map(|&x| x - lse).collect()
}

/// Picks a token from one row of logits.
fn choose(row: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let argmax = || row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
    if p.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let max = row[order[0] as usize];
    let weights: Vec<f64> = order.iter().map(|&i| (((row[i as usize] - max) / p.temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= p.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept: f64 = weights[..keep].iter().sum();
    let mut u = rng.uniform() * kept;
    for (n, w) in weights[..keep].iter().enumerate() {
        u -= w;
        if u < 0.0 {
            return order[n];
        }
    }
    order[keep - 1]
}

impl TrainingSession {
    /// Generates `num_samples` continuations of `prompt` with the run's current weights (or the
    /// base model's). `detokenize` turns generated ids into text for stop strings; `cancelled`
    /// is checked between tokens and ends the call with [`EngineError::Interrupted`].
    pub fn sample(
        &self,
        input: &SampleInput,
        detokenize: &dyn Fn(&[u32]) -> String,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<SampleOutput> {
        let cfg = &self.base.config;
        let p = &input.sampling_params;
        validate(p, input.num_samples)?;
        check_tokens(&input.prompt, "prompt", cfg.vocab_size, cfg.max_position_embeddings)?;
        if input.prompt.len() + p.max_tokens > cfg.max_position_embeddings {
            return Err(EngineError::InvalidParam {
                field: "max_tokens",
                value: p.max_tokens.to_string(),
                reason: "prompt + max_tokens exceeds the model's context (max_position_embeddings)",
            });
        }
        let base_model;
        let model: &Model = if input.base_model_only {
            let frozen = TrainingConfig::Lora(LoraConfig { target_modules: Vec::new(), ..LoraConfig::default() });
            base_model = Model::new(cfg, &self.base.weights, &frozen)?.0;
            &base_model
        } else {
            &self.model
        };
        let device = &self.base.device;
        let n = input.num_samples;
        let mut prefill = KvCache::default();
        let prompt = Tensor::new(input.prompt.as_slice(), device)?.unsqueeze(0)?; // (1,P)
        let logits = model.forward_cached(&prompt, &mut prefill, input.prompt_logprobs)?.squeeze(0)?.to_dtype(DType::F32)?; // (P|1,V)
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let prompt_logprobs = input.prompt_logprobs.then(|| {
            std::iter::once(None)
                .chain(input.prompt[1..].iter().zip(&rows).map(|(&tok, row)| Some(log_softmax(row)[tok as usize])))
                .collect()
        });
        let mut last: Vec<Vec<f32>> = vec![rows.last().cloned().unwrap_or_default(); n];
        let mut cache = prefill.expand(n)?;
        let mut rng = Rng::new(p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        }));
        let stop_ids: Vec<u32> = p.stop.iter().filter_map(|s| if let Stop::Token(t) = s { Some(*t) } else { None }).collect();
        let stop_texts: Vec<&str> = p.stop.iter().filter_map(|s| if let Stop::Text(t) = s { Some(t.as_str()) } else { None }).collect();
        let mut seqs: Vec<SampledSequence> =
            (0..n).map(|_| SampledSequence { tokens: Vec::new(), logprobs: Vec::new(), stop_reason: StopReason::Length }).collect();
        let mut done = vec![false; n];
        for step in 0..p.max_tokens {
            if cancelled() {
                return Err(EngineError::Interrupted);
            }
            let mut next = Vec::with_capacity(n);
            for (i, seq) in seqs.iter_mut().enumerate() {
                if done[i] {
                    next.push(seq.tokens.last().copied().unwrap_or(0));
                    continue;
                }
                let tok = choose(&last[i], p, &mut rng);
                seq.tokens.push(tok);
                seq.logprobs.push(log_softmax(&last[i])[tok as usize]);
                let text_stop = !stop_texts.is_empty() && {
                    let text = detokenize(&seq.tokens);
                    stop_texts.iter().any(|s| text.contains(s))
                };
                if stop_ids.contains(&tok) || text_stop {
                    seq.stop_reason = StopReason::Stop;
                    done[i] = true;
                }
                next.push(tok);
            }
            if done.iter().all(|&d| d) || step + 1 == p.max_tokens {
                break;
            }
            let ids = Tensor::from_vec(next, (n, 1), device)?; // (n,1)
            let logits = model.forward_cached(&ids, &mut cache, false)?.squeeze(1)?.to_dtype(DType::F32)?; // (n,1,V) -> (n,V)
            last = logits.to_vec2()?;
        }
        Ok(SampleOutput { sequences: seqs, prompt_logprobs })
    }
}
