//! The four primitives' messages: `forward`/`forward_backward` (data and losses), `optim_step`,
//! `sample`, and the run and checkpoint configuration they share.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One training example: input tokens and the per-position arrays the loss function reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datum {
    /// Token ids fed to the model. Position `i` predicts `loss_fn_inputs.target_tokens[i]`.
    pub model_input: Vec<u32>,
    /// Per-position arrays, each exactly as long as `model_input`.
    pub loss_fn_inputs: LossFnInputs,
}

impl Datum {
    /// A datum from its two parts.
    pub fn new(model_input: Vec<u32>, loss_fn_inputs: LossFnInputs) -> Self {
        Self { model_input, loss_fn_inputs }
    }
}

/// The named per-position inputs of a loss function. Which ones are required depends on the loss
/// (see [`LossFn::required_inputs`]); unknown names are rejected when parsing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossFnInputs {
    /// The token each position should predict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tokens: Option<Vec<u32>>,
    /// Per-position weight of the cross-entropy term (0 masks a position out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f32>>,
    /// Log-probabilities of `target_tokens` under the sampling policy (for importance sampling and PPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
    /// Per-position advantages (for importance sampling and PPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantages: Option<Vec<f32>>,
}

impl LossFnInputs {
    /// Inputs for `cross_entropy`.
    pub fn cross_entropy(target_tokens: Vec<u32>, weights: Vec<f32>) -> Self {
        Self { target_tokens: Some(target_tokens), weights: Some(weights), ..Self::default() }
    }

    /// Inputs for `importance_sampling` and `ppo`.
    pub fn policy_gradient(target_tokens: Vec<u32>, logprobs: Vec<f32>, advantages: Vec<f32>) -> Self {
        Self {
            target_tokens: Some(target_tokens),
            logprobs: Some(logprobs),
            advantages: Some(advantages),
            ..Self::default()
        }
    }
}

/// A loss function and its configuration. On the wire (Tinker's names):
/// `{"loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": 0.8}}`; a left-out
/// `loss_fn_config` (or a left-out field of it) takes the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
#[serde(rename_all = "snake_case", tag = "loss_fn", content = "loss_fn_config")]
pub enum LossFn {
    /// `-Σ w · log p(target)`.
    #[default]
    CrossEntropy,
    /// `-Σ (p/q) · A`, with `q` the sampler's probability.
    ImportanceSampling,
    /// `-Σ min(r·A, clip(r, clip_low_threshold, clip_high_threshold)·A)`, `r = p/q`.
    Ppo(PpoConfig),
    /// `-Σ sg(clip(r, clip_low_threshold, clip_high_threshold)) · log p · A`: the clipped ratio
    /// weighs the policy gradient and is not differentiated (sg = stop-gradient).
    Cispo(PpoConfig),
    /// `-Σ (log p · A − β/2 · (log p − log q)²)`.
    Dro(DroConfig),
}

impl<'de> Deserialize<'de> for LossFn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        struct Raw {
            loss_fn: String,
            #[serde(default)]
            loss_fn_config: Option<RawConfig>,
        }
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct RawConfig {
            clip_low_threshold: Option<f32>,
            clip_high_threshold: Option<f32>,
            beta: Option<f32>,
        }
        let raw = Raw::deserialize(d)?;
        let cfg = raw.loss_fn_config.unwrap_or_default();
        let clip = |name: &str| -> Result<PpoConfig, D::Error> {
            if cfg.beta.is_some() {
                return Err(D::Error::custom(format!(
                    "loss_fn_config: {name} takes clip_low_threshold and clip_high_threshold, not beta"
                )));
            }
            Ok(PpoConfig {
                clip_low_threshold: cfg.clip_low_threshold.unwrap_or_else(default_clip_low),
                clip_high_threshold: cfg.clip_high_threshold.unwrap_or_else(default_clip_high),
            })
        };
        let none = |loss: LossFn| -> Result<LossFn, D::Error> {
            if cfg.clip_low_threshold.is_some() || cfg.clip_high_threshold.is_some() || cfg.beta.is_some() {
                return Err(D::Error::custom(format!("loss_fn_config: {} takes no configuration", loss.name())));
            }
            Ok(loss)
        };
        match raw.loss_fn.as_str() {
            "cross_entropy" => none(LossFn::CrossEntropy),
            "importance_sampling" => none(LossFn::ImportanceSampling),
            "ppo" => Ok(LossFn::Ppo(clip("ppo")?)),
            "cispo" => Ok(LossFn::Cispo(clip("cispo")?)),
            "dro" => {
                if cfg.clip_low_threshold.is_some() || cfg.clip_high_threshold.is_some() {
                    return Err(D::Error::custom("loss_fn_config: dro takes beta, not clip thresholds"));
                }
                Ok(LossFn::Dro(DroConfig { beta: cfg.beta.unwrap_or_else(default_beta) }))
            }
            other => Err(D::Error::custom(format!(
                "unknown loss_fn `{other}`: expected cross_entropy, importance_sampling, ppo, cispo or dro"
            ))),
        }
    }
}

