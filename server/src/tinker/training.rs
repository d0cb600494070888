//! Training: `create_model`, `get_info`, `forward_backward`, `optim_step`, and saving and loading
//! weights.

use super::*;

/// Tinker's LoRA config; a field left out takes the SDK's default.
#[derive(Deserialize)]
#[serde(default)]
pub(super) struct LoraCfg {
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
pub(super) fn train_flags(l: &LoraConfig) -> (bool, bool, bool) {
    let has = |ms: &[TargetModule]| l.target_modules.iter().any(|m| ms.contains(m));
    (
        has(&[TargetModule::GateProj, TargetModule::UpProj, TargetModule::DownProj]),
        has(&[TargetModule::QProj, TargetModule::KProj, TargetModule::VProj, TargetModule::OProj]),
        has(&[TargetModule::LmHead]),
    )
}

#[derive(Deserialize)]
pub(super) struct CreateModel {
    session_id: String,
    model_seq_id: u64,
    base_model: String,
    lora_config: Option<LoraCfg>,
    #[serde(default)]
    user_metadata: Option<HashMap<String, String>>,
}

/// hearth's LoRA config for Tinker's flags. alpha = 32 whatever the rank (hearth's default).
pub(super) fn lora_of(c: &LoraCfg) -> Result<TrainingConfig, ApiError> {
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
        return Err(ApiError::invalid(
            "lora_config: train_mlp, train_attn and train_unembed are all false: nothing to train",
        ));
    }
    if !(1..=1024).contains(&c.rank) {
        return Err(ApiError::invalid(format!("lora_config.rank = {}: expected 1 to 1024", c.rank)));
    }
    let seed = c.seed.unwrap_or_else(|| hearth_engine::rng::Rng::new(crate::worker::now_ms()).next_u64());
    Ok(TrainingConfig::Lora(LoraConfig { rank: c.rank, alpha: 32.0, target_modules: modules, seed }))
}

pub(super) fn check_base(app: &App, base_model: &str) -> Result<(), ApiError> {
    let served = model_name(app);
    let dir = app.shared.base.source.display().to_string();
    if base_model == served || base_model == dir || base_model.is_empty() {
        Ok(())
    } else {
        // one server, one base model: say which one it is
        Err(ApiError::invalid(format!(
            "base_model {base_model:?}: this server holds {served:?} (one base model per server)"
        )))
    }
}

pub(super) async fn create_model(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: CreateModel = body(b)?;
        check_base(&app, &req.base_model)?;
        check_session(&app, &caller, &req.session_id)?;
        // `user_metadata={"hearth_run": "main"}` drives an existing run (one made in a Rust cell)
        if let Some(existing) = req.user_metadata.as_ref().and_then(|m| m.get("hearth_run")) {
            let run = known_run(&app, &caller, existing)?;
            let model_id = model_of(&caller, &run);
            // a new client counts its seq_ids from 1 again
            app.tinker.order.restart(&run, 1);
            let (id, tx) = app.tinker.new_future(&caller);
            tx.send_replace(Fut::Json(json!({"model_id": model_id, "type": "create_model"})));
            return Ok(json!({"request_id": id, "model_id": model_id}));
        }
        let model_id = format!("{}:train:{}", req.session_id, req.model_seq_id);
        let lora = req.lora_config.unwrap_or_default();
        let training = lora_of(&lora)?;
        let name = run_of(&caller, &model_id)?;
        let op = Op::CreateRun(CreateRunRequest { name: Some(name.clone()), training });
        let mid = model_id.clone();
        app.shared.check_room(&name)?;
        let order_key = name.clone();
        let (app2, run2, meta) = (app.clone(), name.clone(), req.user_metadata.unwrap_or_default());
        let jobs = submit_jobs(
            &app,
            vec![(name, op)],
            Box::new(move |_| {
                save_metadata(&app2, &run2, &meta);
                Ok(Fut::Json(json!({"model_id": mid, "type": "create_model"})))
            }),
        );
        app.tinker.order.open(&order_key, 1);
        Ok(json!({"request_id": unordered(&app, &caller, jobs), "model_id": model_id}))
    };
    run().map(Json).map_or_else(err, IntoResponse::into_response)
}

