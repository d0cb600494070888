//! HTTP routes (axum). Every route needs the bearer token; bodies are parsed here so that a
//! malformed one gets a 400 naming what is wrong, and an oversized one a 413.

use crate::error::ApiError;
use crate::worker::{check_name, now_ms, Op};
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_api::{
    CancelResponse, CreateRunRequest, DetokenizeRequest, ErrorResponse, Metrics, RenderChatRequest, RenderChatResponse, RequestState,
    RequestStatus, Settings, Text, TokenizeRequest, Tokens,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// All routes, with auth and the body limit.
pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/info", get(info))
        .route("/v1/runs", post(create_run).get(list_runs))
        .route("/v1/runs/{run}/metrics", get(metrics))
        .route("/v1/runs/{run}/{op}", post(run_op))
        .route("/v1/tokenize", post(tokenize))
        .route("/v1/detokenize", post(detokenize))
        .route("/v1/render_chat", post(render_chat))
        .route("/v1/requests/{id}", get(poll))
        .route("/v1/requests/{id}/cancel", post(cancel))
        .route("/v1/cancel", post(cancel_all))
        .route("/v1/autosave", post(autosave_all))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/settings", post(settings).get(get_settings))
        // OpenAI-compatible sampling (server/src/openai.rs)
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/chat/completions", post(crate::openai::chat_completions))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        // Tinker's wire protocol (server/src/tinker), with its own auth (X-API-Key)
        .merge(crate::tinker::router(app.clone()))
        // plain text: `error_envelope` wraps it in the envelope of the protocol the path belongs to
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such route; see GET /v1/info and the README for the API") })
        .method_not_allowed_fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, "this route does not take that method") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(error_envelope))
        .with_state(app)
}

/// The largest plain-text error body [`error_envelope`] wraps (axum's rejections are one line).
const PLAIN_ERROR_BYTES: usize = 4096;

/// Every error answers in its protocol's JSON envelope, also the ones axum writes itself as plain
/// text (a path or query that does not parse, a wrong method): `{"error": {"kind", "message"}}`,
/// or Tinker's `{"detail", "kind"}` under `/api/v1`.
async fn error_envelope(req: Request, next: Next) -> Response {
    let tinker = req.uri().path().starts_with("/api/");
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, PLAIN_ERROR_BYTES).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let kind = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        s if s.is_server_error() => "internal",
        _ => "invalid_input",
    };
    let mut out = if tinker {
        (status, Json(serde_json::json!({"detail": message, "kind": kind}))).into_response()
    } else {
        ApiError::new(status, kind, message).into_response()
    };
    // keep what else the response said (Allow on a 405, Retry-After)
    for (name, value) in parts.headers.iter().filter(|(n, _)| *n != header::CONTENT_TYPE && *n != header::CONTENT_LENGTH) {
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

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), app.token.as_bytes()) => {
            app.shared.last_activity_ms.store(now_ms(), Ordering::SeqCst);
            next.run(req).await
        }
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token").into_response(),
        None => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing `Authorization: Bearer <token>` (the token is in the session file)")
            .into_response(),
    }
}

/// Parses a JSON body, mapping every failure to a clear 4xx (for the other protocols' modules).
pub(crate) fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    parse(body)
}

/// A body's bytes, or a clear 4xx: 413 over `--max-body-bytes`, 400 otherwise.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is larger than --max-body-bytes")
        } else {
            ApiError::invalid(format!("request body: {e}"))
        }
    })
}

/// Parses a JSON body, mapping every failure to a clear 4xx.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
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

async fn ping() -> Json<serde_json::Value> {
    Json(serde_json::json!({"ok": true}))
}

async fn info(State(app): State<Arc<App>>) -> Json<hearth_api::ServerInfo> {
    Json(app.info())
}

