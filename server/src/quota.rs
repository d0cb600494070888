//! What each user may take, and what they took: quotas set by the admin (with the server's
//! defaults, `--user-*`), checked before a request is queued, and usage counted as the worker
//! runs their operations.
//!
//! - **Quotas** ([`hearth_api::Quota`]): runs, LoRA rank, tokens per request, queued requests,
//!   device-seconds. A request past one is a 403 `quota_exceeded` that names the quota and
//!   changes nothing. The admin has none (the server's own limits hold for everyone).
//! - **Usage** ([`hearth_api::Usage`]): device-seconds, tokens trained and sampled, counted in
//!   memory by the worker and written to the registry when the server is idle and when it
//!   stops, so a restart keeps them.

use crate::error::ApiError;
use crate::job::{Op, Outcome};
use crate::registry::Registry;
use crate::users::Caller;
use crate::{lock, App};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use hearth_api::{Quota, TrainingConfig, Usage, UsageReport};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// What one user took so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Taken {
    /// Device time, seconds.
    pub device_s: f64,
    /// Weighted target tokens of their `forward_backward` calls.
    pub tokens_trained: u64,
    /// Tokens their samples generated.
    pub tokens_sampled: u64,
}

/// Quotas and usage of every user (the admin's usage under `""`).
pub struct Quotas {
    defaults: Quota,
    set: Mutex<HashMap<String, Quota>>,
    taken: Mutex<HashMap<String, Taken>>,
    /// Usage changed since it was last written to the registry.
    dirty: std::sync::atomic::AtomicBool,
}

fn exceeded(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", message)
}

impl Quotas {
    /// The server's default quota (every field set) and what the registry holds.
    pub fn load(defaults: Quota, registry: &Registry) -> Result<Quotas, rusqlite::Error> {
        let set = registry.quotas()?.into_iter().collect();
        let taken = registry
            .usage()?
            .into_iter()
            .map(|(name, device_s, tokens_trained, tokens_sampled)| {
                (name, Taken { device_s, tokens_trained, tokens_sampled })
            })
            .collect();
        Ok(Quotas { defaults, set: Mutex::new(set), taken: Mutex::new(taken), dirty: Default::default() })
    }

    /// User `user`'s quota in force (`None` for the admin, `""`).
    pub fn of(&self, user: &str) -> Option<Quota> {
        if user.is_empty() {
            return None;
        }
        let set = lock(&self.set).get(user).cloned().unwrap_or_default();
        let d = &self.defaults;
        Some(Quota {
            runs: set.runs.or(d.runs),
            lora_rank: set.lora_rank.or(d.lora_rank),
            request_tokens: set.request_tokens.or(d.request_tokens),
            queued: set.queued.or(d.queued),
            device_seconds: set.device_seconds.or(d.device_seconds),
        })
    }

    /// Changes the fields `change` gives of user `user`'s quota (kept in the registry); the
    /// quota in force after.
    pub fn set(&self, registry: &Registry, user: &str, change: &Quota) -> Result<Quota, ApiError> {
        let mut set = lock(&self.set);
        let mut q = set.get(user).cloned().unwrap_or_default();
        q.runs = change.runs.or(q.runs);
        q.lora_rank = change.lora_rank.or(q.lora_rank);
        q.request_tokens = change.request_tokens.or(q.request_tokens);
        q.queued = change.queued.or(q.queued);
        q.device_seconds = change.device_seconds.or(q.device_seconds);
        registry.set_quota(user, &q).map_err(ApiError::registry)?;
        set.insert(user.to_string(), q);
        drop(set);
        Ok(self.of(user).unwrap_or_default())
    }

    /// Requests `user` may have queued.
    pub fn queued_limit(&self, user: &str, server: usize) -> usize {
        self.of(user).and_then(|q| q.queued).map_or(server, |q| q.min(server))
    }

    /// What `user` took so far.
    pub fn taken(&self, user: &str) -> Taken {
        lock(&self.taken).get(user).copied().unwrap_or_default()
    }

    /// A 403 naming the quota when `op` of `user`'s would go past one; nothing for the admin.
    pub fn check(&self, user: &str, op: &Op) -> Result<(), ApiError> {
        let Some(q) = self.of(user) else { return Ok(()) };
        if let (Op::CreateRun(req), Some(max)) = (op, q.lora_rank) {
            if let TrainingConfig::Lora(l) = &req.training {
                if l.rank > max {
                    return Err(exceeded(format!(
                        "quota lora_rank: rank {} is more than your quota allows ({max})",
                        l.rank
                    )));
                }
            }
        }
        if let (Some(tokens), Some(max)) = (request_tokens(op), q.request_tokens) {
            if tokens > max {
                return Err(exceeded(format!(
                    "quota request_tokens: this request costs {tokens} tokens, your quota allows {max} per request"
                )));
            }
        }
        let limit = q.device_seconds.unwrap_or(0.0);
        let used = self.taken(user).device_s;
        if op.uses_device() && limit > 0.0 && used >= limit {
            return Err(exceeded(format!(
                "quota device_seconds: you have used {used:.1} of your {limit:.1} device-seconds; ask the admin for more"
            )));
        }
        Ok(())
    }

