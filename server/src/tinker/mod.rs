//! Tinker's wire protocol under `/api/v1`, as the official `tinker` SDK (0.38) speaks it, on the
//! same warm model and the same runs as the native `/v1` API.
//!
//! - **Auth**: `X-API-Key: tml-<token>` (the SDK accepts only keys starting `tml-`; the token is
//!   the session file's) or the bare token.
//! - **Ids**: a Tinker session is `s<hex>`; model `S:train:N` is hearth run `S-train-N` (a run
//!   made elsewhere, e.g. `main` in a Rust cell, is addressed by its own name); checkpoint
//!   `tinker://<model>/weights/<name>` is the run's `state` checkpoint `<name>`,
//!   `tinker://<model>/sampler_weights/<name>` its `adapter` checkpoint `sampler-<name>`.
//!   `create_lora_training_client(..., user_metadata={"hearth_run": "main"})` drives the
//!   existing run `main` instead of creating one.
//! - **Futures**: every operation answers `{request_id}` at once; `retrieve_future` long-polls
//!   (25 s, then 408 `try_again`) and answers the result, protobuf for `forward_backward` and
//!   samples (`application/x-protobuf`), or `{error, category}`.
//! - **Order** (`sequencer.rs`): training requests of one model run in `seq_id` order whatever
//!   order they arrive in (a chunked `forward_backward` sends its first chunk last). Every answer
//!   uses up its `seq_id`, an error too: a request refused for its body (undecodable, missing a
//!   field, a `forward_backward` over `--max-body-bytes`) gets its 4xx at once and its `seq_id`,
//!   read leniently (protobuf fields 1 and 2 from the first bytes, or the JSON's `model_id` and
//!   `seq_id`), is marked answered, so the next request does not wait for it. A retry with the
//!   same `seq_id` and the same body gets the same future; another body under a used `seq_id` is
//!   a 409, as is a `seq_id` already passed; one more than 1024 (`sequencer::WINDOW`) ahead is a
//!   400 and changes nothing. A gap not filled within the gap wait (`--tinker-gap-wait-s`, 60 s)
//!   fails the requests waiting behind it, and the order stays at the gap. `asample` with a
//!   `seq_id` is deduplicated the same way, without one never.
//! - **Samplers**: a sampling session holds frozen weights (a `sampler_weights` checkpoint, a
//!   snapshot of a run, or the base model alone) in the worker's memory until the server stops.
//!
//! The engine knows nothing of this: every operation is a worker [`Op`] like the native ones.

mod place;
pub mod proto;
mod sequencer;

use crate::error::ApiError;
use crate::worker::{check_name, Op};
use crate::App;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hearth_api::{
    AdamParams, CheckpointKind, CreateRunRequest, Datum, ForwardBackwardInput, ForwardBackwardOutput, LoadStateRequest, LoraConfig,
    LossFnInputs, RequestState, RunInfo, SampleInput, SampleOutput, SamplingParams, SaveStateRequest, Stop, TargetModule, TrainingConfig,
};
use place::{body_key, fb_key, json_request, proto_place, read_body, typed, Place};
use prost::Message;
use sequencer::{Admitted, SeqError, Sequencer};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long `retrieve_future` holds a poll before answering `try_again` (the SDK gives up on
/// one poll after 45 s).
const POLL_HOLD: Duration = Duration::from_secs(25);

/// A future's state.
#[derive(Clone, Debug)]
enum Fut {
    Pending,
    Json(Value),
    Proto(Vec<u8>),
    Failed { error: String, category: &'static str },
}

impl Fut {
    fn failed(e: &ApiError) -> Self {
        Fut::failed_with(e.status.as_u16(), e.message.clone())
    }

    /// A failure as Tinker reports it: `user` for a 4xx, `server` otherwise.
    fn failed_with(status: u16, error: String) -> Self {
        Fut::Failed { error, category: if (400..500).contains(&status) { "user" } else { "server" } }
    }
}

/// A sampling session.
#[derive(Clone)]
struct Sampler {
    base_model: String,
    model_path: Option<String>,
}

/// The protocol's state: models' order, futures, samplers (a session is only an id).
pub struct Tinker {
    /// Each model's order; an admitted `seq_id` keeps its future's id.
    order: Sequencer<String>,
    futures: Mutex<HashMap<String, watch::Receiver<Fut>>>,
    samplers: Mutex<HashMap<String, Sampler>>,
    /// `asample` answers by sampler and `seq_id`, with their body's key.
    samples_seen: Mutex<HashMap<(String, i64), (u64, Value)>>,
    next_future: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tinker {
    /// The protocol's state, where a training request waits at most `gap_wait` for an earlier
    /// `seq_id` of its model.
    pub fn new(gap_wait: Duration) -> Self {
        Tinker {
            order: Sequencer::new(gap_wait),
            futures: Mutex::default(),
            samplers: Mutex::default(),
            samples_seen: Mutex::default(),
            next_future: AtomicU64::new(0),
        }
    }

    fn new_future(&self) -> (String, watch::Sender<Fut>) {
        let id = format!("req-{}", self.next_future.fetch_add(1, Ordering::SeqCst) + 1);
        let (tx, rx) = watch::channel(Fut::Pending);
        let mut futs = lock(&self.futures);
        if futs.len() > 4096 {
            futs.retain(|_, f| matches!(*f.borrow(), Fut::Pending));
        }
        futs.insert(id.clone(), rx);
        (id, tx)
    }
}

/// The `/api/v1` routes, with their own auth (`X-API-Key`).
pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/client/config", post(client_config))
        .route("/api/v1/client/dynamic_config", post(|| async { Json(json!({"refresh_interval_sec": 300})) }))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions/{id}/finish", post(|| async { Json(json!({})) }))
        .route("/api/v1/telemetry", post(|| async { Json(json!({"status": "accepted"})) }))
        .route("/api/v1/create_model", post(create_model))
        .route("/api/v1/get_info", post(get_info))
        .route("/api/v1/forward_backward", post(forward_backward))
        .route("/api/v1/optim_step", post(optim_step))
        .route("/api/v1/save_weights", post(save_weights))
        .route("/api/v1/save_weights_for_sampler", post(save_weights_for_sampler))
        .route("/api/v1/load_weights", post(load_weights))
        .route("/api/v1/create_sampling_session", post(create_sampling_session))
        .route("/api/v1/samplers/{id}", get(get_sampler))
        .route("/api/v1/asample", post(asample))
        .route("/api/v1/retrieve_future", post(retrieve_future))
        .route("/api/v1/training_runs", get(list_training_runs))
        .route("/api/v1/training_runs/{id}", get(get_training_run))
        .route("/api/v1/training_runs/{id}/checkpoints", get(list_checkpoints))
        .route("/api/v1/training_runs/{id}/checkpoints/{*ckpt}", delete(delete_checkpoint))
        .route("/api/v1/checkpoints", get(list_all_checkpoints))
        .route("/api/v1/weights_info", post(weights_info))
        .layer(axum::middleware::from_fn_with_state(app, auth))
}

/// Tinker's error body (FastAPI's shape, which the SDK prints as `Error code: N - {...}`).
fn err(e: ApiError) -> Response {
    (e.status, Json(json!({"detail": e.message, "kind": e.kind}))).into_response()
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(crate::routes::bearer_token);
    let given = key.map(|k| k.strip_prefix("tml-").unwrap_or(k)).or(bearer);
    match given {
        Some(t) if crate::routes::constant_time_eq(t.as_bytes(), app.token.as_bytes()) => {
            app.shared.last_activity_ms.store(crate::worker::now_ms(), Ordering::SeqCst);
            next.run(req).await
        }
        Some(_) => err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong X-API-Key: use tml-<token>, the token of hearth's session file")),
        None => err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing X-API-Key: use tml-<token>, the token of hearth's session file")),
    }
}

/// A JSON body, any unknown fields allowed (the SDK adds `type` literals and more).
fn body<T: serde::de::DeserializeOwned>(b: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    crate::routes::parse_body(b)
}

// ---- ids ----

/// A session id of ours: letters and digits.
fn is_session(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A session id, or a clear 400.
fn check_session(s: &str) -> Result<(), ApiError> {
    if is_session(s) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("session_id {s:?}: not a session of this server")))
    }
}

