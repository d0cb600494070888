//! The session server's own messages (routes under `/v1`): runs, settings, checkpoints, the
//! tokenizer, metrics, requests and errors.

use crate::{ChatMessage, CheckpointKind, TrainingConfig};
use serde::{Deserialize, Serialize};

/// Body of `POST /v1/runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateRunRequest {
    /// A name for the run (letters, digits, `-`, `_`, `.`; at most 64); generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// LoRA or full fine-tuning (default: LoRA r=16, alpha 32, all projections, seed 0).
    #[serde(default)]
    pub training: TrainingConfig,
}

/// One run, as `GET /v1/runs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Run id (used in every route under `/v1/runs/{run}/`).
    pub id: String,
    /// What it trains.
    pub training: TrainingConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Trainable scalars.
    pub trainable_parameters: usize,
    /// Step of the newest checkpoint on disk, if any.
    pub last_checkpoint_step: Option<u64>,
}

/// Cost accounting: device time held and busy, priced at an hourly rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostInfo {
    /// Seconds the device has been held (model loaded) by this server.
    pub held_s: f64,
    /// Seconds spent executing operations.
    pub busy_s: f64,
    /// Price per hour of the device.
    pub hourly_rate_usd: f64,
    /// held_s × rate.
    pub spent_usd: f64,
    /// The budget, if one was set; training is refused once it is spent.
    pub budget_usd: Option<f64>,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// hearth's version.
    pub version: String,
    /// What `--model` named (folder, hub id or preset).
    pub model: String,
    /// The folder it was loaded from.
    pub model_dir: String,
    /// `model_type` (llama, mistral, qwen2, qwen3).
    pub model_type: String,
    /// Base model parameters.
    pub num_parameters: usize,
    /// `cpu`, `cuda:0`, `metal:0`.
    pub device: String,
    /// Base weights' dtype.
    pub dtype: String,
    /// `q8` or `q4` when the base's 2-D weights are held quantized (`--quantize`, QLoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// Times this server process loaded the base model (1: restarts of clients never reload it).
    pub model_loads: u64,
    /// Seconds since the server started.
    pub uptime_s: f64,
    /// Resident memory of the server process.
    pub memory_bytes: u64,
    /// The runs.
    pub runs: Vec<RunInfo>,
    /// Samplers (Tinker's sampling sessions) holding weights in memory.
    #[serde(default)]
    pub samplers: usize,
    /// Runs restored from checkpoints at start (`--resume`).
    pub resumed: Vec<ResumedRun>,
    /// Cost so far.
    pub cost: CostInfo,
    /// Seconds of inactivity before the server saves everything and exits (0 = never).
    pub idle_timeout_s: u64,
    /// Autosave every this many optimizer steps (0 = never).
    pub autosave_every: u64,
}

/// `POST /v1/settings`: server settings changed while it runs. Fields left out keep their value;
/// the answer holds every setting's current value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Seconds of inactivity before the server saves every run and exits (0 = never; at most
    /// 604800, a week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
}

/// A run brought back at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumedRun {
    /// Run id.
    pub run: String,
    /// Its step.
    pub step: u64,
    /// The checkpoint it came from.
    pub checkpoint: String,
    /// Steps the run had taken that no checkpoint holds, first and last (the previous server
    /// was killed, or could not save them on the way out); they are lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_steps: Option<[u64; 2]>,
}

/// Body of `save_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveStateRequest {
    /// Checkpoint name (letters, digits, `-`, `_`, `.`); saved under the run's folder.
    pub name: String,
    /// `state` (default), `adapter`, `merged`, or a GGUF export: `gguf_f16` (or `gguf`), `gguf_q8_0`, `gguf_q4_k_m`.
    #[serde(default)]
    pub kind: CheckpointKind,
}

/// What `save_state` wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveStateResponse {
    /// The checkpoint folder.
    pub path: String,
    /// Its kind.
    pub kind: CheckpointKind,
    /// The run's step when saved.
    pub step: u64,
}

/// Body of `load_state`: a checkpoint name of this run, a hearth checkpoint path, or a PEFT
/// adapter folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadStateRequest {
    /// Name or path.
    pub source: String,
    /// Also restore the optimizer (moments, step, sampler RNG) from a `state` checkpoint
    /// (default); false loads the weights only and starts the optimizer afresh at step 0.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub optimizer: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

/// What `load_state` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadStateResponse {
    /// The folder loaded.
    pub path: String,
    /// `state` (exact resume) or `adapter` (weights only).
    pub kind: CheckpointKind,
    /// The run's step after loading.
    pub step: u64,
}

