//! Sampling: sampling sessions (frozen weights) and `asample`.

use super::*;

#[derive(Deserialize)]
pub(super) struct CreateSampling {
    session_id: String,
    sampling_session_seq_id: u64,
    model_path: Option<String>,
    base_model: Option<String>,
}

pub(super) async fn create_sampling_session(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let prepare = || -> Result<(String, Sampler, Op), ApiError> {
        let req: CreateSampling = body(b)?;
        check_session(&app, &caller, &req.session_id)?;
        let id = format!("{}:sample:{}", req.session_id, req.sampling_session_seq_id);
        let (source, model_path) = match (req.model_path, req.base_model) {
            (Some(p), _) => (Some(checkpoint_dir(&app, &caller, &p)?), Some(p)),
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
    let rx = match app.shared.submit(caller.run_id(&id), op) {
        Ok((_, rx)) => rx,
        Err(e) => return err(e),
    };
    match crate::http::wait_result(rx).await {
        Ok(_) => {
            lock(&app.tinker.samplers).insert(caller.run_id(&id), sampler);
            Json(json!({"sampling_session_id": id, "type": "create_sampling_session"})).into_response()
        }
        Err(resp) => resp,
    }
}

pub(super) async fn get_sampler(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match lock(&app.tinker.samplers).get(&caller.run_id(&id)) {
        Some(s) => {
            Json(json!({"sampler_id": id, "base_model": s.base_model, "model_path": s.model_path})).into_response()
        }
        None => err(ApiError::not_found(format!("no sampler {id:?} (samplers live until the server stops)"))),
    }
}

#[derive(Deserialize)]
pub(super) struct ASample {
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

pub(super) fn one() -> usize {
    1
}

#[derive(Deserialize)]
pub(super) struct PromptIn {
    chunks: Vec<ChunkIn>,
}

#[derive(Deserialize)]
pub(super) struct ChunkIn {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    tokens: Vec<i64>,
}

#[derive(Deserialize, Default)]
pub(super) struct SamplingIn {
    max_tokens: Option<usize>,
    seed: Option<u64>,
    stop: Option<Value>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
}

/// Tinker's sampling parameters as hearth's; no `stop` means the model's end-of-text token.
pub(super) fn sampling_of(app: &App, p: SamplingIn) -> Result<SamplingParams, ApiError> {
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
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Stop::Token)
                    .ok_or_else(|| ApiError::invalid(format!("sampling_params.stop: {n} is not a token id"))),
                other => {
                    Err(ApiError::invalid(format!("sampling_params.stop: {other} is neither text nor a token id")))
                }
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(format!("sampling_params.stop: {other} is neither text nor a list")))
        }
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

pub(super) async fn asample(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let v: Value = body(b)?;
        let key = body_key("asample", v.to_string().as_bytes());
        let req: ASample = typed(v)?;
        let shown = req
            .sampling_session_id
            .clone()
            .ok_or_else(|| ApiError::invalid("asample: sampling_session_id is missing"))?;
        let sampler = caller.run_id(&shown);
        if !lock(&app.tinker.samplers).contains_key(&sampler) {
            return Err(ApiError::not_found(format!("no sampler {shown:?} (samplers live until the server stops)")));
        }
        if req.topk_prompt_logprobs > 0 || req.topk_sample_logprobs > 0 {
            return Err(ApiError::invalid(
                "topk_prompt_logprobs / topk_sample_logprobs: hearth returns the chosen tokens' logprobs only",
            ));
        }
        if !(1..=1024).contains(&req.num_samples) {
            return Err(ApiError::invalid(format!("num_samples = {}: expected 1 to 1024", req.num_samples)));
        }
        let mut prompt = Vec::new();
        for (i, c) in req.prompt.chunks.iter().enumerate() {
            if c.kind.as_deref().is_some_and(|k| k != "encoded_text") {
                return Err(ApiError::invalid(format!(
                    "prompt.chunks[{i}]: type {:?}; hearth takes encoded_text only",
                    c.kind
                )));
            }
            for &t in &c.tokens {
                prompt.push(
                    u32::try_from(t)
                        .map_err(|_| ApiError::invalid(format!("prompt.chunks[{i}]: {t} is not a token id")))?,
                );
            }
        }
        let params = sampling_of(&app, req.sampling_params.unwrap_or_default())?;
        let input = SampleInput {
            prompt,
            num_samples: req.num_samples,
            sampling_params: params,
            prompt_logprobs: req.prompt_logprobs,
            base_model_only: false,
        };
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
                    format!("sampler {shown}: seq_id {seq} was already used by a different request (a retry must send the same body)"),
                ))
            };
        }
        app.shared.check_room(&sampler)?;
        let jobs = submit_jobs(
            &app,
            vec![(sampler.clone(), Op::SamplerSample(input))],
            Box::new(|mut r| Ok(Fut::Proto(sample_output(&r.remove(0).into_sample()?)))),
        );
        let id = unordered(&app, &caller, jobs);
        let tag = req.seq_id.map_or_else(|| id.clone(), |seq| seq.to_string());
        let ids: Vec<String> = (0..req.num_samples).map(|i| format!("{shown}:seq:{tag}:{i}")).collect();
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