/// Session and number of a model id's two halves (`S` and `N` of `S:train:N` or `S-train-N`).
fn model_parts((sess, n): (&str, &str)) -> bool {
    is_session(sess) && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
}

/// The hearth run a Tinker model id names.
fn run_of(model_id: &str) -> Result<String, ApiError> {
    let run = match model_id.split_once(":train:") {
        Some((sess, n)) if model_parts((sess, n)) => format!("{sess}-train-{n}"),
        Some(_) => return Err(ApiError::invalid(format!("model_id {model_id:?}: expected <session>:train:<n>"))),
        None => model_id.to_string(),
    };
    check_name("model_id", &run)?;
    Ok(run)
}

/// The Tinker model id of a hearth run.
fn model_of(run: &str) -> String {
    match run.rsplit_once("-train-") {
        Some((sess, n)) if model_parts((sess, n)) => format!("{sess}:train:{n}"),
        _ => run.to_string(),
    }
}

/// A checkpoint's kinds in Tinker's paths.
#[derive(Clone, Copy, PartialEq)]
enum CkKind {
    Weights,
    Sampler,
}

impl CkKind {
    fn dir(self) -> &'static str {
        match self {
            CkKind::Weights => "weights",
            CkKind::Sampler => "sampler_weights",
        }
    }
    /// The hearth checkpoint name of Tinker name `name`.
    fn hearth_name(self, name: &str) -> String {
        match self {
            CkKind::Weights => name.to_string(),
            CkKind::Sampler => format!("sampler-{name}"),
        }
    }
}

/// `tinker://<model>/<weights|sampler_weights>/<name>` → (run, kind, Tinker name).
fn parse_path(path: &str) -> Result<(String, CkKind, String), ApiError> {
    let bad = || ApiError::invalid(format!("path {path:?}: expected tinker://<model_id>/weights/<name> or tinker://<model_id>/sampler_weights/<name>"));
    let rest = path.strip_prefix("tinker://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [model, kind, name] = parts[..] else { return Err(bad()) };
    let kind = match kind {
        "weights" => CkKind::Weights,
        "sampler_weights" => CkKind::Sampler,
        _ => return Err(bad()),
    };
    check_name("checkpoint name", name)?;
    Ok((run_of(model)?, kind, name.to_string()))
}

/// The folder of a Tinker checkpoint path, which must exist.
fn checkpoint_dir(app: &App, path: &str) -> Result<std::path::PathBuf, ApiError> {
    let (run, kind, name) = parse_path(path)?;
    let dir = app.shared.checkpoints_dir(&run).join(kind.hearth_name(&name));
    if !dir.is_dir() {
        return Err(ApiError::not_found(format!("no checkpoint {path}")));
    }
    Ok(dir)
}

fn model_name(app: &App) -> String {
    app.model_spec.clone()
}

/// A folder `AutoTokenizer.from_pretrained` reads offline: the model's own, or for a `.gguf` base
/// the Hugging Face files its metadata stands for, written once under the home.
fn tokenizer_dir(app: &App) -> Result<String, ApiError> {
    let base = &app.shared.base;
    let Some(g) = &base.gguf else { return Ok(base.source.display().to_string()) };
    let dir = app.shared.home.join("tokenizers").join(&base.fingerprint);
    if !dir.join("tokenizer.json").is_file() {
        let io = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("writing the tokenizer folder: {e}"));
        // written beside, then renamed into place: a reader never sees half a folder
        let tmp = app.shared.home.join("tokenizers").join(format!(".{}.tmp-{}", base.fingerprint, std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(io)?;
        for (file, value) in [("config.json", &g.config_json), ("tokenizer.json", &g.tokenizer_json), ("tokenizer_config.json", &g.tokenizer_config_json)] {
            std::fs::write(tmp.join(file), value.to_string()).map_err(io)?;
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp); // another request got there first
        }
    }
    Ok(dir.display().to_string())
}

/// Where a run's Tinker `user_metadata` is kept (the cookbook stores its renderer there).
fn metadata_path(app: &App, run: &str) -> std::path::PathBuf {
    app.shared.home.join("runs").join(run).join("tinker-user-metadata.json")
}

fn save_metadata(app: &App, run: &str, meta: &HashMap<String, String>) {
    let path = metadata_path(app, run);
    let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path, json!(meta).to_string()));
    if let Err(e) = written {
        log::warn!("run {run}: user_metadata not saved ({e})");
    }
}

fn run_info(app: &App, run: &str) -> Option<RunInfo> {
    lock(&app.shared.runs).iter().find(|r| r.id == run).cloned()
}

// ---- session ----

async fn client_config() -> Json<Value> {
    // plain JSON and protobuf, no compression, no JWT exchange
    Json(json!({"pjwt_auth_enabled": false, "proto_compress_fwdbwd": false}))
}

async fn capabilities(State(app): State<Arc<App>>) -> Json<Value> {
    let ctx = app.shared.base.config.max_position_embeddings;
    Json(json!({"supported_models": [{"model_name": model_name(&app), "max_context_length": ctx, "trainable": true, "sampleable": true}]}))
}

async fn create_session() -> Json<Value> {
    let id = format!("s{:08x}", hearth_engine::rng::Rng::new(crate::worker::now_ms() ^ u64::from(std::process::id())).next_u64() as u32);
    Json(json!({"session_id": id, "type": "create_session"}))
}

/// A heartbeat's body: the session id must be there (nothing else is kept of a session).
#[derive(Deserialize)]
struct SessionId {
    #[expect(dead_code, reason = "parsed only to require it")]
    session_id: String,
}

async fn heartbeat(b: Result<Bytes, BytesRejection>) -> Response {
    // sessions hold no state here: a heartbeat only has to be well formed
    if let Err(e) = body::<SessionId>(b) {
        return err(e);
    }
    Json(json!({"type": "session_heartbeat"})).into_response()
}

// ---- futures ----

/// What an operation's worker jobs turn into once they end.
type Convert = Box<dyn FnOnce(Vec<Value>) -> Result<Fut, ApiError> + Send>;

/// Submits worker jobs now; their results are converted when they end.
struct Jobs {
    rxs: Vec<watch::Receiver<RequestState>>,
    convert: Convert,
}