/// Body of `POST /v1/tokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// The text.
    pub text: String,
    /// Apply the tokenizer's post-processor (e.g. add BOS). Default false.
    #[serde(default)]
    pub add_special_tokens: bool,
}

/// Token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    /// The ids.
    pub tokens: Vec<u32>,
}

/// Body of `POST /v1/detokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    /// The ids.
    pub tokens: Vec<u32>,
    /// Drop special tokens from the text. Default false.
    #[serde(default)]
    pub skip_special_tokens: bool,
}

/// Text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Text {
    /// The text.
    pub text: String,
}

/// Body of `POST /v1/render_chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// End with the header of an assistant turn. Default true.
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

/// The rendered conversation, as text and as tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderChatResponse {
    /// The text.
    pub text: String,
    /// Its token ids (special tokens of the template are parsed).
    pub tokens: Vec<u32>,
}

/// One optimizer step's figures, as stored in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// The step (1-based: after the first `optim_step`).
    pub step: u64,
    /// Summed loss of the `forward_backward` calls since the previous step.
    pub loss: f64,
    /// Tokens with non-zero weight in those calls.
    pub tokens: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub learning_rate: f64,
    /// Tokens per second over forward_backward + optim_step.
    pub tokens_per_s: f64,
    /// Server resident memory after the step.
    pub memory_bytes: u64,
    /// Unix time of the step.
    pub time: f64,
}

/// `GET /v1/runs/{run}/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The run.
    pub run: String,
    /// One row per optimizer step, in order.
    pub rows: Vec<MetricRow>,
}

/// Where a submitted request stands (`?wait=false`, `GET /v1/requests/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RequestState {
    /// Waiting behind earlier requests.
    Queued,
    /// Executing now.
    Running,
    /// Finished; `result` is the operation's response body.
    Done {
        /// The response body of the operation.
        result: serde_json::Value,
    },
    /// Failed (or was cancelled); `error` as the blocking call would have returned it.
    Failed {
        /// The HTTP status the blocking call would have had.
        status: u16,
        /// The error body.
        error: ErrorBody,
    },
}

/// A submitted request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStatus {
    /// Its id.
    pub request_id: u64,
    /// The run.
    pub run: String,
    /// The operation (`forward_backward`, …).
    pub op: String,
    /// Where it stands.
    #[serde(flatten)]
    pub state: RequestState,
}

/// `POST /v1/requests/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelResponse {
    /// The request.
    pub request_id: u64,
    /// True when the operation will end with `interrupted` (it was queued, or it is a `sample`
    /// that checks between tokens); false when it had already finished or cannot be stopped
    /// midway (it will complete).
    pub cancelled: bool,
}

/// Every error response: `{"error": {"kind": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable kind (`invalid_input`, `not_found`, `unauthorized`,
    /// `interrupted`, `budget_exhausted`, `payload_too_large`, `internal`, …).
    pub kind: String,
    /// What went wrong, naming the field and the value.
    pub message: String,
}

/// The envelope of an error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// A user's quota (`PUT /v1/users/{name}/quota`): what the admin allows them. A field left out
/// keeps its value; in an answer every field holds the quota in force (the server's default
/// where the admin set none). `device_seconds` 0 is no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Runs the user may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<usize>,
    /// Largest LoRA rank of a run of theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// Tokens one request may cost: a batch's tokens, or a sample's prompt plus
    /// `num_samples × max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_tokens: Option<usize>,
    /// Requests they may have queued (past it: 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<usize>,
    /// Seconds of device time their operations may take in all (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_seconds: Option<f64>,
}

/// `POST /v1/users`: a user just added, with their token (the only time it is shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewUser {
    /// The user's name.
    pub name: String,
    /// Their token.
    pub token: String,
}

/// One user's use of the server (`GET /v1/usage`; the admin's row is named `admin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// The user.
    pub user: String,
    /// Seconds of device time their operations took.
    pub device_seconds: f64,
    /// Tokens trained on (weighted target tokens of `forward_backward`).
    pub tokens_trained: u64,
    /// Tokens sampled.
    pub tokens_sampled: u64,
    /// Their runs on this server now.
    pub runs: usize,
    /// Their checkpoints.
    pub checkpoints: usize,
    /// Their device time at the server's hourly rate.
    pub cost_usd: f64,
    /// Their quota in force (none for the admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// One row per user the caller may see (a user: their own; the admin: everyone).
    pub users: Vec<Usage>,
}
