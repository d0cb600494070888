//! Fuzzing every route of the three protocols (native `/v1`, OpenAI-compatible, Tinker's
//! `/api/v1`) with seeded random and mutated requests (issue 32).
//!
//! One server takes a fixed budget of requests: first a sweep that puts each of a few extreme
//! numbers into every numeric field of every route's valid body, then random requests: valid
//! bodies, mutated ones (fields deleted, duplicated, swapped, renamed, retyped; extreme numbers,
//! huge and odd strings, deep nesting, invalid UTF-8, truncation, bit flips, random bytes),
//! protobuf `forward_backward` bodies (valid, altered field by field, bit-flipped), wrong
//! methods, content types, keys and path parameters. After every request the process must still
//! run and the answer must be below 500; every [`PING_EVERY`] requests `/v1/ping` must answer.
//! A server that dies is noted and replaced, so one run finds every class of failure.
//!
//! Then the same valid sequence (native, OpenAI and Tinker) on a new run gives identical results
//! on the fuzzed server and on a fresh one, and the fuzzed server shuts down cleanly.
//!
//! Besides a status of 500 or more, these fail: no answer, a process that exits, a panic in the
//! server's log (its stderr goes to `server.log` in its home: a panic in a spawned task leaves
//! the process up), and an event stream that stops before `data: [DONE]`.
//!
//! The request sequence depends only on the seed: `HEARTH_FUZZ_SEED` replays another,
//! `HEARTH_FUZZ_BUDGET` sets the number of requests, `HEARTH_FUZZ_LOG=1` prints every request
//! with its answer. A failure lists each class (route and outcome) with its count and the first
//! request that showed it: method, path, headers, body, and the mutations that made it.
//!
//! Left out on purpose: `/v1/shutdown` (sent once, at the very end), `idle_timeout_s` stays as
//! the fuzz sets it only until the next request (it is set back to 0 after every settings call),
//! and sizes that are valid but only cost memory (a LoRA rank of 100000 is gigabytes): the
//! extremes used are far past any machine's memory, which the server has to refuse itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod common;

use common::home;
use fastrand::Rng;
use hearth_server::tinker::proto;
use prost::Message;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The seed when `HEARTH_FUZZ_SEED` is not set.
const SEED: u64 = 0x3232;
/// Requests per run (sweep included) when `HEARTH_FUZZ_BUDGET` is not set.
const BUDGET: usize = 3000;
/// `/v1/ping` must answer after this many requests.
const PING_EVERY: usize = 25;
/// Bodies stay below this many bytes.
const MAX_BODY: usize = 1_000_000;
/// How long an answer may take (a loaded 2-core machine, a 1024-token sample).
const LIMIT: Duration = Duration::from_secs(120);
/// How long a long-poll route is waited for before it counts as held (not as a failure).
const LONG_POLL: Duration = Duration::from_secs(4);
/// The fuzz stops early after this many requests that got no answer at all.
const MAX_HANGS: usize = 5;
/// Extreme values the sweep puts into every numeric field.
const SWEEP: [&str; 5] = ["-1", "18446744073709551615", "10000000000", "1e39", "1e308"];
/// Number texts a mutation puts anywhere (some are not valid JSON).
const NUMBERS: [&str; 20] = [
    "-1",
    "0",
    "-0",
    "0.5",
    "01",
    "2147483648",
    "4294967296",
    "10000000000",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e39",
    "1e308",
    "-1e308",
    "1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "1E2",
];

// ---- pools: fuzz names the final check never uses ----

const RUNS: [&str; 5] = ["fz0", "fz0", "fz1", "fz2", "fz-none"];
const CKPTS: [&str; 4] = ["ck0", "ck0a", "ck1", "autosave-1"];
const SESSIONS: [&str; 2] = ["sfz0", "sfz1"];
const MODELS: [&str; 4] = ["sfz0:train:0", "sfz0:train:0", "sfz0:train:1", "fz0"];
const SAMPLERS: [&str; 3] = ["sfz0:sample:0", "sfz0:sample:1", "sfz1:sample:0"];
const TINKER_PATHS: [&str; 6] = [
    "tinker://sfz0:train:0/weights/w0",
    "tinker://sfz0:train:0/sampler_weights/s0",
    "tinker://sfz0:train:0/weights/w1",
    "tinker://sfz0:train:1/sampler_weights/s1",
    "tinker://fz0/weights/ck0",
    "tinker://sfz0:train:0/weights/../w0",
];
const MODULES: [&str; 8] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"];

// ---- HTTP on a plain socket: any method, path bytes, header bytes and body ----

/// Which key a request carries.
#[derive(Clone, Copy, Debug)]
enum Auth {
    Bearer,
    TinkerKey,
    TinkerBare,
    Missing,
    Wrong,
    WrongKey,
    NotUtf8,
    LowercaseBearer,
}

/// One request as it goes on the wire.
#[derive(Clone)]
struct Req {
    method: String,
    path: Vec<u8>,
    auth: Auth,
    content_type: Option<Vec<u8>>,
    extra_headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The route it was made from (`POST /v1/runs/{run}/sample`): failures are grouped by it.
    route: String,
    /// What was done to the valid request.
    notes: Vec<String>,
    /// The route may hold its answer back: no answer within [`LONG_POLL`] is not a failure.
    long_poll: bool,
}

impl Req {
    fn new(method: &str, path: &str, auth: Auth, body: Option<Vec<u8>>, content_type: &str) -> Req {
        Req {
            method: method.to_string(),
            path: path.as_bytes().to_vec(),
            auth,
            content_type: body.as_ref().map(|_| content_type.as_bytes().to_vec()),
            extra_headers: Vec::new(),
            body: body.unwrap_or_default(),
            route: format!("{method} {path}"),
            notes: Vec::new(),
            long_poll: false,
        }
    }

    fn json(method: &str, path: &str, auth: Auth, body: &Value) -> Req {
        Req::new(method, path, auth, Some(body.to_string().into_bytes()), "application/json")
    }

    fn headers(&self, token: &str) -> Vec<(String, Vec<u8>)> {
        let mut h: Vec<(String, Vec<u8>)> = match self.auth {
            Auth::Bearer => vec![("Authorization".into(), format!("Bearer {token}").into_bytes())],
            Auth::TinkerKey => vec![("X-API-Key".into(), format!("tml-{token}").into_bytes())],
            Auth::TinkerBare => vec![("X-API-Key".into(), token.as_bytes().to_vec())],
            Auth::Missing => vec![],
            Auth::Wrong => vec![("Authorization".into(), b"Bearer nope".to_vec())],
            Auth::WrongKey => vec![("X-API-Key".into(), b"tml-nope".to_vec())],
            Auth::NotUtf8 => vec![
                ("Authorization".into(), b"Bearer \xff\xfe".to_vec()),
                ("X-API-Key".into(), b"tml-\xc3\x28".to_vec()),
            ],
            Auth::LowercaseBearer => vec![("Authorization".into(), format!("bearer {token}").into_bytes())],
        };
        if let Some(ct) = &self.content_type {
            h.push(("Content-Type".into(), ct.clone()));
        }
        h.extend(self.extra_headers.iter().cloned());
        h
    }

    /// The request for a failure report: method, path, headers, body (text, or hex).
    fn describe(&self) -> String {
        let mut headers: Vec<String> =
            self.headers("<token>").iter().map(|(k, v)| format!("{k}: {}", printable(v, 200))).collect();
        headers.push(format!("Content-Length: {}", self.body.len()));
        let notes = if self.notes.is_empty() { "none (the valid body)".to_string() } else { self.notes.join("; ") };
        format!(
            "    {} {}\n    headers: {}\n    body: {}\n    made by: {}; mutations: {}",
            self.method,
            printable(&self.path, 300),
            headers.join(", "),
            printable(&self.body, 1500),
            self.route,
            notes
        )
    }
}

/// Text as it is (cut to `max` characters), or hex when it is not UTF-8.
fn printable(b: &[u8], max: usize) -> String {
    match std::str::from_utf8(b) {
        Ok("") => "(empty)".into(),
        Ok(s) => {
            let head: String = s.chars().take(max).collect();
            let shown = if head.chars().any(char::is_control) { format!("{head:?}") } else { head };
            if s.chars().count() <= max {
                shown
            } else {
                format!("{shown}… ({} bytes in all)", b.len())
            }
        }
        Err(_) => {
            let hex: String = b.iter().take(max / 2).map(|x| format!("{x:02x}")).collect();
            let more = if b.len() > max / 2 { format!("… ({} bytes in all)", b.len()) } else { String::new() };
            format!("hex {hex}{more} (as text: {:?})", String::from_utf8_lossy(&b[..b.len().min(max)]))
        }
    }
}

/// What came back.
enum Outcome {
    Answer {
        status: u16,
        head: String,
        body: Vec<u8>,
    },
    /// A long poll still waiting.
    Held,
    /// No answer: the reason.
    Broken(String),
}

/// Sends `req` on a fresh connection (`Connection: close`) and reads the answer to the end.
fn exchange(addr: &str, token: &str, req: &Req, limit: Duration) -> Outcome {
    let mut stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return Outcome::Broken(format!("connect: {e}")),
    };
    let mut wire = Vec::with_capacity(req.body.len() + 512);
    wire.extend_from_slice(req.method.as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(&req.path);
    wire.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in req.headers(token) {
        wire.extend_from_slice(k.as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(&v);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", req.body.len()).as_bytes());
    wire.extend_from_slice(&req.body);
    let _ = stream.set_write_timeout(Some(limit));
    // a server may answer before it has read the whole body: read the answer in any case
    let write_error = stream.write_all(&wire).err();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return if req.long_poll {
                Outcome::Held
            } else {
                Outcome::Broken(format!("no answer within {} s", limit.as_secs()))
            };
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if got.is_empty() => return Outcome::Broken(format!("read: {e} (write: {write_error:?})")),
            Err(_) => break,
        }
    }
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Broken(format!(
            "connection closed without an answer ({} bytes back; write: {write_error:?})",
            got.len()
        ));
    };
    let head = String::from_utf8_lossy(&got[..end]).to_string();
    let Some(status) = head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()) else {
        return Outcome::Broken(format!("not an HTTP answer: {head:?}"));
    };
    let mut body = got[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Outcome::Answer { status, head, body }
}

