//! hearth's native protocol under `/v1`: runs and their operations, requests (poll, cancel),
//! text (tokenize, detokenize, render_chat), and the server's own controls (settings, autosave,
//! shutdown), and the users ([`crate::users`]). Bodies are parsed by [`crate::http`] so that a
//! malformed one gets a 400 naming what is wrong, and an oversized one a 413.
//!
//! Every run name is the caller's ([`Caller::run_id`] in, [`Caller::view`] out): a user's `main`
//! is their own, another user's run or request answers as one that does not exist. The admin
//! names users' runs in full, `alice/main`, also in paths (`/v1/runs/alice/main/forward`).

use crate::error::ApiError;
use crate::http::{parse_body, wait_answer};
use crate::job::{JobState, Op};
use crate::users::{check_run_id, Caller};
use crate::worker::check_name;
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hearth_api::{
    CancelResponse, CreateRunRequest, DetokenizeRequest, LoadStateRequest, Metrics, RenderChatRequest,
    RenderChatResponse, RequestState, RequestStatus, RunInfo, Settings, Text, TokenizeRequest, Tokens,
};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The native routes (auth, the body limit and the error envelope are [`crate::routes`]'s).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/info", get(info))
        .route("/v1/runs", post(create_run).get(list_runs))
        .route("/v1/runs/{run}/metrics", get(metrics))
        .route("/v1/runs/{run}/{op}", post(run_op))
        .route("/v1/runs/{user}/{run}/metrics", get(user_metrics))
        .route("/v1/runs/{user}/{run}/{op}", post(user_run_op))
        .route("/v1/tokenize", post(tokenize))
        .route("/v1/detokenize", post(detokenize))
        .route("/v1/render_chat", post(render_chat))
        .route("/v1/requests/{id}", get(poll))
        .route("/v1/requests/{id}/cancel", post(cancel))
        .route("/v1/cancel", post(cancel_all))
        .route("/v1/autosave", post(autosave_all))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/settings", post(settings).get(get_settings))
        .merge(crate::users::router())
        .merge(crate::quota::router())
}

async fn ping() -> Json<serde_json::Value> {
    Json(serde_json::json!({"ok": true}))
}