fn submit_jobs(app: &App, ops: Vec<(String, Op)>, convert: Convert) -> Result<Jobs, ApiError> {
    let mut rxs = Vec::new();
    for (run, op) in ops {
        if op.uses_device() {
            app.check_budget()?;
        }
        rxs.push(app.shared.submit(run, op)?.1);
    }
    Ok(Jobs { rxs, convert })
}

async fn finish_jobs(jobs: Result<Jobs, ApiError>, tx: watch::Sender<Fut>) {
    let jobs = match jobs {
        Ok(j) => j,
        Err(e) => {
            tx.send_replace(Fut::failed(&e));
            return;
        }
    };
    let mut results = Vec::new();
    for mut rx in jobs.rxs {
        let state = rx.wait_for(|s| matches!(s, RequestState::Done { .. } | RequestState::Failed { .. })).await.map(|s| s.clone());
        match state {
            Ok(RequestState::Done { result }) => results.push(result),
            Ok(RequestState::Failed { status, error }) => {
                tx.send_replace(Fut::failed_with(status, error.message));
                return;
            }
            _ => {
                tx.send_replace(Fut::failed(&ApiError::shutting_down()));
                return;
            }
        }
    }
    let out = (jobs.convert)(results).unwrap_or_else(|e| Fut::failed(&e));
    tx.send_replace(out);
}

/// Runs `make` (which submits the worker jobs) at this request's turn in its model's
/// `seq_id` order; answers the future's id at once. A retry (same `seq_id`, same body `key`)
/// gets its first future.
fn ordered(
    app: &Arc<App>,
    model_id: &str,
    seq_id: i64,
    key: u64,
    make: impl FnOnce(&App) -> Result<Jobs, ApiError> + Send + 'static,
) -> Result<String, ApiError> {
    let mut tx = None;
    let admitted = app.tinker.order.admit(model_id, seq_id, key, || {
        let (id, t) = app.tinker.new_future();
        tx = Some(t);
        id
    });
    let (id, ticket) = match admitted.map_err(seq_error)? {
        Admitted::Again(id) => return Ok(id),
        Admitted::First(id, ticket) => (id, ticket),
    };
    let Some(tx) = tx else { return Ok(id) };
    let app = app.clone();
    tokio::spawn(async move {
        let jobs = match ticket.turn().await {
            Ok(()) => make(&app),
            Err(e) => Err(seq_error(e)),
        };
        // the turn passes on once the jobs are submitted (the worker runs jobs in submission
        // order), or at once if it never came
        drop(ticket);
        finish_jobs(jobs, tx).await;
    });
    Ok(id)
}

/// An order's refusal as an answer.
fn seq_error(e: SeqError) -> ApiError {
    let message = e.to_string();
    match e {
        SeqError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "seq_id_conflict", message),
        SeqError::Passed { .. } | SeqError::Refused { .. } => ApiError::new(StatusCode::CONFLICT, "out_of_order", message),
        SeqError::TooFar { .. } | SeqError::Gap { .. } => ApiError::invalid(message),
    }
}

/// A training request's answer. An error uses up its `seq_id` (of a model that exists), so
/// that the model's next request does not wait for it; an error of the order itself leaves
/// the order as it is.
fn answer(app: &App, place: Option<&Place>, r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            if let Some(p) = place.filter(|p| known_run(app, &p.model_id).is_ok()) {
                app.tinker.order.consume(&p.model_id, p.seq_id);
            }
            err(e)
        }
    }
}

/// A future that is not ordered (creation, sampling).
fn unordered(app: &Arc<App>, jobs: Result<Jobs, ApiError>) -> String {
    let (id, tx) = app.tinker.new_future();
    tokio::spawn(finish_jobs(jobs, tx));
    id
}

#[derive(Deserialize)]
struct RetrieveFuture {
    request_id: String,
}

