//! Never losing work: kill -9 at random points, SIGTERM, idle timeout, budget.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod common;

use common::{home, train_step, Server};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The reference: `steps` uninterrupted training steps on a fresh run.
fn straight_losses(name: &str, steps: u64) -> Vec<f64> {
    let h = home(name);
    let s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    (0..steps).map(|i| train_step(&s, "r", i).0).collect()
}

fn run_step(s: &Server, run: &str) -> u64 {
    let (status, runs) = s.get("/v1/runs");
    let found = runs.as_array().and_then(|list| list.iter().find(|r| r["id"] == run)).and_then(|r| r["step"].as_u64());
    found.unwrap_or_else(|| panic!("run {run:?} is not in GET /v1/runs right after the start: status {status}, {runs}"))
}

/// Every checkpoint the registry lists loads, and the run's recorded step matches the server.
fn check_registry(h: &std::path::Path, base: &hearth_engine::BaseModel) {
    let db = rusqlite::Connection::open(h.join("registry.sqlite")).unwrap();
    let mut st = db.prepare("SELECT path, step FROM checkpoints WHERE kind = 'state'").unwrap();
    let rows: Vec<(String, i64)> =
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(|r| r.unwrap()).collect();
    let base = Arc::new(
        hearth_engine::BaseModel::load(&base.source, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap(),
    );
    for (path, step) in rows {
        let s = hearth_engine::Run::from_checkpoint(base.clone(), std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("checkpoint {path} is unreadable: {e}"));
        assert_eq!(s.step() as i64, step, "{path}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(h.join("runs/k/checkpoints"))
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-")).collect()
        })
        .unwrap_or_default();
    assert!(leftovers.len() <= 1, "temporaries pile up: {leftovers:?}");
}

#[test]
fn kill_9_at_20_random_points_resumes_from_the_last_autosave() {
    let h = home("kill9");
    let every = 5;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut confirmed_autosave = 0; // newest autosave step whose optim_step answered
    let mut kills = 0;
    let mut base = None;
    while kills < 20 {
        let s = Server::start(&h, &["--autosave-every", &every.to_string(), "--idle-timeout", "0"]);
        let step = if kills == 0 {
            s.ok("/v1/runs", &json!({"name": "k"}));
            0
        } else {
            let step = run_step(&s, "k");
            assert_eq!(step % every, 0, "resumed at step {step}, not at an autosave");
            assert!(
                step >= confirmed_autosave,
                "resumed at {step}, but the autosave at {confirmed_autosave} was confirmed"
            );
            let (_, m) = s.get("/v1/runs/k/metrics");
            let steps: Vec<u64> = m["rows"].as_array().unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
            assert_eq!(steps, (1..=step).collect::<Vec<_>>(), "metrics must end at the resumed step");
            step
        };
        if base.is_none() {
            let (_, info) = s.get("/v1/info");
            base = Some(
                hearth_engine::BaseModel::load(
                    std::path::Path::new(info["model_dir"].as_str().unwrap()),
                    &candle_core::Device::Cpu,
                    candle_core::DType::F32,
                )
                .unwrap(),
            );
        }
        if step >= 100 {
            break;
        }
        // Train in a thread; kill -9 after a random delay, wherever the server is.
        let last = Arc::new(AtomicU64::new(step));
        let s = Arc::new(s);
        let (client, seen) = (s.clone(), last.clone());
        let trainer = std::thread::spawn(move || {
            let mut i = seen.load(Ordering::SeqCst);
            while i < 100 {
                let texts = ["hearth keeps the model warm", "one cell at a time", "nothing is ever lost"];
                let (st, _) = client.post("/v1/runs/k/forward_backward", &common::batch(texts[(i % 3) as usize]));
                if st != 200 {
                    return;
                }
                let (st, out) = client.post("/v1/runs/k/optim_step", &json!({"learning_rate": 5e-3}));
                if st != 200 {
                    return;
                }
                i = out["step"].as_u64().unwrap();
                seen.store(i, Ordering::SeqCst);
            }
        });
        // kill a random 1-9 steps on, plus up to 8 ms: mid-request, mid-autosave, or idle
        let target = step + 1 + next(9);
        while last.load(Ordering::SeqCst) < target.min(100) && !trainer.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(next(9)));
        let s = Arc::try_unwrap(s).ok();
        let at = last.load(Ordering::SeqCst);
        if let Some(s) = s {
            s.kill9();
        } else {
            // the trainer still holds a handle: kill by pid through the session file
            let pid =
                serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(h.join("session.json")).unwrap())
                    .unwrap()["pid"]
                    .as_i64()
                    .unwrap();
            // SAFETY: sends SIGKILL to the server we started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        trainer.join().unwrap();
        confirmed_autosave = confirmed_autosave.max(at / every * every);
        kills += 1;
        check_registry(&h, base.as_ref().unwrap());
        eprintln!("kill {kills}: confirmed step {at}");
    }
    assert_eq!(kills, 20, "the loop must be interrupted 20 times");
}

