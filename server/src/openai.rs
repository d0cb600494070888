//! OpenAI-compatible sampling on a run's current weights: `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions`, for evaluation tools that speak the
//! OpenAI API. `model` names one of the caller's runs (`GET /v1/models` lists them); the API key
//! is the caller's token (the server's, or a user's: [`crate::users`]). Each request becomes one `sample` operation in the run's queue, so it sees
//! exactly the weights a native `sample` at that point would, and its logprobs are the same.
//!
//! Decided here: `n`, `max_tokens` (completions default 16, as OpenAI; chat default: the rest of
//! the context, at most 1024), `temperature`, `top_p`, `stop`, `seed`; `logprobs` (completions:
//! 0 or 1; chat: `true`) gives each sampled token's log-probability, and a chat token's `bytes`
//! are the token's own even when it holds part of a character (alternatives, `top_logprobs` or
//! completions `logprobs` above 1, are not computed: asking for them is a 400, as is `echo`).
//! Every request is checked against the server's limits ([`crate::limits`]) before anything is
//! tokenized, allocated or queued. A chat completion stops at the end-of-turn text the chat template
//! writes after an assistant message (found by rendering a probe), which is cut from the content.
//! `stream: true` answers with server-sent events in OpenAI's chunk format while the sample runs:
//! the engine reports each step's tokens, each choice's text is decoded whole and its new part
//! sent, holding back what a stop string could still claim (its length less one character) and
//! an incomplete character; the rest, cut at the stop, goes with the end. A client that goes
//! away cancels the sample.

use crate::error::ApiError;
use crate::http::{parse_body, wait_answer};
use crate::job::{JobState, Op};
use crate::limits::chat_bytes;
use crate::users::Caller;
use crate::App;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hearth_api::{ChatMessage, SampleInput, SampleOutput, SamplingParams, Stop, StopReason};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The OpenAI-compatible routes (auth is [`crate::http::auth`]'s: the bearer token).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: OneOrMany,
    /// Number of alternatives per position; only the sampled token's logprob is given.
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<u32>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The run id of `caller`'s model `run` (the caller's runs are the models it sees).
fn known_run(app: &App, caller: &Caller, run: &str) -> Result<String, ApiError> {
    let id = caller.run_id(run);
    if crate::lock(&app.shared.runs).iter().any(|r| r.id == id) {
        return Ok(id);
    }
    let names: Vec<String> = app.runs_of(caller).into_iter().map(|r| r.id).collect();
    Err(ApiError::not_found(format!(
        "model {run:?} is not a run on this server; the runs are {names:?} (GET /v1/models)"
    )))
}

/// Runs one `sample` in `run`'s queue and waits for it; a failure is the native route's answer.
/// A client that goes away cancels it.
async fn sample(app: &App, run: &str, input: SampleInput) -> Result<SampleOutput, Response> {
    app.check_budget()?;
    let (id, rx) = app.shared.submit(run.to_string(), Op::Sample(input))?;
    Ok(wait_answer(app, id, rx).await?.into_sample()?)
}

fn params(c: &Common, default_max: usize, stop: Vec<Stop>) -> SamplingParams {
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(default_max);
    SamplingParams {
        max_tokens,
        temperature: c.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: c.top_p.unwrap_or(1.0),
        stop,
        seed: c.seed,
    }
}

fn finish_reason(r: &StopReason) -> &'static str {
    match r {
        StopReason::Stop => "stop",
        StopReason::Length => "length",
    }
}