async fn list_runs(State(app): State<Arc<App>>) -> Json<Vec<hearth_api::RunInfo>> {
    Json(app.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// Waits for a request's end and turns it into the operation's response; a client that goes
/// away first cancels it.
async fn finish(app: &App, id: u64, rx: tokio::sync::watch::Receiver<RequestState>) -> Response {
    match wait_answer(app, id, rx).await {
        Ok(result) => Json(result).into_response(),
        Err(failed) => failed,
    }
}

/// [`wait_result`] for a caller that holds the connection: if the handler's future is dropped
/// first (hyper drops it when the client closes the connection: a timeout, an interrupted cell),
/// the request is cancelled, so it stops waiting in the queue, and a running `sample` stops at
/// its next token.
pub(crate) async fn wait_answer(app: &App, id: u64, rx: tokio::sync::watch::Receiver<RequestState>) -> Result<serde_json::Value, Response> {
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

/// Waits for a request's end: the operation's result, or the error response the blocking call
/// answers with.
pub(crate) async fn wait_result(mut rx: tokio::sync::watch::Receiver<RequestState>) -> Result<serde_json::Value, Response> {
    let state = match rx.wait_for(|s| matches!(s, RequestState::Done { .. } | RequestState::Failed { .. })).await {
        Ok(s) => s.clone(),
        Err(_) => return Err(ApiError::shutting_down().into_response()),
    };
    match state {
        RequestState::Done { result } => Ok(result),
        RequestState::Failed { status, error } => {
            Err((StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), Json(ErrorResponse { error })).into_response())
        }
        _ => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "request ended without a result").into_response()),
    }
}

async fn submit(app: &App, run: String, op: Op, wait: bool) -> Response {
    if op.uses_device() {
        if let Err(e) = app.check_budget() {
            return e.into_response();
        }
    }
    let name = op.name();
    match app.shared.submit(run.clone(), op) {
        Err(e) => e.into_response(),
        Ok((id, rx)) if wait => finish(app, id, rx).await,
        Ok((id, _)) => (StatusCode::ACCEPTED, Json(RequestStatus { request_id: id, run, op: name.into(), state: RequestState::Queued })).into_response(),
    }
}

async fn create_run(State(app): State<Arc<App>>, Query(q): Query<WaitQuery>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: CreateRunRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let id = match &req.name {
        Some(n) => n.clone(),
        None => app.fresh_run_name(),
    };
    if let Err(e) = check_name("name", &id) {
        return e.into_response();
    }
    submit(&app, id, Op::CreateRun(req), q.wait).await
}

async fn run_op(
    State(app): State<Arc<App>>,
    Path((run, op)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let op = match op.as_str() {
        "forward" => parse(body).map(Op::Forward),
        "forward_backward" => parse(body).map(Op::ForwardBackward),
        "optim_step" => parse(body).map(Op::OptimStep),
        "sample" => parse(body).map(Op::Sample),
        "save_state" => parse(body).map(Op::SaveState),
        "load_state" => parse(body).map(Op::LoadState),
        other => Err(ApiError::not_found(format!(
            "no operation {other:?}; one of forward, forward_backward, optim_step, sample, save_state, load_state, metrics"
        ))),
    };
    match op {
        Ok(op) => submit(&app, run, op, q.wait).await,
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>, Path(run): Path<String>) -> Response {
    let known = app.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r.id == run);
    if !known {
        return ApiError::not_found(format!("run {run:?} does not exist")).into_response();
    }
    match app.shared.registry.metrics(app.shared.base_key(), &run) {
        Ok(rows) => Json(Metrics { run, rows }).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("registry: {e}")).into_response(),
    }
}

pub(crate) fn text_model(app: &App) -> Result<&hearth_engine::text::TextModel, ApiError> {
    app.shared.base.text.as_ref().ok_or_else(|| ApiError::invalid("this model folder has no tokenizer.json"))
}

async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Tokens, ApiError> {
        let req: TokenizeRequest = parse(body)?;
        app.shared.limits.check_text("text", req.text.len())?;
        Ok(Tokens { tokens: text_model(&app)?.encode(&req.text, req.add_special_tokens)? })
    };
    run().map(Json).into_response()
}

async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Text, ApiError> {
        let req: DetokenizeRequest = parse(body)?;
        let t = text_model(&app)?;
        if let Some((i, id)) = req.tokens.iter().enumerate().find(|(_, &id)| id as usize >= t.vocab_size()) {
            return Err(ApiError::invalid(format!("tokens[{i}] = {id} is out of range: the tokenizer has {} tokens", t.vocab_size())));
        }
        Ok(Text { text: t.decode(&req.tokens, req.skip_special_tokens)? })
    };
    run().map(Json).into_response()
}

async fn render_chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<RenderChatResponse, ApiError> {
        let req: RenderChatRequest = parse(body)?;
        app.shared.limits.check_text("messages", chat_bytes(&req.messages))?;
        let t = text_model(&app)?;
        let text = t.render_chat(&req.messages, req.add_generation_prompt)?;
        let tokens = t.encode(&text, false)?;
        Ok(RenderChatResponse { text, tokens })
    };
    run().map(Json).into_response()
}

