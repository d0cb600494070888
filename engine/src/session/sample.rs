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
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;
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

/// log Σ exp(row): the normaliser of the model's own (temperature-1) distribution.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32 + max
}

/// The `k` highest-scoring token ids, best first (ties broken by the lower id).
fn top(row: &[f32], k: usize) -> Vec<u32> {
    let by_score = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k, by_score);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by_score);
    ids
}

/// Draws one id from `ids` with unnormalised `weights` (same order), `u` uniform in [0, 1).
fn draw(ids: &[u32], weights: &[f64], u: f64) -> u32 {
    let mut u = u * weights.iter().sum::<f64>();
    for (&id, w) in ids.iter().zip(weights) {
        u -= w;
        if u < 0.0 {
            return id;
        }
    }
    ids.last().copied().unwrap_or(0)
}

/// Picks a token from one row of logits: greedy at temperature 0, otherwise from the tempered
/// distribution restricted to the `top_k` best and then to the smallest prefix (best first)
/// holding `top_p` of the remaining mass. Only the candidates are sorted, never the whole
/// vocabulary (a full sort per token was most of the sampling cost at batch 8). `u` is the one
/// uniform draw a tempered pick uses (greedy ignores it).
fn choose(row: &[f32], p: &SamplingParams, u: f64) -> u32 {
    if p.temperature == 0.0 {
        return row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i as u32);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |x: f32| (((x - max) / p.temperature) as f64).exp();
    let vocab = row.len();
    let k = if p.top_k == 0 { vocab } else { p.top_k.min(vocab) };
    if p.top_p >= 1.0 {
        if k == vocab {
            let weights: Vec<f64> = row.iter().map(|&x| weight(x)).collect();
            let ids: Vec<u32> = (0..vocab as u32).collect();
            return draw(&ids, &weights, u);
        }
        let ids = top(row, k);
        let weights: Vec<f64> = ids.iter().map(|&i| weight(row[i as usize])).collect();
        return draw(&ids, &weights, u);
    }
    // Nucleus: the mass is over the top-k set; widen the sorted prefix until it holds top_p.
    let total: f64 = if k == vocab { row.iter().map(|&x| weight(x)).sum() } else { top(row, k).iter().map(|&i| weight(row[i as usize])).sum() };
    let mut width = k.min(256);
    loop {
        let ids = top(row, width);
        let weights: Vec<f64> = ids.iter().map(|&i| weight(row[i as usize])).collect();
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= p.top_p as f64 {
                return draw(&ids[..=n], &weights[..=n], u);
            }
        }
        if width == k {
            return draw(&ids, &weights, u);
        }
        width = (width * 8).min(k);
    }
}

/// The last step's logits as the sampler needs them.
enum Last {
    /// Whole rows (n, V) on the host.
    Rows(Vec<Vec<f32>>),
    /// The greedy pick of each row and its logprob, computed on the device.
    Picked(Vec<(u32, f32)>),
}

/// Greedy picks of logits (n, V) on their device: the highest logit of each row (the lowest id
/// among equal ones, as [`choose`] does) and its log-probability.
fn greedy_picks(logits: &Tensor) -> Result<Vec<(u32, f32)>> {
    let (_n, v) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?; // (n,1)
    // lowest id among the maxima: ids where the row equals its max, others pushed past the end
    let ids = Tensor::arange(0u32, v as u32, logits.device())?.to_dtype(DType::F32)?.unsqueeze(0)?; // (1,V)
    let at_max = logits.broadcast_eq(&max)?; // (n,V) u8
    let beyond = Tensor::full(v as f32, logits.shape(), logits.device())?;
    let first = at_max.where_cond(&ids.broadcast_as(logits.shape())?, &beyond)?.min_keepdim(D::Minus1)?; // (n,1)
    let lse = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?; // (n,1), relative to max
    let ids: Vec<f32> = first.squeeze(1)?.to_vec1()?;
    let logprobs: Vec<f32> = lse.neg()?.squeeze(1)?.to_vec1()?;
    Ok(ids.into_iter().map(|i| i as u32).zip(logprobs).collect())
}

/// One sequence's new token in a step: (sequence, token, logprob).
pub type Picked = (usize, u32, f32);

