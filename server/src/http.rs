//! What the three protocols share over HTTP: one auth layer, the error envelopes, body parsing
//! and waiting for a request's answer. Each protocol's routes are its own module
//! ([`crate::native`], [`crate::openai`], [`crate::tinker`]); [`crate::routes`] composes them.

use crate::error::ApiError;
use crate::job::{JobState, Outcome};
use crate::users::{token_hash, Caller};
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Whether `path` belongs to Tinker's protocol (`/api/v1/...`), whose errors and credentials
/// differ from the native and OpenAI routes'.
pub(crate) fn is_tinker(path: &str) -> bool {
    path.starts_with("/api/")
}

/// An error in its protocol's envelope: `{"error": {"kind", "message"}}`, or Tinker's
/// `{"detail", "kind"}` (FastAPI's shape, which the SDK prints as `Error code: N - {...}`).
pub(crate) fn envelope(tinker: bool, e: ApiError) -> Response {
    if tinker {
        let mut resp = (e.status, Json(serde_json::json!({"detail": e.message, "kind": e.kind}))).into_response();
        resp.headers_mut().extend(e.headers());
        resp
    } else {
        e.into_response()
    }
}

/// The largest plain-text error body [`error_envelope`] wraps (axum's rejections are one line).
const PLAIN_ERROR_BYTES: usize = 4096;

/// Every error answers in its protocol's JSON envelope, also the ones axum writes itself as plain
/// text (a path or query that does not parse, a wrong method): `{"error": {"kind", "message"}}`,
/// or Tinker's `{"detail", "kind"}` under `/api/v1`.
pub(crate) async fn error_envelope(req: Request, next: Next) -> Response {
    let tinker = req.uri().path().starts_with("/api/");
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, PLAIN_ERROR_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let kind = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        s if s.is_server_error() => "internal",
        _ => "invalid_input",
    };
    let mut out = envelope(tinker, ApiError::new(status, kind, message));
    // keep what else the response said (Allow on a 405, Retry-After)
    for (name, value) in
        parts.headers.iter().filter(|(n, _)| *n != header::CONTENT_TYPE && *n != header::CONTENT_LENGTH)
    {
        out.headers_mut().insert(name.clone(), value.clone());
    }
    out
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive, as
/// RFC 9110 says).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares in time independent of where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who holds token `given`: the admin (the session file's token, compared in constant time), a
/// user whose token is not revoked (looked up by its SHA-256, which says nothing about how close
/// a guess came), or nobody.
fn caller_of(app: &App, given: &str) -> Result<Option<Caller>, ApiError> {
    if constant_time_eq(given.as_bytes(), app.token.as_bytes()) {
        return Ok(Some(Caller::Admin));
    }
    let user = app.shared.registry.user_by_token(&token_hash(given)).map_err(ApiError::registry)?;
    Ok(user.map(Caller::User))
}

/// The one auth layer of every protocol: a token, as `Authorization: Bearer <token>` (native
/// and OpenAI routes) or, under Tinker's `/api/v1`, also as `X-API-Key: tml-<token>` (the SDK
/// accepts only keys starting `tml-`) or the bare token. The token is the session file's (the
/// admin) or a user's; the handlers read who calls as an `Extension<Caller>`. Passing auth is
/// not activity for the idle timeout: only work is ([`crate::worker::Shared::submit`]).
pub(crate) async fn auth(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let tinker = is_tinker(req.uri().path());
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    let api_key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
    let given = if tinker { api_key.map(|k| k.strip_prefix("tml-").unwrap_or(k)).or(bearer) } else { bearer };
    let refuse = |message: &str| envelope(tinker, ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message));
    let caller = match given.map(|t| caller_of(&app, t)) {
        Some(Ok(Some(caller))) => caller,
        Some(Err(e)) => return envelope(tinker, e),
        Some(Ok(None)) if tinker => {
            return refuse("wrong X-API-Key: use tml-<token>, with the token of hearth's session file or your own")
        }
        Some(Ok(None)) => return refuse("wrong bearer token"),
        None if tinker => {
            return refuse("missing X-API-Key: use tml-<token>, with the token of hearth's session file or your own")
        }
        None => return refuse("missing `Authorization: Bearer <token>` (the session file's token, or your own)"),
    };
    req.extensions_mut().insert(caller);
    match read_whole_body(req, app.max_body_bytes).await {
        Ok(req) => next.run(req).await,
        Err(e) => envelope(tinker, e),
    }
}

/// The request with its body read whole, when its declared length is within `limit`; any other
/// request as it came (the handler's own body extractor answers a body over the limit, or one of
/// no declared length). hyper keeps a connection alive only if the request's body has been read
/// by the time the response is written: a handler that needs no body (a Tinker session,
/// telemetry, a cancel) would answer before a body sent a moment after its head arrived, and the
/// connection would close under a client about to send its next request on it.
async fn read_whole_body(req: Request, limit: usize) -> Result<Request, ApiError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if !declared.is_some_and(|n| n > 0 && n <= limit) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// A body's bytes, or a clear 4xx: 413 over `--max-body-bytes`, 400 otherwise.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than --max-body-bytes",
            )
        } else {
            ApiError::invalid(format!("request body: {e}"))
        }
    })
}

/// Parses a JSON body (an empty one as `{}`), mapping every failure to a clear 4xx that names
/// the field.
pub(crate) fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body_bytes(body)?;
    let text = if bytes.is_empty() { &b"{}"[..] } else { &bytes[..] };
    // serde_path_to_error names the field: "request body: sampling_params.max_tokens: invalid value…"
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
    de.end().map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
    Ok(value)
}

/// A typed parse's failure as a 400 that names the field (`request body: a.b: …`).
pub(crate) fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if path.is_empty() || path == "." {
        ApiError::invalid(format!("request body: {inner}"))
    } else {
        ApiError::invalid(format!("request body: {path}: {inner}"))
    }
}

/// [`wait_result`] for a caller that holds the connection: if the handler's future is dropped
/// first (hyper drops it when the client closes the connection: a timeout, an interrupted cell),
/// the request is cancelled, so it stops waiting in the queue, and a running `sample` stops at
/// its next token.
pub(crate) async fn wait_answer(
    app: &App,
    id: u64,
    rx: tokio::sync::watch::Receiver<JobState>,
) -> Result<Outcome, Response> {
    struct CancelOnDrop<'a>(&'a App, u64);
    impl Drop for CancelOnDrop<'_> {
        fn drop(&mut self) {
            if self.0.shared.cancel(self.1) == Some(true) {
                log::info!("request {}: the client went away; cancelled", self.1);
            }
        }
    }
    let guard = CancelOnDrop(app, id);
    let answer = wait_result(rx).await;
    std::mem::forget(guard); // answered: nothing to cancel
    answer
}

/// Waits for a request's end: the operation's outcome, or the error response the blocking call
/// answers with.
pub(crate) async fn wait_result(mut rx: tokio::sync::watch::Receiver<JobState>) -> Result<Outcome, Response> {
    crate::job::outcome(&mut rx).await.map_err(IntoResponse::into_response)
}
