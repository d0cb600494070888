//! Building training data: supervised examples with the loss on the completion only, chat
//! examples through the model's template, and policy-gradient examples with group-normalised
//! advantages.

use crate::error::{HearthError, Result};
use crate::session::Session;
use hearth_api::{ChatMessage, Datum, LossFnInputs, SampleInput, SamplingParams, Stop};

/// A supervised example: `prompt` then `completion`; position i predicts token i+1, and only
/// predictions of completion tokens carry weight 1.
pub fn supervised(prompt: &[u32], completion: &[u32]) -> Datum {
    let tokens: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let n = tokens.len().saturating_sub(1);
    let weights = (0..n).map(|i| if i + 1 >= prompt.len() { 1.0 } else { 0.0 }).collect();
    Datum::new(tokens[..n].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), weights))
}

/// A policy-gradient example for `importance_sampling` / `ppo`: the sampled `completion` with the
/// sampler's `logprobs` (one per completion token) and one `advantage` for the whole completion.
/// Prompt positions get advantage 0 (no gradient).
pub fn policy_gradient(prompt: &[u32], completion: &[u32], logprobs: &[f32], advantage: f32) -> Datum {
    let tokens: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let n = tokens.len().saturating_sub(1);
    let p = prompt.len();
    let lp = (0..n).map(|i| if i + 1 >= p { logprobs.get(i + 1 - p).copied().unwrap_or(0.0) } else { 0.0 }).collect();
    let adv = (0..n).map(|i| if i + 1 >= p { advantage } else { 0.0 }).collect();
    Datum::new(tokens[..n].to_vec(), LossFnInputs::policy_gradient(tokens[1..].to_vec(), lp, adv))
}

/// Group-normalised advantages: (r − mean) / (std + 1e-6) within one group of samples of the same
/// prompt; all zeros when every reward is equal.
pub fn group_advantages(rewards: &[f64]) -> Vec<f32> {
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    rewards.iter().map(|r| ((r - mean) / (std + 1e-6)) as f32).collect()
}

impl Session {
    /// A supervised example from text: tokenized by the server's tokenizer.
    pub fn supervised(&self, prompt: &str, completion: &str) -> Result<Datum> {
        Ok(supervised(&self.tokenize(prompt)?, &self.tokenize(completion)?))
    }

    /// The run's greedy answer to one user message, through the model's chat template, cut at
    /// the template's end-of-turn marker (e.g. `<|im_end|>`), at most `max_tokens` tokens.
    pub fn ask(&self, question: &str, max_tokens: usize) -> Result<String> {
        let marker = "\u{1}hearth-end-of-answer\u{1}";
        let probe =
            self.render_chat(&[ChatMessage::new("user", "?"), ChatMessage::new("assistant", marker)], false)?.text;
        let end = probe.rsplit_once(marker).map(|(_, e)| e.trim().to_string()).filter(|e| !e.is_empty());
        let prompt = self.render_chat(&[ChatMessage::new("user", question)], true)?.tokens;
        let stop = end.iter().map(|e| Stop::Text(e.clone())).collect();
        let sampling_params = SamplingParams { max_tokens, temperature: 0.0, stop, ..SamplingParams::default() };
        let out = self.sample(&SampleInput { prompt, sampling_params, ..SampleInput::default() })?;
        let tokens = out.sequences.first().map(|s| s.tokens.clone()).unwrap_or_default();
        let text = self.detokenize(&tokens)?;
        Ok(match &end {
            Some(e) => text.split(e.as_str()).next().unwrap_or_default().trim().to_string(),
            None => text.trim().to_string(),
        })
    }

    /// A chat example: the last message (the assistant's) is the completion, everything before
    /// it, rendered with the chat template and the assistant header, is the prompt.
    pub fn chat_datum(&self, messages: &[ChatMessage]) -> Result<Datum> {
        let Some((last, before)) = messages.split_last().filter(|(l, _)| l.role == "assistant") else {
            return Err(HearthError::Api {
                status: 400,
                kind: "invalid_input".into(),
                message: "chat_datum: the last message must be the assistant's (the completion to learn)".into(),
            });
        };
        let prompt = self.render_chat(before, true)?.tokens;
        let full = self.render_chat(messages, false)?.tokens;
        if !full.starts_with(&prompt) {
            return Err(HearthError::Api {
                status: 400,
                kind: "invalid_input".into(),
                message: format!(
                    "chat_datum: the template renders the prompt differently inside the full conversation (role {:?})",
                    last.role
                ),
            });
        }
        Ok(supervised(&prompt, &full[prompt.len()..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervised_weights_only_the_completion() {
        let d = supervised(&[1, 2, 3], &[4, 5]);
        assert_eq!(d.model_input, vec![1, 2, 3, 4]);
        assert_eq!(d.loss_fn_inputs.target_tokens, Some(vec![2, 3, 4, 5]));
        assert_eq!(d.loss_fn_inputs.weights, Some(vec![0.0, 0.0, 1.0, 1.0]));
    }

    #[test]
    fn policy_gradient_aligns_logprobs_with_the_completion() {
        let d = policy_gradient(&[1, 2], &[7, 8, 9], &[-0.5, -1.0, -1.5], 2.0);
        assert_eq!(d.model_input, vec![1, 2, 7, 8]);
        assert_eq!(d.loss_fn_inputs.logprobs, Some(vec![0.0, -0.5, -1.0, -1.5]));
        assert_eq!(d.loss_fn_inputs.advantages, Some(vec![0.0, 2.0, 2.0, 2.0]));
    }

    #[test]
    fn advantages_are_centred_and_scaled() {
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.0]);
        assert!(a.iter().zip([1.0, -1.0, 1.0, -1.0]).all(|(x, y)| (x - y).abs() < 1e-4), "{a:?}");
        assert_eq!(group_advantages(&[3.0, 3.0]), vec![0.0, 0.0]);
    }
}