    /// A 403 when `user` already has `have` runs, as many as their quota allows.
    pub fn check_runs(&self, user: &str, have: usize) -> Result<(), ApiError> {
        match self.of(user).and_then(|q| q.runs) {
            Some(max) if have >= max => {
                Err(exceeded(format!("quota runs: you have {have} runs, as many as your quota allows ({max})")))
            }
            _ => Ok(()),
        }
    }

    /// Counts a finished operation of `user`'s: its device time and tokens.
    pub fn record(&self, user: &str, took: Duration, op: &'static str, outcome: Option<&Outcome>) {
        let mut taken = lock(&self.taken);
        let t = taken.entry(user.to_string()).or_default();
        t.device_s += took.as_secs_f64();
        match outcome {
            Some(Outcome::Forward(out)) if op == "forward_backward" => {
                t.tokens_trained += out.metrics.get("tokens:sum").copied().unwrap_or(0.0).max(0.0) as u64;
            }
            Some(Outcome::Sample(out)) => {
                t.tokens_sampled += out.sequences.iter().map(|s| s.tokens.len() as u64).sum::<u64>();
            }
            _ => {}
        }
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes the usage to the registry if it changed since the last time.
    pub fn flush(&self, registry: &Registry) {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let rows: Vec<(String, f64, u64, u64)> = lock(&self.taken)
            .iter()
            .map(|(u, t)| (u.clone(), t.device_s, t.tokens_trained, t.tokens_sampled))
            .collect();
        if let Err(e) = registry.set_usage(&rows) {
            log::warn!("usage not recorded: {e}");
            self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The tokens a request may cost: a batch's, or a sample's prompt and every sequence's length.
fn request_tokens(op: &Op) -> Option<usize> {
    let batch = |i: &hearth_api::ForwardBackwardInput| i.data.iter().map(|d| d.model_input.len()).sum::<usize>();
    let sample = |i: &hearth_api::SampleInput| {
        i.prompt.len().saturating_add(i.num_samples.saturating_mul(i.sampling_params.max_tokens))
    };
    match op {
        Op::Forward(i) | Op::ForwardBackward(i) => Some(batch(i)),
        Op::Sample(i) | Op::SampleStream(i, _) | Op::SamplerSample(i) => Some(sample(i)),
        _ => None,
    }
}

/// `GET /v1/usage` and `PUT /v1/users/{name}/quota`.
pub fn router() -> axum::Router<std::sync::Arc<App>> {
    Router::new().route("/v1/usage", get(usage)).route("/v1/users/{name}/quota", put(set_quota).get(get_quota))
}

/// One user's usage row (`""`: the admin, shown as `admin`).
pub fn usage_of(app: &App, user: &str) -> Usage {
    let shared = &app.shared;
    let taken = shared.quotas.taken(user);
    let runs = lock(&shared.runs).iter().filter(|r| crate::users::owner_of(&r.id) == user).count();
    let checkpoints = shared.registry.checkpoint_count(shared.base_key(), user).unwrap_or(0);
    Usage {
        user: if user.is_empty() { "admin".into() } else { user.into() },
        device_seconds: taken.device_s,
        tokens_trained: taken.tokens_trained,
        tokens_sampled: taken.tokens_sampled,
        runs,
        checkpoints,
        cost_usd: taken.device_s * app.hourly_rate() / 3600.0,
        quota: shared.quotas.of(user),
    }
}

async fn usage(State(app): State<std::sync::Arc<App>>, Extension(caller): Extension<Caller>) -> Response {
    let users = match &caller {
        Caller::User(u) => vec![usage_of(&app, u)],
        Caller::Admin => {
            let names = match app.shared.registry.users() {
                Ok(rows) => rows.into_iter().map(|r| r.name),
                Err(e) => return ApiError::registry(e).into_response(),
            };
            std::iter::once(String::new()).chain(names).map(|u| usage_of(&app, &u)).collect()
        }
    };
    Json(UsageReport { users }).into_response()
}

async fn set_quota(
    State(app): State<std::sync::Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let set = || -> Result<Quota, ApiError> {
        caller.require_admin("setting quotas")?;
        let change: Quota = crate::http::parse_body(body)?;
        if !app.shared.registry.users().map_err(ApiError::registry)?.iter().any(|u| u.name == name) {
            return Err(ApiError::not_found(format!("no user {name:?}")));
        }
        if change.device_seconds.is_some_and(|s| !s.is_finite() || s < 0.0) {
            return Err(ApiError::invalid("device_seconds: expected a number of seconds, 0 or more (0: no limit)"));
        }
        app.shared.quotas.set(&app.shared.registry, &name, &change)
    };
    set().map(Json).into_response()
}

async fn get_quota(
    State(app): State<std::sync::Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    // a user may read their own quota; the admin anyone's
    if caller.user().is_some_and(|u| u != name) {
        return ApiError::not_found(format!("no user {name:?}")).into_response();
    }
    match app.shared.quotas.of(&name) {
        Some(q) => Json(q).into_response(),
        None => ApiError::not_found("the admin has no quota").into_response(),
    }
}