/// A chunked body's data (what arrived of it).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|&n| n > 0) else { break };
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = b.get(start + size + 2..).unwrap_or_default();
    }
    out
}

// ---- valid bodies of every route ----

/// A route's body before mutation.
enum Body {
    None,
    Json(Value),
    Proto(proto::ForwardBackwardRequest),
}

/// The generator's state: the seeded randomness and each Tinker model's next `seq_id` as the
/// requests sent so far have used them up (never read from answers, so the sequence depends on
/// the seed alone).
struct Ctx {
    rng: Rng,
    seqs: HashMap<String, i64>,
    /// Making the sweep's requests: names and paths are the pools' first, valid ones.
    sweeping: bool,
}

impl Ctx {
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())].clone()
    }

    /// A name from a pool (the first while sweeping).
    fn name<'a>(&mut self, pool: &[&'a str]) -> &'a str {
        if self.sweeping {
            pool[0]
        } else {
            self.pick(pool)
        }
    }

    /// A path parameter: from the pool, or a bad one.
    fn seg(&mut self, pool: &[&str]) -> String {
        if self.sweeping || self.rng.f32() < 0.85 {
            return self.name(pool).to_string();
        }
        match self.rng.usize(..16) {
            0 => "..".into(),
            1 => "%2e%2e".into(),
            2 => "%2E%2E%2Fetc".into(),
            3 => "%2F".into(),
            4 => "%00".into(),
            5 => "%FF%FE".into(),
            6 => "%C3%A9t%C3%A9".into(),
            7 => "été-\u{1F525}".into(), // raw UTF-8 in the request line
            8 => "x".repeat(5000),
            9 => "18446744073709551615".into(),
            10 => "18446744073709551616".into(),
            11 => "-1".into(),
            12 => "0".into(),
            13 => "1e400".into(),
            14 => "%20".into(),
            _ => "a%0Ab".into(),
        }
    }

    /// Byte tokens (printable ASCII).
    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.rng.u32(32..127)).collect()
    }

    /// The next `seq_id` of `model`.
    fn seq(&mut self, model: &str) -> i64 {
        self.seqs.get(model).copied().unwrap_or(1)
    }

    fn seed(&mut self) -> u64 {
        self.rng.u64(0..1000)
    }
}

/// One datum for `loss`, 1 to 8 positions.
fn datum(c: &mut Ctx, loss: &str) -> Value {
    let n = c.rng.usize(1..=8);
    let t = c.tokens(n + 1);
    let inputs = if loss == "cross_entropy" {
        json!({"target_tokens": &t[1..], "weights": vec![1.0; n]})
    } else {
        json!({"target_tokens": &t[1..], "logprobs": vec![-2.5; n], "advantages": vec![0.5; n]})
    };
    json!({"model_input": &t[..n], "loss_fn_inputs": inputs})
}

