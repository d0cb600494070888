//! A class on one server: users added by the admin, each with runs of their own that no other
//! user can see or touch, and the server's controls kept for the admin. Everything against the
//! real binary on loopback; the Tinker and OpenAI clients' side is in tests/protocols.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod common;

use common::{add_user, batch, call, home, ok_as, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn post(s: &Server, token: &str, path: &str, body: Value) -> (u16, Value) {
    call(s, token, "POST", path, Some(&body))
}

fn get(s: &Server, token: &str, path: &str) -> (u16, Value) {
    call(s, token, "GET", path, None)
}

fn ok(s: &Server, token: &str, path: &str, body: Value) -> Value {
    ok_as(s, token, path, body)
}

fn step(s: &Server, token: &str, run: &str, text: &str) -> Value {
    ok(s, token, &format!("/v1/runs/{run}/forward_backward"), batch(text));
    ok(s, token, &format!("/v1/runs/{run}/optim_step"), json!({"learning_rate": 5e-3}))
}

fn run_ids(s: &Server, token: &str) -> Vec<String> {
    let (status, v) = get(s, token, "/v1/runs");
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

/// Every file under `dir` with its bytes, for comparing a folder before and after.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().display().to_string(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn quiet(name: &str) -> Server {
    Server::start(&home(name), &["--idle-timeout", "0", "--autosave-every", "0"])
}

#[test]
fn the_admin_adds_and_removes_users_and_a_removed_token_stops_at_once() {
    let s = quiet("users-admin");
    let alice = add_user(&s, "alice");
    assert_eq!(alice.len(), 64);
    let (status, v) = s.post("/v1/users", &json!({"name": "alice"}));
    assert_eq!((status, v["error"]["kind"].as_str()), (409, Some("exists")), "{v}");
    let (status, v) = s.post("/v1/users", &json!({"name": "Not A Name"}));
    assert_eq!(status, 400, "{v}");

    // a user's token works; near misses do not, and say nothing more than a wrong token
    assert_eq!(get(&s, &alice, "/v1/info").0, 200);
    for wrong in [alice.to_uppercase(), alice[..63].to_string(), format!("{alice}0"), s.token[..63].to_string()] {
        let (status, v) = get(&s, &wrong, "/v1/info");
        assert_eq!((status, v["error"]["message"].as_str()), (401, Some("wrong bearer token")), "{wrong}");
    }

    // users are the admin's business
    let (status, v) = post(&s, &alice, "/v1/users", json!({"name": "mallory"}));
    assert_eq!((status, v["error"]["kind"].as_str()), (403, Some("admin_only")), "{v}");
    assert_eq!(get(&s, &alice, "/v1/users").0, 403);
    assert_eq!(call(&s, &alice, "DELETE", "/v1/users/alice", None).0, 403);
    let (_, users) = s.get("/v1/users");
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice"]);
    assert!(users[0].get("token").is_none() && !users.to_string().contains(&alice), "the list never shows a token");

    // the command line adds to the same registry, and the running server knows at once
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
        .args(["users", "add", "bob", "--count", "2", "--prefix", "student", "--home", s.home.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let lines: Vec<(String, String)> = String::from_utf8(cli.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_once(',').map(|(n, t)| (n.to_string(), t.to_string())).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["bob", "student1", "student2"]);
    for (_, token) in &lines {
        assert_eq!(get(&s, token, "/v1/info").0, 200);
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
        .args(["users", "add", "carol", "Bad", "--home", s.home.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("user name \"Bad\""));
    assert!(!s.get("/v1/users").1.to_string().contains("carol"), "a bad list adds nobody");

    // removing: the token stops at once, the runs stay
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    step(&s, &alice, "main", "alice trains");
    let (status, v) = call(&s, &s.token, "DELETE", "/v1/users/alice", None);
    assert_eq!(status, 200, "{v}");
    let (status, v) = get(&s, &alice, "/v1/runs");
    assert_eq!(status, 401, "{v}");
    assert!(run_ids(&s, &s.token).contains(&"alice/main".to_string()));
    assert_eq!(call(&s, &s.token, "DELETE", "/v1/users/alice", None).0, 404);
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
        .args(["users", "remove", "bob", "--home", s.home.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success());
    assert_eq!(get(&s, &lines[0].1, "/v1/info").0, 401);
}

#[test]
fn a_users_runs_checkpoints_and_requests_are_out_of_everyone_elses_reach() {
    let s = quiet("users-isolation");
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));

    // each has their own `main`
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    step(&s, &alice, "main", "alice's first step");
    step(&s, &alice, "main", "alice's second step");
    let saved = ok(&s, &alice, "/v1/runs/main/save_state", json!({"name": "ck"}));
    let ck_dir = Path::new(saved["path"].as_str().unwrap()).to_path_buf();
    assert!(ck_dir.starts_with(s.home.join("users").join("alice")), "{}", ck_dir.display());
    let sample = post(
        &s,
        &alice,
        "/v1/runs/main/sample?wait=false",
        json!({"prompt": [1, 2], "sampling_params": {"max_tokens": 4}}),
    );
    let alice_request = sample.1["request_id"].as_u64().unwrap();
    let checkpoint_before = files(&ck_dir);
    let metrics_before = get(&s, &alice, "/v1/runs/main/metrics").1;
    assert_eq!(metrics_before["rows"].as_array().unwrap().len(), 2);

    assert_eq!(run_ids(&s, &alice), ["main"]);
    assert_eq!(run_ids(&s, &bob), ["main"]);
    let mut all = run_ids(&s, &s.token);
    all.sort();
    assert_eq!(all, ["alice/main", "bob/main"]);
    let (_, info) = get(&s, &bob, "/v1/info");
    assert_eq!(info["runs"].as_array().unwrap().len(), 1);
    assert_eq!(info["runs"][0]["step"], 0, "bob's info shows his own main");

    // bob against everything of alice's: each answers as something that does not exist
    // the same answer as for a name that does not exist, word for word (`zed` is no user)
    let same_as_missing = |path: &str, body: Option<Value>, missing: &str| {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (status, v) = call(&s, &bob, method, path, body.as_ref());
        let (status2, v2) = call(&s, &bob, method, missing, body.as_ref());
        assert_eq!(status, 404, "{path}: {v}");
        let (m, m2) = (v.to_string(), v2.to_string());
        assert_eq!(
            (status, m.replace("alice", "zed").replace(&alice_request.to_string(), "999999")),
            (status2, m2),
            "{path}"
        );
    };
    for op in ["forward", "forward_backward", "optim_step", "sample", "save_state", "load_state"] {
        let body = match op {
            "save_state" => json!({"name": "stolen"}),
            "load_state" => json!({"source": "ck"}),
            "optim_step" => json!({}),
            "sample" => json!({"prompt": [1]}),
            _ => batch("bob was here"),
        };
        same_as_missing(&format!("/v1/runs/alice/main/{op}"), Some(body), &format!("/v1/runs/zed/main/{op}"));
    }
    same_as_missing("/v1/runs/alice/main/metrics", None, "/v1/runs/zed/main/metrics");
    same_as_missing(&format!("/v1/requests/{alice_request}"), None, "/v1/requests/999999");
    same_as_missing(&format!("/v1/requests/{alice_request}/cancel"), Some(json!({})), "/v1/requests/999999/cancel");
    // her checkpoint, by every name bob could give it, is one that does not exist
    for source in ["alice/main/ck", "main/ck", "ck", ck_dir.to_str().unwrap(), "../alice/runs/main/checkpoints/ck"] {
        let (status, v) = post(&s, &bob, "/v1/runs/main/load_state", json!({"source": source}));
        assert_eq!((status, v["error"]["kind"].as_str()), (400, Some("bad_checkpoint")), "{source}: {v}");
    }
    // OpenAI: bob's models are his runs; alice's answer as no model
    let (_, models) = get(&s, &bob, "/v1/models");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["main"]);
    for model in ["alice/main", "alice"] {
        let (status, v) = post(&s, &bob, "/v1/completions", json!({"model": model, "prompt": "x", "max_tokens": 1}));
        assert_eq!(status, 404, "{model}: {v}");
    }
    // bob's own work under the same name touches only his
    step(&s, &bob, "main", "bob's own step");
    ok(&s, &bob, "/v1/runs/main/save_state", json!({"name": "ck"}));

    // alice's run is as she left it
    assert_eq!(files(&ck_dir), checkpoint_before, "alice's checkpoint is byte-identical");
    assert_eq!(get(&s, &alice, "/v1/runs/main/metrics").1, metrics_before);
    let (_, polled) = get(&s, &alice, &format!("/v1/requests/{alice_request}?timeout_s=60"));
    assert_eq!(polled["state"], "done", "{polled}");
    assert_eq!(polled["run"], "main");

    // the admin reaches every run by its full name
    let (status, v) = s.post("/v1/runs/alice/main/forward", &batch("the teacher looks"));
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.get("/v1/runs/alice/main/metrics");
    assert_eq!((status, v["rows"].as_array().map(Vec::len)), (200, Some(2)), "{v}");
    let (status, v) = s.post("/v1/runs/bob/main/load_state", &json!({"source": "alice/main/ck"}));
    assert_eq!((status, v["step"].as_u64()), (200, Some(2)), "{v}");
}

#[test]
fn control_is_scoped_a_users_cancel_touches_only_their_own_and_the_server_is_the_admins() {
    let s = quiet("users-control");
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    // alice queues several samples; bob's interrupt comes while they run and wait
    let body = json!({"prompt": [1, 2, 3], "num_samples": 4, "sampling_params": {"max_tokens": 64, "seed": 1}});
    let ids: Vec<u64> = (0..4)
        .map(|_| post(&s, &alice, "/v1/runs/main/sample?wait=false", body.clone()).1["request_id"].as_u64().unwrap())
        .collect();
    let (status, v) = post(&s, &bob, "/v1/cancel", json!({}));
    assert_eq!((status, v["cancelled"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
    for id in &ids {
        let (_, polled) = get(&s, &alice, &format!("/v1/requests/{id}?timeout_s=120"));
        assert_eq!(polled["state"], "done", "bob's cancel left alice's request {id} alone: {polled}");
    }
    // alice's own interrupt cancels hers
    let queued: Vec<u64> = (0..3)
        .map(|_| post(&s, &alice, "/v1/runs/main/sample?wait=false", body.clone()).1["request_id"].as_u64().unwrap())
        .collect();
    let (_, v) = post(&s, &alice, "/v1/cancel", json!({}));
    let cancelled: Vec<u64> = v["cancelled"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert!(!cancelled.is_empty() && cancelled.iter().all(|c| queued.contains(c)), "{v}");

    // the server's controls are the admin's
    for (path, body) in [("/v1/shutdown", json!({})), ("/v1/settings", json!({"idle_timeout_s": 1}))] {
        let (status, v) = post(&s, &bob, path, body);
        assert_eq!((status, v["error"]["kind"].as_str()), (403, Some("admin_only")), "{path}: {v}");
    }
    assert_eq!(get(&s, &bob, "/v1/settings").1["idle_timeout_s"], 0, "settings unchanged");
    assert_eq!(s.get("/v1/ping").0, 200, "the server is still up");
    // a user's autosave saves their runs only
    step(&s, &bob, "main", "bob trains");
    step(&s, &alice, "main", "alice trains");
    let (_, v) = post(&s, &bob, "/v1/autosave", json!({}));
    assert_eq!(v["saved"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(v["saved"][0]["path"].as_str().unwrap().contains("/users/bob/"), "{v}");
}

#[test]
fn sigterm_saves_every_users_runs_and_the_next_start_resumes_each() {
    let h = home("users-resume");
    let s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    ok(&s, &s.token, "/v1/runs", json!({"name": "main"}));
    for i in 0..3 {
        step(&s, &alice, "main", &format!("alice {i}"));
    }
    step(&s, &bob, "main", "bob 0");
    let mut s = s;
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(120).success());
    drop(s);
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    let (_, runs) = s.get("/v1/runs");
    let mut steps: Vec<(String, u64)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r["step"].as_u64().unwrap()))
        .collect();
    steps.sort();
    assert_eq!(steps, [("alice/main".to_string(), 3), ("bob/main".to_string(), 1), ("main".to_string(), 0)]);
    // tokens outlive the server: the registry holds them
    assert_eq!(run_ids(&s, &alice), ["main"]);
}

#[test]
fn only_work_keeps_the_server_up_polls_and_reads_do_not() {
    let h = home("users-idle");
    let mut s = Server::start(&h, &["--idle-timeout", "2", "--autosave-every", "0"]);
    ok(&s, &s.token, "/v1/runs", json!({"name": "main"}));
    step(&s, &s.token, "main", "some work");
    // reads every 200 ms, for far longer than the timeout: the server still saves and exits
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "polling kept the server up");
        let _ = s.get("/v1/info");
        let _ = s.get("/v1/runs");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success());
    let session: Value = serde_json::from_str(&std::fs::read_to_string(h.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["state"], "stopped", "{session}");
    drop(s);
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    assert_eq!(s.get("/v1/runs").1[0]["step"], 1, "the next start resumes the run");
}

#[test]
fn each_users_session_lands_on_their_own_main() {
    let s = quiet("users-session");
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    let a = hearth::Session::attach(&s.url, &alice, "main").unwrap();
    let b = hearth::Session::attach(&s.url, &bob, "main").unwrap();
    assert_eq!((a.run_name(), b.run_name()), ("main", "main"));
    let datum = a.supervised("alice's ", "own words").unwrap();
    a.forward_backward(std::slice::from_ref(&datum)).unwrap();
    a.optim_step(&hearth::AdamParams::default()).unwrap();
    let mut all = run_ids(&s, &s.token);
    all.sort();
    assert_eq!(all, ["alice/main", "bob/main"]);
    assert_eq!(s.get("/v1/runs/alice/main/metrics").1["rows"].as_array().unwrap().len(), 1);
    assert_eq!(s.get("/v1/runs/bob/main/metrics").1["rows"].as_array().unwrap().len(), 0);
}

#[test]
fn a_user_who_pipelines_many_samples_does_not_hold_up_another_users_step() {
    let s = quiet("users-fair");
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    let body = json!({"prompt": [1, 2, 3], "sampling_params": {"max_tokens": 48, "seed": 1}});
    let ids: Vec<u64> = (0..40)
        .map(|_| post(&s, &alice, "/v1/runs/main/sample?wait=false", body.clone()).1["request_id"].as_u64().unwrap())
        .collect();
    // bob's step is served within a turn or two of alice's, not after her forty samples
    step(&s, &bob, "main", "bob's turn comes");
    let (_, last) = get(&s, &alice, &format!("/v1/requests/{}", ids[ids.len() - 1]));
    assert_ne!(last["state"], "done", "alice's last sample is not over when bob's step is: {last}");
    for id in ids {
        let (_, polled) = get(&s, &alice, &format!("/v1/requests/{id}?timeout_s=120"));
        assert_eq!(polled["state"], "done", "{polled}");
    }
}

#[test]
fn a_full_line_is_a_429_with_retry_after_and_only_its_user_waits() {
    let s = Server::start(&home("users-bounded"), &["--idle-timeout", "0", "--max-queued-per-user", "3"]);
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    // forty rows: one such request is decoded at a time, the others wait in the line
    let body = json!({"prompt": [1, 2, 3], "num_samples": 40, "sampling_params": {"max_tokens": 200, "seed": 1}});
    // alice fills her line (one may be running already, so up to five are taken)
    let mut refused = None;
    for _ in 0..6 {
        let resp = ureq::post(&format!("{}/v1/runs/main/sample?wait=false", s.url))
            .set("Authorization", &format!("Bearer {alice}"))
            .send_json(body.clone());
        if let Err(ureq::Error::Status(429, r)) = resp {
            refused = Some((r.header("Retry-After").map(str::to_string), r.into_json::<Value>().unwrap()));
            break;
        }
        assert_eq!(resp.unwrap().status(), 202);
    }
    let (retry_after, v) = refused.expect("a fourth queued request is refused");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(v["error"]["kind"], "queue_full", "{v}");
    // bob's line is his own
    let (status, v) = post(&s, &bob, "/v1/runs/main/sample?wait=false", body.clone());
    assert_eq!(status, 202, "{v}");
    // the refused request changed nothing: alice's requests are the ones she was answered for
    let (_, all) = post(&s, &alice, "/v1/cancel", json!({}));
    assert!(all["cancelled"].as_array().unwrap().len() <= 4, "{all}");
}

#[test]
fn quotas_the_admin_sets_are_refused_clearly_and_change_nothing_and_usage_is_counted() {
    let h = home("users-quota");
    let s = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    let quota = |who: &str, q: Value| call(&s, &s.token, "PUT", &format!("/v1/users/{who}/quota"), Some(&q));
    let refused = |(status, v): (u16, Value), name: &str| {
        assert_eq!((status, v["error"]["kind"].as_str()), (403, Some("quota_exceeded")), "{name}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(&format!("quota {name}")), "{v}");
    };
    // the defaults hold until the admin says otherwise
    let (_, q) = get(&s, &alice, "/v1/users/alice/quota");
    assert_eq!((q["runs"].as_u64(), q["lora_rank"].as_u64()), (Some(8), Some(64)), "{q}");
    assert_eq!(get(&s, &alice, "/v1/users/bob/quota").0, 404, "a user reads their own quota only");
    assert_eq!(call(&s, &bob, "PUT", "/v1/users/bob/quota", Some(&json!({"runs": 100}))).0, 403);
    assert_eq!(quota("nobody", json!({"runs": 1})).0, 404);
    assert_eq!(quota("alice", json!({"runs": 1, "colour": "red"})).0, 400);
    let (status, q) = quota("alice", json!({"runs": 1, "request_tokens": 64}));
    assert_eq!((status, q["runs"].as_u64(), q["lora_rank"].as_u64()), (200, Some(1), Some(64)), "{q}");

    refused(
        post(&s, &alice, "/v1/runs", json!({"name": "big", "training": {"kind": "lora", "rank": 128}})),
        "lora_rank",
    );
    ok(&s, &alice, "/v1/runs", json!({"name": "main"}));
    refused(post(&s, &alice, "/v1/runs", json!({"name": "second"})), "runs");
    assert_eq!(run_ids(&s, &alice), ["main"], "a refused run is not made");
    let long = "x".repeat(100);
    refused(post(&s, &alice, "/v1/runs/main/forward_backward", batch(&long)), "request_tokens");
    refused(
        post(
            &s,
            &alice,
            "/v1/runs/main/sample",
            json!({"prompt": [1], "num_samples": 4, "sampling_params": {"max_tokens": 16}}),
        ),
        "request_tokens",
    );
    assert!(get(&s, &alice, "/v1/runs/main/metrics").1["rows"].as_array().unwrap().is_empty());
    step(&s, &alice, "main", "short enough");
    // device time: once spent, device work is refused; reads still answer
    quota("alice", json!({"device_seconds": 1e-6}));
    refused(post(&s, &alice, "/v1/runs/main/forward", batch("more work")), "device_seconds");
    assert_eq!(get(&s, &alice, "/v1/runs").0, 200);
    // queued requests
    quota("bob", json!({"queued": 1}));
    ok(&s, &bob, "/v1/runs", json!({"name": "main"}));
    let body = json!({"prompt": [1, 2], "num_samples": 16, "sampling_params": {"max_tokens": 512}});
    let codes: Vec<u16> = (0..4).map(|_| post(&s, &bob, "/v1/runs/main/sample?wait=false", body.clone()).0).collect();
    assert!(codes.contains(&429), "{codes:?}");
    post(&s, &bob, "/v1/cancel", json!({}));

    // usage: each user's own, the admin's table of everyone
    let (_, mine) = get(&s, &alice, "/v1/usage");
    let rows = mine["users"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0]["user"].as_str(), rows[0]["runs"].as_u64()), (Some("alice"), Some(1)));
    assert!(rows[0]["device_seconds"].as_f64().unwrap() > 0.0 && rows[0]["tokens_trained"].as_u64().unwrap() > 0);
    let (_, all) = s.get("/v1/usage");
    let users: Vec<&str> = all["users"].as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(users, ["admin", "alice", "bob"]);
    let alice_trained = rows[0]["tokens_trained"].clone();
    // kept through a restart, with the quotas
    let mut s = s;
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(120).success());
    drop(s);
    let s = Server::start(&h, &["--idle-timeout", "0"]);
    let (_, mine) = get(&s, &alice, "/v1/usage");
    assert_eq!(mine["users"][0]["tokens_trained"], alice_trained);
    assert_eq!(mine["users"][0]["quota"]["runs"], 1);
}

/// Twelve runs trained in turn (one step each, then a round of gradients accumulated on every
/// run before any step, then samples): every loss, logprob and token.
fn twelve_runs(s: &Server) -> Vec<Value> {
    let texts: Vec<String> = (0..12).map(|i| format!("run {i} learns its own line {}", "ab".repeat(i))).collect();
    let mut seen = Vec::new();
    for i in 0..12 {
        ok(
            s,
            &s.token,
            "/v1/runs",
            json!({"name": format!("r{i}"), "training": {"kind": "lora", "rank": 4, "seed": i}}),
        );
    }
    for round in 0..2 {
        for (i, text) in texts.iter().enumerate() {
            let fb = ok(s, &s.token, &format!("/v1/runs/r{i}/forward_backward"), batch(text));
            let st = ok(
                s,
                &s.token,
                &format!("/v1/runs/r{i}/optim_step"),
                json!({"learning_rate": 1e-2 * (round + 1) as f64}),
            );
            seen.push(json!([fb["metrics"], st]));
        }
    }
    // gradients waiting on every run at once: none of them may be evicted with its gradients
    for (i, text) in texts.iter().enumerate() {
        seen.push(ok(s, &s.token, &format!("/v1/runs/r{i}/forward_backward"), batch(text))["metrics"].clone());
    }
    for i in 0..12 {
        seen.push(ok(s, &s.token, &format!("/v1/runs/r{i}/optim_step"), json!({"learning_rate": 1e-2})));
    }
    for (i, text) in texts.iter().enumerate() {
        seen.push(ok(s, &s.token, &format!("/v1/runs/r{i}/forward"), batch(text))["loss_fn_outputs"].clone());
        let sample = json!({"prompt": [1, 2, 3], "sampling_params": {"max_tokens": 8}});
        seen.push(ok(s, &s.token, &format!("/v1/runs/r{i}/sample"), sample)["sequences"].clone());
    }
    seen
}

#[test]
fn runs_evicted_past_the_cap_come_back_bit_for_bit() {
    let free = quiet("resident-free");
    let want = twelve_runs(&free);
    drop(free);
    let h = home("resident-capped");
    let capped = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0", "--max-resident-runs", "4"]);
    let got = twelve_runs(&capped);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "result {i} differs under --max-resident-runs 4");
    }
    // the evictions were saves of state checkpoints, registered as autosaves
    let evicted = (0..12).filter(|i| {
        std::fs::read_dir(h.join("runs").join(format!("r{i}")).join("checkpoints"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("autosave-")))
            .unwrap_or(false)
    });
    assert!(evicted.count() >= 8, "most runs were evicted at some point");
    let (_, runs) = capped.get("/v1/runs");
    assert_eq!(runs.as_array().unwrap().len(), 12, "evicted runs are listed");
}

#[test]
fn the_admin_publishes_a_starting_checkpoint_that_every_user_can_load_and_none_can_change() {
    let s = quiet("users-published");
    let (alice, bob) = (add_user(&s, "alice"), add_user(&s, "bob"));
    ok(&s, &s.token, "/v1/runs", json!({"name": "starter"}));
    step(&s, &s.token, "starter", "the exercise starts here");
    ok(&s, &s.token, "/v1/runs/starter/save_state", json!({"name": "ck"}));
    let (status, v) = post(&s, &bob, "/v1/published", json!({"name": "exercise1", "source": "starter/ck"}));
    assert_eq!((status, v["error"]["kind"].as_str()), (403, Some("admin_only")), "{v}");
    let (status, v) = s.post("/v1/published", &json!({"name": "exercise1", "source": "starter/ck"}));
    assert_eq!((status, v["source"].as_str()), (201, Some("published:exercise1")), "{v}");
    assert_eq!(s.post("/v1/published", &json!({"name": "exercise1", "source": "starter/ck"})).0, 409);
    let (_, list) = get(&s, &alice, "/v1/published");
    assert_eq!(list[0]["name"], "exercise1");
    // the admin's run moves on; what was published stays as it was
    step(&s, &s.token, "starter", "the teacher goes on");
    for (token, who) in [(&alice, "alice"), (&bob, "bob")] {
        ok(&s, token, "/v1/runs", json!({"name": "main"}));
        let loaded = ok(&s, token, "/v1/runs/main/load_state", json!({"source": "published:exercise1"}));
        assert_eq!(loaded["step"], 1, "{who}: {loaded}");
    }
    let loss = |token: &str| ok(&s, token, "/v1/runs/main/forward", batch("probe"))["metrics"]["loss:sum"].clone();
    assert_eq!(loss(&alice), loss(&bob));
    step(&s, &alice, "main", "alice's own exercise");
    let reloaded = ok(&s, &bob, "/v1/runs/main/load_state", json!({"source": "published:exercise1"}));
    assert_eq!(reloaded["step"], 1, "alice's training changed nothing published");
    let (status, v) = post(&s, &alice, "/v1/runs/main/load_state", json!({"source": "published:nope"}));
    assert_eq!((status, v["error"]["kind"].as_str()), (400, Some("bad_checkpoint")), "{v}");
    assert!(!v.to_string().contains(s.home.to_str().unwrap()), "no server path in the answer: {v}");
}

#[test]
fn a_run_or_sample_that_would_not_fit_is_refused_with_507_and_changes_nothing() {
    let s = Server::start(&home("resident-admission"), &["--idle-timeout", "0", "--memory-budget-mb", "1"]);
    let out_of_memory = |(status, v): (u16, Value)| {
        assert_eq!((status, v["error"]["kind"].as_str()), (507, Some("out_of_memory")), "{v}");
    };
    out_of_memory(s.post("/v1/runs", &json!({"name": "r"})));
    assert!(s.get("/v1/runs").1.as_array().unwrap().is_empty(), "nothing was made");
    let s = Server::start(&home("resident-admission-2"), &["--idle-timeout", "0", "--memory-budget-mb", "100000"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    s.ok("/v1/runs/r/sample", &json!({"prompt": [1, 2], "sampling_params": {"max_tokens": 4}}));
}