impl TrainingSession {
    /// Generates `num_samples` continuations of `prompt` with the run's current weights (or the
    /// base model's). `detokenize` turns generated ids into text for stop strings; `cancelled`
    /// is checked between tokens and ends the call with [`EngineError::Interrupted`].
    pub fn sample(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<SampleOutput> {
        self.sample_streaming(input, detokenize, cancelled, &|_| {})
    }

    /// [`sample`](Self::sample), reporting each step's new tokens as they are picked:
    /// `on_tokens` gets `(sequence, token, logprob)` for every sequence still going (a live
    /// stream sends them on while the rest is sampled).
    pub fn sample_streaming(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
        on_tokens: &(dyn Fn(&[Picked]) + Sync),
    ) -> Result<SampleOutput> {
        // Decoding is a long chain of small ops; run it on a pool thread so each parallel
        // kernel splits work with a warm sibling instead of waking the pool from outside.
        crate::fused::in_pool(|| self.sample_in_pool(input, detokenize, cancelled, on_tokens)).map_err(crate::recompute::classify)
    }

    fn sample_in_pool(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
        on_tokens: &(dyn Fn(&[Picked]) + Sync),
    ) -> Result<SampleOutput> {
        let cfg = &self.base.config;
        let p = &input.sampling_params;
        validate(p, input.num_samples)?;
        check_tokens(&input.prompt, "prompt", cfg.vocab_size, cfg.max_position_embeddings)?;
        // checked: a max_tokens near usize::MAX must not wrap past the context check
        if input.prompt.len().checked_add(p.max_tokens).is_none_or(|end| end > cfg.max_position_embeddings) {
            return Err(EngineError::InvalidParam {
                field: "max_tokens",
                value: p.max_tokens.to_string(),
                reason: "prompt + max_tokens exceeds the model's context (max_position_embeddings)",
            });
        }
        let model = if input.base_model_only {
            let frozen = TrainingConfig::Lora(LoraConfig { target_modules: Vec::new(), ..LoraConfig::default() });
            Model::new_quantized(cfg, &self.base.weights, &self.base.quantized, &frozen)?.0
        } else {
            self.model.detached()
        };
        let device = &self.base.device;
        let n = input.num_samples;
        let mut prefill = KvCache::with_capacity(input.prompt.len() + p.max_tokens);
        let prompt = Tensor::new(input.prompt.as_slice(), device)?.unsqueeze(0)?; // (1,P)
        let logits = model.forward_cached(&prompt, &mut prefill, input.prompt_logprobs)?.squeeze(0)?.to_dtype(DType::F32)?; // (P|1,V)
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let prompt_logprobs = input.prompt_logprobs.then(|| {
            std::iter::once(None)
                .chain(input.prompt[1..].iter().zip(&rows).map(|(&tok, row)| Some(row[tok as usize] - log_sum_exp(row))))
                .collect()
        });
        let first = rows.last().cloned().unwrap_or_default();
        let mut last = Last::Rows(vec![first; n]);
        // Greedy decoding on a GPU picks on the device: two numbers per sequence cross to the
        // host instead of a vocabulary-sized row.
        let greedy_on_device = p.temperature == 0.0 && !device.is_cpu();
        let mut cache = prefill.expand(n)?;
        // No seed: the run's own generator picks one (so a resumed `state` samples as the
        // uninterrupted run would have). It advances only when the call succeeds.
        let mut run_rng = match self.rng.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut rng = Rng::new(p.seed.unwrap_or_else(|| run_rng.next_u64()));
        let stop_ids: Vec<u32> = p.stop.iter().filter_map(|s| if let Stop::Token(t) = s { Some(*t) } else { None }).collect();
        let stop_texts: Vec<&str> = p.stop.iter().filter_map(|s| if let Stop::Text(t) = s { Some(t.as_str()) } else { None }).collect();
        let mut seqs: Vec<SampledSequence> =
            (0..n).map(|_| SampledSequence { tokens: Vec::new(), logprobs: Vec::new(), stop_reason: StopReason::Length }).collect();
        let mut done = vec![false; n];
        for step in 0..p.max_tokens {
            if cancelled() {
                return Err(EngineError::Interrupted);
            }
            let active: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
            let picks: Vec<(u32, f32)> = match &last {
                Last::Rows(rows) => {
                    // One uniform per tempered pick, drawn in sequence order (so the rows can be
                    // scored in parallel and a seed still gives the same samples).
                    let us: Vec<f64> = active.iter().map(|_| if p.temperature > 0.0 { rng.uniform() } else { 0.0 }).collect();
                    active
                        .par_iter()
                        .zip(us)
                        .map(|(&i, u)| {
                            let tok = choose(&rows[i], p, u);
                            (tok, rows[i][tok as usize] - log_sum_exp(&rows[i]))
                        })
                        .collect()
                }
                Last::Picked(picked) => active.iter().map(|&i| picked[i]).collect(),
            };
            let mut next: Vec<u32> = seqs.iter().map(|s| s.tokens.last().copied().unwrap_or(0)).collect();
            let picked: Vec<Picked> = active.iter().zip(&picks).map(|(&i, &(tok, lp))| (i, tok, lp)).collect();
            on_tokens(&picked);
            for (&i, (tok, logprob)) in active.iter().zip(picks) {
                let seq = &mut seqs[i];
                seq.tokens.push(tok);
                seq.logprobs.push(logprob);
                let text_stop = !stop_texts.is_empty() && {
                    let text = detokenize(&seq.tokens);
                    stop_texts.iter().any(|s| text.contains(s))
                };
                if stop_ids.contains(&tok) || text_stop {
                    seq.stop_reason = StopReason::Stop;
                    done[i] = true;
                }
                next[i] = tok;
            }
            if done.iter().all(|&d| d) || step + 1 == p.max_tokens {
                break;
            }
            let ids = Tensor::from_vec(next, (n, 1), device)?; // (n,1)
            let logits = model.forward_cached(&ids, &mut cache, false)?.squeeze(1)?.to_dtype(DType::F32)?; // (n,1,V) -> (n,V)
            last = if greedy_on_device { Last::Picked(greedy_picks(&logits)?) } else { Last::Rows(logits.to_vec2()?) };
        }
        if p.seed.is_none() {
            if let Ok(mut r) = self.rng.lock() {
                *r = run_rng;
            }
        }
        Ok(SampleOutput { sequences: seqs, prompt_logprobs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..SamplingParams::default() }
    }

    /// Frequencies of 20 000 draws.
    fn histogram(row: &[f32], p: &SamplingParams) -> Vec<f64> {
        let mut rng = Rng::new(7);
        let mut counts = vec![0.0; row.len()];
        let n = 20_000;
        for _ in 0..n {
            counts[choose(row, p, rng.uniform()) as usize] += 1.0 / n as f64;
        }
        counts
    }

    #[test]
    fn filters_follow_the_definitions() {
        // probabilities at temperature 1: 0.4, 0.3, 0.2, 0.1 (ids shuffled)
        let row: Vec<f32> = [0.2f32, 0.4, 0.1, 0.3].iter().map(|p| p.ln()).collect();
        let close = |got: &[f64], want: &[f64]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.015, "got {got:?}, want {want:?}");
            }
        };
        close(&histogram(&row, &params(1.0, 0, 1.0)), &[0.2, 0.4, 0.1, 0.3]);
        close(&histogram(&row, &params(1.0, 2, 1.0)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        // top_p 0.65: 0.4 + 0.3 ≥ 0.65 keeps two tokens
        close(&histogram(&row, &params(1.0, 0, 0.65)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        // top_k 3 renormalises to 4/9, 3/9, 2/9; top_p 0.5 then needs the first two
        close(&histogram(&row, &params(1.0, 3, 0.5)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        close(&histogram(&row, &params(1.0, 1, 1.0)), &[0.0, 1.0, 0.0, 0.0]);
        // temperature 0.5 squares the probabilities: 4:16:1:9
        close(&histogram(&row, &params(0.5, 0, 1.0)), &[4.0 / 30.0, 16.0 / 30.0, 1.0 / 30.0, 9.0 / 30.0]);
        assert_eq!(choose(&row, &params(0.0, 0, 1.0), 0.5), 1);
    }

    #[test]
    fn nucleus_widens_past_the_first_window() {
        // 1000 equal logits: top_p 0.9 needs 900 candidates, more than the first 256-wide window
        let row = vec![0.0f32; 1000];
        let h = histogram(&row, &params(1.0, 0, 0.9));
        assert_eq!(h[900..].iter().sum::<f64>(), 0.0);
        assert!(h[600..900].iter().sum::<f64>() > 0.25);
    }

    #[test]
    fn greedy_picks_on_the_device_agree_with_the_host() {
        // ties (bf16 logits have many) go to the lowest id, as on the host
        let rows = vec![vec![0.5f32, 2.0, -1.0, 2.0], vec![3.0, 3.0, 3.0, 3.0], vec![-7.0, -2.5, -9.0, -2.6]];
        let t = Tensor::new(rows.clone(), &candle_core::Device::Cpu).unwrap();
        let picks = greedy_picks(&t).unwrap();
        for (row, (id, logprob)) in rows.iter().zip(picks) {
            let want = choose(row, &params(0.0, 0, 1.0), 0.0);
            assert_eq!(id, want);
            let want_lp = row[want as usize] - log_sum_exp(row);
            assert!((logprob - want_lp).abs() < 1e-6, "{logprob} vs {want_lp}");
        }
    }
}