impl LossFn {
    /// The `loss_fn_inputs` this loss reads.
    pub fn required_inputs(&self) -> &'static [&'static str] {
        match self {
            LossFn::CrossEntropy => &["target_tokens", "weights"],
            LossFn::ImportanceSampling | LossFn::Ppo(_) | LossFn::Cispo(_) | LossFn::Dro(_) => {
                &["target_tokens", "logprobs", "advantages"]
            }
        }
    }

    /// The loss's name as used on the wire (`cross_entropy`, `importance_sampling`, `ppo`,
    /// `cispo`, `dro`).
    pub fn name(&self) -> &'static str {
        match self {
            LossFn::CrossEntropy => "cross_entropy",
            LossFn::ImportanceSampling => "importance_sampling",
            LossFn::Ppo(_) => "ppo",
            LossFn::Cispo(_) => "cispo",
            LossFn::Dro(_) => "dro",
        }
    }
}

/// Clip bounds of the probability ratio (PPO and CISPO).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// Lower clip bound of the probability ratio (default 0.8).
    #[serde(default = "default_clip_low")]
    pub clip_low_threshold: f32,
    /// Upper clip bound of the probability ratio (default 1.2).
    #[serde(default = "default_clip_high")]
    pub clip_high_threshold: f32,
}

fn default_clip_low() -> f32 {
    0.8
}
fn default_clip_high() -> f32 {
    1.2
}
fn default_beta() -> f32 {
    0.05
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self { clip_low_threshold: default_clip_low(), clip_high_threshold: default_clip_high() }
    }
}

/// The weight of DRO's quadratic penalty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DroConfig {
    /// β in `β/2 · (log p − log q)²` (default 0.05).
    #[serde(default = "default_beta")]
    pub beta: f32,
}

impl Default for DroConfig {
    fn default() -> Self {
        Self { beta: default_beta() }
    }
}

/// Body of `forward` and `forward_backward`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBackwardInput {
    /// The batch; datums may have different lengths.
    pub data: Vec<Datum>,
    /// The loss and its configuration.
    #[serde(flatten)]
    pub loss_fn: LossFn,
}

/// Per-datum output of a loss function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossFnOutput {
    /// Log-probability of each `target_tokens[i]` under the current weights.
    pub logprobs: Vec<f32>,
    /// This datum's contribution to `loss:sum`.
    pub loss: f32,
}

/// Result of `forward` and `forward_backward`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBackwardOutput {
    /// One entry per datum, in order.
    pub loss_fn_outputs: Vec<LossFnOutput>,
    /// Metrics keyed `name:reduction`: `loss:sum`, `tokens:sum`, `weights:sum` (cross-entropy).
    pub metrics: BTreeMap<String, f64>,
}

/// Parameters of one AdamW step (decoupled weight decay, as `torch.optim.AdamW`).
/// The full set comes with every call, so learning-rate schedules live in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamParams {
    /// Learning rate (default 1e-4).
    pub learning_rate: f64,
    /// First-moment decay (default 0.9).
    pub beta1: f64,
    /// Second-moment decay (default 0.95).
    pub beta2: f64,
    /// Denominator epsilon (default 1e-12).
    pub eps: f64,
    /// Decoupled weight decay (default 0).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off (default).
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self { learning_rate: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-12, weight_decay: 0.0, grad_clip_norm: 0.0 }
    }
}

/// Result of `optim_step`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimStepOutput {
    /// The step counter after this step (the first step returns 1).
    pub step: u64,
    /// The learning rate that was applied.
    pub learning_rate: f64,
    /// Global L2 norm of the accumulated gradients, before clipping.
    pub grad_norm: f64,
}

/// Projections LoRA can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
    /// The output projection (unembedding, `lm_head`; the embedding matrix itself when the model
    /// ties them). Not in [`TargetModule::ALL`]: ask for it by name.
    LmHead,
}

