//! Tinker's wire protocol (`/api/v1`) as a client sees it, on the real server: every answer uses
//! up its `seq_id` (an error too), a far-ahead `seq_id` changes nothing, a gap fails only the
//! requests behind it, and a future is keyed by what its request asked.
//!
//! The servers run with a 3 s gap wait: a request that waited for a hole would fail after it,
//! so a next request that succeeds within it did not wait.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{home, respond, Server};
use hearth_server::tinker::proto;
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

/// `--tinker-gap-wait-s` of the servers here.
const GAP_S: u64 = 3;
/// `--max-body-bytes` of the servers here.
const MAX_BODY: usize = 100_000;
const TEXT: &str = "hearth keeps the model warm";

/// A server and a client that speaks to it as the SDK does (`X-API-Key: tml-<token>`).
struct Tinker {
    server: Server,
    agent: ureq::Agent,
}

impl Tinker {
    fn start(name: &str) -> Tinker {
        let (gap, max_body) = (GAP_S.to_string(), MAX_BODY.to_string());
        let args = [
            "--idle-timeout",
            "0",
            "--autosave-every",
            "0",
            "--tinker-gap-wait-s",
            &gap,
            "--max-body-bytes",
            &max_body,
        ];
        let server = Server::start(&home(name), &args);
        Tinker { server, agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build() }
    }

    fn request(&self, path: &str) -> ureq::Request {
        self.agent
            .post(&format!("{}/api/v1/{path}", self.server.url))
            .set("X-API-Key", &format!("tml-{}", self.server.token))
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        respond(self.request(path).send_json(body.clone()))
    }

    fn post_proto(&self, path: &str, body: &[u8]) -> (u16, Value) {
        respond(self.request(path).set("Content-Type", "application/x-protobuf").send_bytes(body))
    }

    /// A request that must be accepted: its future's id.
    fn accepted(&self, (status, body): (u16, Value)) -> String {
        assert_eq!(status, 200, "{body}");
        body["request_id"].as_str().unwrap().to_string()
    }

    /// A future's outcome, polled through `try_again`: its body (JSON or protobuf), or the error.
    fn result(&self, request_id: &str) -> Result<Vec<u8>, String> {
        loop {
            match self.request("retrieve_future").send_json(json!({"request_id": request_id})) {
                Ok(resp) => {
                    let json = resp.content_type() == "application/json";
                    let mut bytes = Vec::new();
                    resp.into_reader().read_to_end(&mut bytes).unwrap();
                    if json {
                        let v: Value = serde_json::from_slice(&bytes).unwrap();
                        if let Some(e) = v.get("error") {
                            return Err(e.to_string());
                        }
                    }
                    return Ok(bytes);
                }
                Err(ureq::Error::Status(408, _)) => continue,
                Err(e) => panic!("retrieve_future {request_id}: {e}"),
            }
        }
    }

    fn session(&self) -> String {
        let (status, body) = self.post("create_session", &json!({}));
        assert_eq!(status, 200, "{body}");
        body["session_id"].as_str().unwrap().to_string()
    }

