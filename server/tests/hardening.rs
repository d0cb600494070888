//! Bad input changes nothing and shutdown always saves: one regression test per fault that
//! probing the server from outside found (issue 32), each named after what it guards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod common;

use common::{batch, home, respond, train_step, Server};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

fn quiet(name: &str) -> Server {
    Server::start(&home(name), &["--idle-timeout", "0", "--autosave-every", "0"])
}

/// A raw call with any header set (the Tinker routes' key, another scheme).
fn call(s: &Server, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> (u16, Value) {
    let mut req = ureq::request(method, &format!("{}{path}", s.url));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    respond(match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    })
}

fn tinker_key(s: &Server) -> String {
    format!("tml-{}", s.token)
}

fn runs(s: &Server) -> Vec<Value> {
    s.get("/v1/runs").1.as_array().cloned().unwrap_or_default()
}

fn step_of(s: &Server, run: &str) -> Option<u64> {
    runs(s).iter().find(|r| r["id"] == run).and_then(|r| r["step"].as_u64())
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn a_streamed_completion_with_a_huge_n_is_refused_before_anything_is_allocated() {
    let s = quiet("huge-n");
    s.ok("/v1/runs", &json!({"name": "r1"}));
    for stream in [true, false] {
        for n in [10_000_000_000u64, 10_000_000, 257] {
            let (status, body) =
                s.post("/v1/completions", &json!({"model": "r1", "prompt": "x", "stream": stream, "n": n}));
            assert_eq!(status, 400, "stream {stream}, n {n}: {body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("--max-samples"), "{body}");
            let (status, body) = s.post(
                "/v1/chat/completions",
                &json!({"model": "r1", "messages": [{"role": "user", "content": "x"}], "stream": stream, "n": n}),
            );
            assert_eq!(status, 400, "chat, stream {stream}, n {n}: {body}");
        }
    }
    assert_eq!(s.get("/v1/ping").0, 200, "the server is up");
    // the streamed and unstreamed answers to the same bad request are the same plain 400
    let bad = |stream: bool| {
        s.post("/v1/completions", &json!({"model": "r1", "prompt": "x", "stream": stream, "max_tokens": 5000}))
    };
    assert_eq!(bad(true), bad(false));
}

#[test]
fn deleting_the_checkpoint_at_the_current_step_does_not_lose_training() {
    let h = home("delete-ck");
    let s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r1"}));
    for i in 0..4 {
        train_step(&s, "r1", i);
    }
    s.ok("/v1/runs/r1/save_state", &json!({"name": "keep", "kind": "state"}));
    let key = tinker_key(&s);
    let (status, body) =
        call(&s, "DELETE", "/api/v1/training_runs/r1/checkpoints/weights/keep", &[("X-API-Key", &key)], None);
    assert_eq!(status, 200, "{body}");
    let mut s = s;
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(120).success());
    let s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    assert_eq!(step_of(&s, "r1"), Some(4), "the run is back where it was: {:?}", runs(&s));
    assert_eq!(s.get("/v1/runs/r1/metrics").1["rows"].as_array().unwrap().len(), 4);
}

#[test]
fn lora_rank_alpha_and_target_modules_are_bounded() {
    let s = quiet("lora-bounds");
    let lora = |rank: u64, alpha: f64, modules: Value| json!({"name": "x", "training": {"kind": "lora", "rank": rank, "alpha": alpha, "target_modules": modules}});
    let all = json!(["q_proj", "v_proj"]);
    for (body, says) in [
        (lora(100_000, 32.0, all.clone()), "--max-lora-rank"),
        (lora(0, 32.0, all.clone()), "rank"),
        (lora(8, 1e39, all.clone()), "alpha"),
        (lora(8, -1.0, all.clone()), "alpha"),
        (lora(8, 32.0, json!([])), "target_modules is empty"),
        (lora(8, 32.0, json!(["q_proj", "q_proj"])), "twice"),
    ] {
        let (status, e) = s.post("/v1/runs", &body);
        assert_eq!(status, 400, "{body}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(says), "{body}: {e}");
    }
    assert!(runs(&s).is_empty(), "nothing was created: {:?}", runs(&s));
    s.ok("/v1/runs", &lora(8, 16.0, all));
}

#[test]
fn oversized_text_and_batches_are_refused_before_any_work() {
    let s = quiet("oversized");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let before = rss_bytes(s.child.id());
    let big = "x".repeat(10 << 20);
    let (status, e) = s.post("/v1/tokenize", &json!({"text": big}));
    assert_eq!(status, 413, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("--max-text-bytes"), "{e}");
    let (status, e) = s.post("/v1/render_chat", &json!({"messages": [{"role": "user", "content": big}]}));
    assert_eq!(status, 413, "{e}");
    let (status, e) = s.post("/v1/completions", &json!({"model": "r", "prompt": big, "max_tokens": 1}));
    assert_eq!(status, 413, "{e}");
    let (status, e) =
        s.post("/v1/chat/completions", &json!({"model": "r", "messages": [{"role": "user", "content": big}]}));
    assert_eq!(status, 413, "{e}");
    // 64 datums of 1024 tokens: 65,536 tokens, twice the default limit
    let row: Vec<u32> = (0..1024).map(|i| i % 200).collect();
    let datum = json!({"model_input": row, "loss_fn_inputs": {"target_tokens": row, "weights": vec![1.0; 1024]}});
    let (status, e) =
        s.post("/v1/runs/r/forward_backward", &json!({"data": vec![datum; 64], "loss_fn": "cross_entropy"}));
    assert_eq!(status, 413, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("65536 tokens")
            && e["error"]["message"].as_str().unwrap().contains("--max-request-tokens"),
        "{e}"
    );
    let after = rss_bytes(s.child.id());
    assert!(after < before + (256 << 20), "the refusals cost {} MB", (after.saturating_sub(before)) >> 20);
    assert_eq!(step_of(&s, "r"), Some(0));
    let (_, m) = s.get("/v1/runs/r/metrics");
    assert!(m["rows"].as_array().unwrap().is_empty());
}

#[test]
fn memory_of_a_large_request_is_given_back_once_the_server_is_idle() {
    let s = quiet("give-back");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let pid = s.child.id();
    let baseline = rss_bytes(pid);
    // a batch at the limit: its activations and logits are freed when it ends
    let row: Vec<u32> = (0..1024).map(|i| i % 200).collect();
    let datum = json!({"model_input": row, "loss_fn_inputs": {"target_tokens": row, "weights": vec![1.0; 1024]}});
    s.ok("/v1/runs/r/forward", &json!({"data": vec![datum; 32], "loss_fn": "cross_entropy"}));
    let peak = rss_bytes(pid);
    assert!(
        peak > baseline + (64 << 20),
        "the batch should take memory: baseline {} MB, after {} MB",
        baseline >> 20,
        peak >> 20
    );
    let t0 = Instant::now();
    let mut now = peak;
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
        now = rss_bytes(pid);
        if now < baseline + (peak - baseline) / 2 {
            break;
        }
    }
    assert!(
        now < baseline + (peak - baseline) / 2,
        "resident memory stayed at {} MB (baseline {} MB, peak {} MB)",
        now >> 20,
        baseline >> 20,
        peak >> 20
    );
}

#[test]
fn a_learning_rate_that_would_wreck_the_weights_is_refused_and_changes_nothing() {
    let s = quiet("huge-lr");
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    let probe = json!({"prompt": [104, 105], "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 5}});
    let before = s.ok("/v1/runs/r/sample", &probe);
    s.ok("/v1/runs/r/forward_backward", &batch("one more batch"));
    let (status, e) = s.post("/v1/runs/r/optim_step", &json!({"learning_rate": 1e30}));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("learning_rate"), "{e}");
    assert_eq!(step_of(&s, "r"), Some(1));
    assert_eq!(s.ok("/v1/runs/r/sample", &probe), before, "the weights did not change");
    // the gradients are still there: a sane step applies them
    assert_eq!(s.ok("/v1/runs/r/optim_step", &json!({"learning_rate": 1e-3}))["step"], 2);
    let after = s.ok("/v1/runs/r/sample", &probe);
    assert!(
        after["sequences"][0]["logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().is_some_and(f64::is_finite)),
        "{after}"
    );
}

#[test]
fn shutdown_does_not_wait_for_a_half_sent_request() {
    let h = home("half-sent");
    let mut s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0", "--shutdown-grace-s", "1"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n").unwrap();
    // and a stream nobody reads
    let mut unread = std::net::TcpStream::connect(&addr).unwrap();
    let body = json!({"model": "r", "prompt": "x", "stream": true, "max_tokens": 1000, "n": 64}).to_string();
    write!(unread, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", s.token, body.len()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGTERM);
    let status = s.wait_exit(120);
    assert!(status.success(), "{status}");
    let session: Value = serde_json::from_str(&std::fs::read_to_string(h.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["state"], "stopped", "{session}");
    drop((half, unread));
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    assert_eq!(step_of(&s, "r"), Some(1));
}

#[test]
fn sigterm_cancels_a_running_sample_and_saves() {
    let h = home("sigterm-sample");
    let mut s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    let long = json!({"prompt": [104, 105], "num_samples": 128, "sampling_params": {"max_tokens": 1000, "temperature": 1.0, "seed": 1}});
    let (_, queued) = s.post("/v1/runs/r/sample?wait=false", &long);
    let id = queued["request_id"].as_u64().unwrap();
    let t0 = Instant::now();
    while s.get(&format!("/v1/requests/{id}")).1["state"] != "running" {
        assert!(t0.elapsed() < Duration::from_secs(60), "the sample never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // the waiter sees how the sample ended: interrupted, not finished
    let url = format!("{}/v1/requests/{id}?timeout_s=120", s.url);
    let token = s.token.clone();
    let waiter =
        std::thread::spawn(move || respond(ureq::get(&url).set("Authorization", &format!("Bearer {token}")).call()));
    std::thread::sleep(Duration::from_millis(100));
    s.signal(libc::SIGTERM);
    let (_, ended) = waiter.join().unwrap();
    assert_eq!(ended["state"], "failed", "the sample ran to the end instead of being cancelled: {ended}");
    assert_eq!(ended["error"]["kind"], "interrupted", "{ended}");
    assert!(s.wait_exit(120).success());
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    assert_eq!(step_of(&s, "r"), Some(1));
}

#[test]
fn max_tokens_at_the_top_of_usize_is_refused_in_all_three_protocols() {
    let s = quiet("max-tokens-wrap");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let huge = u64::MAX;
    let (status, e) =
        s.post("/v1/runs/r/sample", &json!({"prompt": [104, 105], "sampling_params": {"max_tokens": huge}}));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("context (1024)"), "{e}");
    for stream in [false, true] {
        let (status, e) =
            s.post("/v1/completions", &json!({"model": "r", "prompt": "hi", "max_tokens": huge, "stream": stream}));
        assert_eq!(status, 400, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("context (1024)"), "{e}");
    }
    // Tinker: the sampler's future fails as the caller's error
    let key = tinker_key(&s);
    let hdr = [("X-API-Key", key.as_str())];
    let (_, sess) = call(
        &s,
        "POST",
        "/api/v1/create_session",
        &hdr,
        Some(&json!({"tags": [], "user_metadata": null, "sdk_version": "0.38.0", "type": "create_session"})),
    );
    let sid = sess["session_id"].as_str().unwrap().to_string();
    let (status, sampler) = call(
        &s,
        "POST",
        "/api/v1/create_sampling_session",
        &hdr,
        Some(&json!({"session_id": sid, "sampling_session_seq_id": 0, "base_model": "tiny"})),
    );
    assert_eq!(status, 200, "{sampler}");
    let body = json!({"sampling_session_id": sampler["sampling_session_id"], "seq_id": 1, "num_samples": 1,
                      "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]}, "sampling_params": {"max_tokens": huge}});
    let (status, fut) = call(&s, "POST", "/api/v1/asample", &hdr, Some(&body));
    assert_eq!(status, 200, "{fut}");
    let (_, out) = call(&s, "POST", "/api/v1/retrieve_future", &hdr, Some(&json!({"request_id": fut["request_id"]})));
    assert_eq!(out["category"], "user", "{out}");
    assert!(out["error"].as_str().unwrap().contains("context (1024)"), "{out}");
}

#[test]
fn a_request_whose_client_went_away_is_cancelled() {
    let s = quiet("client-gone");
    s.ok("/v1/runs", &json!({"name": "r"})); // request 1
                                             // 128 × 900 tokens: seconds of work on the tiny model, far past the client's patience
    let long = json!({"model": "r", "messages": [{"role": "user", "content": "hi"}], "n": 128, "max_tokens": 900, "temperature": 1.0});
    let impatient = ureq::AgentBuilder::new().timeout(Duration::from_millis(300)).build();
    let r = impatient
        .post(&format!("{}/v1/chat/completions", s.url))
        .set("Authorization", &format!("Bearer {}", s.token))
        .send_json(long);
    assert!(r.is_err(), "the client gave up");
    // request 2 is that chat's sample: it ends interrupted instead of running to the end
    let (_, ended) = s.get("/v1/requests/2?timeout_s=120");
    assert_eq!(ended["op"], "sample", "{ended}");
    assert_eq!(ended["state"], "failed", "the abandoned sample ran to the end: {ended}");
    assert_eq!(ended["error"]["kind"], "interrupted", "{ended}");
    // and a native blocking call the same
    let native =
        json!({"prompt": [104, 105], "num_samples": 128, "sampling_params": {"max_tokens": 900, "temperature": 1.0}});
    let r = impatient
        .post(&format!("{}/v1/runs/r/sample", s.url))
        .set("Authorization", &format!("Bearer {}", s.token))
        .send_json(native);
    assert!(r.is_err());
    let (_, ended) = s.get("/v1/requests/3?timeout_s=120");
    assert_eq!(ended["error"]["kind"], "interrupted", "{ended}");
}

/// A tmpfs mounted for the test (root only), unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .status()
            .ok()?
            .success();
        ok.then(|| SmallDisk(at.to_path_buf()))
    }

    /// Takes every free byte.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![7u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_server_fault_and_shutdown_says_which_steps_were_lost() {
    let h = home("full-disk");
    // the run's folder lives on a 16 MB tmpfs; the registry and the model stay on the real disk
    let Some(disk) = SmallDisk::mount(&h.join("small"), 16 << 20) else {
        eprintln!("SKIPPED a_full_disk_is_a_server_fault_and_shutdown_says_which_steps_were_lost: mounting a tmpfs needs root");
        return;
    };
    std::fs::create_dir_all(h.join("runs")).unwrap();
    std::os::unix::fs::symlink(h.join("small"), h.join("runs/r")).unwrap();
    let mut s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    s.ok("/v1/runs/r/save_state", &json!({"name": "first", "kind": "state"}));
    train_step(&s, "r", 1);
    train_step(&s, "r", 2);
    disk.fill();
    let (status, e) = s.post("/v1/runs/r/save_state", &json!({"name": "full", "kind": "state"}));
    assert_eq!((status, e["error"]["kind"].as_str()), (507, Some("disk_full")), "{e}");
    let (status, e) = s.post("/v1/autosave", &json!({}));
    assert_eq!(status, 507, "{e}");
    assert_eq!(e["failed"][0]["run"], "r", "{e}");
    assert_eq!(e["failed"][0]["step"], 3, "{e}");
    s.signal(libc::SIGTERM);
    let exit = s.wait_exit(120);
    assert!(!exit.success(), "a shutdown that could not save exits non-zero");
    let session: Value = serde_json::from_str(&std::fs::read_to_string(h.join("session.json")).unwrap()).unwrap();
    let why = session["stop_reason"].as_str().unwrap();
    assert!(why.contains("NOT SAVED") && why.contains("run r at step 3 (last saved: step 1)"), "{session}");
    disk.free();
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    let (_, info) = s.get("/v1/info");
    let resumed = info["resumed"].as_array().unwrap().iter().find(|r| r["run"] == "r").cloned().unwrap();
    assert_eq!(resumed["step"], 1, "{info}");
    assert_eq!(resumed["lost_steps"], json!([2, 3]), "{info}");
}

#[test]
fn load_state_answers_alike_for_every_folder_that_is_not_a_checkpoint() {
    let s = quiet("load-paths");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let answer = |source: &str| {
        let (status, e) = s.post("/v1/runs/r/load_state", &json!({"source": source}));
        (status, e["error"]["message"].as_str().unwrap_or_default().replace(&format!("{source:?}"), "SOURCE"))
    };
    let missing = answer("/no/such/folder");
    assert_eq!(missing.0, 400, "{missing:?}");
    for source in ["/etc", "/", "/proc/self", "../../etc", "nope", "r/nope"] {
        assert_eq!(answer(source), missing, "{source}");
    }
}

#[test]
fn rejections_and_wrong_methods_answer_in_the_error_envelope() {
    let s = quiet("envelope");
    for (method, path) in [
        ("GET", "/v1/runs/r/forward"),
        ("DELETE", "/v1/runs"),
        ("GET", "/v1/requests/not-a-number"),
        ("GET", "/v1/requests/1?timeout_s=soon"),
    ] {
        let (status, e) = call(&s, method, path, &[("Authorization", &format!("Bearer {}", s.token))], None);
        assert!((400..500).contains(&status), "{method} {path}: {status}");
        assert!(e["error"]["kind"].is_string() && e["error"]["message"].is_string(), "{method} {path}: {status} {e}");
    }
    let key = tinker_key(&s);
    let (status, e) = call(&s, "GET", "/api/v1/training_runs?limit=many", &[("X-API-Key", &key)], None);
    assert_eq!(status, 400);
    assert!(e["detail"].is_string(), "{e}");
    let (status, e) = call(&s, "GET", "/api/v1/forward_backward", &[("X-API-Key", &key)], None);
    assert_eq!(status, 405);
    assert!(e["detail"].is_string(), "{e}");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let s = quiet("bearer-case");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (status, _) = call(&s, "GET", "/v1/runs", &[("Authorization", &format!("{scheme} {}", s.token))], None);
        assert_eq!(status, 200, "{scheme}");
    }
    let (status, _) = call(&s, "GET", "/v1/runs", &[("Authorization", &format!("Basic {}", s.token))], None);
    assert_eq!(status, 401);
}

#[test]
fn completions_logprobs_above_one_is_refused_not_shrunk() {
    let s = quiet("logprobs-n");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let (status, e) = s.post("/v1/completions", &json!({"model": "r", "prompt": "hi", "max_tokens": 2, "logprobs": 5}));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("logprobs = 5"), "{e}");
    let ok = s.ok("/v1/completions", &json!({"model": "r", "prompt": "hi", "max_tokens": 2, "logprobs": 1}));
    assert_eq!(ok["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(), 2);
}

#[test]
fn a_name_archived_by_no_resume_can_be_used_again() {
    let h = home("archived-name");
    let mut s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    train_step(&s, "r", 0);
    s.ok("/v1/runs/r/save_state", &json!({"name": "mine", "kind": "state"}));
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(120).success());
    let s = Server::start(&h, &["--idle-timeout", "0", "--no-resume"]);
    assert!(runs(&s).is_empty());
    let again = s.ok("/v1/runs", &json!({"name": "r"}));
    assert_eq!(again["step"], 0);
    assert!(
        s.get("/v1/runs/r/metrics").1["rows"].as_array().unwrap().is_empty(),
        "the old run's metrics are not the new run's"
    );
    let moved: Vec<_> = std::fs::read_dir(h.join("archive")).unwrap().flatten().collect();
    assert_eq!(moved.len(), 1, "the archived run's files were moved aside, not deleted");
    assert!(moved[0].path().join("checkpoints/mine/hearth.json").is_file());
}

#[test]
fn a_restarted_server_lists_every_run_before_it_answers_anything() {
    let h = home("listed-at-once");
    let mut s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    let names: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    for n in &names {
        s.ok("/v1/runs", &json!({"name": n}));
        train_step(&s, n, 0);
    }
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(120).success());
    for round in 0..3 {
        let s = Server::start(&h, &["--idle-timeout", "0"]);
        let listed = runs(&s);
        for n in &names {
            assert!(
                listed.iter().any(|r| r["id"] == *n),
                "round {round}: {n} missing from the first GET /v1/runs: {listed:?}"
            );
        }
        let (_, models) = s.get("/v1/models");
        assert_eq!(models["data"].as_array().unwrap().len(), names.len(), "round {round}: {models}");
        drop(s);
    }
}

/// One request on a kept-alive connection, its body written `body_delay` after its head; the
/// response's status line.
fn raw_post(conn: &mut std::net::TcpStream, path: &str, auth: &str, body: &str, body_delay: Duration) -> String {
    use std::io::Read;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if let Err(e) = conn.write_all(head.as_bytes()) {
        return format!("connection closed: {e}");
    }
    std::thread::sleep(body_delay);
    if let Err(e) = conn.write_all(body.as_bytes()) {
        return format!("connection closed: {e}");
    }
    // read one response: its head, then Content-Length bytes of body
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => return format!("connection closed after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    let mut rest = vec![0u8; len];
    conn.read_exact(&mut rest).unwrap();
    head.lines().next().unwrap_or_default().to_string()
}

/// A handler that needs no body (a Tinker session, telemetry, a cancel) still reads it before
/// answering: hyper keeps a connection alive only if the request's body was read by then, so a
/// body that arrives a moment after its head (a loaded machine, a client that writes head and
/// body apart) would close the connection under a client about to send its next request on it.
#[test]
fn a_body_that_arrives_after_its_head_keeps_the_connection_alive() {
    let s = quiet("late-body");
    let addr = s.url.trim_start_matches("http://").to_string();
    let tinker = format!("X-API-Key: tml-{}", s.token);
    let bearer = format!("Authorization: Bearer {}", s.token);
    for (path, auth) in [
        ("/api/v1/create_session", tinker.as_str()),
        ("/api/v1/telemetry", tinker.as_str()),
        ("/api/v1/client/config", tinker.as_str()),
        ("/v1/cancel", bearer.as_str()),
    ] {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        for i in 0..3 {
            let status = raw_post(&mut conn, path, auth, "{}", Duration::from_millis(200));
            assert!(status.starts_with("HTTP/1.1 200"), "{path}, request {i} on one connection: {status}");
        }
    }
}
