//! Command-line options of `hearth-server` (also what tests and front-ends pass when they spawn it).

use clap::Parser;
use std::path::PathBuf;

/// hearth's session server: keeps one base model warm and serves runs on it over HTTP.
#[derive(Parser, Debug, Clone)]
#[command(name = "hearth-server", version, about, long_about = None)]
pub struct Options {
    /// The base model: a local Hugging Face folder, a `.gguf` file, a hub repo id (owner/name),
    /// one GGUF file of a hub repo (owner/name:file.gguf), or a generated preset (`tiny`,
    /// `smollm2-135m-shape`).
    #[arg(long, default_value = "tiny")]
    pub model: String,

    /// Address to listen on. Loopback by default; port 0 picks a free one (the session file and
    /// the first line on stdout say which).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,

    /// File holding the bearer token; created (mode 0600) with a fresh token if missing.
    /// Without it a fresh token is generated and written only to the session file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// Seconds without work (an operation of a run or a sampler; not a heartbeat, a poll or a
    /// read) before every run is saved and the server exits (0 = never).
    #[arg(long, default_value_t = 1800)]
    pub idle_timeout: u64,

    /// Autosave each run every this many optimizer steps (0 = never).
    #[arg(long, default_value_t = 25)]
    pub autosave_every: u64,

    /// Autosaves kept per run (older ones are deleted).
    #[arg(long, default_value_t = 3)]
    pub keep_autosaves: usize,

    /// `cpu`, `cuda`, `cuda:N` (needs the `cuda` feature) or `metal`.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Base weights' dtype: `f32`, `bf16` or `f16` (default f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    pub dtype: Option<String>,

    /// Keep the base's 2-D weights (projections, embeddings) as quantized blocks, dequantized per
    /// layer when used (QLoRA): `q8` (8-bit blocks) or `q4` (4-bit). A GGUF file's own quantized
    /// blocks are kept as they are. LoRA trains on it as on a dense base; full fine-tuning is
    /// refused. Default: dense.
    #[arg(long)]
    pub quantize: Option<String>,

    /// Activation recompute in training steps: `on` keeps only each layer's input and recomputes
    /// the rest on backward (same gradients, about a third more compute, a fraction of the
    /// memory: long contexts fit), `off` keeps everything, `auto` turns it on when a step's
    /// activations would take more than half the device's free memory.
    #[arg(long, default_value = "auto")]
    pub recompute: String,

    /// Restore every run of this base model from its newest checkpoint. The default when the
    /// session file names a server that has stopped.
    #[arg(long, conflicts_with = "no_resume")]
    pub resume: bool,

    /// Start with no runs even if a previous server left some.
    #[arg(long)]
    pub no_resume: bool,

    /// hearth's home (registry, checkpoints, session file). Default: `$HEARTH_HOME`, else
    /// `$XDG_DATA_HOME/hearth`, else `~/.local/share/hearth`.
    #[arg(long)]
    pub home: Option<PathBuf>,

    /// TLS certificate chain (PEM) for remote use; with `--tls-key`.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Most tokens one request may carry: a training batch's `model_input`s together, or a
    /// sampling prompt. A larger batch is refused (413); split it: gradients accumulate.
    #[arg(long, default_value_t = 32_768)]
    pub max_request_tokens: usize,

    /// Most bytes of text one request may have tokenized (tokenize, chat rendering, OpenAI
    /// prompts and messages).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_text_bytes: usize,

    /// Most sequences one sampling request may generate (`n`, `num_samples`; at most 256).
    #[arg(long, default_value_t = 256)]
    pub max_samples: usize,

    /// Largest LoRA rank a run may have.
    #[arg(long, default_value_t = 512)]
    pub max_lora_rank: usize,

    /// Requests one user (or the admin) may have queued; past it a request is refused with 429
    /// and `Retry-After` (the Tinker SDK waits and retries).
    #[arg(long, default_value_t = 256)]
    pub max_queued_per_user: usize,

    /// Runs held in memory at most (0: no cap). Past it the least recently used run is saved as
    /// a `state` checkpoint and dropped; its next operation brings it back, bit for bit.
    #[arg(long, default_value_t = 0)]
    pub max_resident_runs: usize,

    /// Tinker samplers holding weights in memory at most (0: no cap). Past it the least
    /// recently used is evicted: one made from a checkpoint is loaded again when used, a
    /// snapshot is dropped.
    #[arg(long, default_value_t = 64)]
    pub max_samplers: usize,

    /// Memory the server may hold, in MiB (0: as much as the device has available). A new run,
    /// sampler or sample that would take it past this is refused with 507 before anything is
    /// allocated.
    #[arg(long, default_value_t = 0)]
    pub memory_budget_mb: u64,

    /// A user's default quota of runs (the admin sets one per user: `PUT /v1/users/NAME/quota`).
    #[arg(long, default_value_t = 8)]
    pub user_runs: usize,

    /// A user's default quota: the largest LoRA rank of their runs.
    #[arg(long, default_value_t = 64)]
    pub user_lora_rank: usize,

    /// A user's default quota: tokens one request may cost (a batch's tokens; a sample's prompt
    /// plus num_samples × max_tokens).
    #[arg(long, default_value_t = 32768)]
    pub user_request_tokens: usize,

    /// A user's default quota of device-seconds in all (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub user_device_seconds: f64,

    /// Seconds a shutdown waits for open connections (a half-sent request, an unread stream)
    /// after every run is saved, before it closes them.
    #[arg(long, default_value_t = 5)]
    pub shutdown_grace_s: u64,

    /// Price of the device per hour in USD (default: from a table of common GPUs; 0 on the CPU).
    #[arg(long)]
    pub hourly_rate: Option<f64>,

    /// Stop training once this many USD of device time are spent (runs are saved first).
    #[arg(long)]
    pub budget_usd: Option<f64>,

    /// Seconds a Tinker training request waits for an earlier `seq_id` of its model before it
    /// fails (hidden: tests shorten it).
    #[arg(long, default_value_t = 60, hide = true)]
    pub tinker_gap_wait_s: u64,
}

impl Options {
    /// The home folder these options point at.
    pub fn home_dir(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(hearth_api::home_dir)
    }
}
