//! The client's error type.

/// What can go wrong talking to the session server.
#[derive(Debug, thiserror::Error)]
pub enum HearthError {
    /// The server refused the request (4xx) or failed (5xx); `kind` is machine-readable.
    #[error("{kind}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// `invalid_input`, `not_found`, `interrupted`, `budget_exhausted`, …
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// No server could be reached or started.
    #[error("no session server: {0}")]
    NoServer(String),
    /// The connection failed mid-request.
    #[error("connection to the session server failed: {0}")]
    Transport(String),
    /// A response did not parse.
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl HearthError {
    /// True for a cancelled operation.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, HearthError::Api { kind, .. } if kind == "interrupted")
    }
}

/// The client's result type.
pub type Result<T> = std::result::Result<T, HearthError>;