async fn retrieve_future(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let req: RetrieveFuture = match body(b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let Some(mut rx) = lock(&app.tinker.futures).get(&req.request_id).cloned() else {
        return err(ApiError::not_found(format!("no future {:?}", req.request_id)));
    };
    let state = match tokio::time::timeout(POLL_HOLD, rx.wait_for(|f| !matches!(f, Fut::Pending))).await {
        Ok(Ok(s)) => s.clone(),
        _ => Fut::Pending,
    };
    match state {
        Fut::Pending => (StatusCode::REQUEST_TIMEOUT, Json(json!({"type": "try_again", "request_id": req.request_id, "queue_state": "active"}))).into_response(),
        Fut::Json(v) => Json(v).into_response(),
        Fut::Proto(bytes) => ([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response(),
        Fut::Failed { error, category } => Json(json!({"error": error, "category": category})).into_response(),
    }
}

// ---- training ----

/// Tinker's LoRA config; a field left out takes the SDK's default.
#[derive(Deserialize)]
#[serde(default)]
struct LoraCfg {
    rank: usize,
    seed: Option<u64>,
    train_mlp: bool,
    train_attn: bool,
    train_unembed: bool,
}

impl Default for LoraCfg {
    fn default() -> Self {
        Self { rank: 32, seed: None, train_mlp: true, train_attn: true, train_unembed: true }
    }
}

/// Tinker's `train_mlp`, `train_attn`, `train_unembed` of a hearth adapter (`lora_of`'s inverse).
fn train_flags(l: &LoraConfig) -> (bool, bool, bool) {
    let has = |ms: &[TargetModule]| l.target_modules.iter().any(|m| ms.contains(m));
    (
        has(&[TargetModule::GateProj, TargetModule::UpProj, TargetModule::DownProj]),
        has(&[TargetModule::QProj, TargetModule::KProj, TargetModule::VProj, TargetModule::OProj]),
        has(&[TargetModule::LmHead]),
    )
}

#[derive(Deserialize)]
struct CreateModel {
    session_id: String,
    model_seq_id: u64,
    base_model: String,
    lora_config: Option<LoraCfg>,
    #[serde(default)]
    user_metadata: Option<HashMap<String, String>>,
}

/// hearth's LoRA config for Tinker's flags. alpha = 32 whatever the rank (hearth's default).
fn lora_of(c: &LoraCfg) -> Result<TrainingConfig, ApiError> {
    let mut modules = Vec::new();
    if c.train_attn {
        modules.extend([TargetModule::QProj, TargetModule::KProj, TargetModule::VProj, TargetModule::OProj]);
    }
    if c.train_mlp {
        modules.extend([TargetModule::GateProj, TargetModule::UpProj, TargetModule::DownProj]);
    }
    if c.train_unembed {
        modules.push(TargetModule::LmHead);
    }
    if modules.is_empty() {
        return Err(ApiError::invalid("lora_config: train_mlp, train_attn and train_unembed are all false: nothing to train"));
    }
    if !(1..=1024).contains(&c.rank) {
        return Err(ApiError::invalid(format!("lora_config.rank = {}: expected 1 to 1024", c.rank)));
    }
    let seed = c.seed.unwrap_or_else(|| hearth_engine::rng::Rng::new(crate::worker::now_ms()).next_u64());
    Ok(TrainingConfig::Lora(LoraConfig { rank: c.rank, alpha: 32.0, target_modules: modules, seed }))
}

fn check_base(app: &App, base_model: &str) -> Result<(), ApiError> {
    let served = model_name(app);
    let dir = app.shared.base.source.display().to_string();
    if base_model == served || base_model == dir || base_model.is_empty() {
        Ok(())
    } else {
        // one server, one base model: say which one it is
        Err(ApiError::invalid(format!("base_model {base_model:?}: this server holds {served:?} (one base model per server)")))
    }
}

async fn create_model(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: CreateModel = body(b)?;
        check_base(&app, &req.base_model)?;
        check_session(&req.session_id)?;
        // `user_metadata={"hearth_run": "main"}` drives an existing run (one made in a Rust cell)
        if let Some(existing) = req.user_metadata.as_ref().and_then(|m| m.get("hearth_run")) {
            let run = known_run(&app, existing)?;
            let model_id = model_of(&run);
            // a new client counts its seq_ids from 1 again
            app.tinker.order.restart(&model_id, 1);
            let (id, tx) = app.tinker.new_future();
            tx.send_replace(Fut::Json(json!({"model_id": model_id, "type": "create_model"})));
            return Ok(json!({"request_id": id, "model_id": model_id}));
        }
        let model_id = format!("{}:train:{}", req.session_id, req.model_seq_id);
        let lora = req.lora_config.unwrap_or_default();
        let training = lora_of(&lora)?;
        let name = run_of(&model_id)?;
        let op = Op::CreateRun(CreateRunRequest { name: Some(name.clone()), training });
        let mid = model_id.clone();
        let (app2, run2, meta) = (app.clone(), name.clone(), req.user_metadata.unwrap_or_default());
        let jobs = submit_jobs(
            &app,
            vec![(name, op)],
            Box::new(move |_| {
                save_metadata(&app2, &run2, &meta);
                Ok(Fut::Json(json!({"model_id": mid, "type": "create_model"})))
            }),
        );
        app.tinker.order.open(&model_id, 1);
        Ok(json!({"request_id": unordered(&app, jobs), "model_id": model_id}))
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

#[derive(Deserialize)]
struct ModelId {
    model_id: String,
}

fn model_info(app: &App, model_id: &str) -> Result<Value, ApiError> {
    let run = run_of(model_id)?;
    let info = run_info(app, &run).ok_or_else(|| ApiError::not_found(format!("unknown model_id {model_id:?}")))?;
    let name = model_name(app);
    let tokenizer = tokenizer_dir(app)?;
    let (is_lora, rank, (mlp, attn, unembed)) = match &info.training {
        TrainingConfig::Lora(l) => (true, Some(l.rank), train_flags(l)),
        TrainingConfig::Full => (false, None, (true, true, true)),
    };
    Ok(json!({
        "type": "get_info",
        "model_id": model_id,
        "model_data": {"arch": app.shared.base.config.family.model_type(), "model_name": name, "tokenizer_id": tokenizer},
        "is_lora": is_lora,
        "lora_rank": rank,
        "train_mlp": mlp,
        "train_attn": attn,
        "train_unembed": unembed,
        "model_name": name,
        "optimizer_config": {"type": "adamw"},
        "step": info.step,
    }))
}

async fn get_info(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    body::<ModelId>(b).and_then(|r| model_info(&app, &r.model_id)).map(Json).map_or_else(err, IntoResponse::into_response)
}

/// Tensor bytes as numbers.
fn tensor_values(name: &str, t: &proto::Tensor) -> Result<Vec<f64>, ApiError> {
    let Some(proto::tensor::Encoding::Dense(bytes)) = &t.encoding else {
        return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: only dense tensors are taken")));
    };
    let chunks = |n: usize| -> Result<std::slice::ChunksExact<'_, u8>, ApiError> {
        if bytes.len() % n != 0 {
            return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: {} bytes is not a whole number of {n}-byte values", bytes.len())));
        }
        Ok(bytes.chunks_exact(n))
    };
    let arr = |c: &[u8], n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(c);
        a
    };
    let v: Vec<f64> = match proto::DType::try_from(t.dtype) {
        Ok(proto::DType::Float32) => chunks(4)?.map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Ok(proto::DType::Int64) => chunks(8)?.map(|c| i64::from_le_bytes(arr(c, 8)) as f64).collect(),
        Ok(proto::DType::Int32) => chunks(4)?.map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Ok(proto::DType::Bfloat16) => chunks(2)?.map(|c| f64::from(f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))).collect(),
        _ => return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: dtype {} is not float32, int64, int32 or bfloat16", t.dtype))),
    };
    let elems: i64 = t.shape.iter().product();
    if !t.shape.is_empty() && elems as usize != v.len() {
        return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: shape {:?} but {} values", t.shape, v.len())));
    }
    if t.shape.len() > 1 {
        return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: shape {:?}; hearth takes one value per position", t.shape)));
    }
    Ok(v)
}

/// A protobuf datum as hearth's.
fn datum_of(i: usize, d: &proto::Datum) -> Result<Datum, ApiError> {
    let mut tokens = Vec::new();
    for c in &d.model_input {
        match &c.chunk {
            Some(proto::chunk::Kind::EncodedText(t)) => {
                if t.tokens.len() % 4 != 0 {
                    return Err(ApiError::invalid(format!("data[{i}].model_input: token bytes are not int32s")));
                }
                for b in t.tokens.chunks_exact(4) {
                    let id = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    tokens.push(u32::try_from(id).map_err(|_| ApiError::invalid(format!("data[{i}].model_input: token id {id} is negative")))?);
                }
            }
            None => return Err(ApiError::invalid(format!("data[{i}].model_input: only encoded_text chunks are taken (images are not supported)"))),
        }
    }
    let mut inputs = LossFnInputs::default();
    for (name, t) in &d.loss_fn_inputs {
        let v = tensor_values(name, t)?;
        let f32s = || v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        match name.as_str() {
            "target_tokens" => {
                let ids = v.iter().map(|&x| if x >= 0.0 && x <= f64::from(u32::MAX) && x.fract() == 0.0 { Ok(x as u32) } else { Err(x) });
                inputs.target_tokens = Some(ids.collect::<Result<_, _>>().map_err(|x| ApiError::invalid(format!("data[{i}].loss_fn_inputs.target_tokens: {x} is not a token id")))?);
            }
            "weights" => inputs.weights = Some(f32s()),
            "logprobs" => inputs.logprobs = Some(f32s()),
            "advantages" => inputs.advantages = Some(f32s()),
            other => return Err(ApiError::invalid(format!("data[{i}].loss_fn_inputs.{other}: hearth takes target_tokens, weights, logprobs and advantages"))),
        }
    }
    Ok(Datum::new(tokens, inputs))
}

/// The protobuf request as hearth's input (the loss and its config through hearth's own parser).
fn fb_input(req: &proto::ForwardBackwardRequest) -> Result<ForwardBackwardInput, ApiError> {
    let data = req.data.iter().enumerate().map(|(i, d)| datum_of(i, d)).collect::<Result<Vec<_>, _>>()?;
    let mut config = serde_json::Map::new();
    for (k, v) in &req.loss_fn_config {
        config.insert(k.clone(), json!(v));
    }
    for (k, v) in &req.loss_fn_config_v2 {
        match &v.value {
            Some(proto::loss_config_value::Value::Number(x)) => {
                config.insert(k.clone(), json!(x));
            }
            Some(proto::loss_config_value::Value::Text(t)) => return Err(ApiError::invalid(format!("loss_fn_config.{k} = {t:?}: hearth's losses take numbers"))),
            None => {}
        }
    }
    let loss = if config.is_empty() { json!({"loss_fn": req.loss_fn}) } else { json!({"loss_fn": req.loss_fn, "loss_fn_config": config}) };
    let mut wire = loss;
    wire["data"] = serde_json::to_value(&data).map_err(|e| ApiError::invalid(e.to_string()))?;
    serde_json::from_value(wire).map_err(|e| ApiError::invalid(format!("loss: {e}")))
}

/// hearth's output as Tinker's protobuf: one record with every datum's `logprobs`.
fn fb_output(out: &ForwardBackwardOutput) -> Vec<u8> {
    let mut data = Vec::new();
    let mut offsets = vec![0i64];
    for o in &out.loss_fn_outputs {
        data.extend(proto::f32_bytes(&o.logprobs));
        offsets.push(data.len() as i64);
    }
    let logprobs = proto::BatchedTensor {
        data,
        offsets: offsets.iter().flat_map(|x| x.to_le_bytes()).collect(),
        dtype: proto::DType::Float32 as i32,
        trailing_shape: vec![],
    };
    let record = proto::ArrayRecord {
        type_tag: "ArrayRecord".into(),
        fields: HashMap::from([("logprobs".to_string(), logprobs)]),
        num_datums: out.loss_fn_outputs.len() as i64,
    };
    // the SDK splits every key on ':' into name and reduction
    let metrics = out.metrics.iter().filter(|(k, _)| k.split(':').count() == 2).map(|(k, v)| (k.clone(), *v)).collect();
    proto::ForwardBackwardOutput { loss_fn_output_type: "ArrayRecord".into(), loss_fn_outputs: vec![record], metrics }.encode_to_vec()
}

async fn forward_backward(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    // read here, not by the `Bytes` extractor: a body over the limit still names its place
    let (bytes, whole) = match read_body(body, app.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return err(e),
    };
    let decoded = whole.then(|| proto::ForwardBackwardRequest::decode(&bytes[..]));
    let place = match &decoded {
        Some(Ok(req)) => Some(Place { model_id: req.model_id.clone(), seq_id: i64::from(req.seq_id) }),
        _ => proto_place(&bytes),
    };
    let run = || -> Result<Value, ApiError> {
        let Some(decoded) = decoded else {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is larger than --max-body-bytes"));
        };
        if headers.get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity") {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_input", "Content-Encoding: this server reads uncompressed protobuf (client/config says proto_compress_fwdbwd: false)"));
        }
        let req = decoded.map_err(|e| ApiError::invalid(format!("forward_backward: not a tinker_public.ForwardBackwardRequest protobuf: {e}")))?;
        let run = known_run(&app, &req.model_id)?;
        let key = fb_key(&req);
        // a bad datum fails the future (its seq_id is used: the SDK has counted it)
        let input = fb_input(&req);
        let forward_only = req.forward_only;
        let id = ordered(&app, &req.model_id, i64::from(req.seq_id), key, move |app| {
            let input = input?;
            let op = if forward_only { Op::Forward(input) } else { Op::ForwardBackward(input) };
            submit_jobs(
                app,
                vec![(run, op)],
                Box::new(|mut r| {
                    let out: ForwardBackwardOutput = serde_json::from_value(r.remove(0)).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
                    Ok(Fut::Proto(fb_output(&out)))
                }),
            )
        })?;
        Ok(json!({"request_id": id, "model_id": req.model_id}))
    };
    answer(&app, place.as_ref(), run())
}