/// The text of a chat, in bytes (what rendering and tokenizing it costs, before the template).
pub(crate) fn chat_bytes(messages: &[hearth_api::ChatMessage]) -> usize {
    messages.iter().fold(0usize, |n, m| n.saturating_add(m.role.len()).saturating_add(m.content.len()))
}

#[derive(Deserialize)]
struct PollQuery {
    /// Seconds to wait for the request to end (long poll); 0 answers at once.
    #[serde(default)]
    timeout_s: f64,
}

fn status_of(app: &App, id: u64) -> Result<(RequestStatus, tokio::sync::watch::Receiver<RequestState>), ApiError> {
    let reqs = app.shared.requests.lock().unwrap_or_else(|p| p.into_inner());
    let e = reqs.get(&id).ok_or_else(|| ApiError::not_found(format!("no request {id}")))?;
    let rx = e.state.subscribe();
    let state = rx.borrow().clone();
    Ok((RequestStatus { request_id: id, run: e.run.clone(), op: e.op.into(), state }, rx))
}

async fn poll(State(app): State<Arc<App>>, Path(id): Path<u64>, Query(q): Query<PollQuery>) -> Response {
    let (mut status, mut rx) = match status_of(&app, id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if q.timeout_s > 0.0 {
        let limit = Duration::from_secs_f64(q.timeout_s.min(300.0));
        let done = |s: &RequestState| matches!(s, RequestState::Done { .. } | RequestState::Failed { .. });
        let waited = tokio::time::timeout(limit, async { rx.wait_for(done).await.map(|s| s.clone()) }).await;
        status.state = match waited {
            Ok(Ok(s)) => s,
            _ => rx.borrow().clone(),
        };
    }
    Json(status).into_response()
}

async fn cancel(State(app): State<Arc<App>>, Path(id): Path<u64>) -> Response {
    match app.shared.cancel(id) {
        Some(cancelled) => Json(CancelResponse { request_id: id, cancelled }).into_response(),
        None => ApiError::not_found(format!("no request {id}")).into_response(),
    }
}

/// Cancels every queued request and a running `sample` (a front-end's interrupt).
async fn cancel_all(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({"cancelled": app.shared.cancel_everything()})).into_response()
}

/// Saves every run changed since its last checkpoint, without stopping (a kernel shutting down).
async fn autosave_all(State(app): State<Arc<App>>) -> Response {
    let shared = app.shared.clone();
    let report = tokio::task::spawn_blocking(move || shared.save_all("autosave")).await.unwrap_or_default();
    match report.failed.first() {
        None => Json(serde_json::json!({"saved": report.saved})).into_response(),
        // a save that failed is the server's fault (a full disk): a 5xx that lists what was saved
        // and what was not
        Some(first) => {
            let status = if first.error.kind == "disk_full" { StatusCode::INSUFFICIENT_STORAGE } else { StatusCode::INTERNAL_SERVER_ERROR };
            let runs: Vec<&str> = report.failed.iter().map(|f| f.run.as_str()).collect();
            let error = hearth_api::ErrorBody { kind: first.error.kind.clone(), message: format!("runs {runs:?} could not be saved: {}", first.error.message) };
            (status, Json(serde_json::json!({"error": error, "saved": report.saved, "failed": report.failed}))).into_response()
        }
    }
}

async fn shutdown(State(app): State<Arc<App>>) -> Response {
    app.trigger_shutdown("shutdown request");
    Json(serde_json::json!({"shutting_down": true})).into_response()
}

/// The longest idle timeout `POST /v1/settings` accepts (a week).
const MAX_IDLE_TIMEOUT_S: u64 = 7 * 24 * 3600;

fn current_settings(app: &App) -> Settings {
    Settings { idle_timeout_s: Some(app.idle_timeout.load(Ordering::SeqCst)) }
}

async fn get_settings(State(app): State<Arc<App>>) -> Json<Settings> {
    Json(current_settings(&app))
}

/// Changes settings of the running server; a bad body is a 400 that changes nothing.
async fn settings(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: Settings = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Some(s) = req.idle_timeout_s.filter(|&s| s > MAX_IDLE_TIMEOUT_S) {
        return ApiError::invalid(format!("idle_timeout_s = {s} is more than a week ({MAX_IDLE_TIMEOUT_S}); use 0 for never")).into_response();
    }
    if let Some(s) = req.idle_timeout_s {
        app.idle_timeout.store(s, Ordering::SeqCst);
        log::info!("idle timeout set to {s} s");
    }
    Json(current_settings(&app)).into_response()
}