/// One token's text (for logprobs and stream chunks).
fn piece(t: &hearth_engine::text::TextModel, id: u32) -> String {
    t.decode(&[id], false).unwrap_or_default()
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The part of a choice's text that can go out now (see the module doc).
fn sendable(text: &str, stop: &[Stop]) -> usize {
    let stops: Vec<&str> =
        stop.iter().filter_map(|s| if let Stop::Text(x) = s { Some(x.as_str()) } else { None }).collect();
    if let Some(found) = stops.iter().filter_map(|s| text.find(s)).min() {
        return found;
    }
    let hold = stops.iter().map(|s| s.chars().count().saturating_sub(1)).max().unwrap_or(0);
    let mut cut = text.char_indices().rev().nth(hold.saturating_sub(1)).map_or(0, |(i, _)| i);
    if hold == 0 {
        cut = text.len();
    }
    // a token that ends inside a character decodes as U+FFFD: wait for the rest of it
    while text[..cut].ends_with('\u{FFFD}') {
        cut -= '\u{FFFD}'.len_utf8();
    }
    cut
}

/// How a live stream shapes its chunks: `chunk(choice, text delta or None for the role chunk,
/// finish_reason)`.
type Chunker = Box<dyn Fn(usize, Option<&str>, Option<&str>) -> Value + Send>;

/// Samples each input in turn in `run`'s queue and streams the choices (`n` per input, numbered
/// across inputs) as server-sent events while they are sampled. `drop_token` (the chat's
/// end-of-text) is left out of the text; `role` sends a chat's first chunk per choice.
fn live_stream(
    app: Arc<App>,
    run: String,
    inputs: Vec<SampleInput>,
    drop_token: Option<u32>,
    role: bool,
    chunk: Chunker,
) -> Result<Response, ApiError> {
    app.check_budget()?;
    app.text_model()?;
    app.shared.check_room(&run)?;
    // what would fail at once fails before the stream starts (and before anything is allocated
    // per choice), as the same error response the request unstreamed gets
    for input in &inputs {
        app.shared.limits.check_sample(input)?;
    }
    let (frames, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let Ok(t) = app.text_model() else { return };
        let mut base = 0;
        'inputs: for input in inputs {
            let n = input.num_samples;
            let stop = input.sampling_params.stop.clone();
            let (tokens_tx, mut tokens_rx) = tokio::sync::mpsc::unbounded_channel();
            let (id, mut state) = match app.shared.submit(run.clone(), Op::SampleStream(input, tokens_tx)) {
                Ok(x) => x,
                Err(e) => {
                    let _ = frames.send(event(&json!({"error": {"message": e.message, "type": e.kind}}))).await;
                    break;
                }
            };
            let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
            let mut sent = vec![0usize; n];
            if role {
                for i in 0..n {
                    if frames.send(event(&chunk(base + i, None, None))).await.is_err() {
                        app.shared.cancel(id);
                        return;
                    }
                }
            }
            while let Some(picked) = tokens_rx.recv().await {
                for (i, tok, _) in picked {
                    if Some(tok) != drop_token {
                        tokens[i].push(tok);
                    }
                    let text = t.decode(&tokens[i], false).unwrap_or_default();
                    let upto = sendable(&text, &stop);
                    if upto > sent[i] && text.is_char_boundary(sent[i]) {
                        let delta = &text[sent[i]..upto];
                        sent[i] = upto;
                        if frames.send(event(&chunk(base + i, Some(delta), None))).await.is_err() {
                            app.shared.cancel(id); // the client went away
                            return;
                        }
                    }
                }
            }
            // a worker gone mid-stream (shutting down) ends the stream without an error event
            let ended = state.wait_for(JobState::is_over).await.map(|s| s.clone().into_outcome());
            let out = match ended {
                Ok(Ok(outcome)) => outcome.into_sample(),
                Ok(Err(e)) => Err(e),
                Err(_) => break,
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    let _ = frames.send(event(&json!({"error": {"message": e.message, "type": e.kind}}))).await;
                    break 'inputs;
                }
            };
            for (i, seq) in out.sequences.iter().enumerate() {
                let kept: Vec<u32> = seq.tokens.iter().copied().filter(|&x| Some(x) != drop_token).collect();
                let text = cut_at_stop(&t.decode(&kept, false).unwrap_or_default(), &stop);
                let rest = text.get(sent[i]..).unwrap_or_default();
                if !rest.is_empty() && frames.send(event(&chunk(base + i, Some(rest), None))).await.is_err() {
                    return;
                }
                if frames.send(event(&chunk(base + i, Some(""), Some(finish_reason(&seq.stop_reason))))).await.is_err()
                {
                    return;
                }
            }
            base += n;
        }
        let _ = frames.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "stream").into_response()))
}