#[derive(Deserialize)]
struct OptimStep {
    model_id: String,
    seq_id: i64,
    adam_params: Option<AdamIn>,
    optimizer_params: Option<Value>,
}

#[derive(Deserialize)]
struct AdamIn {
    learning_rate: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    weight_decay: Option<f64>,
    grad_clip_norm: Option<f64>,
}

async fn optim_step(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let (v, key, place) = match json_request("optim_step", b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let run = || -> Result<Value, ApiError> {
        let req: OptimStep = typed(v)?;
        let run = known_run(&app, &req.model_id)?;
        let params = match (req.adam_params, req.optimizer_params) {
            (Some(a), _) => {
                let d = AdamParams::default();
                Ok(AdamParams {
                    learning_rate: a.learning_rate.unwrap_or(d.learning_rate),
                    beta1: a.beta1.unwrap_or(d.beta1),
                    beta2: a.beta2.unwrap_or(d.beta2),
                    eps: a.eps.unwrap_or(d.eps),
                    weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
                    grad_clip_norm: a.grad_clip_norm.unwrap_or(d.grad_clip_norm),
                })
            }
            (None, Some(p)) => Err(ApiError::invalid(format!("optimizer_params {}: hearth's optimizer is AdamW (adam_params)", p.get("type").unwrap_or(&Value::Null)))),
            (None, None) => Err(ApiError::invalid("optim_step: adam_params is missing")),
        };
        let id = ordered(&app, &req.model_id, req.seq_id, key, move |app| {
            submit_jobs(
                app,
                vec![(run, Op::OptimStep(params?))],
                Box::new(|r| {
                    let o = &r[0];
                    Ok(Fut::Json(json!({"type": "optim_step", "metrics": {
                        "grad_norm:mean": o["grad_norm"], "learning_rate:mean": o["learning_rate"], "step:max": o["step"]
                    }})))
                }),
            )
        })?;
        Ok(json!({"request_id": id, "model_id": req.model_id}))
    };
    answer(&app, place.as_ref(), run())
}

/// The run of a model id that exists.
fn known_run(app: &App, model_id: &str) -> Result<String, ApiError> {
    let run = run_of(model_id)?;
    if run_info(app, &run).is_none() {
        return Err(ApiError::not_found(format!("unknown model_id {model_id:?}")));
    }
    Ok(run)
}

#[derive(Deserialize)]
struct SaveWeights {
    model_id: String,
    seq_id: i64,
    path: Option<String>,
    sampling_session_seq_id: Option<u64>,
}

fn save_op(app: &Arc<App>, req: SaveWeights, key: u64, kind: CkKind) -> Result<Value, ApiError> {
    let run = known_run(app, &req.model_id)?;
    let model_id = req.model_id.clone();
    let id = match (req.path, kind, req.sampling_session_seq_id) {
        (Some(name), _, _) => {
            let named = check_name("path", &name).and_then(|()| {
                if name.starts_with("autosave-") {
                    Err(ApiError::invalid(format!("path {name:?}: names starting with `autosave-` are the server's")))
                } else {
                    Ok(name)
                }
            });
            ordered(app, &req.model_id, req.seq_id, key, move |app| {
                let name = named?;
                let ck = CheckpointKind::from(kind);
                let tinker_path = format!("tinker://{model_id}/{}/{name}", kind.dir());
                let answer_type = match kind {
                    CkKind::Weights => "save_weights",
                    CkKind::Sampler => "save_weights_for_sampler",
                };
                submit_jobs(
                    app,
                    vec![(run, Op::SaveState(SaveStateRequest { name: kind.hearth_name(&name), kind: ck }))],
                    Box::new(move |_| Ok(Fut::Json(json!({"path": tinker_path, "type": answer_type})))),
                )
            })?
        }
        (None, CkKind::Sampler, Some(n)) => {
            // no name: a snapshot of the current weights to sample from, no file
            let session = req.model_id.split_once(":train:").map_or(run.as_str(), |(s, _)| s).to_string();
            let sampler = format!("{session}:sample:{n}");
            let entry = Sampler { base_model: model_name(app), model_path: None };
            let app2 = app.clone();
            ordered(app, &req.model_id, req.seq_id, key, move |app| {
                let s = sampler.clone();
                submit_jobs(
                    app,
                    vec![(run, Op::Snapshot { sampler: sampler.clone() })],
                    Box::new(move |_| {
                        lock(&app2.tinker.samplers).insert(s.clone(), entry);
                        Ok(Fut::Json(json!({"sampling_session_id": s, "type": "save_weights_for_sampler"})))
                    }),
                )
            })?
        }
        _ => return Err(ApiError::invalid("path: a checkpoint name is required")),
    };
    Ok(json!({"request_id": id, "model_id": req.model_id}))
}

impl From<CkKind> for CheckpointKind {
    fn from(k: CkKind) -> Self {
        match k {
            CkKind::Weights => CheckpointKind::State,
            CkKind::Sampler => CheckpointKind::Adapter,
        }
    }
}

/// `save_weights` and `save_weights_for_sampler`.
fn save(app: &Arc<App>, route: &str, b: Result<Bytes, BytesRejection>, kind: CkKind) -> Response {
    match json_request(route, b) {
        Ok((v, key, place)) => answer(app, place.as_ref(), typed(v).and_then(|r| save_op(app, r, key, kind))),
        Err(e) => err(e),
    }
}

async fn save_weights(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    save(&app, "save_weights", b, CkKind::Weights)
}

async fn save_weights_for_sampler(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    save(&app, "save_weights_for_sampler", b, CkKind::Sampler)
}

#[derive(Deserialize)]
struct LoadWeights {
    path: String,
    #[serde(default)]
    optimizer: bool,
    model_id: Option<String>,
    seq_id: Option<i64>,
    session_id: Option<String>,
    model_seq_id: Option<u64>,
    #[serde(default)]
    user_metadata: Option<HashMap<String, String>>,
}

async fn load_weights(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let (v, key, place) = match json_request("load_weights", b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let run = || -> Result<Value, ApiError> {
        let req: LoadWeights = typed(v)?;
        match (req.model_id, req.seq_id, req.session_id, req.model_seq_id) {
            // into an existing model, in its order
            (Some(model_id), Some(seq), _, _) => {
                let run = known_run(&app, &model_id)?;
                let dir = checkpoint_dir(&app, &req.path);
                let (path, optimizer) = (req.path.clone(), req.optimizer);
                let id = ordered(&app, &model_id, seq, key, move |app| {
                    let source = dir?.display().to_string();
                    submit_jobs(
                        app,
                        vec![(run, Op::LoadState(LoadStateRequest { source, optimizer }))],
                        Box::new(move |_| Ok(Fut::Json(json!({"path": path, "type": "load_weights"})))),
                    )
                })?;
                Ok(json!({"request_id": id, "model_id": model_id}))
            }
            // a new model made from the checkpoint
            (None, _, Some(session), Some(n)) => {
                check_session(&session)?;
                let dir = checkpoint_dir(&app, &req.path)?;
                let model_id = format!("{session}:train:{n}");
                let name = run_of(&model_id)?;
                let mid = model_id.clone();
                let path = req.path.clone();
                // the new run's metadata: the request's, else its source run's
                let meta = match req.user_metadata {
                    Some(m) => Some(m),
                    None => parse_path(&req.path)
                        .ok()
                        .and_then(|(src, _, _)| std::fs::read_to_string(metadata_path(&app, &src)).ok())
                        .and_then(|t| serde_json::from_str(&t).ok()),
                };
                let (app2, run2) = (app.clone(), name.clone());
                let jobs = submit_jobs(
                    &app,
                    vec![(name, Op::CreateRunFrom { source: dir, optimizer: req.optimizer })],
                    Box::new(move |_| {
                        if let Some(meta) = meta {
                            save_metadata(&app2, &run2, &meta);
                        }
                        Ok(Fut::Json(json!({"path": path, "model_id": mid, "type": "load_weights"})))
                    }),
                );
                app.tinker.order.open(&model_id, 1);
                Ok(json!({"request_id": unordered(&app, jobs), "model_id": model_id}))
            }
            _ => Err(ApiError::invalid("load_weights: give model_id and seq_id, or session_id and model_seq_id")),
        }
    };
    // a load into an existing model has a place in its order, a new model none
    answer(&app, place.as_ref(), run())
}

// ---- sampling ----

#[derive(Deserialize)]
struct CreateSampling {
    session_id: String,
    sampling_session_seq_id: u64,
    model_path: Option<String>,
    base_model: Option<String>,
}

async fn create_sampling_session(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let prepare = || -> Result<(String, Sampler, Op), ApiError> {
        let req: CreateSampling = body(b)?;
        check_session(&req.session_id)?;
        let id = format!("{}:sample:{}", req.session_id, req.sampling_session_seq_id);
        let (source, model_path) = match (req.model_path, req.base_model) {
            (Some(p), _) => (Some(checkpoint_dir(&app, &p)?), Some(p)),
            (None, Some(b)) => {
                check_base(&app, &b)?;
                (None, None)
            }
            (None, None) => return Err(ApiError::invalid("create_sampling_session: give model_path or base_model")),
        };
        Ok((id, Sampler { base_model: model_name(&app), model_path }, Op::CreateSampler(source)))
    };
    let (id, sampler, op) = match prepare() {
        Ok(x) => x,
        Err(e) => return err(e),
    };
    let rx = match app.shared.submit(id.clone(), op) {
        Ok((_, rx)) => rx,
        Err(e) => return err(e),
    };
    match crate::routes::wait_result(rx).await {
        Ok(_) => {
            lock(&app.tinker.samplers).insert(id.clone(), sampler);
            Json(json!({"sampling_session_id": id, "type": "create_sampling_session"})).into_response()
        }
        Err(resp) => resp,
    }
}

async fn get_sampler(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match lock(&app.tinker.samplers).get(&id) {
        Some(s) => Json(json!({"sampler_id": id, "base_model": s.base_model, "model_path": s.model_path})).into_response(),
        None => err(ApiError::not_found(format!("no sampler {id:?} (samplers live until the server stops)"))),
    }
}

#[derive(Deserialize)]
struct ASample {
    sampling_session_id: Option<String>,
    /// Without one a request is never taken for a retry of another.
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default = "one")]
    num_samples: usize,
    prompt: PromptIn,
    #[serde(default)]
    sampling_params: Option<SamplingIn>,
    #[serde(default)]
    prompt_logprobs: bool,
    #[serde(default)]
    topk_prompt_logprobs: u32,
    #[serde(default)]
    topk_sample_logprobs: u32,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct PromptIn {
    chunks: Vec<ChunkIn>,
}

#[derive(Deserialize)]
struct ChunkIn {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    tokens: Vec<i64>,
}

#[derive(Deserialize, Default)]
struct SamplingIn {
    max_tokens: Option<usize>,
    seed: Option<u64>,
    stop: Option<Value>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
}

/// Tinker's sampling parameters as hearth's; no `stop` means the model's end-of-text token.
fn sampling_of(app: &App, p: SamplingIn) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let stop = match p.stop {
        None | Some(Value::Null) => {
            let eos = app.shared.base.text.as_ref().and_then(|t| t.special_tokens().1.and_then(|e| t.token_to_id(e)));
            eos.map(Stop::Token).into_iter().collect()
        }
        Some(Value::String(s)) => vec![Stop::Text(s)],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(Stop::Text(s)),
                Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(Stop::Token).ok_or_else(|| ApiError::invalid(format!("sampling_params.stop: {n} is not a token id"))),
                other => Err(ApiError::invalid(format!("sampling_params.stop: {other} is neither text nor a token id"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(ApiError::invalid(format!("sampling_params.stop: {other} is neither text nor a list"))),
    };
    Ok(SamplingParams {
        max_tokens: p.max_tokens.unwrap_or(d.max_tokens),
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.filter(|&k| k > 0).map_or(0, |k| k as usize),
        top_p: p.top_p.unwrap_or(d.top_p),
        stop,
        seed: p.seed,
    })
}

/// hearth's samples as Tinker's protobuf.
fn sample_output(out: &SampleOutput) -> Vec<u8> {
    let sequences = out
        .sequences
        .iter()
        .map(|s| proto::SampledSequence {
            stop_reason: match s.stop_reason {
                hearth_api::StopReason::Stop => proto::StopReason::Stop as i32,
                hearth_api::StopReason::Length => proto::StopReason::Length as i32,
            },
            tokens: proto::i32_bytes(s.tokens.iter().map(|&t| t as i32)),
            logprobs: Some(proto::f32_bytes(&s.logprobs)),
            topk_sampled_logprobs: None,
        })
        .collect();
    let prompt_logprobs = out.prompt_logprobs.as_ref().map(|p| proto::f32_bytes(&p.iter().map(|x| x.unwrap_or(f32::NAN)).collect::<Vec<_>>()));
    proto::SampleResponse { sequences, prompt_logprobs, topk_prompt_logprobs: None, prompt_cache_hit_tokens: 0 }.encode_to_vec()
}

async fn asample(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let v: Value = body(b)?;
        let key = body_key("asample", v.to_string().as_bytes());
        let req: ASample = typed(v)?;
        let sampler = req.sampling_session_id.clone().ok_or_else(|| ApiError::invalid("asample: sampling_session_id is missing"))?;
        if !lock(&app.tinker.samplers).contains_key(&sampler) {
            return Err(ApiError::not_found(format!("no sampler {sampler:?} (samplers live until the server stops)")));
        }
        if req.topk_prompt_logprobs > 0 || req.topk_sample_logprobs > 0 {
            return Err(ApiError::invalid("topk_prompt_logprobs / topk_sample_logprobs: hearth returns the chosen tokens' logprobs only"));
        }
        if !(1..=1024).contains(&req.num_samples) {
            return Err(ApiError::invalid(format!("num_samples = {}: expected 1 to 1024", req.num_samples)));
        }
        let mut prompt = Vec::new();
        for (i, c) in req.prompt.chunks.iter().enumerate() {
            if c.kind.as_deref().is_some_and(|k| k != "encoded_text") {
                return Err(ApiError::invalid(format!("prompt.chunks[{i}]: type {:?}; hearth takes encoded_text only", c.kind)));
            }
            for &t in &c.tokens {
                prompt.push(u32::try_from(t).map_err(|_| ApiError::invalid(format!("prompt.chunks[{i}]: {t} is not a token id")))?);
            }
        }
        let params = sampling_of(&app, req.sampling_params.unwrap_or_default())?;
        let input = SampleInput { prompt, num_samples: req.num_samples, sampling_params: params, prompt_logprobs: req.prompt_logprobs, base_model_only: false };
        // checked and recorded under one lock: two copies of a request make one future
        let mut seen = lock(&app.tinker.samples_seen);
        let place = req.seq_id.map(|seq| (sampler.clone(), seq));
        if let Some(((_, seq), (first_key, first))) = place.as_ref().and_then(|p| Some((p, seen.get(p)?))) {
            return if *first_key == key {
                Ok(first.clone())
            } else {
                Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "seq_id_conflict",
                    format!("sampler {sampler}: seq_id {seq} was already used by a different request (a retry must send the same body)"),
                ))
            };
        }
        let jobs = submit_jobs(
            &app,
            vec![(sampler.clone(), Op::SamplerSample(input))],
            Box::new(|mut r| {
                let out: SampleOutput = serde_json::from_value(r.remove(0)).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
                Ok(Fut::Proto(sample_output(&out)))
            }),
        );
        let id = unordered(&app, jobs);
        let tag = req.seq_id.map_or_else(|| id.clone(), |seq| seq.to_string());
        let ids: Vec<String> = (0..req.num_samples).map(|i| format!("{sampler}:seq:{tag}:{i}")).collect();
        let answer = json!({"request_id": id, "sample_sequence_ids": ids});
        if let Some(place) = place {
            if seen.len() > 4096 {
                seen.clear();
            }
            seen.insert(place, (key, answer.clone()));
        }
        Ok(answer)
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

// ---- REST reads ----

/// Unix seconds as an ISO 8601 UTC time.
fn iso_time(secs: f64) -> String {
    let s = secs.max(0.0) as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (y, m, d) = hearth_engine::text::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn modified(path: &std::path::Path) -> f64 {
    std::fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
}

/// A run's checkpoints in Tinker's shape (`state` ones as `weights/`, sampler adapters as
/// `sampler_weights/`; merged and GGUF exports are hearth's own and not listed).
fn checkpoints_of(app: &App, run: &str) -> Result<Vec<Value>, ApiError> {
    let rows = app.shared.registry.checkpoints(app.shared.base_key(), run).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("registry: {e}")))?;
    let model = model_of(run);
    let mut out = Vec::new();
    for r in rows {
        let (kind, name) = match (r.kind.as_str(), r.name.strip_prefix("sampler-")) {
            ("adapter", Some(n)) => (CkKind::Sampler, n.to_string()),
            ("state", _) => (CkKind::Weights, r.name.clone()),
            _ => continue,
        };
        let dir = std::path::Path::new(&r.path);
        if !dir.is_dir() {
            continue;
        }
        let size: u64 = std::fs::read_dir(dir).map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0);
        out.push(json!({
            "checkpoint_id": format!("{}/{name}", kind.dir()),
            "checkpoint_type": if kind == CkKind::Weights { "training" } else { "sampler" },
            "time": iso_time(modified(dir)),
            "tinker_path": format!("tinker://{model}/{}/{name}", kind.dir()),
            "size_bytes": size,
            "public": false,
        }));
    }
    Ok(out)
}