    /// A new LoRA model, created: its id.
    fn create_model(&self) -> String {
        let session = self.session();
        let (status, body) = self.post(
            "create_model",
            &json!({"session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4}}),
        );
        assert_eq!(status, 200, "{body}");
        self.result(body["request_id"].as_str().unwrap()).unwrap();
        body["model_id"].as_str().unwrap().to_string()
    }

    /// `forward_backward` at `seq_id` is accepted and succeeds: it did not wait for a `seq_id`
    /// that will never come (that wait ends in a failure naming the missing id, not in a result,
    /// so no clock is needed to tell).
    fn runs_promptly(&self, model_id: &str, seq_id: i32) {
        let id = self.accepted(self.post_proto("forward_backward", &fb(model_id, seq_id, TEXT)));
        let outcome = self.result(&id);
        assert!(outcome.is_ok(), "seq_id {seq_id} failed: {outcome:?}");
    }
}

/// A `forward_backward` request over `text`'s bytes (cross-entropy), as the SDK encodes it.
fn fb(model_id: &str, seq_id: i32, text: &str) -> Vec<u8> {
    let t: Vec<i32> = text.bytes().map(i32::from).collect();
    let n = t.len() - 1;
    let tensor = |dtype: proto::DType, bytes: Vec<u8>| proto::Tensor {
        encoding: Some(proto::tensor::Encoding::Dense(bytes)),
        dtype: dtype as i32,
        shape: vec![n as i64],
    };
    proto::ForwardBackwardRequest {
        model_id: model_id.into(),
        seq_id,
        data: vec![proto::Datum {
            model_input: vec![proto::Chunk {
                chunk: Some(proto::chunk::Kind::EncodedText(proto::EncodedTextChunk {
                    tokens: proto::i32_bytes(t[..n].iter().copied()),
                })),
            }],
            loss_fn_inputs: HashMap::from([
                (
                    "target_tokens".to_string(),
                    tensor(proto::DType::Int64, t[1..].iter().flat_map(|&x| i64::from(x).to_le_bytes()).collect()),
                ),
                ("weights".to_string(), tensor(proto::DType::Float32, proto::f32_bytes(&vec![1.0; n]))),
            ]),
        }],
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn optim(model_id: &str, seq_id: i64) -> Value {
    json!({"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 1e-3}, "type": "optim_step"})
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[test]
fn a_rejected_forward_backward_consumes_its_seq_id() {
    let t = Tinker::start("tinker-rejected-fb");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    // model_id and seq_id 2 come first, then bytes that do not decode
    let mut bad = fb(&m, 2, TEXT);
    bad.extend_from_slice(b"\xff\xff\xff\x01");
    let (status, body) = t.post_proto("forward_backward", &bad);
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("protobuf"), "{body}");
    t.runs_promptly(&m, 3);
    // seq_id 2 was answered: it is never run
    let (status, body) = t.post_proto("forward_backward", &fb(&m, 2, TEXT));
    assert_eq!(status, 409, "{body}");
}

#[test]
fn an_oversized_body_consumes_its_seq_id() {
    let t = Tinker::start("tinker-oversized");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    let big = fb(&m, 2, &"x".repeat(8_000));
    assert!(big.len() > MAX_BODY);
    let (status, body) = t.post_proto("forward_backward", &big);
    assert_eq!(status, 413, "{body}");
    assert!(detail(&body).contains("max-body-bytes"), "{body}");
    t.runs_promptly(&m, 3);
}

#[test]
fn save_weights_without_a_path_consumes_its_seq_id() {
    let t = Tinker::start("tinker-save-no-path");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    let (status, body) = t.post("save_weights", &json!({"model_id": m, "seq_id": 2, "type": "save_weights"}));
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("path"), "{body}");
    t.runs_promptly(&m, 3);
}

#[test]
fn a_json_body_that_fails_typed_parsing_consumes_its_seq_id() {
    let t = Tinker::start("tinker-bad-json");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    let (status, body) =
        t.post("optim_step", &json!({"model_id": m, "seq_id": 2, "adam_params": {"learning_rate": "fast"}}));
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("adam_params.learning_rate"), "{body}");
    let id = t.accepted(t.post("optim_step", &optim(&m, 3)));
    let outcome = t.result(&id);
    assert!(outcome.is_ok(), "seq_id 3: {outcome:?}");
}

#[test]
fn a_far_ahead_seq_id_is_refused_and_changes_nothing() {
    let t = Tinker::start("tinker-far-ahead");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    let (status, body) = t.post("optim_step", &optim(&m, 50_000));
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("too far ahead") && detail(&body).contains("1024"), "{body}");
    // long after the gap wait, the order is where the client left it
    std::thread::sleep(Duration::from_secs(GAP_S + 1));
    t.runs_promptly(&m, 2);
    let id = t.accepted(t.post("optim_step", &optim(&m, 3)));
    t.result(&id).unwrap();
}

#[test]
fn a_gap_timeout_fails_the_waiter_but_keeps_the_order() {
    let t = Tinker::start("tinker-gap");
    let m = t.create_model();
    t.runs_promptly(&m, 1);
    let three = fb(&m, 3, TEXT);
    let id3 = t.accepted(t.post_proto("forward_backward", &three));
    let failed = t.result(&id3).unwrap_err();
    assert!(failed.contains("seq_id 3 waited") && failed.contains("for seq_id 2, which never came"), "{failed}");
    // seq_id 2 comes late: it runs, and the order goes on past the failed 3
    t.runs_promptly(&m, 2);
    t.runs_promptly(&m, 4);
    // a retry of 3 gets its (failed) future
    assert_eq!(t.accepted(t.post_proto("forward_backward", &three)), id3);
}

#[test]
fn a_different_body_under_a_used_seq_id_is_a_conflict() {
    let t = Tinker::start("tinker-conflict");
    let m = t.create_model();
    let first = fb(&m, 1, TEXT);
    let id = t.accepted(t.post_proto("forward_backward", &first));
    // a retry (the same body) gets the same future
    assert_eq!(t.accepted(t.post_proto("forward_backward", &first)), id);
    t.result(&id).unwrap();
    let (status, body) = t.post_proto("forward_backward", &fb(&m, 1, "another text entirely"));
    assert_eq!(status, 409, "{body}");
    assert!(detail(&body).contains("seq_id 1 "), "{body}");
    let (status, body) = t.post("optim_step", &optim(&m, 1));
    assert_eq!(status, 409, "{body}");
    t.runs_promptly(&m, 2);
}

/// A sampling session on the base model.
fn sampler(t: &Tinker) -> String {
    let session = t.session();
    let (status, body) = t.post(
        "create_sampling_session",
        &json!({"session_id": session, "sampling_session_seq_id": 0, "base_model": "tiny"}),
    );
    assert_eq!(status, 200, "{body}");
    body["sampling_session_id"].as_str().unwrap().to_string()
}

/// An `asample` body: `max_tokens` tokens after a short prompt, no stop.
fn asample(sampler: &str, max_tokens: usize, seq_id: Option<i64>) -> Value {
    let mut v = json!({
        "sampling_session_id": sampler,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 101, 97]}]},
        "num_samples": 1,
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "stop": []},
    });
    if let Some(s) = seq_id {
        v["seq_id"] = json!(s);
    }
    v
}