#[test]
fn sigterm_and_idle_timeout_continue_at_exactly_the_same_step() {
    let want = straight_losses("straight-12", 12);
    let h = home("sigterm-idle");
    let mut got = Vec::new();

    let mut s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    got.extend((0..4).map(|i| train_step(&s, "r", i).0));
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(30).success());
    drop(s);

    // The session file names a stopped server, so the next one resumes by default.
    let mut s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "1"]);
    let (_, info) = s.get("/v1/info");
    assert_eq!(info["resumed"][0]["step"], 4, "{info}");
    got.extend((4..8).map(|i| train_step(&s, "r", i).0));
    let status = s.wait_exit(30); // idle for a second: saves and exits by itself
    assert!(status.success());
    let session: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["state"], "stopped");
    assert_eq!(session["stop_reason"], "idle timeout");
    drop(s);

    let s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "0"]);
    assert_eq!(run_step(&s, "r"), 8);
    got.extend((8..12).map(|i| train_step(&s, "r", i).0));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "step {i}: {g} vs uninterrupted {w}");
    }
    let (_, m) = s.get("/v1/runs/r/metrics");
    let steps: Vec<u64> = m["rows"].as_array().unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "one metrics row per step across restarts");
}

#[test]
fn a_spent_budget_saves_every_run_and_refuses_training() {
    let h = home("budget");
    // $3600/h = $1/s, budget $1: spent after about a second
    let s = Server::start(&h, &["--hourly-rate", "3600", "--budget-usd", "1", "--idle-timeout", "0"]);
    s.ok("/v1/runs", &json!({"name": "b"}));
    train_step(&s, "b", 0);
    std::thread::sleep(Duration::from_millis(1200));
    let (status, err) = s.post("/v1/runs/b/forward_backward", &common::batch("too late"));
    assert_eq!(status, 402, "{err}");
    assert_eq!(err["error"]["kind"], "budget_exhausted");
    assert!(err["error"]["message"].as_str().unwrap().contains("budget of $1.00"));
    std::thread::sleep(Duration::from_millis(500));
    let (_, info) = s.get("/v1/info");
    assert_eq!(info["runs"][0]["last_checkpoint_step"], 1, "the run was saved when the budget ran out: {info}");
    assert!(info["cost"]["spent_usd"].as_f64().unwrap() >= 1.0);
}

#[test]
fn the_idle_timeout_set_at_run_time_stops_the_server_and_the_next_one_resumes() {
    let h = home("settings-idle");
    // Started with the default (half an hour): only the setting can make it stop within the test.
    let mut s = Server::start(&h, &["--autosave-every", "0"]);
    s.ok("/v1/runs", &json!({"name": "r"}));
    for i in 0..3 {
        train_step(&s, "r", i);
    }

    // Bad input is a 400 naming the field, and changes nothing.
    for bad in [
        json!({"idle_timeout_s": -1}),
        json!({"idle_timeout_s": "2"}),
        json!({"idle_timeout": 2}),
        json!({"idle_timeout_s": 604_801}),
    ] {
        let (status, err) = s.post("/v1/settings", &bad);
        assert_eq!(status, 400, "{bad} -> {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("idle_timeout"), "{err}");
    }
    let (_, now) = s.get("/v1/settings");
    assert_eq!(now["idle_timeout_s"], 1800, "a refused setting changed the timeout: {now}");

    let set = s.ok("/v1/settings", &json!({"idle_timeout_s": 1}));
    assert_eq!(set["idle_timeout_s"], 1);
    let (_, info) = s.get("/v1/info");
    assert_eq!(info["idle_timeout_s"], 1);
    assert!(s.wait_exit(30).success(), "idle for a second after the setting: saves and exits by itself");
    let session: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["stop_reason"], "idle timeout");
    drop(s);

    // The next server resumes the run where it stopped, with the default timeout again.
    let s = Server::start(&h, &["--autosave-every", "0"]);
    let (_, info) = s.get("/v1/info");
    assert_eq!(info["resumed"][0]["step"], 3, "{info}");
    assert_eq!(info["idle_timeout_s"], 1800);
}

#[test]
fn recompute_on_and_a_quantized_base_train_like_the_default_and_bad_values_are_refused_before_loading() {
    let with = |name: &str, flag: &str| {
        let h = home(name);
        let s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "0", "--recompute", flag]);
        s.ok("/v1/runs", &json!({"name": "r"}));
        (0..4).map(|i| train_step(&s, "r", i).0).collect::<Vec<f64>>()
    };
    let off = with("recompute-off", "off");
    let on = with("recompute-on", "on");
    for (a, b) in off.iter().zip(&on) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "losses with recompute off {off:?} and on {on:?}");
    }
    // QLoRA: an 8-bit base trains along the dense one's curve, and says so in /v1/info
    let h = home("quantize-q8");
    let s = Server::start(&h, &["--autosave-every", "0", "--idle-timeout", "0", "--quantize", "q8"]);
    let (_, info) = s.get("/v1/info");
    assert_eq!(info["quantize"], "q8", "{info}");
    s.ok("/v1/runs", &json!({"name": "r"}));
    let q8: Vec<f64> = (0..4).map(|i| train_step(&s, "r", i).0).collect();
    for (a, b) in off.iter().zip(&q8) {
        assert!((a - b).abs() <= 0.02 * off[0].abs(), "losses dense {off:?} and 8-bit {q8:?}");
    }
    drop(s);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
        .args(["--home", home("quantize-bad").to_str().unwrap(), "--quantize", "q3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quantize q3: expected q8 or q4"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-server"))
        .args(["--home", home("recompute-bad").to_str().unwrap(), "--recompute", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--recompute sometimes: expected auto, on or off"), "{err}");
}