fn training_run(app: &App, info: &RunInfo) -> Value {
    let cks = checkpoints_of(app, &info.id).unwrap_or_default();
    let last = |t: &str| cks.iter().find(|c| c["checkpoint_type"] == t).cloned();
    let (is_lora, rank) = match &info.training {
        TrainingConfig::Lora(l) => (true, Some(l.rank)),
        TrainingConfig::Full => (false, None),
    };
    json!({
        "training_run_id": model_of(&info.id),
        "base_model": model_name(app),
        "model_owner": "hearth",
        "is_lora": is_lora,
        "corrupted": false,
        "lora_rank": rank,
        "last_request_time": iso_time(app.shared.last_activity_ms.load(Ordering::SeqCst) as f64 / 1000.0),
        "last_checkpoint": last("training"),
        "last_sampler_checkpoint": last("sampler"),
        "user_metadata": std::fs::read_to_string(metadata_path(app, &info.id)).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()),
    })
}

#[derive(Deserialize)]
struct Page {
    #[serde(default = "twenty")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

fn twenty() -> usize {
    20
}

async fn list_training_runs(State(app): State<Arc<App>>, Query(p): Query<Page>) -> Json<Value> {
    let runs = lock(&app.shared.runs).clone();
    let page: Vec<Value> = runs.iter().skip(p.offset).take(p.limit).map(|r| training_run(&app, r)).collect();
    Json(json!({"training_runs": page, "cursor": {"offset": p.offset, "limit": p.limit, "total_count": runs.len()}}))
}

async fn get_training_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let info = run_of(&id).ok().and_then(|r| run_info(&app, &r));
    match info {
        Some(i) => Json(training_run(&app, &i)).into_response(),
        None => err(ApiError::not_found(format!("no training run {id:?}"))),
    }
}