impl TargetModule {
    /// All seven projections.
    pub const ALL: [TargetModule; 7] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
    ];

    /// Every module LoRA can attach to, in canonical order: the seven projections, then `lm_head`.
    pub const EVERY: [TargetModule; 8] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
        TargetModule::LmHead,
    ];

    /// The checkpoint name (`q_proj`, …, `lm_head`).
    pub fn name(&self) -> &'static str {
        match self {
            TargetModule::QProj => "q_proj",
            TargetModule::KProj => "k_proj",
            TargetModule::VProj => "v_proj",
            TargetModule::OProj => "o_proj",
            TargetModule::GateProj => "gate_proj",
            TargetModule::UpProj => "up_proj",
            TargetModule::DownProj => "down_proj",
            TargetModule::LmHead => "lm_head",
        }
    }

    /// Parses a checkpoint name (`q_proj`, …, `lm_head`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::EVERY.into_iter().find(|m| m.name() == name)
    }
}

/// One chat message for `render_chat` (`{"role": "user", "content": "..."}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the model's template knows.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// What `save_state` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// The LoRA adapter in PEFT layout (`adapter_config.json`, `adapter_model.safetensors`).
    Adapter,
    /// Everything needed to resume exactly: adapter (or weights), optimizer moments, step, RNG,
    /// training config.
    #[default]
    State,
    /// Full weights with the adapter merged in, in the base model's layout (a model folder).
    Merged,
    /// The merged model as one GGUF file (`model.gguf`) in F16, with the tokenizer and chat
    /// template: what llama.cpp, Ollama and LM Studio run. `gguf` is accepted for it too.
    #[serde(rename = "gguf_f16", alias = "gguf")]
    GgufF16,
    /// The merged model as GGUF, matrices in Q8_0 (about half of F16).
    #[serde(rename = "gguf_q8_0")]
    GgufQ8,
    /// The merged model as GGUF in llama.cpp's Q4_K_M mix (about a quarter of F16).
    #[serde(rename = "gguf_q4_k_m")]
    GgufQ4KM,
}

impl CheckpointKind {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::Adapter => "adapter",
            CheckpointKind::State => "state",
            CheckpointKind::Merged => "merged",
            CheckpointKind::GgufF16 => "gguf_f16",
            CheckpointKind::GgufQ8 => "gguf_q8_0",
            CheckpointKind::GgufQ4KM => "gguf_q4_k_m",
        }
    }

    /// True for the GGUF exports.
    pub fn is_gguf(self) -> bool {
        matches!(self, CheckpointKind::GgufF16 | CheckpointKind::GgufQ8 | CheckpointKind::GgufQ4KM)
    }
}

/// What a run trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TrainingConfig {
    /// A LoRA adapter on frozen base weights.
    Lora(LoraConfig),
    /// Every weight of the model (for teaching tiny models from scratch).
    Full,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig::Lora(LoraConfig::default())
    }
}

/// A LoRA adapter's shape. `B = 0` at creation; `A` as PEFT initialises it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank r (default 16).
    pub rank: usize,
    /// Alpha; the update is scaled by alpha / r (default 32).
    pub alpha: f64,
    /// Projections to adapt (default: all seven).
    pub target_modules: Vec<TargetModule>,
    /// Seed of A's initialisation (default 0).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, target_modules: TargetModule::ALL.to_vec(), seed: 0 }
    }
}

/// A condition that ends a sampled sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// Stop once this token is sampled (it is kept in the output).
    Token(u32),
    /// Stop once the decoded completion contains this text.
    Text(String),
}

/// How to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Tokens to generate at most (default 64).
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (default 1).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 turns it off (default).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 turns it off (default).
    pub top_p: f32,
    /// Stop tokens and stop strings.
    pub stop: Vec<Stop>,
    /// Seed: the same seed gives the same samples. None draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 64, temperature: 1.0, top_k: 0, top_p: 1.0, stop: Vec::new(), seed: None }
    }
}

/// Body of `sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleInput {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sequences to generate from the prompt, as one batch (default 1).
    #[serde(default = "one")]
    pub num_samples: usize,
    /// Sampling parameters.
    #[serde(default)]
    pub sampling_params: SamplingParams,
    /// Also return the log-probability of each prompt token given the ones before it.
    #[serde(default)]
    pub prompt_logprobs: bool,
    /// Sample the base model alone, without this run's adapter.
    #[serde(default)]
    pub base_model_only: bool,
}

