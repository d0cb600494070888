//! Tinker's wire protocol under `/api/v1`, as the official `tinker` SDK (0.38) speaks it, on the
//! same warm model and the same runs as the native `/v1` API.
//!
//! - **Auth**: `X-API-Key: tml-<token>` (the SDK accepts only keys starting `tml-`; the token is
//!   the session file's, or a user's) or the bare token.
//! - **Owners**: everything here is the caller's ([`crate::users`]): models are runs under the
//!   caller's names, and sessions, futures and samplers remember who made them. Another user's
//!   model id, `tinker://` path, future or sampler answers as one that does not exist; the
//!   admin names a user's model as `USER/<model id>` (`tinker://alice/s1:train:0/weights/x`).
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
//!   snapshot of a run, or the base model alone) in the worker's memory until its session
//!   finishes, or until newer samplers push it out ([`crate::resident`], `--max-samplers`).
//!
//! The engine knows nothing of this: every operation is a worker [`Op`] like the native ones.
//!
//! Files: this one holds the protocol's state and its routes (its auth is
//! [`crate::http::auth`]'s, shared by every protocol); `ids.rs` maps ids and
//! checkpoint paths, `futures.rs` runs operations as futures, `sequencer.rs` orders them,
//! `place.rs` reads a request's place before its body, `convert.rs` and `proto.rs` are the
//! protobuf side, and `training.rs`, `sampling.rs` and `rest.rs` the handlers.

mod convert;
mod futures;
mod ids;
mod place;
pub mod proto;
mod rest;
mod sampling;
mod sequencer;
mod training;

use crate::error::ApiError;
use crate::job::{JobState, Op, Outcome};
use crate::users::{check_user_name, Caller};
use crate::worker::check_name;
use crate::{lock, App};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use convert::*;
use futures::*;
use hearth_api::{
    AdamParams, CheckpointKind, CreateRunRequest, Datum, ForwardBackwardInput, ForwardBackwardOutput, LoadStateRequest,
    LoraConfig, LossFnInputs, RunInfo, SampleInput, SampleOutput, SamplingParams, SaveStateRequest, Stop, TargetModule,
    TrainingConfig,
};
use ids::*;
use place::{body_key, fb_key, json_request, proto_place, read_body, typed, Place};
use prost::Message;
use rest::*;
use sampling::*;
use sequencer::{Admitted, SeqError, Sequencer};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use training::*;

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

/// The protocol's state: models' order, futures, samplers, and who made each session.
pub struct Tinker {
    /// Each model's order, by run id; an admitted `seq_id` keeps its future's id.
    order: Sequencer<String>,
    /// Futures by id, with who asked.
    futures: Mutex<HashMap<String, (Caller, watch::Receiver<Fut>)>>,
    /// Sampling sessions by their id in the server (a user's are `USER/<id>`, like runs).
    samplers: Mutex<HashMap<String, Sampler>>,
    /// Who made each session of this server's life (a session from before a restart is anyone's
    /// to name again: what it makes is under the caller's own names either way).
    sessions: Mutex<HashMap<String, Caller>>,
    /// `asample` answers by sampler and `seq_id`, with their body's key.
    samples_seen: Mutex<HashMap<(String, i64), (u64, Value)>>,
    next_future: AtomicU64,
}

impl Tinker {
    /// The protocol's state, where a training request waits at most `gap_wait` for an earlier
    /// `seq_id` of its model.
    pub fn new(gap_wait: Duration) -> Self {
        Tinker {
            order: Sequencer::new(gap_wait),
            futures: Mutex::default(),
            samplers: Mutex::default(),
            sessions: Mutex::default(),
            samples_seen: Mutex::default(),
            next_future: AtomicU64::new(0),
        }
    }

    /// A new future of `owner`'s.
    fn new_future(&self, owner: &Caller) -> (String, watch::Sender<Fut>) {
        let id = format!("req-{}", self.next_future.fetch_add(1, Ordering::SeqCst) + 1);
        let (tx, rx) = watch::channel(Fut::Pending);
        let mut futs = lock(&self.futures);
        if futs.len() > 4096 {
            futs.retain(|_, (_, f)| matches!(*f.borrow(), Fut::Pending));
        }
        futs.insert(id.clone(), (owner.clone(), rx));
        (id, tx)
    }
}

/// The `/api/v1` routes (auth is [`crate::http::auth`]'s: `X-API-Key: tml-<token>`).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/client/config", post(client_config))
        .route("/api/v1/client/dynamic_config", post(|| async { Json(json!({"refresh_interval_sec": 300})) }))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions/{id}/finish", post(finish_session))
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
}

/// Tinker's error body (FastAPI's shape, which the SDK prints as `Error code: N - {...}`).
fn err(e: ApiError) -> Response {
    crate::http::envelope(true, e)
}

/// A JSON body, any unknown fields allowed (the SDK adds `type` literals and more).
fn body<T: serde::de::DeserializeOwned>(b: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    crate::http::parse_body(b)
}