async fn info(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Json<hearth_api::ServerInfo> {
    Json(app.info(&caller))
}

async fn list_runs(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Json<Vec<RunInfo>> {
    Json(app.runs_of(&caller))
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
async fn finish(app: &App, caller: &Caller, id: u64, rx: tokio::sync::watch::Receiver<JobState>) -> Response {
    match wait_answer(app, id, rx).await {
        Ok(outcome) => Json(outcome.seen_by(caller).to_json()).into_response(),
        Err(failed) => failed,
    }
}

/// Submits `op` on the caller's run `run` (as the caller names it).
async fn submit(app: &App, caller: &Caller, run: String, op: Op, wait: bool) -> Response {
    if op.uses_device() {
        if let Err(e) = app.check_budget() {
            return e.into_response();
        }
    }
    let name = op.name();
    match app.shared.submit(caller.run_id(&run), op) {
        Err(e) => e.into_response(),
        Ok((id, rx)) if wait => finish(app, caller, id, rx).await,
        Ok((id, _)) => (
            StatusCode::ACCEPTED,
            Json(RequestStatus { request_id: id, run, op: name.into(), state: RequestState::Queued }),
        )
            .into_response(),
    }
}

async fn create_run(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: CreateRunRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let name = match &req.name {
        Some(n) => n.clone(),
        None => app.fresh_run_name(&caller),
    };
    // a user names runs of their own; the admin may name a user's (`alice/main`)
    let checked = if caller.is_admin() { check_run_id("name", &name) } else { check_name("name", &name) };
    if let Err(e) = checked {
        return e.into_response();
    }
    submit(&app, &caller, name, Op::CreateRun(req), q.wait).await
}

async fn run_op(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path((run, op)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let op = match op.as_str() {
        "forward" => parse_body(body).map(Op::Forward),
        "forward_backward" => parse_body(body).map(Op::ForwardBackward),
        "optim_step" => parse_body(body).map(Op::OptimStep),
        "sample" => parse_body(body).map(Op::Sample),
        "save_state" => parse_body(body).map(Op::SaveState),
        "load_state" => parse_body::<LoadStateRequest>(body).and_then(|mut req| {
            req.source = caller.checkpoint_source(&req.source)?;
            if let Some(name) = req.source.strip_prefix(crate::users::PUBLISHED) {
                let dir = crate::users::published_dir(&app, name);
                if !dir.is_dir() {
                    return Err(crate::checkpoints::no_such_checkpoint(&req.source));
                }
                req.source = dir.display().to_string();
            }
            Ok(Op::LoadState(req))
        }),
        other => Err(ApiError::not_found(format!(
            "no operation {other:?}; one of forward, forward_backward, optim_step, sample, save_state, load_state, metrics"
        ))),
    };
    match op {
        Ok(op) => submit(&app, &caller, run, op, q.wait).await,
        Err(e) => e.into_response(),
    }
}

/// `/v1/runs/{user}/{run}/{op}`: the admin's path to a user's run (for a user, a run that does
/// not exist).
async fn user_run_op(
    state: State<Arc<App>>,
    caller: Extension<Caller>,
    Path((user, run, op)): Path<(String, String, String)>,
    q: Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !caller.is_admin() {
        return ApiError::not_found(format!("run {:?} does not exist", format!("{user}/{run}"))).into_response();
    }
    run_op(state, caller, Path((format!("{user}/{run}"), op)), q, body).await
}

async fn user_metrics(
    state: State<Arc<App>>,
    caller: Extension<Caller>,
    Path((user, run)): Path<(String, String)>,
) -> Response {
    metrics(state, caller, Path(format!("{user}/{run}"))).await
}

async fn metrics(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(run): Path<String>,
) -> Response {
    let id = caller.run_id(&run);
    let known = app.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r.id == id);
    if !known {
        return ApiError::not_found(format!("run {run:?} does not exist")).into_response();
    }
    match app.shared.registry.metrics(app.shared.base_key(), &id) {
        Ok(rows) => Json(Metrics { run, rows }).into_response(),
        Err(e) => ApiError::registry(e).into_response(),
    }
}

async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Tokens, ApiError> {
        let req: TokenizeRequest = parse_body(body)?;
        app.shared.limits.check_text("text", req.text.len())?;
        Ok(Tokens { tokens: app.text_model()?.encode(&req.text, req.add_special_tokens)? })
    };
    run().map(Json).into_response()
}

async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Text, ApiError> {
        let req: DetokenizeRequest = parse_body(body)?;
        let t = app.text_model()?;
        if let Some((i, id)) = req.tokens.iter().enumerate().find(|(_, &id)| id as usize >= t.vocab_size()) {
            return Err(ApiError::invalid(format!(
                "tokens[{i}] = {id} is out of range: the tokenizer has {} tokens",
                t.vocab_size()
            )));
        }
        Ok(Text { text: t.decode(&req.tokens, req.skip_special_tokens)? })
    };
    run().map(Json).into_response()
}

async fn render_chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<RenderChatResponse, ApiError> {
        let req: RenderChatRequest = parse_body(body)?;
        app.shared.limits.check_text("messages", crate::limits::chat_bytes(&req.messages))?;
        let t = app.text_model()?;
        let text = t.render_chat(&req.messages, req.add_generation_prompt)?;
        let tokens = t.encode(&text, false)?;
        Ok(RenderChatResponse { text, tokens })
    };
    run().map(Json).into_response()
}

#[derive(Deserialize)]
struct PollQuery {
    /// Seconds to wait for the request to end (long poll); 0 answers at once.
    #[serde(default)]
    timeout_s: f64,
}

