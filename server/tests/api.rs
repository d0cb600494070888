//! The HTTP API: auth, the bad-input matrix, ordering under concurrency, futures and cancel,
//! checkpoints by name and path, text routes, TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{batch, home, train_step, Server};
use serde_json::{json, Value};

#[test]
fn every_request_needs_the_token() {
    let s = Server::start(&home("auth"), &["--idle-timeout", "0"]);
    let agent = ureq::agent();
    let (status, body) = common::respond(agent.get(&format!("{}/v1/info", s.url)).call());
    assert_eq!(status, 401);
    assert_eq!(body["error"]["kind"], "unauthorized");
    let (status, _) =
        common::respond(agent.get(&format!("{}/v1/info", s.url)).set("Authorization", "Bearer nope").call());
    assert_eq!(status, 401);
    let (status, _) = common::respond(agent.post(&format!("{}/v1/shutdown", s.url)).call());
    assert_eq!(status, 401, "shutdown needs the token too");
    assert_eq!(s.get("/v1/ping").0, 200);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(s.home.join("session.json")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the session file holds the token");
}

#[test]
fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let s = Server::start(&home("bad-input"), &["--idle-timeout", "0", "--max-body-bytes", "20000"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    let probe = batch("the same forward twice");
    let before = s.ok("/v1/runs/r/forward", &probe);

    let good = |f: &dyn Fn(&mut Value)| {
        let mut b = batch("hello there");
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("forward_backward", good(&|b| b["data"][0]["model_input"][2] = json!(100000)).to_string().into_bytes(), 400, "out of range"),
        ("forward_backward", good(&|b| { b["data"][0]["loss_fn_inputs"]["weights"].as_array_mut().unwrap().pop(); }).to_string().into_bytes(), 400, "weights has"),
        ("forward_backward", good(&|b| b["loss_fn"] = json!("hinge")).to_string().into_bytes(), 400, "unknown loss_fn `hinge`"),
        ("forward_backward", br#"{"data":[{"model_input":[1,2],"loss_fn_inputs":{"target_tokens":[2,3],"logprobs":[-1,-1],"advantages":[NaN,1]}}],"loss_fn":"importance_sampling"}"#.to_vec(), 400, "request body"),
        ("forward_backward", good(&|b| b["data"][0]["loss_fn_inputs"]["weights"][0] = json!(0.5)).to_string().replacen("0.5", "1e400", 1).into_bytes(), 400, "request body"),
        ("sample", json!({"prompt": [1, 2], "sampling_params": {"max_tokens": -1}}).to_string().into_bytes(), 400, "max_tokens"),
        ("sample", json!({"prompt": [1, 2], "sampling_params": {"max_tokens": 0}}).to_string().into_bytes(), 400, "max_tokens"),
        ("optim_step", json!({"learning_rate": -1.0}).to_string().into_bytes(), 400, "learning_rate"),
        ("forward_backward", b"{\"data\": [".to_vec(), 400, "request body"),
        ("forward_backward", vec![b' '; 30000], 413, "larger than"),
        ("save_state", json!({"name": "../escape"}).to_string().into_bytes(), 400, "name"),
        ("load_state", json!({"source": "/nonexistent/checkpoint"}).to_string().into_bytes(), 400, "no such checkpoint"),
        ("frobnicate", b"{}".to_vec(), 404, "no operation"),
    ];
    for (op, body, want_status, want_msg) in &cases {
        let (status, err) = s.post_raw(&format!("/v1/runs/r/{op}"), body);
        assert_eq!(status, *want_status, "{op}: {err}");
        let msg = err["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want_msg), "{op}: `{msg}` should mention `{want_msg}`");
    }
    let (status, err) = s.post("/v1/runs/nobody/forward", &probe);
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["kind"], "not_found");
    let after = s.ok("/v1/runs/r/forward", &probe);
    assert_eq!(before, after, "a refused request must change nothing");
    let (_, runs) = s.get("/v1/runs");
    assert_eq!(runs[0]["step"], 1);
}

#[test]
fn concurrent_clients_keep_each_runs_order() {
    let s = Server::start(&home("concurrent"), &["--idle-timeout", "0"]);
    s.ok("/v1/runs", &json!({"name": "a"}));
    s.ok("/v1/runs", &json!({"name": "b"}));
    let s = std::sync::Arc::new(s);
    let handles: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|run| {
            let s = s.clone();
            std::thread::spawn(move || {
                // queue 10 steps without waiting, then collect them in order
                let mut ids = Vec::new();
                for i in 0..10 {
                    let (st, q) = s.post(
                        &format!("/v1/runs/{run}/forward_backward?wait=false"),
                        &batch(&format!("{run} text {i}")),
                    );
                    assert_eq!(st, 202, "{q}");
                    ids.push(q["request_id"].as_u64().unwrap());
                    let (st, q) =
                        s.post(&format!("/v1/runs/{run}/optim_step?wait=false"), &json!({"learning_rate": 1e-3}));
                    assert_eq!(st, 202);
                    ids.push(q["request_id"].as_u64().unwrap());
                }
                let mut steps = Vec::new();
                for id in ids {
                    let (_, r) = s.get(&format!("/v1/requests/{id}?timeout_s=60"));
                    assert_eq!(r["state"], "done", "{r}");
                    assert_eq!(r["run"], run);
                    if r["op"] == "optim_step" {
                        steps.push(r["result"]["step"].as_u64().unwrap());
                    }
                }
                steps
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), (1..=10).collect::<Vec<u64>>());
    }
}

#[test]
fn futures_can_be_cancelled_queued_or_while_sampling() {
    let s = Server::start(&home("cancel"), &["--idle-timeout", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    let long = json!({"prompt": [104, 105], "num_samples": 8, "sampling_params": {"max_tokens": 1000, "temperature": 1.0, "seed": 1}});
    let (_, running) = s.post("/v1/runs/r/sample?wait=false", &long);
    let (_, queued) = s.post("/v1/runs/r/forward_backward?wait=false", &batch("never runs"));
    let (rid, qid) = (running["request_id"].as_u64().unwrap(), queued["request_id"].as_u64().unwrap());
    // wait until the sample is running
    for _ in 0..200 {
        if s.get(&format!("/v1/requests/{rid}")).1["state"] == "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(s.ok(&format!("/v1/requests/{qid}/cancel"), &json!({}))["cancelled"], true);
    assert_eq!(s.ok(&format!("/v1/requests/{rid}/cancel"), &json!({}))["cancelled"], true);
    for id in [rid, qid] {
        let (_, r) = s.get(&format!("/v1/requests/{id}?timeout_s=60"));
        assert_eq!(r["state"], "failed", "{r}");
        assert_eq!(r["status"], 409);
        assert_eq!(r["error"]["kind"], "interrupted");
    }
    let (_, runs) = s.get("/v1/runs");
    assert_eq!(runs[0]["step"], 0);
    let fb = s.ok("/v1/runs/r/forward_backward", &batch("runs fine after"));
    assert!(fb["metrics"]["loss:sum"].as_f64().unwrap() > 0.0);
    let (status, _) = s.post("/v1/requests/999999/cancel", &json!({}));
    assert_eq!(status, 404);
}

#[test]
fn checkpoints_by_name_and_path_and_text_routes() {
    let s = Server::start(&home("checkpoints"), &["--idle-timeout", "0", "--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    let (status, dup) = s.post("/v1/runs", &json!({"name": "r"}));
    assert_eq!(status, 409, "{dup}");
    let auto = s.ok("/v1/runs", &json!({}));
    assert!(auto["id"].as_str().unwrap().starts_with("run-"));
    train_step(&s, "r", 0);
    let saved = s.ok("/v1/runs/r/save_state", &json!({"name": "one", "kind": "state"}));
    assert_eq!(saved["step"], 1);
    let adapter = s.ok("/v1/runs/r/save_state", &json!({"name": "one-adapter", "kind": "adapter"}));
    assert!(std::path::Path::new(adapter["path"].as_str().unwrap()).join("adapter_config.json").is_file());
    train_step(&s, "r", 1);
    let loaded = s.ok("/v1/runs/r/load_state", &json!({"source": "one"}));
    assert_eq!((loaded["step"].as_u64(), loaded["kind"].as_str()), (Some(1), Some("state")));
    let other = s.ok("/v1/runs", &json!({"name": "copy"}));
    assert_eq!(other["step"], 0);
    let by_path = s.ok("/v1/runs/copy/load_state", &json!({"source": adapter["path"]}));
    assert_eq!(by_path["kind"], "adapter");
    let (_, m) = s.get("/v1/runs/r/metrics");
    assert_eq!(m["rows"].as_array().unwrap().len(), 1, "metrics after the loaded step are dropped");

    let toks = s.ok("/v1/tokenize", &json!({"text": "héllo"}));
    let text = s.ok("/v1/detokenize", &json!({"tokens": toks["tokens"]}));
    assert_eq!(text["text"], "héllo");
    let chat = s.ok("/v1/render_chat", &json!({"messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(chat["text"], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(chat["tokens"][0], 257);
    let (status, _) = s.post("/v1/detokenize", &json!({"tokens": [5000]}));
    assert_eq!(status, 400);
}

#[test]
fn tls_serves_the_same_api() {
    let h = home("tls");
    let (cert, key) = (h.join("cert.pem"), h.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let s = Server::start(
        &h,
        &["--idle-timeout", "0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(s.url.starts_with("https://"));
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert", cert.to_str().unwrap(), "-H", &format!("Authorization: Bearer {}", s.token)])
        .arg(format!("{}/v1/ping", s.url.replace("127.0.0.1", "localhost")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"ok":true}"#);
}

#[test]
fn token_file_is_created_private_and_reused_and_a_second_server_is_refused() {
    let h = home("token-file");
    let token_file = h.join("secrets").join("token");
    let first_token = {
        let s = Server::start(&h, &["--idle-timeout", "0", "--token-file", token_file.to_str().unwrap()]);
        let on_disk = std::fs::read_to_string(&token_file).unwrap();
        assert_eq!(on_disk.trim(), s.token);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        // a second server on the same home is refused while this one runs
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
            .args(["--home", h.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("already running"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.ok("/v1/shutdown", &json!({}));
        let mut s = s;
        assert!(s.wait_exit(30).success());
        s.token.clone()
    };
    let s = Server::start(&h, &["--idle-timeout", "0", "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(s.token, first_token, "the token file is reused across restarts");
}

/// The GPU's code path on the CPU: a bf16 base trains, samples, saves every kind and resumes.
#[test]
fn a_bf16_base_trains_samples_saves_and_resumes() {
    let h = home("bf16");
    let s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0", "--dtype", "bf16"]);
    let (_, info) = s.get("/v1/info");
    assert!(info.to_string().to_lowercase().contains("bf16"), "{info}");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let losses: Vec<f64> = (0..6).map(|_| train_step(&s, "r", 0).0).collect();
    assert!(losses[5] < losses[0], "bf16 training lowers the loss: {losses:?}");
    let out = s.ok(
        "/v1/runs/r/sample",
        &json!({"prompt": [104, 101], "num_samples": 3, "sampling_params": {"max_tokens": 5, "temperature": 0.0}}),
    );
    let seqs = out["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 3);
    assert!(seqs.iter().all(|q| q["tokens"] == seqs[0]["tokens"] && q["tokens"].as_array().unwrap().len() == 5));
    for kind in ["state", "adapter", "merged"] {
        let saved = s.ok("/v1/runs/r/save_state", &json!({"name": format!("b-{kind}"), "kind": kind}));
        assert!(std::path::Path::new(saved["path"].as_str().unwrap()).is_dir(), "{saved}");
    }
    let before = s.ok("/v1/runs/r/forward", &common::batch("hearth keeps the model warm"));
    train_step(&s, "r", 0);
    s.ok("/v1/runs/r/load_state", &json!({"source": "b-state"}));
    let after = s.ok("/v1/runs/r/forward", &common::batch("hearth keeps the model warm"));
    assert_eq!(before["metrics"]["loss:sum"], after["metrics"]["loss:sum"], "load_state restores the bf16 run exactly");
}
