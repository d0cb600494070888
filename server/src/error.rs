//! Errors: [`ServerError`] for starting and stopping the server, [`ApiError`] for responses
//! (`{"error": {"kind", "message"}}`, 4xx for the caller's mistakes, 5xx for ours).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_api::{ErrorBody, ErrorResponse};
use hearth_engine::EngineError;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The engine failed (loading the model, restoring a run).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The run registry failed.
    #[error("registry: {0}")]
    Registry(#[from] rusqlite::Error),
    /// A file or socket operation failed.
    #[error("{op} {what}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bad option.
    #[error("{0}")]
    Config(String),
    /// The server stopped, but some runs could not be saved (their unsaved steps are lost).
    #[error("stopped with unsaved runs: {0}")]
    Unsaved(String),
}

impl ServerError {
    pub(crate) fn io(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServerError {
        let what = what.to_string();
        move |source| ServerError::Io { op, what, source }
    }
}

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable kind.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// A 4xx or 5xx with a kind and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into() }
    }

    /// 400: the request is malformed or names bad values.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// 404: no such run / request.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500: an invariant of the server's own broke (the registry, a file it wrote).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 500: the registry (SQLite) failed.
    pub fn registry(e: rusqlite::Error) -> Self {
        Self::internal(format!("registry: {e}"))
    }

    /// 429: the caller's line in the queue is full.
    pub fn queue_full(queued: usize) -> Self {
        log::debug!("a line of {queued} queued requests is full: answered 429");
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("you have {queued} requests queued, the most one user may; retry when some have run (Retry-After)"),
        )
    }

    /// The headers an error answers with besides its body: `Retry-After` on a 429.
    pub fn headers(&self) -> Vec<(axum::http::HeaderName, axum::http::HeaderValue)> {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            vec![(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"))]
        } else {
            Vec::new()
        }
    }

    /// 503 while the server saves and exits.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is saving every run and shutting down; retry against the next one",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { kind: self.kind.to_string(), message: self.message.clone() }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Interrupted => Self::new(StatusCode::CONFLICT, "interrupted", message),
            EngineError::Checkpoint { .. } => Self::new(StatusCode::BAD_REQUEST, "bad_checkpoint", message),
            EngineError::OutOfMemory(_) => Self::new(StatusCode::INSUFFICIENT_STORAGE, "out_of_memory", message),
            // the machine's faults, never the caller's: a full disk, any other file error
            ref e if e.is_disk_full() => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!("{message}; free some space and retry"),
            ),
            EngineError::Io { .. } => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", message),
            EngineError::Candle(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "device_error", message),
            e if e.is_user_error() => Self::invalid(message),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        e.into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(ErrorResponse { error: self.body() })).into_response();
        resp.headers_mut().extend(self.headers());
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_faults_are_4xx_and_ours_are_5xx() {
        let status = |e: EngineError| ApiError::from(e).status;
        assert_eq!(
            status(EngineError::Weights("tensor `x` is missing from the checkpoint".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(EngineError::Internal("recompute: layer inputs out of step".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let internal = ApiError::from(EngineError::Internal("kv cache buffer missing".into()));
        assert_eq!((internal.kind, internal.message.as_str()), ("internal", "internal error: kv cache buffer missing"));
        assert_eq!(status(EngineError::Interrupted), StatusCode::CONFLICT);
        assert_eq!(status(EngineError::OutOfMemory("a step".into())), StatusCode::INSUFFICIENT_STORAGE);
    }
}