async fn list_checkpoints(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match run_of(&id).and_then(|r| checkpoints_of(&app, &r)) {
        Ok(c) => Json(json!({"checkpoints": c})).into_response(),
        Err(e) => err(e),
    }
}

async fn list_all_checkpoints(State(app): State<Arc<App>>, Query(p): Query<Page>) -> Json<Value> {
    let runs = lock(&app.shared.runs).clone();
    let all: Vec<Value> = runs.iter().flat_map(|r| checkpoints_of(&app, &r.id).unwrap_or_default()).collect();
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip(p.offset).take(p.limit.max(1)).collect();
    Json(json!({"checkpoints": page, "cursor": {"offset": p.offset, "limit": p.limit, "total_count": total}}))
}

async fn delete_checkpoint(State(app): State<Arc<App>>, Path((id, ckpt)): Path<(String, String)>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let run = run_of(&id)?;
        let path = format!("tinker://{}/{}", model_of(&run), ckpt.trim_start_matches('/'));
        let (run, kind, name) = parse_path(&path)?;
        let hname = kind.hearth_name(&name);
        let dir = app.shared.checkpoints_dir(&run).join(&hname);
        if !dir.is_dir() {
            return Err(ApiError::not_found(format!("no checkpoint {path}")));
        }
        app.shared.registry.remove_checkpoint(app.shared.base_key(), &run, &hname).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("registry: {e}")))?;
        std::fs::remove_dir_all(&dir).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("removing {path}: {e}")))?;
        Ok(json!({"deleted": path}))
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