/// `GET /v1/models`: every run, as OpenAI lists models.
pub async fn models(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Json<Value> {
    let data: Vec<Value> = app
        .runs_of(&caller)
        .iter()
        .map(|r| json!({"id": r.id, "object": "model", "created": 0, "owned_by": "hearth", "step": r.step}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions_inner(&app, &caller, body).await.unwrap_or_else(|failed| failed)
}

async fn completions_inner(
    app: &Arc<App>,
    caller: &Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let req: CompletionRequest = parse_body(body)?;
    if req.echo {
        return Err(ApiError::invalid(
            "echo: prompt echoing is not supported; use the native sample with prompt_logprobs",
        )
        .into());
    }
    if let Some(k) = req.logprobs.filter(|&k| k > 1) {
        return Err(ApiError::invalid(format!(
            "logprobs = {k}: hearth gives each sampled token's logprob (logprobs: 0 or 1); the most likely alternatives are not computed"
        ))
        .into());
    }
    let n = req.common.n.unwrap_or(1);
    app.shared.limits.check_samples(n)?;
    let run = known_run(app, caller, &req.common.model)?;
    let t = app.text_model()?;
    let prompts = req.prompt.into_vec();
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt: must not be empty").into());
    }
    app.shared.limits.check_text("prompt", prompts.iter().fold(0usize, |b, p| b.saturating_add(p.len())))?;
    let stop: Vec<Stop> = req.common.stop.take_stop();
    app.shared.limits.check_stops(&stop)?;
    let p = params(&req.common, 16, stop);
    let id = format!("cmpl-{}", unix_now());
    if req.common.stream {
        let inputs = prompts
            .iter()
            .map(|prompt| {
                Ok(SampleInput {
                    prompt: t.encode(prompt, true)?,
                    num_samples: n,
                    sampling_params: p.clone(),
                    ..SampleInput::default()
                })
            })
            .collect::<Result<Vec<_>, hearth_engine::EngineError>>()
            .map_err(ApiError::from)?;
        let model = req.common.model.clone();
        let chunk: Chunker = Box::new(move |index, text, reason| {
            json!({"id": id, "object": "text_completion", "created": unix_now(), "model": model,
                   "choices": [{"index": index, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": reason}]})
        });
        return live_stream(app.clone(), run.clone(), inputs, None, false, chunk).map_err(Response::from);
    }
    // every prompt is checked before the first is sampled: a bad second prompt changes nothing
    let inputs = prompts
        .iter()
        .map(|prompt| {
            let input = SampleInput {
                prompt: t.encode(prompt, true)?,
                num_samples: n,
                sampling_params: p.clone(),
                ..SampleInput::default()
            };
            app.shared.limits.check_sample(&input)?;
            Ok(input)
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let (mut choices, mut prompt_total, mut completion_total) = (Vec::new(), 0, 0);
    for (pi, input) in inputs.into_iter().enumerate() {
        prompt_total += input.prompt.len();
        let out = sample(app, &run, input).await?;
        for (si, seq) in out.sequences.iter().enumerate() {
            completion_total += seq.tokens.len();
            let text = t.decode(&seq.tokens, false).map_err(ApiError::from)?;
            let text = cut_at_stop(&text, &p.stop);
            let logprobs = req.logprobs.map(|_| {
                let pieces: Vec<String> = seq.tokens.iter().map(|&x| piece(t, x)).collect();
                let mut offset = 0;
                let offsets: Vec<usize> = pieces
                    .iter()
                    .map(|s| {
                        let o = offset;
                        offset += s.len();
                        o
                    })
                    .collect();
                json!({"tokens": pieces, "token_logprobs": seq.logprobs, "top_logprobs": Value::Null, "text_offset": offsets})
            });
            let choice = json!({"index": pi * n + si, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(&seq.stop_reason)});
            choices.push(choice);
        }
    }
    let usage = json!({"prompt_tokens": prompt_total, "completion_tokens": completion_total, "total_tokens": prompt_total + completion_total});
    let model = req.common.model.clone();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": unix_now(), "model": model, "choices": choices, "usage": usage}))
        .into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    chat_inner(&app, &caller, body).await.unwrap_or_else(|failed| failed)
}

/// The text a chat template writes after an assistant message (`<|im_end|>`, `<|eot_id|>`, …).
fn end_of_turn(t: &hearth_engine::text::TextModel) -> Option<String> {
    let marker = "\u{1}hearth-end-of-answer\u{1}";
    let probe = t.render_chat(&[ChatMessage::new("user", "?"), ChatMessage::new("assistant", marker)], false).ok()?;
    probe.rsplit_once(marker).map(|(_, e)| e.trim().to_string()).filter(|e| !e.is_empty())
}

/// The text before the first stop string (the sampler keeps the token that completed it).
fn cut_at_stop(text: &str, stop: &[Stop]) -> String {
    let cut = stop
        .iter()
        .filter_map(|s| if let Stop::Text(x) = s { text.find(x.as_str()) } else { None })
        .min()
        .unwrap_or(text.len());
    text[..cut].to_string()
}

trait TakeStop {
    fn take_stop(&self) -> Vec<Stop>;
}

impl TakeStop for Option<OneOrMany> {
    fn take_stop(&self) -> Vec<Stop> {
        match self {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![Stop::Text(s.clone())],
            Some(OneOrMany::Many(v)) => v.iter().map(|s| Stop::Text(s.clone())).collect(),
        }
    }
}

async fn chat_inner(
    app: &Arc<App>,
    caller: &Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let req: ChatRequest = parse_body(body)?;
    if req.top_logprobs.unwrap_or(0) > 0 {
        return Err(ApiError::invalid(
            "top_logprobs: alternatives are not computed; logprobs: true gives each sampled token's logprob",
        )
        .into());
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages: must not be empty").into());
    }
    let n = req.common.n.unwrap_or(1);
    app.shared.limits.check_samples(n)?;
    app.shared.limits.check_text("messages", chat_bytes(&req.messages))?;
    let run = known_run(app, caller, &req.common.model)?;
    let t = app.text_model()?;
    let text = t.render_chat(&req.messages, true).map_err(ApiError::from)?;
    let prompt = t.encode(&text, false).map_err(ApiError::from)?;
    let mut stop = req.common.stop.take_stop();
    app.shared.limits.check_stops(&stop)?;
    if let Some(end) = end_of_turn(t) {
        stop.push(Stop::Text(end));
    }
    let eos = t.special_tokens().1.and_then(|e| t.token_to_id(e));
    if let Some(eos) = eos {
        stop.push(Stop::Token(eos));
    }
    let room = app.shared.base.config.max_position_embeddings.saturating_sub(prompt.len()).clamp(1, 1024);
    let p = params(&req.common, room, stop);
    let prompt_len = prompt.len();
    if req.common.stream {
        let (id, model) = (format!("chatcmpl-{}", unix_now()), req.common.model.clone());
        let chunk: Chunker = Box::new(move |index, text, reason| {
            let delta = match (text, reason) {
                (None, _) => json!({"role": "assistant", "content": ""}),
                (Some(_), Some(_)) => json!({}),
                (Some(t), None) => json!({"content": t}),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": unix_now(), "model": model,
                   "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": reason}]})
        });
        let input = SampleInput { prompt, num_samples: n, sampling_params: p, ..SampleInput::default() };
        return live_stream(app.clone(), run.clone(), vec![input], eos, true, chunk).map_err(Response::from);
    }
    let out =
        sample(app, &run, SampleInput { prompt, num_samples: n, sampling_params: p.clone(), ..SampleInput::default() })
            .await?;
    let id = format!("chatcmpl-{}", unix_now());
    let model = req.common.model.clone();
    let mut choices = Vec::new();
    let mut completion_total = 0;
    for (i, seq) in out.sequences.iter().enumerate() {
        completion_total += seq.tokens.len();
        let kept: Vec<u32> = seq.tokens.iter().copied().filter(|&x| Some(x) != eos).collect();
        let content = cut_at_stop(&t.decode(&kept, false).map_err(ApiError::from)?, &p.stop);
        let logprobs = req.logprobs.then(|| {
            let content: Vec<Value> = seq
                .tokens
                .iter()
                .zip(&seq.logprobs)
                .map(|(&x, &lp)| {
                    // a token holding part of a character: its own bytes, not U+FFFD's
                    let s = piece(t, x);
                    let bytes = t.token_bytes(x).unwrap_or_else(|| s.clone().into_bytes());
                    json!({"token": s, "logprob": lp, "bytes": bytes, "top_logprobs": []})
                })
                .collect();
            json!({"content": content})
        });
        choices.push(json!({"index": i, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
                            "finish_reason": finish_reason(&seq.stop_reason)}));
    }
    let usage = json!({"prompt_tokens": prompt_len, "completion_tokens": completion_total, "total_tokens": prompt_len + completion_total});
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": unix_now(), "model": model, "choices": choices, "usage": usage}))
        .into_response())
}