/// How many tokens a sample future's first sequence has.
fn sampled_tokens(t: &Tinker, request_id: &str) -> usize {
    let bytes = t.result(request_id).unwrap();
    proto::SampleResponse::decode(&bytes[..]).unwrap().sequences[0].tokens.len() / 4
}

#[test]
fn asample_without_seq_id_is_never_a_stale_future() {
    let t = Tinker::start("tinker-asample-no-seq");
    let s = sampler(&t);
    let two = t.accepted(t.post("asample", &asample(&s, 2, None)));
    let five = t.accepted(t.post("asample", &asample(&s, 5, None)));
    assert_ne!(two, five);
    assert_eq!((sampled_tokens(&t, &two), sampled_tokens(&t, &five)), (2, 5));
    // not even the same body twice: without a seq_id, each request is its own
    assert_ne!(t.accepted(t.post("asample", &asample(&s, 2, None))), two);
}

#[test]
fn asample_under_a_used_seq_id_is_keyed_by_its_body() {
    let t = Tinker::start("tinker-asample-seq");
    let s = sampler(&t);
    let id = t.accepted(t.post("asample", &asample(&s, 2, Some(7))));
    assert_eq!(t.accepted(t.post("asample", &asample(&s, 2, Some(7)))), id);
    let (status, body) = t.post("asample", &asample(&s, 5, Some(7)));
    assert_eq!(status, 409, "{body}");
    assert!(detail(&body).contains("seq_id 7 "), "{body}");
    assert_eq!(sampled_tokens(&t, &id), 2);
}