#[derive(Deserialize)]
struct WeightsInfo {
    tinker_path: String,
}

async fn weights_info(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: WeightsInfo = body(b)?;
        let dir = checkpoint_dir(&app, &req.tinker_path)?;
        let training = hearth_engine::session::checkpoint_training_config(&dir)?;
        Ok(match training {
            TrainingConfig::Lora(l) => {
                let (mlp, attn, unembed) = train_flags(&l);
                json!({"base_model": model_name(&app), "is_lora": true, "lora_rank": l.rank,
                       "train_mlp": mlp, "train_attn": attn, "train_unembed": unembed})
            }
            TrainingConfig::Full => json!({"base_model": model_name(&app), "is_lora": false}),
        })
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_both_ways() {
        assert_eq!(run_of("s1a2b:train:3").unwrap(), "s1a2b-train-3");
        assert_eq!(model_of("s1a2b-train-3"), "s1a2b:train:3");
        assert_eq!(run_of("main").unwrap(), "main");
        assert_eq!(model_of("main"), "main");
        assert!(run_of("s1:train:x").is_err());
        assert!(run_of("../etc").is_err());
        let (run, kind, name) = parse_path("tinker://s1:train:0/sampler_weights/s1").unwrap();
        assert_eq!((run.as_str(), kind.hearth_name(&name).as_str()), ("s1-train-0", "sampler-s1"));
        assert!(parse_path("tinker://s1:train:0/weights/../x").is_err());
        assert!(parse_path("tinker://s1:train:0/other/x").is_err());
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_time(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_796_083_200.0 + 3661.0), "2026-12-01T01:01:01Z");
        assert_eq!(iso_time(951_782_400.0), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn protobuf_datums_become_hearths() {
        let t = |dtype: proto::DType, bytes: Vec<u8>, n: i64| proto::Tensor { encoding: Some(proto::tensor::Encoding::Dense(bytes)), dtype: dtype as i32, shape: vec![n] };
        let req = proto::ForwardBackwardRequest {
            model_id: "s1:train:0".into(),
            seq_id: 1,
            data: vec![proto::Datum {
                model_input: vec![proto::Chunk { chunk: Some(proto::chunk::Kind::EncodedText(proto::EncodedTextChunk { tokens: proto::i32_bytes([1, 2, 3]) })) }],
                loss_fn_inputs: HashMap::from([
                    ("target_tokens".to_string(), t(proto::DType::Int64, [2i64, 3, 4].iter().flat_map(|x| x.to_le_bytes()).collect(), 3)),
                    ("weights".to_string(), t(proto::DType::Float32, proto::f32_bytes(&[0.0, 1.0, -0.5]), 3)),
                ]),
            }],
            loss_fn: "cross_entropy".into(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = proto::ForwardBackwardRequest::decode(&bytes[..]).unwrap();
        let input = fb_input(&back).unwrap();
        assert_eq!(input.data[0].model_input, vec![1, 2, 3]);
        assert_eq!(input.data[0].loss_fn_inputs.target_tokens, Some(vec![2, 3, 4]));
        assert_eq!(input.data[0].loss_fn_inputs.weights, Some(vec![0.0, 1.0, -0.5]));
        // a config value, a foreign input, a bad shape: clear errors
        let mut ppo = back.clone();
        ppo.loss_fn = "ppo".into();
        ppo.loss_fn_config.insert("clip_low_threshold".into(), 0.7);
        assert!(matches!(fb_input(&ppo).unwrap().loss_fn, hearth_api::LossFn::Ppo(c) if (c.clip_low_threshold - 0.7).abs() < 1e-9));
        let mut foreign = back.clone();
        foreign.data[0].loss_fn_inputs.insert("mask".into(), t(proto::DType::Float32, proto::f32_bytes(&[1.0; 3]), 3));
        assert!(fb_input(&foreign).unwrap_err().message.contains("loss_fn_inputs.mask"));
        let mut short = back;
        short.data[0].loss_fn_inputs.insert("weights".into(), t(proto::DType::Float32, proto::f32_bytes(&[1.0; 2]), 3));
        assert!(fb_input(&short).unwrap_err().message.contains("shape [3] but 2 values"));
        assert!(proto::ForwardBackwardRequest::decode(&b"\xff\xff\xff"[..]).is_err());
    }
}
