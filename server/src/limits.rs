//! What one request may cost, checked in one place before any work or allocation.
//!
//! Every operation of the three protocols reaches the worker through [`crate::worker::Shared::submit`],
//! which checks it with these functions first; text is checked here before it is tokenized
//! (tokenizing is the one cost the HTTP side pays before submitting). A refusal is a 4xx that names the limit and the
//! flag that sets it, and changes nothing. The body size is bounded before parsing by
//! `--max-body-bytes`.

use crate::error::ApiError;
use axum::http::StatusCode;
use hearth_api::{ForwardBackwardInput, SampleInput, Stop, TrainingConfig};

/// Most stop strings and tokens one sampling request may give.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Largest LoRA alpha taken (the update is scaled by alpha / rank).
pub const MAX_ALPHA: f64 = 1e6;

/// The bounds (`hearth-server --help` lists their flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Tokens in one request: a batch's `model_input`s together, or a prompt
    /// (`--max-request-tokens`).
    pub max_request_tokens: usize,
    /// Bytes of text tokenized for one request (`--max-text-bytes`).
    pub max_text_bytes: usize,
    /// Sequences one sampling request may generate (`n`, `num_samples`; `--max-samples`).
    pub max_samples: usize,
    /// Largest LoRA rank (`--max-lora-rank`).
    pub max_lora_rank: usize,
    /// Requests one user may have queued (`--max-queued-per-user`).
    pub max_queued_per_user: usize,
    /// The model's context: a prompt plus `max_tokens` must fit in it.
    pub context: usize,
}

/// 413 naming the limit.
fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded", message)
}

impl Limits {
    /// A run's training config: rank and alpha in range, target modules given once each.
    pub fn check_training(&self, training: &TrainingConfig) -> Result<(), ApiError> {
        let TrainingConfig::Lora(l) = training else { return Ok(()) };
        if !(1..=self.max_lora_rank).contains(&l.rank) {
            return Err(ApiError::invalid(format!(
                "training.rank = {}: expected 1 to {} (--max-lora-rank)",
                l.rank, self.max_lora_rank
            )));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0 && l.alpha <= MAX_ALPHA) {
            return Err(ApiError::invalid(format!(
                "training.alpha = {}: expected a number above 0 and at most {MAX_ALPHA}",
                l.alpha
            )));
        }
        if l.target_modules.is_empty() {
            return Err(ApiError::invalid("training.target_modules is empty: name at least one projection to adapt"));
        }
        for (i, m) in l.target_modules.iter().enumerate() {
            if l.target_modules[..i].contains(m) {
                return Err(ApiError::invalid(format!("training.target_modules names {m:?} twice")));
            }
        }
        Ok(())
    }

    /// A batch: its tokens together within `--max-request-tokens`.
    pub fn check_batch(&self, input: &ForwardBackwardInput) -> Result<(), ApiError> {
        let tokens = input.data.iter().fold(0usize, |n, d| n.saturating_add(d.model_input.len()));
        if tokens > self.max_request_tokens {
            return Err(too_large(format!(
                "data: {tokens} tokens in {} datums; one request takes at most {} (--max-request-tokens): split the batch and call forward_backward for each part (gradients accumulate)",
                input.data.len(),
                self.max_request_tokens
            )));
        }
        Ok(())
    }

    /// A sampling request: `n`, the prompt, `max_tokens` (checked arithmetic) and stop strings.
    pub fn check_sample(&self, input: &SampleInput) -> Result<(), ApiError> {
        self.check_samples(input.num_samples)?;
        let prompt = input.prompt.len();
        if prompt > self.max_request_tokens {
            return Err(too_large(format!(
                "prompt: {prompt} tokens; one request takes at most {} (--max-request-tokens)",
                self.max_request_tokens
            )));
        }
        let max = input.sampling_params.max_tokens;
        if max == 0 || prompt.checked_add(max).is_none_or(|end| end > self.context) {
            return Err(ApiError::invalid(format!(
                "max_tokens = {max}: expected at least 1, and the prompt ({prompt} tokens) + max_tokens within the model's context ({})",
                self.context
            )));
        }
        self.check_stops(&input.sampling_params.stop)
    }