#[derive(Deserialize)]
pub(super) struct ModelId {
    model_id: String,
}

pub(super) fn model_info(app: &App, caller: &Caller, model_id: &str) -> Result<Value, ApiError> {
    let run = run_of(caller, model_id)?;
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

pub(super) async fn get_info(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    body::<ModelId>(b)
        .and_then(|r| model_info(&app, &caller, &r.model_id))
        .map(Json)
        .map_or_else(err, IntoResponse::into_response)
}

pub(super) async fn forward_backward(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than --max-body-bytes",
            ));
        };
        if headers.get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity") {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_input", "Content-Encoding: this server reads uncompressed protobuf (client/config says proto_compress_fwdbwd: false)"));
        }
        let req = decoded.map_err(|e| {
            ApiError::invalid(format!("forward_backward: not a tinker_public.ForwardBackwardRequest protobuf: {e}"))
        })?;
        let run = known_run(&app, &caller, &req.model_id)?;
        let key = fb_key(&req);
        // a bad datum fails the future (its seq_id is used: the SDK has counted it)
        let input = fb_input(&req);
        let forward_only = req.forward_only;
        let id = ordered(&app, &caller, &run.clone(), i64::from(req.seq_id), key, move |app| {
            let input = input?;
            let op = if forward_only { Op::Forward(input) } else { Op::ForwardBackward(input) };
            submit_jobs(app, vec![(run, op)], Box::new(|mut r| Ok(Fut::Proto(fb_output(&r.remove(0).into_forward()?)))))
        })?;
        Ok(json!({"request_id": id, "model_id": req.model_id}))
    };
    answer(&app, &caller, place.as_ref(), run())
}

#[derive(Deserialize)]
pub(super) struct OptimStep {
    model_id: String,
    seq_id: i64,
    adam_params: Option<AdamIn>,
    optimizer_params: Option<Value>,
}

#[derive(Deserialize)]
pub(super) struct AdamIn {
    learning_rate: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    weight_decay: Option<f64>,
    grad_clip_norm: Option<f64>,
}

pub(super) async fn optim_step(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, key, place) = match json_request("optim_step", b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let run = || -> Result<Value, ApiError> {
        let req: OptimStep = typed(v)?;
        let run = known_run(&app, &caller, &req.model_id)?;
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
            (None, Some(p)) => Err(ApiError::invalid(format!(
                "optimizer_params {}: hearth's optimizer is AdamW (adam_params)",
                p.get("type").unwrap_or(&Value::Null)
            ))),
            (None, None) => Err(ApiError::invalid("optim_step: adam_params is missing")),
        };
        let id = ordered(&app, &caller, &run.clone(), req.seq_id, key, move |app| {
            submit_jobs(
                app,
                vec![(run, Op::OptimStep(params?))],
                Box::new(|mut r| {
                    let o = r.remove(0).into_optim_step()?;
                    Ok(Fut::Json(json!({"type": "optim_step", "metrics": {
                        "grad_norm:mean": o.grad_norm, "learning_rate:mean": o.learning_rate, "step:max": o.step
                    }})))
                }),
            )
        })?;
        Ok(json!({"request_id": id, "model_id": req.model_id}))
    };
    answer(&app, &caller, place.as_ref(), run())
}

/// The run of `caller`'s model id that exists.
pub(super) fn known_run(app: &App, caller: &Caller, model_id: &str) -> Result<String, ApiError> {
    let run = run_of(caller, model_id)?;
    if run_info(app, &run).is_none() {
        return Err(ApiError::not_found(format!("unknown model_id {model_id:?}")));
    }
    Ok(run)
}