fn fb_json(c: &mut Ctx) -> Value {
    let loss = c.pick(&["cross_entropy", "cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]);
    let data: Vec<Value> = (0..c.rng.usize(1..=2)).map(|_| datum(c, loss)).collect();
    let mut b = json!({"data": data, "loss_fn": loss});
    if matches!(loss, "ppo" | "cispo") && c.rng.bool() {
        b["loss_fn_config"] = json!({"clip_low_threshold": 0.8, "clip_high_threshold": 1.2});
    } else if loss == "dro" && c.rng.bool() {
        b["loss_fn_config"] = json!({"beta": 0.05});
    }
    b
}

fn sampling(c: &mut Ctx) -> Value {
    json!({
        "max_tokens": c.rng.usize(1..=4),
        "temperature": c.pick(&[0.0, 0.7, 1.0]),
        "top_k": c.pick(&[0, 5]),
        "top_p": c.pick(&[1.0, 0.9]),
        "stop": c.pick(&[json!([]), json!([256]), json!(["e"])]),
        "seed": c.seed(),
    })
}

fn lora(c: &mut Ctx) -> Value {
    let mut modules: Vec<&str> = MODULES.iter().copied().filter(|_| c.rng.bool()).collect();
    if modules.is_empty() {
        modules.push("q_proj");
    }
    json!({"kind": "lora", "rank": c.rng.usize(1..=4), "alpha": 8.0, "target_modules": modules, "seed": c.seed()})
}

fn tensor(dtype: proto::DType, bytes: Vec<u8>, n: usize) -> proto::Tensor {
    proto::Tensor { encoding: Some(proto::tensor::Encoding::Dense(bytes)), dtype: dtype as i32, shape: vec![n as i64] }
}

/// A valid protobuf `forward_backward` on `tokens` (cross-entropy, every position weighted).
fn fb_proto_of(model: &str, seq: i64, texts: &[Vec<u32>], forward_only: bool) -> proto::ForwardBackwardRequest {
    let data = texts
        .iter()
        .map(|t| {
            let n = t.len() - 1;
            proto::Datum {
                model_input: vec![proto::Chunk {
                    chunk: Some(proto::chunk::Kind::EncodedText(proto::EncodedTextChunk {
                        tokens: proto::i32_bytes(t[..n].iter().map(|&x| x as i32)),
                    })),
                }],
                loss_fn_inputs: HashMap::from([
                    (
                        "target_tokens".to_string(),
                        tensor(
                            proto::DType::Int64,
                            t[1..].iter().flat_map(|&x| i64::from(x).to_le_bytes()).collect(),
                            n,
                        ),
                    ),
                    ("weights".to_string(), tensor(proto::DType::Float32, proto::f32_bytes(&vec![1.0; n]), n)),
                ]),
            }
        })
        .collect();
    proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq as i32,
        data,
        loss_fn: "cross_entropy".into(),
        forward_only,
        ..Default::default()
    }
}

/// `m` as protobuf with its map entries in key order: prost writes a `HashMap` in its random
/// order, and the bytes (so every bit flip) must depend on the seed alone. Encodings of one
/// message type concatenated read as one message with all their fields and map entries.
fn encode(m: &proto::ForwardBackwardRequest) -> Vec<u8> {
    let mut head = m.clone();
    let data = std::mem::take(&mut head.data);
    let config: BTreeMap<String, f64> = std::mem::take(&mut head.loss_fn_config).into_iter().collect();
    let config_v2: BTreeMap<String, proto::LossConfigValue> =
        std::mem::take(&mut head.loss_fn_config_v2).into_iter().collect();
    let mut out = head.encode_to_vec();
    for d in data {
        let mut datum = proto::Datum { model_input: d.model_input, loss_fn_inputs: HashMap::new() }.encode_to_vec();
        for (k, v) in d.loss_fn_inputs.into_iter().collect::<BTreeMap<_, _>>() {
            datum.extend(
                proto::Datum { model_input: Vec::new(), loss_fn_inputs: HashMap::from([(k, v)]) }.encode_to_vec(),
            );
        }
        out.push((3 << 3) | 2); // field 3 (data), length-delimited
        prost::encode_length_delimiter(datum.len(), &mut out).unwrap();
        out.extend(datum);
    }
    for (k, v) in config {
        out.extend(
            proto::ForwardBackwardRequest { loss_fn_config: HashMap::from([(k, v)]), ..Default::default() }
                .encode_to_vec(),
        );
    }
    for (k, v) in config_v2 {
        out.extend(
            proto::ForwardBackwardRequest { loss_fn_config_v2: HashMap::from([(k, v)]), ..Default::default() }
                .encode_to_vec(),
        );
    }
    out
}

fn fb_proto(c: &mut Ctx) -> proto::ForwardBackwardRequest {
    let model = c.name(&MODELS);
    let seq = c.seq(model);
    let texts: Vec<Vec<u32>> = (0..c.rng.usize(1..=2))
        .map(|_| {
            let n = c.rng.usize(2..=9);
            c.tokens(n)
        })
        .collect();
    let forward_only = c.rng.f32() < 0.25;
    fb_proto_of(model, seq, &texts, forward_only)
}

/// Tinker `training` body fields: model, its `seq_id`, and a `type`.
fn ordered(c: &mut Ctx, kind: &str) -> Value {
    let model = c.name(&MODELS);
    json!({"model_id": model, "seq_id": c.seq(model), "type": kind})
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// A route: method, its path template (for grouping), and how to make a valid request.
struct Route {
    method: &'static str,
    route: &'static str,
    tinker: bool,
    long_poll: bool,
    make: fn(&mut Ctx) -> (String, Body),
}

fn native(method: &'static str, route: &'static str, make: fn(&mut Ctx) -> (String, Body)) -> Route {
    Route { method, route, tinker: false, long_poll: false, make }
}

fn tinker(method: &'static str, route: &'static str, make: fn(&mut Ctx) -> (String, Body)) -> Route {
    Route { method, route, tinker: true, long_poll: false, make }
}

fn plain(path: &str) -> (String, Body) {
    (path.to_string(), Body::None)
}

fn with(path: String, v: Value) -> (String, Body) {
    (path, Body::Json(v))
}

/// Every route of `native.rs`, `openai.rs` and `tinker/mod.rs` but `/v1/shutdown`, and a few
/// that do not exist.
fn routes() -> Vec<Route> {
    vec![
        native("GET", "/v1/ping", |_| plain("/v1/ping")),
        native("GET", "/v1/info", |_| plain("/v1/info")),
        native("POST", "/v1/runs", |c| {
            let mut b = json!({"name": c.name(&RUNS[1..4]), "training": lora(c)});
            if c.rng.f32() < 0.15 {
                b["training"] = json!({"kind": "full"});
            }
            if c.rng.f32() < 0.03 || c.sweeping {
                b.as_object_mut().unwrap().remove("name"); // a generated name
            }
            with("/v1/runs".into(), b)
        }),
        native("GET", "/v1/runs", |_| plain("/v1/runs")),
        native("GET", "/v1/runs/{run}/metrics", |c| plain(&format!("/v1/runs/{}/metrics", c.seg(&RUNS)))),
        native("POST", "/v1/runs/{run}/forward", |c| with(op_path(c, "forward"), fb_json(c))),
        native("POST", "/v1/runs/{run}/forward_backward", |c| with(op_path(c, "forward_backward"), fb_json(c))),
        native("POST", "/v1/runs/{run}/optim_step", |c| {
            let b = json!({"learning_rate": c.pick(&[1e-4, 1e-3]), "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                           "weight_decay": c.pick(&[0.0, 0.1]), "grad_clip_norm": c.pick(&[0.0, 1.0])});
            with(op_path(c, "optim_step"), b)
        }),
        native("POST", "/v1/runs/{run}/sample", |c| {
            let n = c.rng.usize(1..=4);
            let b = json!({"prompt": c.tokens(n), "num_samples": c.rng.usize(1..=2), "sampling_params": sampling(c),
                           "prompt_logprobs": c.rng.bool(), "base_model_only": c.rng.f32() < 0.2});
            with(op_path(c, "sample"), b)
        }),
        native("POST", "/v1/runs/{run}/save_state", |c| {
            let kind = c.pick(&[
                "state",
                "state",
                "adapter",
                "adapter",
                "merged",
                "gguf",
                "gguf_f16",
                "gguf_q8_0",
                "gguf_q4_k_m",
            ]);
            let b = json!({"name": c.name(&CKPTS[..3]), "kind": kind});
            with(op_path(c, "save_state"), b)
        }),
        native("POST", "/v1/runs/{run}/load_state", |c| {
            let source = c.pick(&["ck0", "ck0a", "ck1", "autosave-1", "/", "/nonexistent", "../fz1/ck0"]);
            let b = json!({"source": source, "optimizer": c.rng.bool()});
            with(op_path(c, "load_state"), b)
        }),
        native("POST", "/v1/runs/{run}/{op} (no such op)", |c| {
            let op = c.pick(&["frobnicate", "metrics", "FORWARD", "forward%20", "sample%00", "%2e%2e"]);
            with(op_path(c, op), json!({}))
        }),
        native("POST", "/v1/tokenize", |c| {
            let text = c.pick(&["hello", "héllo <|im_end|>", "", "\u{1F525}\u{0}x"]);
            with("/v1/tokenize".into(), json!({"text": text, "add_special_tokens": c.rng.bool()}))
        }),
        native("POST", "/v1/detokenize", |c| {
            let n = c.rng.usize(0..=6);
            let mut tokens = c.tokens(n);
            tokens.push(c.pick(&[10, 256, 257, 258]));
            with("/v1/detokenize".into(), json!({"tokens": tokens, "skip_special_tokens": c.rng.bool()}))
        }),
        native("POST", "/v1/render_chat", |c| {
            let role = c.pick(&["user", "system", "assistant", "tool"]);
            let b = json!({"messages": [{"role": role, "content": "hi"}, {"role": "user", "content": "<|im_start|>x"}], "add_generation_prompt": c.rng.bool()});
            with("/v1/render_chat".into(), b)
        }),
        Route {
            long_poll: true,
            ..native("GET", "/v1/requests/{id}", |c| {
                let id = if c.rng.f32() < 0.8 { c.rng.u64(1..=80).to_string() } else { c.seg(&["1"]) };
                let timeout = c.pick(&[
                    "",
                    "?timeout_s=0",
                    "?timeout_s=0.05",
                    "?timeout_s=-1",
                    "?timeout_s=NaN",
                    "?timeout_s=inf",
                    "?timeout_s=1e400",
                    "?timeout_s=x",
                ]);
                plain(&format!("/v1/requests/{id}{timeout}"))
            })
        },
        native("POST", "/v1/requests/{id}/cancel", |c| {
            let id = if c.rng.f32() < 0.8 { c.rng.u64(1..=80).to_string() } else { c.seg(&["1"]) };
            with(format!("/v1/requests/{id}/cancel"), json!({}))
        }),
        native("POST", "/v1/cancel", |_| with("/v1/cancel".into(), json!({}))),
        native("POST", "/v1/autosave", |_| with("/v1/autosave".into(), json!({}))),
        native("GET", "/v1/settings", |_| plain("/v1/settings")),
        native("POST", "/v1/settings", |c| {
            with("/v1/settings".into(), json!({"idle_timeout_s": c.pick(&[0, 3600, 604_800])}))
        }),
        native("GET", "/v1/models", |_| plain("/v1/models")),
        native("POST", "/v1/completions", |c| {
            let b = json!({
                "model": c.name(&RUNS), "prompt": c.pick(&[json!("hi"), json!(["a", "b"]), json!("hello there")]),
                "max_tokens": c.rng.usize(1..=4), "temperature": c.pick(&[0.0, 1.0]), "top_p": c.pick(&[1.0, 0.9]),
                "n": c.rng.usize(1..=2), "stop": c.pick(&[Value::Null, json!("x"), json!(["x", "y"])]), "seed": c.seed(),
                "stream": c.rng.f32() < 0.3, "logprobs": c.pick(&[Value::Null, json!(0), json!(1)]), "echo": false,
            });
            with("/v1/completions".into(), b)
        }),
        native("POST", "/v1/chat/completions", |c| {
            let b = json!({
                "model": c.name(&RUNS), "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "max_tokens": c.rng.usize(1..=4), "temperature": c.pick(&[0.0, 1.0]), "top_p": 1.0, "n": c.rng.usize(1..=2),
                "stop": c.pick(&[Value::Null, json!("x")]), "seed": c.seed(), "stream": c.rng.f32() < 0.3,
                "logprobs": c.rng.bool(), "top_logprobs": 0,
            });
            with("/v1/chat/completions".into(), b)
        }),
        // Tinker
        tinker("GET", "/api/v1/healthz", |_| plain("/api/v1/healthz")),
        tinker("POST", "/api/v1/client/config", |_| {
            with("/api/v1/client/config".into(), json!({"sdk_version": "0.38.0"}))
        }),
        tinker("POST", "/api/v1/client/dynamic_config", |_| with("/api/v1/client/dynamic_config".into(), json!({}))),
        tinker("GET", "/api/v1/get_server_capabilities", |_| plain("/api/v1/get_server_capabilities")),
        tinker("POST", "/api/v1/create_session", |_| {
            with(
                "/api/v1/create_session".into(),
                json!({"tags": ["fuzz"], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}),
            )
        }),
        tinker("POST", "/api/v1/session_heartbeat", |c| {
            with(
                "/api/v1/session_heartbeat".into(),
                json!({"session_id": c.name(&SESSIONS), "type": "session_heartbeat"}),
            )
        }),
        tinker("POST", "/api/v1/sessions/{id}/finish", |c| {
            with(format!("/api/v1/sessions/{}/finish", c.seg(&SESSIONS)), json!({}))
        }),
        tinker("POST", "/api/v1/telemetry", |_| {
            with(
                "/api/v1/telemetry".into(),
                json!({"events": [{"event": "fuzz", "event_id": "1", "timestamp": "2026-01-01T00:00:00Z"}], "platform": "linux", "sdk_version": "0.38.0"}),
            )
        }),
        tinker("POST", "/api/v1/create_model", |c| {
            let mut b = json!({
                "session_id": c.name(&SESSIONS), "model_seq_id": c.rng.u64(0..=2), "base_model": c.pick(&["tiny", ""]),
                "lora_config": {"rank": c.rng.usize(1..=4), "seed": c.seed(), "train_mlp": c.rng.bool(), "train_attn": true, "train_unembed": c.rng.bool()},
                "user_metadata": {"renderer": "fuzz"}, "type": "create_model",
            });
            if c.rng.f32() < 0.1 {
                b["user_metadata"] = json!({"hearth_run": c.name(&RUNS)});
            }
            with("/api/v1/create_model".into(), b)
        }),
        tinker("POST", "/api/v1/get_info", |c| {
            with("/api/v1/get_info".into(), json!({"model_id": c.name(&MODELS), "type": "get_info"}))
        }),
        tinker("POST", "/api/v1/forward_backward", |c| ("/api/v1/forward_backward".into(), Body::Proto(fb_proto(c)))),
        tinker("POST", "/api/v1/optim_step", |c| {
            let adam = json!({"adam_params": {"learning_rate": c.pick(&[1e-4, 1e-3]), "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}});
            with("/api/v1/optim_step".into(), merge(ordered(c, "optim_step"), adam))
        }),
        tinker("POST", "/api/v1/save_weights", |c| {
            let path = json!({"path": c.pick(&["w0", "w1"])});
            with("/api/v1/save_weights".into(), merge(ordered(c, "save_weights"), path))
        }),
        tinker("POST", "/api/v1/save_weights_for_sampler", |c| {
            let extra = if c.rng.bool() {
                json!({"path": c.pick(&["s0", "s1"])})
            } else {
                json!({"sampling_session_seq_id": c.rng.u64(0..=3)})
            };
            with("/api/v1/save_weights_for_sampler".into(), merge(ordered(c, "save_weights_for_sampler"), extra))
        }),
        tinker("POST", "/api/v1/load_weights", |c| {
            let path = c.name(&TINKER_PATHS);
            let b = if c.rng.f32() < 0.7 {
                merge(ordered(c, "load_weights"), json!({"path": path, "optimizer": c.rng.bool()}))
            } else {
                json!({"path": path, "session_id": "sfz1", "model_seq_id": c.rng.u64(0..=2), "optimizer": c.rng.bool(), "type": "load_weights"})
            };
            with("/api/v1/load_weights".into(), b)
        }),
        tinker("POST", "/api/v1/create_sampling_session", |c| {
            let mut b = json!({"session_id": c.name(&SESSIONS), "sampling_session_seq_id": c.rng.u64(0..=3), "type": "create_sampling_session"});
            if c.rng.bool() {
                b["base_model"] = json!("tiny");
            } else {
                b["model_path"] = json!(c.name(&TINKER_PATHS));
            }
            with("/api/v1/create_sampling_session".into(), b)
        }),
        tinker("GET", "/api/v1/samplers/{id}", |c| plain(&format!("/api/v1/samplers/{}", c.seg(&SAMPLERS)))),
        tinker("POST", "/api/v1/asample", |c| {
            let n = c.rng.usize(1..=4);
            let params = json!({
                "max_tokens": c.rng.usize(1..=4), "seed": c.seed(), "temperature": c.pick(&[0.0, 1.0]),
                "stop": c.pick(&[Value::Null, json!("x"), json!([256]), json!(["a", 10])]), "top_k": c.pick(&[-1, 0, 5]), "top_p": 1.0,
            });
            let b = json!({
                "sampling_session_id": c.name(&SAMPLERS), "seq_id": c.rng.i64(0..=20), "num_samples": c.rng.usize(1..=2),
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": c.tokens(n)}]}, "sampling_params": params,
                "prompt_logprobs": c.rng.bool(), "type": "sample",
            });
            with("/api/v1/asample".into(), b)
        }),
        Route {
            long_poll: true,
            ..tinker("POST", "/api/v1/retrieve_future", |c| {
                with("/api/v1/retrieve_future".into(), json!({"request_id": format!("req-{}", c.rng.u64(1..=80))}))
            })
        },
        tinker("GET", "/api/v1/training_runs", |c| plain(&format!("/api/v1/training_runs{}", page(c)))),
        tinker("GET", "/api/v1/training_runs/{id}", |c| plain(&format!("/api/v1/training_runs/{}", c.seg(&MODELS)))),
        tinker("GET", "/api/v1/training_runs/{id}/checkpoints", |c| {
            plain(&format!("/api/v1/training_runs/{}/checkpoints", c.seg(&MODELS)))
        }),
        tinker("DELETE", "/api/v1/training_runs/{id}/checkpoints/{*ckpt}", |c| {
            let ck = c.pick(&[
                "weights/w1",
                "weights/w1",
                "sampler_weights/s1",
                "sampler_weights/s1",
                "weights/w0",
                "weights/../w0",
                "weights/%2e%2e",
                "a/b/c",
                "weights/",
            ]);
            plain(&format!("/api/v1/training_runs/{}/checkpoints/{ck}", c.seg(&MODELS)))
        }),
        tinker("GET", "/api/v1/checkpoints", |c| plain(&format!("/api/v1/checkpoints{}", page(c)))),
        tinker("POST", "/api/v1/weights_info", |c| {
            with("/api/v1/weights_info".into(), json!({"tinker_path": c.name(&TINKER_PATHS)}))
        }),
        // no such routes
        native("GET", "(no such route)", |c| {
            plain(c.pick(&[
                "/",
                "/v1",
                "/v1/",
                "/v2/ping",
                "/V1/PING",
                "//v1/ping",
                "/v1/runs/fz0",
                "/v1/runs/fz0/forward/x",
                "/api/v1",
                "/api/v1/nope",
                "/v1/ping/..",
                "/v1/ping?x=%zz",
            ]))
        }),
    ]
}

/// `/v1/runs/{run}/{op}` with an optional `wait` query.
fn op_path(c: &mut Ctx, op: &str) -> String {
    let q = c.pick(&["", "", "", "", "?wait=false", "?wait=true", "?wait=2", "?wait=%ff"]);
    let q = if c.sweeping { "" } else { q };
    format!("/v1/runs/{}/{op}{q}", c.seg(&RUNS))
}

/// A Tinker list page query.
fn page(c: &mut Ctx) -> String {
    c.pick(&[
        "",
        "?limit=5",
        "?limit=0&offset=1",
        "?offset=18446744073709551615",
        "?limit=18446744073709551616",
        "?limit=-1",
        "?limit=x",
        "?limit=1e9",
    ])
    .to_string()
}

// ---- mutations ----

/// A JSON body being mutated: texts that are not JSON values (`1e400`, deep nesting) go in as
/// placeholder strings and replace them when written out.
struct Draft {
    value: Value,
    raws: Vec<String>,
    big_string: bool,
}

impl Draft {
    fn raw(&mut self, text: String) -> Value {
        self.raws.push(text);
        Value::String(format!("@@fuzz-raw-{}@@", self.raws.len() - 1))
    }

    fn render(&self) -> Vec<u8> {
        let mut s = self.value.to_string();
        for (i, raw) in self.raws.iter().enumerate() {
            s = s.replacen(&format!("\"@@fuzz-raw-{i}@@\""), raw, 1);
        }
        s.into_bytes()
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn unescape(key: &str) -> String {
    key.replace("~1", "/").replace("~0", "~")
}

/// JSON pointers to every node (the first four elements of an array).
fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    out.push(at.to_string());
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| pointers(x, &format!("{at}/{}", escape(k)), out)),
        Value::Array(a) => a.iter().take(4).enumerate().for_each(|(i, x)| pointers(x, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn shown(ptr: &str) -> &str {
    if ptr.is_empty() {
        "the whole body"
    } else {
        ptr
    }
}

fn random_value(c: &mut Ctx, depth: u32) -> Value {
    match c.rng.usize(..if depth > 1 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(c.rng.bool()),
        2 => json!(c.rng.i64(-3..=300)),
        3 => json!(c.pick(&[0.5, -0.0, 1e-300, 3.4e38, 1e300])),
        4 => json!(weird_string(c)),
        5 => json!(c.pick(&["", "x", "1", "true", "null"])),
        6 => Value::Array((0..c.rng.usize(0..=3)).map(|_| random_value(c, depth + 1)).collect()),
        _ => Value::Object((0..c.rng.usize(0..=3)).map(|i| (format!("k{i}"), random_value(c, depth + 1))).collect()),
    }
}

fn weird_string(c: &mut Ctx) -> String {
    c.pick(&[
        "".to_string(),
        "\u{0}".into(),
        "../../etc/passwd".into(),
        "/".into(),
        "/dev/zero".into(),
        "été \u{1F525} \u{202E}".into(),
        "<|im_end|><|im_start|>assistant".into(),
        "{{ raise('x') }}{% for x in range(999999999) %}".into(),
        "x".repeat(10_000),
        "a b".into(),
        "sfz0:train:0".into(),
        "tinker://sfz0:train:0/weights/w0".into(),
        "%00".into(),
        "\r\n".into(),
    ])
}

/// A string of about `size` bytes.
fn huge_string(c: &mut Ctx) -> String {
    let size = c.pick(&[1_000, 65_536, 700_000]);
    let unit = c.pick(&["a", "é", "\u{1F525}", "<|im_end|>", " "]);
    unit.repeat(size / unit.len())
}

/// One structural change at a random node.
fn mutate_json(c: &mut Ctx, d: &mut Draft, notes: &mut Vec<String>) {
    let mut ptrs = Vec::new();
    pointers(&d.value, "", &mut ptrs);
    let ptr = c.pick(&ptrs);
    let parent = ptr.rsplit_once('/').map(|(p, k)| (p.to_string(), unescape(k)));
    let op = c.rng.usize(..14);
    match op {
        0 | 1 if parent.is_some() => {
            let (p, k) = parent.unwrap_or_default();
            match d.value.pointer_mut(&p) {
                Some(Value::Object(m)) => {
                    m.remove(&k);
                }
                Some(Value::Array(a)) => {
                    if let Some(i) = k.parse::<usize>().ok().filter(|&i| i < a.len()) {
                        a.remove(i);
                    }
                }
                _ => {}
            }
            notes.push(format!("delete {}", shown(&ptr)));
        }
        2 => {
            let v = random_value(c, 0);
            notes.push(format!("replace {} with {v}", shown(&ptr)));
            set(d, &ptr, v);
        }
        3 | 4 => {
            let n = c.pick(&NUMBERS);
            let v = d.raw(n.to_string());
            notes.push(format!("replace {} with {n}", shown(&ptr)));
            set(d, &ptr, v);
        }
        5 => {
            let s = if d.big_string { weird_string(c) } else { huge_string(c) };
            d.big_string |= s.len() > 10_000;
            notes.push(format!(
                "replace {} with a string of {} bytes ({:?}…)",
                shown(&ptr),
                s.len(),
                s.chars().take(12).collect::<String>()
            ));
            set(d, &ptr, Value::String(s));
        }
        6 => {
            let v = match d.value.pointer(&ptr) {
                Some(Value::Number(n)) => json!(n.to_string()),
                Some(Value::String(s)) => s.parse::<f64>().map_or(json!(s.len()), |x| json!(x)),
                Some(Value::Bool(b)) => json!(u8::from(*b)),
                Some(Value::Array(a)) => {
                    Value::Object(a.iter().enumerate().map(|(i, x)| (i.to_string(), x.clone())).collect())
                }
                Some(Value::Object(m)) => Value::Array(m.values().cloned().collect()),
                _ => json!(0),
            };
            notes.push(format!("retype {} as {v}", shown(&ptr)));
            set(d, &ptr, v);
        }
        7 => {
            let key = c.pick(&["type", "extra", "", "__proto__", "data", "name", "idle_timeout_s"]);
            let v = random_value(c, 1);
            match d.value.pointer_mut(&ptr) {
                Some(Value::Object(m)) => {
                    m.insert(key.to_string(), v.clone());
                }
                Some(other) => *other = json!({key: v.clone()}),
                None => {}
            }
            notes.push(format!("add field {key:?} = {v} at {}", shown(&ptr)));
        }
        8 if parent.is_some() => {
            let (p, k) = parent.unwrap_or_default();
            if let Some(Value::Object(m)) = d.value.pointer_mut(&p) {
                if let Some(v) = m.remove(&k) {
                    let new = c.pick(&[format!("{k}_"), k.to_uppercase(), format!(" {k}"), String::new()]);
                    notes.push(format!("rename {} to {new:?}", shown(&ptr)));
                    m.insert(new, v);
                }
            }
        }
        9 => {
            if let Some(Value::Array(a)) = d.value.pointer_mut(&ptr) {
                if let Some(first) = a.first().cloned() {
                    let each = first.to_string().len().max(1);
                    let n = (200_000 / each).clamp(1, 64);
                    a.extend(std::iter::repeat_n(first, n));
                    notes.push(format!("repeat the first element of {} {n} more times", shown(&ptr)));
                }
            } else {
                let v = d.value.pointer(&ptr).cloned().unwrap_or(Value::Null);
                notes.push(format!("wrap {} in an array", shown(&ptr)));
                set(d, &ptr, json!([v]));
            }
        }
        10 => {
            let depth = c.pick(&[128usize, 129, 1000, 100_000]);
            let text = if c.rng.bool() {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            };
            let v = d.raw(text);
            notes.push(format!("replace {} with {depth} levels of nesting", shown(&ptr)));
            set(d, &ptr, v);
        }
        11 => {
            if let Some(Value::Object(m)) = d.value.pointer_mut(&ptr) {
                let keys: Vec<String> = m.keys().cloned().collect();
                if keys.len() >= 2 {
                    let (a, b) = (c.pick(&keys), c.pick(&keys));
                    let (va, vb) = (m[&a].clone(), m[&b].clone());
                    m.insert(a.clone(), vb);
                    m.insert(b.clone(), va);
                    notes.push(format!("swap {a:?} and {b:?} in {}", shown(&ptr)));
                }
            }
        }
        12 => {
            let v = c.pick(&[json!([]), json!({}), json!("")]);
            notes.push(format!("empty {} ({v})", shown(&ptr)));
            set(d, &ptr, v);
        }
        _ => {
            let v = d.raw(
                c.pick(&["\"\\ud800\"", "\"\\u0000\"", "\"\\x\"", "\"é\\/\"", "-", "[1,]", "{\"a\" 1}"]).to_string(),
            );
            notes.push(format!("replace {} with a bad literal", shown(&ptr)));
            set(d, &ptr, v);
        }
    }
}

fn set(d: &mut Draft, ptr: &str, v: Value) {
    if let Some(slot) = d.value.pointer_mut(ptr) {
        *slot = v;
    }
}

/// A first field written twice (`{"k": other, "k": v, ...}`).
fn duplicate_key(c: &mut Ctx, body: Vec<u8>, notes: &mut Vec<String>) -> Vec<u8> {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&body) else { return body };
    let keys: Vec<&String> = m.keys().collect();
    if keys.is_empty() || body.first() != Some(&b'{') {
        return body;
    }
    let key = c.pick(&keys).clone();
    let v = if c.rng.bool() { m[&key].clone() } else { random_value(c, 1) };
    notes.push(format!("write field {key:?} twice, first as {v}"));
    let mut out = format!("{{{}:{},", json!(key), v).into_bytes();
    out.extend_from_slice(&body[1..]);
    out
}

/// One change to the bytes.
fn mutate_bytes(c: &mut Ctx, b: &mut Vec<u8>, notes: &mut Vec<String>) {
    let pos = |c: &mut Ctx, b: &Vec<u8>| c.rng.usize(..=b.len());
    match c.rng.usize(..6) {
        0 if !b.is_empty() => {
            let at = c.rng.usize(..b.len());
            notes.push(format!("cut to {at} of {} bytes", b.len()));
            b.truncate(at);
        }
        1 if !b.is_empty() => {
            let n = c.rng.usize(1..=8);
            for _ in 0..n {
                let i = c.rng.usize(..b.len());
                b[i] ^= 1 << c.rng.u8(0..8);
            }
            notes.push(format!("flip {n} bits"));
        }
        2 => {
            let seq: &[u8] = c.pick(&[
                &b"\xff"[..],
                b"\xc3\x28",
                b"\xed\xa0\x80",
                b"\xf8\x88\x80\x80\x80",
                b"\xc0\xaf",
                b"\xe2\x82",
            ]);
            let at = b.iter().position(|&x| x == b'"').map_or_else(|| pos(c, b), |i| i + 1);
            b.splice(at..at, seq.iter().copied());
            notes.push(format!("insert invalid UTF-8 {seq:02x?} at byte {at}"));
        }
        3 => {
            let at = pos(c, b);
            let junk: Vec<u8> = (0..c.rng.usize(1..=4)).map(|_| c.pick(b"{}[]\",:\\\0\x7f \n")).collect();
            notes.push(format!("insert {junk:02x?} at byte {at}"));
            b.splice(at..at, junk);
        }
        4 => {
            let tail: &[u8] = c.pick(&[&b"x"[..], b"}", b"\0", b" {}", b"\xff", b",", b"\n\n"]);
            b.extend_from_slice(tail);
            notes.push(format!("append {tail:02x?}"));
        }
        _ => {
            b.splice(0..0, *b"\xef\xbb\xbf");
            notes.push("prefix a UTF-8 byte order mark".into());
        }
    }
}

/// A body that is not the route's at all.
fn other_body(c: &mut Ctx, routes: &[Route], notes: &mut Vec<String>) -> Vec<u8> {
    match c.rng.usize(..5) {
        0 => {
            let n = c.rng.usize(0..=4096);
            notes.push(format!("{n} random bytes"));
            (0..n).map(|_| c.rng.u8(..)).collect()
        }
        1 => {
            let b = c.pick(&["", "null", "[]", "true", "\"x\"", "0", "{}", "{\"\":{}}", "\u{feff}{}"]);
            notes.push(format!("body {b:?}"));
            b.as_bytes().to_vec()
        }
        2 => {
            notes.push("500000 spaces".into());
            vec![b' '; 500_000]
        }
        _ => {
            let other = &routes[c.rng.usize(..routes.len())];
            let (_, body) = (other.make)(c);
            notes.push(format!("the body of {} {}", other.method, other.route));
            match body {
                Body::None => b"{}".to_vec(),
                Body::Json(v) => v.to_string().into_bytes(),
                Body::Proto(m) => encode(&m),
            }
        }
    }
}

/// Datum `d`'s `target_tokens`.
fn target(m: &mut proto::ForwardBackwardRequest, d: usize) -> Option<&mut proto::Tensor> {
    m.data.get_mut(d).and_then(|x| x.loss_fn_inputs.get_mut("target_tokens"))
}

/// One change to a protobuf `forward_backward` request.
fn mutate_proto(c: &mut Ctx, m: &mut proto::ForwardBackwardRequest, notes: &mut Vec<String>) {
    let d = c.rng.usize(..m.data.len().max(1));
    match c.rng.usize(..18) {
        0 => {
            m.model_id = c
                .pick(&[
                    "",
                    "sfz0:train:x",
                    "../x",
                    "sfz9:train:0",
                    "sfz0:train:18446744073709551616",
                    "fz-none",
                    "a:train:1:train:2",
                ])
                .to_string();
            notes.push(format!("model_id {:?}", m.model_id));
        }
        1 => {
            m.seq_id = c.pick(&[i32::MAX, i32::MIN, -1, 0, m.seq_id + 1000]);
            notes.push(format!("seq_id {}", m.seq_id));
        }
        2 => {
            m.data.clear();
            notes.push("no data".into());
        }
        3 if !m.data.is_empty() => {
            let n = c.pick(&[8usize, 64]);
            let first = m.data[0].clone();
            m.data.extend(std::iter::repeat_n(first, n));
            notes.push(format!("{n} more copies of data[0]"));
        }
        4 => {
            let tokens: Vec<u8> = c.pick(&[
                vec![1u8, 0, 0],
                proto::i32_bytes([-1]),
                proto::i32_bytes([i32::MAX]),
                proto::i32_bytes([300, 301]),
                vec![],
            ]);
            notes.push(format!("data[{d}] token bytes {tokens:02x?}"));
            if let Some(x) = m.data.get_mut(d) {
                x.model_input = vec![proto::Chunk {
                    chunk: Some(proto::chunk::Kind::EncodedText(proto::EncodedTextChunk { tokens })),
                }];
            }
        }
        5 => {
            if let Some(x) = m.data.get_mut(d) {
                x.model_input.push(proto::Chunk { chunk: None });
            }
            notes.push(format!("data[{d}] gets an empty chunk"));
        }
        6 => {
            let dtype = c.pick(&[
                0,
                99,
                -1,
                proto::DType::Int32 as i32,
                proto::DType::Bfloat16 as i32,
                proto::DType::Float32 as i32,
            ]);
            if let Some(t) = target(m, d) {
                t.dtype = dtype;
            }
            notes.push(format!("target_tokens dtype {dtype}"));
        }
        7 => {
            let shape = c.pick(&[
                vec![],
                vec![-1],
                vec![0],
                vec![i64::MAX],
                vec![i64::MAX, 2],
                vec![1 << 32, 1 << 32],
                vec![i64::MIN],
                vec![1, 1, 1],
            ]);
            notes.push(format!("target_tokens shape {shape:?}"));
            if let Some(t) = target(m, d) {
                t.shape = shape;
            }
        }
        8 => {
            let values: Vec<f32> = c.pick(&[vec![0.5], vec![-1.0], vec![f32::NAN], vec![1e10], vec![f32::INFINITY]]);
            let n = m
                .data
                .get(d)
                .and_then(|x| x.loss_fn_inputs.get("weights"))
                .map_or(1, |w| w.shape.first().copied().unwrap_or(1).max(0) as usize);
            let v: Vec<f32> = values.iter().copied().cycle().take(n).collect();
            if let Some(t) = target(m, d) {
                *t = tensor(proto::DType::Float32, proto::f32_bytes(&v), n);
            }
            notes.push(format!("target_tokens as float32 {values:?}"));
        }
        9 => {
            if let Some(w) = m.data.get_mut(d).and_then(|x| x.loss_fn_inputs.get_mut("weights")) {
                if let Some(proto::tensor::Encoding::Dense(b)) = &mut w.encoding {
                    b.push(0);
                }
            }
            notes.push("weights one byte longer".into());
        }
        10 => {
            if let Some(t) = target(m, d) {
                t.encoding = c.pick(&[
                    None,
                    Some(proto::tensor::Encoding::SparseCsr(proto::SparseCsr {
                        values: vec![1, 2],
                        crow_indices: vec![0],
                        col_indices: vec![],
                    })),
                ]);
            }
            notes.push("target_tokens not dense".into());
        }
        11 => {
            let name = c.pick(&["target_tokens", "weights"]);
            if let Some(x) = m.data.get_mut(d) {
                x.loss_fn_inputs.remove(name);
            }
            notes.push(format!("no {name}"));
        }
        12 => {
            let name = c.pick(&["mask", "", "logprobs"]);
            if let Some(x) = m.data.get_mut(d) {
                x.loss_fn_inputs.insert(name.into(), tensor(proto::DType::Float32, proto::f32_bytes(&[1.0]), 1));
            }
            notes.push(format!("extra input {name:?}"));
        }
        13 => {
            m.loss_fn = c
                .pick(&["", "ppo", "dro", "cispo", "importance_sampling", "hinge", "x".repeat(1000).as_str()])
                .to_string();
            notes.push(format!("loss_fn {:?}", m.loss_fn.chars().take(20).collect::<String>()));
        }
        14 => {
            let (k, v) =
                (c.pick(&["clip_low_threshold", "beta", "x"]), c.pick(&[f64::NAN, f64::INFINITY, -1e308, -1.0, 1e39]));
            m.loss_fn_config.insert(k.into(), v);
            notes.push(format!("loss_fn_config {k} = {v}"));
        }
        15 => {
            let v = c.pick(&[
                None,
                Some(proto::loss_config_value::Value::Text("x".into())),
                Some(proto::loss_config_value::Value::Number(f64::NAN)),
            ]);
            notes.push(format!("loss_fn_config_v2 beta = {v:?}"));
            m.loss_fn_config_v2.insert("beta".into(), proto::LossConfigValue { value: v });
        }
        _ => {
            m.forward_only = !m.forward_only;
            notes.push(format!("forward_only {}", m.forward_only));
        }
    }
}

// ---- one request ----

/// A request from the sweep: each extreme into each numeric field of each route's valid body
/// (`stream` both ways where there is one).
fn sweep(c: &mut Ctx, routes: &[Route]) -> Vec<Req> {
    let mut out = Vec::new();
    c.sweeping = true;
    for route in routes {
        let (path, body) = (route.make)(c);
        let Body::Json(v) = body else { continue };
        let variants = if v.get("stream").is_some() { vec![json!(false), json!(true)] } else { vec![Value::Null] };
        for stream in variants {
            let mut v = v.clone();
            if !stream.is_null() {
                v["stream"] = stream;
            }
            let mut ptrs = Vec::new();
            pointers(&v, "", &mut ptrs);
            for ptr in ptrs.iter().filter(|p| v.pointer(p).is_some_and(Value::is_number)) {
                for x in SWEEP {
                    let mut d = Draft { value: v.clone(), raws: Vec::new(), big_string: false };
                    let raw = d.raw(x.to_string());
                    set(&mut d, ptr, raw);
                    let mut req = base_req(route, &path);
                    req.body = d.render();
                    req.content_type = Some(b"application/json".to_vec());
                    req.notes.push(format!("sweep: {ptr} = {x}"));
                    out.push(req);
                }
            }
        }
    }
    c.sweeping = false;
    out
}

fn base_req(route: &Route, path: &str) -> Req {
    let mut req = Req::new(route.method, path, if route.tinker { Auth::TinkerKey } else { Auth::Bearer }, None, "");
    req.route = format!("{} {}", route.method, route.route);
    req.long_poll = route.long_poll;
    req
}

/// A random request: a route's valid request, perhaps mutated.
fn random_request(c: &mut Ctx, routes: &[Route]) -> Req {
    let route = &routes[c.rng.usize(..routes.len())];
    let (path, body) = (route.make)(c);
    let mut req = base_req(route, &path);
    let mut notes = Vec::new();
    let roll = c.rng.f32();
    match body {
        Body::None => {
            if roll < 0.15 {
                req.body = other_body(c, routes, &mut notes);
                req.content_type = Some(b"application/json".to_vec());
            }
        }
        Body::Json(v) => {
            req.content_type = Some(b"application/json".to_vec());
            req.body = if roll < 0.25 {
                v.to_string().into_bytes()
            } else if roll < 0.80 {
                let mut d = Draft { value: v, raws: Vec::new(), big_string: false };
                for _ in 0..c.rng.usize(1..=3) {
                    mutate_json(c, &mut d, &mut notes);
                }
                let mut b = d.render();
                if c.rng.f32() < 0.1 {
                    b = duplicate_key(c, b, &mut notes);
                }
                if c.rng.f32() < 0.3 {
                    mutate_bytes(c, &mut b, &mut notes);
                }
                b
            } else if roll < 0.90 {
                let mut b = v.to_string().into_bytes();
                for _ in 0..c.rng.usize(1..=2) {
                    mutate_bytes(c, &mut b, &mut notes);
                }
                b
            } else {
                other_body(c, routes, &mut notes)
            };
        }
        Body::Proto(mut m) => {
            req.content_type = Some(b"application/x-protobuf".to_vec());
            req.body = if roll < 0.2 {
                encode(&m)
            } else if roll < 0.75 {
                for _ in 0..c.rng.usize(1..=3) {
                    mutate_proto(c, &mut m, &mut notes);
                }
                let mut b = encode(&m);
                if c.rng.f32() < 0.3 {
                    mutate_bytes(c, &mut b, &mut notes);
                }
                b
            } else if roll < 0.92 {
                let mut b = encode(&m);
                for _ in 0..c.rng.usize(1..=3) {
                    mutate_bytes(c, &mut b, &mut notes);
                }
                b
            } else {
                other_body(c, routes, &mut notes)
            };
            if c.rng.f32() < 0.05 {
                req.extra_headers.push((
                    "Content-Encoding".into(),
                    c.pick(&[&b"gzip"[..], b"identity", b"br, gzip", b"\xff"]).to_vec(),
                ));
                notes.push("a Content-Encoding".into());
            }
        }
    }
    if req.body.len() > MAX_BODY {
        req.body.truncate(MAX_BODY);
        notes.push(format!("cut to {MAX_BODY} bytes"));
    }
    // what is around the body
    if c.rng.f32() < 0.05 {
        let m = c.pick(&["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FUZZ"]);
        if m != req.method {
            notes.push(format!("method {m} instead of {}", req.method));
            req.method = m.to_string();
        }
    }
    if c.rng.f32() < 0.08 {
        let ct = c.pick(&[
            &b"text/plain"[..],
            b"application/x-protobuf",
            b"application/json",
            b"multipart/form-data; boundary=x",
            b"application/json; charset=latin1",
            b"",
            b"\xff\xfe",
        ]);
        notes.push(format!("Content-Type {}", printable(ct, 60)));
        req.content_type = Some(ct.to_vec());
    }
    if c.rng.f32() < 0.04 {
        req.auth = c.pick(&[
            Auth::Missing,
            Auth::Wrong,
            Auth::WrongKey,
            Auth::NotUtf8,
            Auth::LowercaseBearer,
            Auth::Bearer,
            Auth::TinkerKey,
            Auth::TinkerBare,
        ]);
        notes.push(format!("auth {:?}", req.auth));
    }
    if c.rng.f32() < 0.02 {
        let q = c.pick(&["?", "?%zz", "?a=1&a=2&a=3", "?x=\u{e9}"]);
        req.path.extend_from_slice(q.as_bytes());
        notes.push(format!("query {q:?}"));
    }
    if c.rng.f32() < 0.01 {
        let at = c.rng.usize(1..=req.path.len());
        req.path.splice(at..at, *b"\xff\x00");
        notes.push(format!("raw bytes ff 00 at path byte {at}"));
    }
    req.notes = notes;
    req
}

// ---- the server under test ----

/// A server started as `common::Server::start` starts one, but with its stderr in a file, where
/// the fuzz looks for panics after every request (a panic in a spawned task leaves the process
/// up and may leave the answer looking fine).
struct Target {
    child: Child,
    addr: String,
    token: String,
    log: PathBuf,
    /// How much of the log has been read.
    log_read: u64,
    starts: usize,
}

impl Target {
    fn start(starts: usize) -> Target {
        let home = home(&format!("fuzz-{starts}"));
        let log = home.join("server.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth-server"))
            .arg("--home")
            .arg(&home)
            .args(["--listen", "127.0.0.1:0", "--model", "tiny", "--idle-timeout", "0"])
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(
            line.contains("listening on"),
            "server did not start: {line:?}; {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let session: Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("session.json")).unwrap()).unwrap();
        let addr = session["url"].as_str().unwrap().trim_start_matches("http://").to_string();
        let mut t =
            Target { child, addr, token: session["token"].as_str().unwrap().to_string(), log, log_read: 0, starts };
        setup(&t);
        t.new_log();
        t
    }

    fn send(&self, req: &Req) -> Outcome {
        exchange(&self.addr, &self.token, req, if req.long_poll { LONG_POLL } else { LIMIT })
    }

    /// What the server has written to stderr since the last call.
    fn new_log(&mut self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            if f.seek(SeekFrom::Start(self.log_read)).is_ok() {
                let mut b = Vec::new();
                let _ = f.read_to_end(&mut b);
                self.log_read += b.len() as u64;
                text = String::from_utf8_lossy(&b).into_owned();
            }
        }
        text
    }

    /// A request that must succeed (setup, the final check): the answer's body.
    fn must(&self, req: &Req) -> Vec<u8> {
        match self.send(req) {
            Outcome::Answer { status: 200, body, .. } => body,
            Outcome::Answer { status, body, .. } => panic!(
                "{} {}: {status} {}",
                req.method,
                String::from_utf8_lossy(&req.path),
                String::from_utf8_lossy(&body)
            ),
            Outcome::Held => panic!("{} {}: held", req.method, String::from_utf8_lossy(&req.path)),
            Outcome::Broken(e) => panic!("{} {}: {e}", req.method, String::from_utf8_lossy(&req.path)),
        }
    }

    fn ok(&self, path: &str, body: &Value) -> Value {
        serde_json::from_slice(&self.must(&Req::json("POST", path, Auth::Bearer, body))).unwrap()
    }

    fn tinker(&self, path: &str, body: &Value) -> Value {
        serde_json::from_slice(&self.must(&Req::json("POST", path, Auth::TinkerKey, body))).unwrap()
    }

    /// A Tinker operation's future, waited for: its result's bytes (JSON or protobuf).
    fn future(&self, answer: &Value) -> Vec<u8> {
        let id = answer["request_id"].clone();
        let deadline = Instant::now() + LIMIT;
        loop {
            let req = Req::json("POST", "/api/v1/retrieve_future", Auth::TinkerKey, &json!({"request_id": id}));
            match exchange(&self.addr, &self.token, &req, Duration::from_secs(60)) {
                Outcome::Answer { status: 200, head, body } => {
                    if !head.contains("x-protobuf") {
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        assert!(v.get("error").is_none(), "future {id}: {v}");
                    }
                    return body;
                }
                Outcome::Answer { status: 408, .. } if Instant::now() < deadline => {}
                Outcome::Answer { status, body, .. } => {
                    panic!("future {id}: {status} {}", String::from_utf8_lossy(&body))
                }
                Outcome::Held | Outcome::Broken(_) => panic!("future {id}: no answer"),
            }
        }
    }

    /// Waits up to `secs` for the process to end: how it ended.
    fn exit_within(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Panic and abort lines of a server log: `panicked at LOCATION: MESSAGE (in FRAME)`, with the
/// backtrace's first frame in hearth's own code; `memory allocation of N bytes failed`.
fn panics(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some((_, at)) = line.split_once(" panicked at ") {
            let ours =
                lines[i + 1..].iter().take(200).take_while(|l| !l.contains(" panicked at ")).map(|l| l.trim()).find(
                    |l| {
                        l.starts_with("at ")
                            && l.contains("src/")
                            && !l.contains("/rustc/")
                            && !l.contains(".cargo/registry")
                    },
                );
            let frame = ours.map(|l| format!(" (in {})", &l[3..])).unwrap_or_default();
            out.push(format!("panicked at {at} {}{frame}", lines.get(i + 1).unwrap_or(&"")));
        } else if line.starts_with("memory allocation of") || line.contains("fatal runtime error") {
            out.push(line.to_string());
        }
    }
    out
}

/// What the pools name, made valid on a new server: runs `fz0` (LoRA, one step, checkpoints
/// `ck0` and `ck0a`) and `fz1` (full), Tinker model `sfz0:train:0` with `seq_id`s 1-4 used
/// (one step, `weights/w0`, `sampler_weights/s0`), samplers `sfz0:sample:0` (base) and `:1`.
fn setup(t: &Target) {
    let b = common::batch("fuzz setup text");
    t.ok("/v1/runs", &json!({"name": "fz0", "training": {"kind": "lora", "rank": 4, "seed": 1}}));
    t.ok("/v1/runs", &json!({"name": "fz1", "training": {"kind": "full"}}));
    t.ok("/v1/runs/fz0/forward_backward", &b);
    t.ok("/v1/runs/fz0/optim_step", &json!({"learning_rate": 1e-3}));
    t.ok("/v1/runs/fz0/save_state", &json!({"name": "ck0", "kind": "state"}));
    t.ok("/v1/runs/fz0/save_state", &json!({"name": "ck0a", "kind": "adapter"}));
    let m = "sfz0:train:0";
    t.future(&t.tinker(
        "/api/v1/create_model",
        &json!({"session_id": "sfz0", "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 5}}),
    ));
    let request = fb_proto_of(m, 1, &[(100..110).collect(), (50..55).collect()], false);
    let fb = encode(&request);
    assert_eq!(
        proto::ForwardBackwardRequest::decode(&fb[..]).unwrap(),
        request,
        "the fuzz's own protobuf encoding reads back"
    );
    let sent =
        t.must(&Req::new("POST", "/api/v1/forward_backward", Auth::TinkerKey, Some(fb), "application/x-protobuf"));
    t.future(&serde_json::from_slice(&sent).unwrap());
    t.future(
        &t.tinker("/api/v1/optim_step", &json!({"model_id": m, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}})),
    );
    t.future(&t.tinker("/api/v1/save_weights", &json!({"model_id": m, "seq_id": 3, "path": "w0"})));
    t.future(&t.tinker("/api/v1/save_weights_for_sampler", &json!({"model_id": m, "seq_id": 4, "path": "s0"})));
    t.tinker(
        "/api/v1/create_sampling_session",
        &json!({"session_id": "sfz0", "sampling_session_seq_id": 0, "base_model": "tiny"}),
    );
    t.tinker("/api/v1/create_sampling_session", &json!({"session_id": "sfz0", "sampling_session_seq_id": 1, "model_path": "tinker://sfz0:train:0/sampler_weights/s0"}));
}

/// Each pool model's next `seq_id` after setup.
fn setup_seqs() -> HashMap<String, i64> {
    HashMap::from([("sfz0:train:0".to_string(), 5), ("sfz0:train:1".to_string(), 1), ("fz0".to_string(), 1)])
}

/// Moves a pool model's `seq_id` on when `req` uses it up: the server takes the id of every
/// training request whose body reads as JSON (or protobuf) naming a model and an integer id,
/// whether or not the rest of it is valid.
fn track_seq(c: &mut Ctx, req: &Req) {
    const TRAINING: [&str; 4] =
        ["/api/v1/optim_step", "/api/v1/save_weights", "/api/v1/save_weights_for_sampler", "/api/v1/load_weights"];
    if req.method != "POST"
        || !matches!(req.auth, Auth::TinkerKey | Auth::TinkerBare | Auth::Bearer)
        || !req.extra_headers.is_empty()
    {
        return;
    }
    let path = String::from_utf8_lossy(&req.path);
    let place = if path == "/api/v1/forward_backward" {
        proto::ForwardBackwardRequest::decode(&req.body[..]).ok().map(|m| (m.model_id, i64::from(m.seq_id)))
    } else if TRAINING.contains(&path.as_ref()) {
        serde_json::from_slice::<Value>(&req.body)
            .ok()
            .and_then(|v| Some((v.get("model_id")?.as_str()?.to_string(), v.get("seq_id")?.as_i64()?)))
    } else {
        None
    };
    if let Some((model, seq)) = place {
        if let Some(next) = c.seqs.get_mut(&model).filter(|n| **n == seq) {
            *next += 1;
        }
    }
}

// ---- failures ----

struct Failure {
    index: usize,
    class: String,
    what: String,
    req: Option<Req>,
}

/// The failure report: each class once, with its count and first request.
fn report(seed: u64, failures: &[Failure]) -> String {
    let mut classes: BTreeMap<&str, (usize, &Failure)> = BTreeMap::new();
    for f in failures {
        classes.entry(&f.class).or_insert((0, f)).0 += 1;
    }
    let mut out = format!(
        "{} failures in {} classes (seed {seed}: HEARTH_FUZZ_SEED={seed} replays them)\n",
        failures.len(),
        classes.len()
    );
    for (class, (count, f)) in &classes {
        out += &format!("\n[{count}×] {class}\n  first at request #{}: {}\n", f.index, f.what);
        if let Some(req) = &f.req {
            out += &req.describe();
            out.push('\n');
        }
    }
    out
}

/// A failure's route, with the method it was sent with where that is not the route's.
fn class_of(req: &Req) -> String {
    if req.route.starts_with(&format!("{} ", req.method)) {
        req.route.clone()
    } else {
        format!("{} (sent as {})", req.route, req.method)
    }
}

/// A status, and the error kind of a JSON error body.
fn status_class(status: u16, body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let kind = v["error"]["kind"].as_str().or(v["kind"].as_str()).unwrap_or("").to_string();
    let msg =
        v["error"]["message"].as_str().or(v["detail"].as_str()).map_or_else(|| printable(body, 300), str::to_string);
    (format!("answers {status} {kind}"), format!("answered {status}: {msg}"))
}

// ---- the final check ----

/// Keys whose values differ between two servers by design (ids, times, paths).
const VOLATILE: [&str; 6] = ["id", "created", "request_id", "path", "time", "tokens_per_s"];

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !VOLATILE.contains(&k.as_str()));
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn f32_bits(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A fixed valid sequence on new run `fuzz-check` and new Tinker model `scheck:train:0`, each
/// step's result without ids and times (floats as their bits where they come as protobuf).
fn check_sequence(t: &Target) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let mut step = |name: &'static str, mut v: Value| {
        strip(&mut v);
        out.push((name, v));
    };
    let lora = json!({"kind": "lora", "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"], "seed": 1234});
    step("create_run", t.ok("/v1/runs", &json!({"name": "fuzz-check", "training": lora})));
    step(
        "forward_backward",
        t.ok("/v1/runs/fuzz-check/forward_backward", &common::batch("hearth keeps the model warm")),
    );
    step(
        "optim_step",
        t.ok(
            "/v1/runs/fuzz-check/optim_step",
            &json!({"learning_rate": 1e-2, "weight_decay": 0.1, "grad_clip_norm": 1.0}),
        ),
    );
    step("forward", t.ok("/v1/runs/fuzz-check/forward", &common::batch("one cell at a time")));
    let prompt = json!([104, 101, 97, 114]);
    let greedy = json!({"prompt": prompt, "num_samples": 2, "sampling_params": {"max_tokens": 8, "temperature": 0.0}});
    step("sample, temperature 0", t.ok("/v1/runs/fuzz-check/sample", &greedy));
    let seeded = json!({"prompt": prompt, "num_samples": 2, "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 42}, "prompt_logprobs": true});
    step("sample, temperature 1, seed 42", t.ok("/v1/runs/fuzz-check/sample", &seeded));
    let cmpl = json!({"model": "fuzz-check", "prompt": "hearth", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2, "logprobs": 1});
    step("completions", t.ok("/v1/completions", &cmpl));
    let chat = json!({"model": "fuzz-check", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0.0, "logprobs": true});
    step("chat completions", t.ok("/v1/chat/completions", &chat));
    step("tokenize", t.ok("/v1/tokenize", &json!({"text": "héllo <|im_end|>"})));

    let m = "scheck:train:0";
    let made = t.future(&t.tinker("/api/v1/create_model", &json!({"session_id": "scheck", "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 99}})));
    step("tinker create_model", serde_json::from_slice(&made).unwrap());
    let fb_out = |bytes: Vec<u8>| {
        let o = proto::ForwardBackwardOutput::decode(&bytes[..]).unwrap();
        let metrics: BTreeMap<String, u64> = o.metrics.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect();
        let logprobs: Vec<Vec<u32>> = o.loss_fn_outputs.iter().map(|r| f32_bits(&r.fields["logprobs"].data)).collect();
        json!({"metrics": metrics, "logprobs": logprobs})
    };
    let text: Vec<u32> = "tinker keeps the order".bytes().map(u32::from).collect();
    for (seq, forward_only, name) in [(1, false, "tinker forward_backward"), (3, true, "tinker forward")] {
        if seq == 3 {
            let stepped = t.future(&t.tinker(
                "/api/v1/optim_step",
                &json!({"model_id": m, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}}),
            ));
            step("tinker optim_step", serde_json::from_slice(&stepped).unwrap());
        }
        let body = encode(&fb_proto_of(m, seq, std::slice::from_ref(&text), forward_only));
        let sent = t.must(&Req::new(
            "POST",
            "/api/v1/forward_backward",
            Auth::TinkerKey,
            Some(body),
            "application/x-protobuf",
        ));
        step(name, fb_out(t.future(&serde_json::from_slice(&sent).unwrap())));
    }
    let snap = t.future(&t.tinker(
        "/api/v1/save_weights_for_sampler",
        &json!({"model_id": m, "seq_id": 4, "sampling_session_seq_id": 0}),
    ));
    step("tinker snapshot", serde_json::from_slice(&snap).unwrap());
    let ask = json!({"sampling_session_id": "scheck:sample:0", "seq_id": 0, "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
                     "sampling_params": {"max_tokens": 6, "temperature": 1.0, "seed": 5}, "prompt_logprobs": true});
    let sampled = proto::SampleResponse::decode(&t.future(&t.tinker("/api/v1/asample", &ask))[..]).unwrap();
    let seqs: Vec<Value> = sampled
        .sequences
        .iter()
        .map(|s| json!({"tokens": s.tokens, "logprobs": f32_bits(s.logprobs.as_deref().unwrap_or_default()), "stop": s.stop_reason}))
        .collect();
    step(
        "tinker asample",
        json!({"sequences": seqs, "prompt_logprobs": f32_bits(sampled.prompt_logprobs.as_deref().unwrap_or_default())}),
    );
    out
}

// ---- the test ----

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[test]
fn random_and_mutated_requests_leave_the_server_up_and_its_answers_unchanged() {
    let seed = env_or("HEARTH_FUZZ_SEED", SEED);
    let budget = env_or("HEARTH_FUZZ_BUDGET", BUDGET);
    let verbose = std::env::var_os("HEARTH_FUZZ_LOG").is_some();
    let started = Instant::now();
    let routes = routes();
    let mut c = Ctx { rng: Rng::with_seed(seed), seqs: setup_seqs(), sweeping: false };
    let sweep = sweep(&mut c, &routes);
    eprintln!("fuzz: seed {seed} (HEARTH_FUZZ_SEED), {budget} requests (HEARTH_FUZZ_BUDGET): {} in the sweep of extremes, the rest random, over {} routes", sweep.len().min(budget), routes.len());
    let mut t = Target::start(0);
    let mut failures: Vec<Failure> = Vec::new();
    let mut hangs = 0;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut sweep = sweep.into_iter();
    for i in 0..budget {
        let req = sweep.next().unwrap_or_else(|| random_request(&mut c, &routes));
        track_seq(&mut c, &req);
        let outcome = t.send(&req);
        let mut suspect = false;
        let failure = match &outcome {
            Outcome::Answer { status, head, body } => {
                *statuses.entry(*status).or_default() += 1;
                // every event stream ends with [DONE], also after an error event: one that stops
                // early lost the task that wrote it (or the process is going down)
                let cut = head.contains("text/event-stream") && !body.ends_with(b"data: [DONE]\n\n");
                suspect = cut;
                if *status >= 500 {
                    Some(status_class(*status, body))
                } else if cut {
                    let tail = printable(&body[body.len().saturating_sub(300)..], 300);
                    Some((
                        format!("answers {status} but its event stream stops before `data: [DONE]`"),
                        format!("the stream ends with {tail}"),
                    ))
                } else {
                    None
                }
            }
            Outcome::Held => None,
            Outcome::Broken(e) => {
                suspect = true;
                hangs += usize::from(e.starts_with("no answer"));
                Some((e.split(" (").next().unwrap_or(e).to_string(), e.clone()))
            }
        };
        if verbose {
            let status = match &outcome {
                Outcome::Answer { status, body, .. } if *status >= 300 => {
                    status_class(*status, body).1.chars().take(160).collect::<String>()
                }
                Outcome::Answer { status, .. } => status.to_string(),
                Outcome::Held => "held".into(),
                Outcome::Broken(e) => e.clone(),
            };
            eprintln!(
                "fuzz: #{i} {status} {} {} [{}] {}",
                req.method,
                printable(&req.path, 80),
                req.route,
                req.notes.join("; ")
            );
        }
        let exited = if suspect { t.exit_within(3) } else { t.child.try_wait().ok().flatten() };
        let log = t.new_log();
        let panicked = panics(&log);
        if let Some(status) = exited {
            let what = format!(
                "the server process exited ({status}) on this request; its last words: {}",
                panicked.join(" | ")
            );
            failures.push(Failure {
                index: i,
                class: format!("{}: the process exits", class_of(&req)),
                what,
                req: Some(req.clone()),
            });
            eprintln!("fuzz: #{i}: the server exited ({status}); starting another");
            let starts = t.starts + 1;
            drop(t);
            t = Target::start(starts);
            c.seqs = setup_seqs();
            continue;
        }
        if let Some((class, what)) = failure {
            failures.push(Failure {
                index: i,
                class: format!("{}: {class}", class_of(&req)),
                what,
                req: Some(req.clone()),
            });
        }
        for p in panicked {
            let place = p.rsplit_once(" (in ").map_or_else(
                || p.split(' ').take(3).collect::<Vec<_>>().join(" "),
                |(_, f)| format!("in {}", f.trim_end_matches(')')),
            );
            let class = format!("{}: a server thread panics ({place})", class_of(&req));
            failures.push(Failure {
                index: i,
                class,
                what: format!("on this request or just before it: {p}"),
                req: Some(req.clone()),
            });
        }
        if req.method == "POST" && req.path.starts_with(b"/v1/settings") {
            t.ok("/v1/settings", &json!({"idle_timeout_s": 0}));
        }
        if (i + 1) % PING_EVERY == 0 {
            let ping = Req::new("GET", "/v1/ping", Auth::Bearer, None, "");
            if !matches!(
                exchange(&t.addr, &t.token, &ping, Duration::from_secs(60)),
                Outcome::Answer { status: 200, .. }
            ) {
                failures.push(Failure {
                    index: i,
                    class: "GET /v1/ping: no 200 within 60 s".into(),
                    what: "after this request".into(),
                    req: Some(req),
                });
            }
        }
        if hangs >= MAX_HANGS {
            eprintln!("fuzz: {hangs} requests got no answer; stopping at #{i}");
            break;
        }
    }
    eprintln!(
        "fuzz: statuses {statuses:?}; {} failures; {} server starts; {:.1} s",
        failures.len(),
        t.starts + 1,
        started.elapsed().as_secs_f64()
    );

    // the same valid sequence on the fuzzed server and on a fresh one
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_sequence(&t)));
    let fuzzed = checked.unwrap_or_else(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        failures.push(Failure {
            index: budget,
            class: "final check: a valid request fails on the fuzzed server".into(),
            what: why,
            req: None,
        });
        Vec::new()
    });
    let fresh = if fuzzed.is_empty() { Vec::new() } else { check_sequence(&Target::start(1000)) };
    for ((name, a), (_, b)) in fuzzed.iter().zip(&fresh) {
        if a != b {
            let what = format!(
                "fuzzed server: {}\n    fresh server:  {}",
                printable(a.to_string().as_bytes(), 1500),
                printable(b.to_string().as_bytes(), 1500)
            );
            failures.push(Failure {
                index: budget,
                class: format!("final check: `{name}` differs from a fresh server's"),
                what,
                req: None,
            });
        }
    }
    // and the fuzzed server still goes down cleanly
    let bye = Req::json("POST", "/v1/shutdown", Auth::Bearer, &json!({}));
    let said = t.send(&bye);
    match t.exit_within(120) {
        Some(s) if s.success() => {}
        other => {
            let answer = match said {
                Outcome::Answer { status, body, .. } => format!("{status} {}", printable(&body, 300)),
                Outcome::Held => "held".into(),
                Outcome::Broken(e) => e,
            };
            failures.push(Failure {
                index: budget,
                class: "POST /v1/shutdown after the fuzz: no clean exit".into(),
                what: format!("answer {answer}, exit {other:?}"),
                req: Some(bye),
            });
        }
    }
    for p in panics(&t.new_log()) {
        failures.push(Failure {
            index: budget,
            class: "final check or shutdown: a server thread panics".into(),
            what: p,
            req: None,
        });
    }
    eprintln!("fuzz: done in {:.1} s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", report(seed, &failures));
}