    /// `n` / `num_samples`.
    pub fn check_samples(&self, n: usize) -> Result<(), ApiError> {
        if !(1..=self.max_samples).contains(&n) {
            return Err(ApiError::invalid(format!(
                "n = {n}: expected 1 to {} sequences per request (--max-samples)",
                self.max_samples
            )));
        }
        Ok(())
    }

    /// Stop strings: a few, short, not empty (an empty one would stop before the first token).
    pub fn check_stops(&self, stop: &[Stop]) -> Result<(), ApiError> {
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid(format!("stop: {} entries; at most {MAX_STOPS}", stop.len())));
        }
        for s in stop {
            if let Stop::Text(t) = s {
                if t.is_empty() || t.len() > MAX_STOP_BYTES {
                    return Err(ApiError::invalid(format!(
                        "stop: {:?} is {} bytes; a stop string has 1 to {MAX_STOP_BYTES}",
                        truncated(t),
                        t.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Text about to be tokenized (`field` names it in the refusal).
    pub fn check_text(&self, field: &str, bytes: usize) -> Result<(), ApiError> {
        if bytes > self.max_text_bytes {
            return Err(too_large(format!(
                "{field}: {bytes} bytes of text; one request tokenizes at most {} (--max-text-bytes)",
                self.max_text_bytes
            )));
        }
        Ok(())
    }
}

/// The first characters of a long string, for a message.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The text of a chat, in bytes (what rendering and tokenizing it costs, before the template).
pub(crate) fn chat_bytes(messages: &[hearth_api::ChatMessage]) -> usize {
    messages.iter().fold(0usize, |n, m| n.saturating_add(m.role.len()).saturating_add(m.content.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::{Datum, LoraConfig, SamplingParams, TargetModule};

    fn limits() -> Limits {
        Limits {
            max_request_tokens: 100,
            max_text_bytes: 1000,
            max_samples: 8,
            max_lora_rank: 64,
            max_queued_per_user: 8,
            context: 128,
        }
    }

    #[test]
    fn max_tokens_near_the_top_of_usize_does_not_wrap_past_the_context_check() {
        let input = |max_tokens| SampleInput {
            prompt: vec![1, 2, 3],
            sampling_params: SamplingParams { max_tokens, ..SamplingParams::default() },
            ..SampleInput::default()
        };
        assert!(limits().check_sample(&input(125)).is_ok());
        for max in [126, usize::MAX, usize::MAX - 2] {
            let e = limits().check_sample(&input(max)).unwrap_err();
            assert!(e.message.contains("within the model's context (128)"), "{max}: {}", e.message);
        }
    }

    #[test]
    fn every_bound_names_itself() {
        let l = limits();
        let lora =
            |rank, alpha, target_modules| TrainingConfig::Lora(LoraConfig { rank, alpha, target_modules, seed: 0 });
        let all = TargetModule::ALL.to_vec();
        assert!(l.check_training(&lora(64, 32.0, all.clone())).is_ok());
        assert!(l.check_training(&lora(65, 32.0, all.clone())).unwrap_err().message.contains("--max-lora-rank"));
        assert!(l.check_training(&lora(0, 32.0, all.clone())).is_err());
        for alpha in [1e39, f64::NAN, 0.0, -1.0] {
            assert!(l.check_training(&lora(8, alpha, all.clone())).unwrap_err().message.contains("alpha"), "{alpha}");
        }
        assert!(l.check_training(&lora(8, 32.0, vec![])).unwrap_err().message.contains("empty"));
        let twice = vec![TargetModule::QProj, TargetModule::VProj, TargetModule::QProj];
        assert!(l.check_training(&lora(8, 32.0, twice)).unwrap_err().message.contains("twice"));
        let batch = |n| ForwardBackwardInput {
            data: vec![Datum::new(vec![1; n], Default::default()); 2],
            loss_fn: Default::default(),
        };
        assert!(l.check_batch(&batch(50)).is_ok());
        let e = l.check_batch(&batch(51)).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("102 tokens") && e.message.contains("--max-request-tokens"), "{}", e.message);
        assert!(l.check_samples(9).unwrap_err().message.contains("--max-samples"));
        assert!(l.check_samples(10_000_000_000).is_err());
        assert!(l.check_stops(&[Stop::Text(String::new())]).is_err());
        assert!(l.check_stops(&vec![Stop::Token(1); 17]).is_err());
        assert!(l.check_text("text", 1001).unwrap_err().message.contains("--max-text-bytes"));
    }
}