/// Request `id` of `caller`'s (another user's answers as one that does not exist).
fn status_of(
    app: &App,
    caller: &Caller,
    id: u64,
) -> Result<(RequestStatus, tokio::sync::watch::Receiver<JobState>), ApiError> {
    let reqs = app.shared.requests.lock().unwrap_or_else(|p| p.into_inner());
    let e =
        reqs.get(&id).filter(|e| caller.owns(&e.run)).ok_or_else(|| ApiError::not_found(format!("no request {id}")))?;
    let rx = e.state.subscribe();
    let state = rx.borrow().to_api(caller);
    let run = caller.view(&e.run).unwrap_or_default();
    Ok((RequestStatus { request_id: id, run, op: e.op.into(), state }, rx))
}

async fn poll(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
    Query(q): Query<PollQuery>,
) -> Response {
    let (mut status, mut rx) = match status_of(&app, &caller, id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if q.timeout_s > 0.0 {
        let limit = Duration::from_secs_f64(q.timeout_s.min(300.0));
        let waited =
            tokio::time::timeout(limit, async { rx.wait_for(JobState::is_over).await.map(|s| s.to_api(&caller)) })
                .await;
        status.state = match waited {
            Ok(Ok(s)) => s,
            _ => rx.borrow().to_api(&caller),
        };
    }
    Json(status).into_response()
}

async fn cancel(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>, Path(id): Path<u64>) -> Response {
    match app.shared.cancel_of(&caller, id) {
        Some(cancelled) => Json(CancelResponse { request_id: id, cancelled }).into_response(),
        None => ApiError::not_found(format!("no request {id}")).into_response(),
    }
}

/// Cancels every queued request and a running `sample` of the caller's (a front-end's
/// interrupt; the admin's cancels everyone's).
async fn cancel_all(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Response {
    Json(serde_json::json!({"cancelled": app.shared.cancel_everything(&caller)})).into_response()
}

/// Saves every run of the caller's changed since its last checkpoint, without stopping (a
/// kernel shutting down).
async fn autosave_all(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Response {
    let shared = app.shared.clone();
    let report =
        tokio::task::spawn_blocking(move || shared.save_runs_of(&caller, "autosave")).await.unwrap_or_default();
    match report.failed.first() {
        None => Json(serde_json::json!({"saved": report.saved})).into_response(),
        // a save that failed is the server's fault (a full disk): a 5xx that lists what was saved
        // and what was not
        Some(first) => {
            let status = if first.error.kind == "disk_full" {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            let runs: Vec<&str> = report.failed.iter().map(|f| f.run.as_str()).collect();
            let error = hearth_api::ErrorBody {
                kind: first.error.kind.clone(),
                message: format!("runs {runs:?} could not be saved: {}", first.error.message),
            };
            (status, Json(serde_json::json!({"error": error, "saved": report.saved, "failed": report.failed})))
                .into_response()
        }
    }
}

async fn shutdown(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(e) = caller.require_admin("shutting the server down") {
        return e.into_response();
    }
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
async fn settings(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: Settings = match caller.require_admin("changing settings").and_then(|()| parse_body(body)) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Some(s) = req.idle_timeout_s.filter(|&s| s > MAX_IDLE_TIMEOUT_S) {
        return ApiError::invalid(format!(
            "idle_timeout_s = {s} is more than a week ({MAX_IDLE_TIMEOUT_S}); use 0 for never"
        ))
        .into_response();
    }
    if let Some(s) = req.idle_timeout_s {
        app.idle_timeout.store(s, Ordering::SeqCst);
        // a new timeout counts from now, not from the last work
        app.shared.last_activity_ms.store(crate::worker::now_ms(), Ordering::SeqCst);
        log::info!("idle timeout set to {s} s");
    }
    Json(current_settings(&app)).into_response()
}
