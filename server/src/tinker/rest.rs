//! Sessions (an id and a heartbeat) and the REST reads: training runs, checkpoints, weights info.

use super::*;

pub(super) async fn client_config() -> Json<Value> {
    // plain JSON and protobuf, no compression, no JWT exchange
    Json(json!({"pjwt_auth_enabled": false, "proto_compress_fwdbwd": false}))
}

pub(super) async fn capabilities(State(app): State<Arc<App>>) -> Json<Value> {
    let ctx = app.shared.base.config.max_position_embeddings;
    Json(
        json!({"supported_models": [{"model_name": model_name(&app), "max_context_length": ctx, "trainable": true, "sampleable": true}]}),
    )
}

pub(super) async fn create_session(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Json<Value> {
    let mut sessions = lock(&app.tinker.sessions);
    let mut seed = crate::worker::now_ms() ^ u64::from(std::process::id());
    let id = loop {
        let id = format!("s{:08x}", hearth_engine::rng::Rng::new(seed).next_u64() as u32);
        if !sessions.contains_key(&id) {
            break id;
        }
        seed = seed.wrapping_add(1);
    };
    sessions.insert(id.clone(), caller);
    Json(json!({"session_id": id, "type": "create_session"}))
}

/// A heartbeat's body: the session id must be there (nothing else is kept of a session).
#[derive(Deserialize)]
pub(super) struct SessionId {
    session_id: String,
}

/// A heartbeat keeps nothing alive: it is not work, so the idle timer goes on (the server saves
/// every run and exits when only heartbeats come).
pub(super) async fn heartbeat(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    match body::<SessionId>(b).and_then(|s| check_session(&app, &caller, &s.session_id)) {
        Ok(()) => Json(json!({"type": "session_heartbeat"})).into_response(),
        Err(e) => err(e),
    }
}

/// The SDK closing its session: the session's samplers are freed.
pub(super) async fn finish_session(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = check_session(&app, &caller, &id) {
        return err(e);
    }
    let prefix = caller.run_id(&format!("{id}:"));
    lock(&app.tinker.samplers).retain(|k, _| !k.starts_with(&prefix));
    let shared = app.shared.clone();
    let freed = tokio::task::spawn_blocking(move || shared.drop_samplers(prefix)).await.unwrap_or(0);
    log::debug!("session {id} finished: {freed} sampler(s) freed");
    Json(json!({})).into_response()
}

/// Unix seconds as an ISO 8601 UTC time.
pub(super) fn iso_time(secs: f64) -> String {
    let s = secs.max(0.0) as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (y, m, d) = hearth_engine::text::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub(super) fn modified(path: &std::path::Path) -> f64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A run's checkpoints in Tinker's shape (`state` ones as `weights/`, sampler adapters as
/// `sampler_weights/`; merged and GGUF exports are hearth's own and not listed), with the
/// paths `caller` names them by.
pub(super) fn checkpoints_of(app: &App, caller: &Caller, run: &str) -> Result<Vec<Value>, ApiError> {
    let rows = app.shared.registry.checkpoints(app.shared.base_key(), run).map_err(ApiError::registry)?;
    let model = model_of(caller, run);
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
        let size: u64 = std::fs::read_dir(dir)
            .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
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

pub(super) fn training_run(app: &App, caller: &Caller, info: &RunInfo) -> Value {
    let cks = checkpoints_of(app, caller, &info.id).unwrap_or_default();
    let last = |t: &str| cks.iter().find(|c| c["checkpoint_type"] == t).cloned();
    let (is_lora, rank) = match &info.training {
        TrainingConfig::Lora(l) => (true, Some(l.rank)),
        TrainingConfig::Full => (false, None),
    };
    json!({
        "training_run_id": model_of(caller, &info.id),
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
pub(super) struct Page {
    #[serde(default = "twenty")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

pub(super) fn twenty() -> usize {
    20
}

/// The runs `caller` may see, under the server's ids.
fn runs_of(app: &App, caller: &Caller) -> Vec<RunInfo> {
    lock(&app.shared.runs).iter().filter(|r| caller.owns(&r.id)).cloned().collect()
}

pub(super) async fn list_training_runs(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<Page>,
) -> Json<Value> {
    let runs = runs_of(&app, &caller);
    let page: Vec<Value> = runs.iter().skip(p.offset).take(p.limit).map(|r| training_run(&app, &caller, r)).collect();
    Json(json!({"training_runs": page, "cursor": {"offset": p.offset, "limit": p.limit, "total_count": runs.len()}}))
}

pub(super) async fn get_training_run(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let info = run_of(&caller, &id).ok().and_then(|r| run_info(&app, &r));
    match info {
        Some(i) => Json(training_run(&app, &caller, &i)).into_response(),
        None => err(ApiError::not_found(format!("no training run {id:?}"))),
    }
}

pub(super) async fn list_checkpoints(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match run_of(&caller, &id).and_then(|r| checkpoints_of(&app, &caller, &r)) {
        Ok(c) => Json(json!({"checkpoints": c})).into_response(),
        Err(e) => err(e),
    }
}

pub(super) async fn list_all_checkpoints(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<Page>,
) -> Json<Value> {
    let runs = runs_of(&app, &caller);
    let all: Vec<Value> = runs.iter().flat_map(|r| checkpoints_of(&app, &caller, &r.id).unwrap_or_default()).collect();
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip(p.offset).take(p.limit.max(1)).collect();
    Json(json!({"checkpoints": page, "cursor": {"offset": p.offset, "limit": p.limit, "total_count": total}}))
}

pub(super) async fn delete_checkpoint(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path((id, ckpt)): Path<(String, String)>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let run = run_of(&caller, &id)?;
        let path = format!("tinker://{}/{}", model_of(&caller, &run), ckpt.trim_start_matches('/'));
        let (run, kind, name) = parse_path(&caller, &path)?;
        let hname = kind.hearth_name(&name);
        let dir = app.shared.checkpoints_dir(&run).join(&hname);
        if !dir.is_dir() {
            return Err(ApiError::not_found(format!("no checkpoint {path}")));
        }
        app.shared.registry.remove_checkpoint(app.shared.base_key(), &run, &hname).map_err(ApiError::registry)?;
        std::fs::remove_dir_all(&dir).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("removing {path}: {e}"))
        })?;
        Ok(json!({"deleted": path}))
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

#[derive(Deserialize)]
pub(super) struct WeightsInfo {
    tinker_path: String,
}

pub(super) async fn weights_info(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: WeightsInfo = body(b)?;
        let dir = checkpoint_dir(&app, &caller, &req.tinker_path)?;
        let training = hearth_engine::run::checkpoint_training_config(&dir)?;
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
    fn iso_times() {
        assert_eq!(iso_time(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_796_083_200.0 + 3661.0), "2026-12-01T01:01:01Z");
        assert_eq!(iso_time(951_782_400.0), "2000-02-29T00:00:00Z");
    }
}