#[derive(Deserialize)]
pub(super) struct SaveWeights {
    model_id: String,
    seq_id: i64,
    path: Option<String>,
    sampling_session_seq_id: Option<u64>,
}

pub(super) fn save_op(
    app: &Arc<App>,
    caller: &Caller,
    req: SaveWeights,
    key: u64,
    kind: CkKind,
) -> Result<Value, ApiError> {
    let run = known_run(app, caller, &req.model_id)?;
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
            ordered(app, caller, &run.clone(), req.seq_id, key, move |app| {
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
            let model = model_of(caller, &run);
            let session = model.split_once(":train:").map_or(model.as_str(), |(s, _)| s).to_string();
            let shown = format!("{session}:sample:{n}");
            let sampler = caller.run_id(&shown);
            let entry = Sampler { base_model: model_name(app), model_path: None };
            let app2 = app.clone();
            ordered(app, caller, &run.clone(), req.seq_id, key, move |app| {
                submit_jobs(
                    app,
                    vec![(run, Op::Snapshot { sampler: sampler.clone() })],
                    Box::new(move |_| {
                        lock(&app2.tinker.samplers).insert(sampler, entry);
                        Ok(Fut::Json(json!({"sampling_session_id": shown, "type": "save_weights_for_sampler"})))
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
pub(super) fn save(
    app: &Arc<App>,
    caller: &Caller,
    route: &str,
    b: Result<Bytes, BytesRejection>,
    kind: CkKind,
) -> Response {
    match json_request(route, b) {
        Ok((v, key, place)) => {
            answer(app, caller, place.as_ref(), typed(v).and_then(|r| save_op(app, caller, r, key, kind)))
        }
        Err(e) => err(e),
    }
}

pub(super) async fn save_weights(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    save(&app, &caller, "save_weights", b, CkKind::Weights)
}

pub(super) async fn save_weights_for_sampler(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    save(&app, &caller, "save_weights_for_sampler", b, CkKind::Sampler)
}

#[derive(Deserialize)]
pub(super) struct LoadWeights {
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

pub(super) async fn load_weights(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, key, place) = match json_request("load_weights", b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let run = || -> Result<Value, ApiError> {
        let req: LoadWeights = typed(v)?;
        match (req.model_id, req.seq_id, req.session_id, req.model_seq_id) {
            // into an existing model, in its order
            (Some(model_id), Some(seq), _, _) => {
                let run = known_run(&app, &caller, &model_id)?;
                let dir = checkpoint_dir(&app, &caller, &req.path);
                let (path, optimizer) = (req.path.clone(), req.optimizer);
                let id = ordered(&app, &caller, &run.clone(), seq, key, move |app| {
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
                check_session(&app, &caller, &session)?;
                let dir = checkpoint_dir(&app, &caller, &req.path)?;
                let model_id = format!("{session}:train:{n}");
                let name = run_of(&caller, &model_id)?;
                let mid = model_id.clone();
                let path = req.path.clone();
                // the new run's metadata: the request's, else its source run's
                let meta = match req.user_metadata {
                    Some(m) => Some(m),
                    None => parse_path(&caller, &req.path)
                        .ok()
                        .and_then(|(src, _, _)| std::fs::read_to_string(metadata_path(&app, &src)).ok())
                        .and_then(|t| serde_json::from_str(&t).ok()),
                };
                app.shared.check_room(&name)?;
                let order_key = name.clone();
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
                app.tinker.order.open(&order_key, 1);
                Ok(json!({"request_id": unordered(&app, &caller, jobs), "model_id": model_id}))
            }
            _ => Err(ApiError::invalid("load_weights: give model_id and seq_id, or session_id and model_seq_id")),
        }
    };
    // a load into an existing model has a place in its order, a new model none
    answer(&app, &caller, place.as_ref(), run())
}
