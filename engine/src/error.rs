//! The engine's error type: one enum, variants that name the operation and the offending values.

use std::path::PathBuf;

/// Everything that can go wrong in the engine. User mistakes, out-of-memory and interruption
/// are separate variants so callers (the server) can map them to 4xx, 507 and "interrupted".
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The batch has no datums.
    #[error("empty batch: `data` has no datums")]
    EmptyBatch,
    /// A datum has no tokens.
    #[error("data[{datum}].model_input is empty")]
    EmptyDatum {
        /// Index of the datum in the batch.
        datum: usize,
    },
    /// A token id is not in the vocabulary.
    #[error(
        "{field}[{position}] = {id} is out of range: the vocabulary has {vocab_size} tokens (ids 0..{vocab_size})"
    )]
    TokenOutOfRange {
        /// Path of the array, e.g. `data[2].model_input`.
        field: String,
        /// Position in that array.
        position: usize,
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// A per-position array does not match `model_input` in length.
    #[error("data[{datum}].loss_fn_inputs.{field} has {len} entries, model_input has {expected}")]
    LengthMismatch {
        /// Index of the datum.
        datum: usize,
        /// Name of the array.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The length of `model_input`.
        expected: usize,
    },
    /// A loss input is missing.
    #[error("data[{datum}].loss_fn_inputs.{field} is missing: loss `{loss}` needs {required}")]
    MissingInput {
        /// Index of the datum.
        datum: usize,
        /// Name of the missing array.
        field: &'static str,
        /// The loss function.
        loss: &'static str,
        /// All inputs the loss needs.
        required: String,
    },
    /// A float input is NaN or infinite.
    #[error("data[{datum}].loss_fn_inputs.{field}[{position}] is {value}: inputs must be finite")]
    NonFinite {
        /// Index of the datum.
        datum: usize,
        /// Name of the array.
        field: &'static str,
        /// Position in the array.
        position: usize,
        /// The value.
        value: f32,
    },
    /// A datum is longer than the model's context.
    #[error("data[{datum}] has {len} tokens; the model's context is {max} tokens")]
    SequenceTooLong {
        /// Index of the datum.
        datum: usize,
        /// Its length.
        len: usize,
        /// `max_position_embeddings`.
        max: usize,
    },
    /// A scalar parameter is out of its domain.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidParam {
        /// Name of the parameter, e.g. `learning_rate`.
        field: &'static str,
        /// The value as given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// `optim_step` was called with nothing to apply.
    #[error("optim_step: no gradients have been accumulated since the last step; call forward_backward first")]
    NoGradients,
    /// The loss (or a gradient) is NaN or infinite; nothing was accumulated.
    #[error("{op}: the loss is {value}; gradients were not accumulated (check inputs and learning rate)")]
    NonFiniteLoss {
        /// The operation.
        op: &'static str,
        /// The loss value.
        value: f64,
    },
    /// A model configuration cannot be used.
    #[error("model config {path}: {reason}")]
    Config {
        /// Where the config came from.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF file cannot be used (not GGUF, truncated, an architecture, tensor type or
    /// pre-tokenizer hearth does not know); nothing was loaded.
    #[error("GGUF {path}: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Weights do not match the configuration.
    #[error("weights: {0}")]
    Weights(String),
    /// A broken invariant of the engine's own: a bug, never the caller's input (a 500).
    #[error("internal error: {0}")]
    Internal(String),
    /// A checkpoint cannot be loaded (wrong base model, other shapes, corrupt file, unknown
    /// format); the run is unchanged.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The chat template failed on these messages (or raised an exception on purpose, e.g.
    /// "roles must alternate").
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Downloading a model failed (network, server error).
    #[error("download: {0}")]
    Download(String),
    /// The model or batch will not fit in memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A device cannot be opened (an unknown name, no such GPU, a build without its support).
    #[error("device {spec}: {reason}")]
    Device {
        /// The device as named (`cuda:1`).
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The operation was cancelled; no state changed.
    #[error("interrupted: the operation was cancelled and changed nothing")]
    Interrupted,
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `writing`, …).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An error from candle (a bug on our side or a device failure).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// True for errors caused by the caller's input (a 4xx), false for ours or the device's.
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            EngineError::OutOfMemory(_)
                | EngineError::Io { .. }
                | EngineError::Candle(_)
                | EngineError::Interrupted
                | EngineError::Download(_)
                | EngineError::Device { .. }
                | EngineError::Internal(_)
        )
    }

    /// True when a file operation failed because the disk (or the user's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, EngineError::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
        let path = path.into();
        move |source| EngineError::Io { op, path, source }
    }
}

/// The I/O error somewhere in `e`'s chain of sources (a copy: the chain is borrowed).
pub(crate) fn io_error_in(e: &(dyn std::error::Error + 'static)) -> Option<std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(
                io.raw_os_error()
                    .map_or_else(|| std::io::Error::new(io.kind(), io.to_string()), std::io::Error::from_raw_os_error),
            );
        }
        cur = err.source();
    }
    None
}