impl Default for SampleInput {
    /// An empty prompt, one sample, default sampling parameters.
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            num_samples: 1,
            sampling_params: SamplingParams::default(),
            prompt_logprobs: false,
            base_model_only: false,
        }
    }
}

fn one() -> usize {
    1
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token or string was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledSequence {
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the model (temperature 1, before any
    /// top-k/top-p filtering), comparable with `forward`'s logprobs.
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub stop_reason: StopReason,
}

/// Result of `sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleOutput {
    /// `num_samples` sequences.
    pub sequences: Vec<SampledSequence>,
    /// With `prompt_logprobs`: `None` for the first prompt token, then one per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_fn_wire_format_matches_tinker_names() {
        let input: ForwardBackwardInput =
            serde_json::from_str(r#"{"data": [], "loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": 0.7}}"#)
                .unwrap();
        assert_eq!(input.loss_fn, LossFn::Ppo(PpoConfig { clip_low_threshold: 0.7, clip_high_threshold: 1.2 }));
        let ce: ForwardBackwardInput = serde_json::from_str(r#"{"data": [], "loss_fn": "cross_entropy"}"#).unwrap();
        assert_eq!(ce.loss_fn, LossFn::CrossEntropy);
        let parse =
            |s: &str| serde_json::from_str::<ForwardBackwardInput>(s).map(|i| i.loss_fn).map_err(|e| e.to_string());
        assert!(parse(r#"{"data": [], "loss_fn": "mse"}"#).unwrap_err().contains("unknown loss_fn `mse`"));
        // a left-out config (or null, as the Tinker SDK sends) means the defaults
        assert_eq!(parse(r#"{"data": [], "loss_fn": "ppo"}"#), Ok(LossFn::Ppo(PpoConfig::default())));
        assert_eq!(
            parse(r#"{"data": [], "loss_fn": "ppo", "loss_fn_config": null}"#),
            Ok(LossFn::Ppo(PpoConfig::default()))
        );
        assert_eq!(parse(r#"{"data": [], "loss_fn": "cispo"}"#), Ok(LossFn::Cispo(PpoConfig::default())));
        assert_eq!(
            parse(r#"{"data": [], "loss_fn": "dro", "loss_fn_config": {"beta": 0.1}}"#),
            Ok(LossFn::Dro(DroConfig { beta: 0.1 }))
        );
        assert_eq!(parse(r#"{"data": [], "loss_fn": "dro"}"#), Ok(LossFn::Dro(DroConfig::default())));
        assert!(parse(r#"{"data": [], "loss_fn": "dro", "loss_fn_config": {"clip_low_threshold": 0.5}}"#)
            .unwrap_err()
            .contains("dro takes beta"));
        assert!(parse(r#"{"data": [], "loss_fn": "ppo", "loss_fn_config": {"beta": 0.5}}"#)
            .unwrap_err()
            .contains("not beta"));
        assert!(parse(r#"{"data": [], "loss_fn": "ppo", "loss_fn_config": {"clip": 0.5}}"#)
            .unwrap_err()
            .contains("clip"));
        assert!(parse(r#"{"data": [], "loss_fn": "cross_entropy", "loss_fn_config": {"beta": 1}}"#)
            .unwrap_err()
            .contains("no configuration"));
        // what is written reads back
        for loss in [
            LossFn::CrossEntropy,
            LossFn::Ppo(PpoConfig::default()),
            LossFn::Cispo(PpoConfig { clip_low_threshold: 0.5, clip_high_threshold: 2.0 }),
            LossFn::Dro(DroConfig { beta: 0.3 }),
        ] {
            let text = serde_json::to_string(&ForwardBackwardInput { data: vec![], loss_fn: loss }).unwrap();
            assert_eq!(parse(&text), Ok(loss), "{text}");
        }
    }

    #[test]
    fn unknown_loss_input_is_rejected_by_name() {
        let err = serde_json::from_str::<Datum>(r#"{"model_input": [1], "loss_fn_inputs": {"target_token": [2]}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target_token"), "{err}");
    }

    #[test]
    fn adam_defaults_are_tinkers() {
        let p: AdamParams = serde_json::from_str(r#"{"learning_rate": 0.001}"#).unwrap();
        assert_eq!(p, AdamParams { learning_rate: 0.001, ..AdamParams::default() });
        assert_eq!((p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm), (0.9, 0.95, 1e-12, 0.0, 0.0));
    }
}
