//! Sampling requests of several users decoded together on the real server: they run at the
//! same time, each gets exactly what it gets alone, a long sample lets other users' training
//! through between its tokens, a run's own order is kept, and cancelling one request leaves the
//! others alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{add_user, batch, call, home, ok_as, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn ok(s: &Server, token: &str, path: &str, body: Value) -> Value {
    ok_as(s, token, path, body)
}

fn submit(s: &Server, token: &str, path: &str, body: Value) -> u64 {
    let (status, v) = call(s, token, "POST", &format!("{path}?wait=false"), Some(&body));
    assert_eq!(status, 202, "POST {path}: {v}");
    v["request_id"].as_u64().unwrap()
}

fn state(s: &Server, token: &str, id: u64) -> Value {
    call(s, token, "GET", &format!("/v1/requests/{id}"), None).1
}

/// Waits until every request (token, id) is running at the same moment; none may end first.
fn wait_running_together(s: &Server, requests: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let states: Vec<Value> = requests.iter().map(|&(t, id)| state(s, t, id)["state"].clone()).collect();
        if states.iter().all(|st| st == "running") {
            return;
        }
        assert!(
            states.iter().all(|st| st != "done" && st != "failed") && Instant::now() < deadline,
            "the requests never ran together: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for request `id` to end; its result.
fn result(s: &Server, token: &str, id: u64) -> Value {
    let (_, v) = call(s, token, "GET", &format!("/v1/requests/{id}?timeout_s=300"), None);
    assert_eq!(v["state"], "done", "request {id}: {v}");
    v["result"].clone()
}

/// A user with a run `main` of LoRA rank `rank`, trained one step on `text`.
fn trained_user(s: &Server, name: &str, rank: u64, text: &str) -> String {
    let token = add_user(s, name);
    ok(s, &token, "/v1/runs", json!({"name": "main", "training": {"kind": "lora", "rank": rank}}));
    ok(s, &token, "/v1/runs/main/forward_backward", batch(text));
    ok(s, &token, "/v1/runs/main/optim_step", json!({"learning_rate": 1e-2}));
    token
}

fn quiet(name: &str) -> Server {
    Server::start(&home(name), &["--idle-timeout", "0", "--autosave-every", "0"])
}

fn sample_body(prompt: &str, num_samples: u64, max_tokens: u64, seed: u64) -> Value {
    let prompt: Vec<u32> = prompt.bytes().map(u32::from).collect();
    json!({"prompt": prompt, "num_samples": num_samples,
           "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "seed": seed}})
}

#[test]
fn several_users_samples_run_at_once_and_each_equals_its_sample_alone() {
    let s = quiet("batching-equal");
    let users: Vec<(String, Value)> = [("alice", 4, "alice's text"), ("bob", 8, "bob writes"), ("carol", 2, "c c c")]
        .iter()
        .enumerate()
        .map(|(i, (name, rank, text))| {
            let token = trained_user(&s, name, *rank, text);
            (token, sample_body(&format!("{name} says"), 1 + i as u64, 300, 7 + i as u64))
        })
        .collect();
    // alone, one after another
    let alone: Vec<Value> = users.iter().map(|(t, body)| ok(&s, t, "/v1/runs/main/sample", body.clone())).collect();
    // all at once: every request is running at the same moment, not waiting in line
    let ids: Vec<u64> = users.iter().map(|(t, body)| submit(&s, t, "/v1/runs/main/sample", body.clone())).collect();
    let requests: Vec<(&str, u64)> = users.iter().zip(&ids).map(|((t, _), &id)| (t.as_str(), id)).collect();
    wait_running_together(&s, &requests);
    for (((t, _), id), want) in users.iter().zip(ids).zip(&alone) {
        assert_eq!(&result(&s, t, id), want, "request {id} beside the others");
    }
}

#[test]
fn a_long_sample_lets_another_users_steps_through_and_keeps_its_runs_order() {
    let s = quiet("batching-yield");
    let alice = trained_user(&s, "alice", 4, "alice's text");
    let bob = trained_user(&s, "bob", 4, "bob's text");
    let long = sample_body("a long one", 8, 1000, 3);
    let want = ok(&s, &alice, "/v1/runs/main/sample", long.clone());
    // alice's long sample, then a step of her own run queued behind it
    let sample = submit(&s, &alice, "/v1/runs/main/sample", long);
    let fb = submit(&s, &alice, "/v1/runs/main/forward_backward", batch("changes alice's weights"));
    let opt = submit(&s, &alice, "/v1/runs/main/optim_step", json!({"learning_rate": 1e-2}));
    wait_running_together(&s, &[(&alice, sample)]);
    // bob trains two steps between alice's tokens
    for i in 0..2 {
        ok(&s, &bob, "/v1/runs/main/forward_backward", batch(&format!("bob {i}")));
        ok(&s, &bob, "/v1/runs/main/optim_step", json!({"learning_rate": 1e-2}));
    }
    // alice's step, seen before her sample is seen still running, waited for it
    let step_state = state(&s, &alice, fb);
    let during = state(&s, &alice, sample);
    assert_eq!(during["state"], "running", "bob's steps were served while alice's sample ran: {during}");
    assert_eq!(step_state["state"], "queued", "a run's order is kept");
    // and the sample saw the weights it started with
    assert_eq!(result(&s, &alice, sample), want);
    assert_eq!(result(&s, &alice, opt)["step"], 2);
}

#[test]
fn cancelling_one_running_sample_leaves_the_others_untouched() {
    let s = quiet("batching-cancel");
    let alice = trained_user(&s, "alice", 4, "alice's text");
    let bob = trained_user(&s, "bob", 8, "bob's text");
    let body = sample_body("go on", 2, 600, 5);
    let want = ok(&s, &bob, "/v1/runs/main/sample", body.clone());
    let a = submit(&s, &alice, "/v1/runs/main/sample", sample_body("stop me", 4, 1000, 1));
    let b = submit(&s, &bob, "/v1/runs/main/sample", body);
    wait_running_together(&s, &[(&alice, a), (&bob, b)]);
    let (status, v) = call(&s, &alice, "POST", &format!("/v1/requests/{a}/cancel"), Some(&json!({})));
    assert_eq!(status, 200, "{v}");
    let (_, ended) = call(&s, &alice, "GET", &format!("/v1/requests/{a}?timeout_s=300"), None);
    assert_eq!(ended["state"], "failed", "{ended}");
    assert_eq!(ended["error"]["kind"], "interrupted", "{ended}");
    assert_eq!(result(&s, &bob, b), want, "bob's sample beside a cancelled one");
}
