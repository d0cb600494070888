//! Server overhead: the no-op round trip (`GET /v1/ping`, keep-alive, loopback; p50 and p99 of
//! 2000) and `forward_backward` through the server versus the engine called directly (median of
//! 12 each, interleaved ABBA, `smollm2-135m-shape`, one sequence of 256 tokens, LoRA r=16). Prints one JSON line.
//!
//!     cargo run --release -p hearth-server --example bench_server
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use hearth_api::{Datum, ForwardBackwardInput, LossFn, LossFnInputs, TrainingConfig};
use hearth_engine::preset::Preset;
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    hearth_engine::alloc::keep_freed_memory();
    let home = std::env::temp_dir().join(format!("hearth-bench-server-{}", std::process::id()));
    let model = Preset::Smollm2_135mShape.name();
    let opts = hearth_server::options::Options::parse_from([
        "hearth-server",
        "--model",
        model,
        "--home",
        home.to_str().unwrap(),
        "--idle-timeout",
        "0",
        "--autosave-every",
        "0",
    ]);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || hearth_server::run(opts, |r| tx.send(r.url.clone()).unwrap()));
    let url = rx.recv().unwrap();
    let session: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("session.json")).unwrap()).unwrap();
    let auth = format!("Bearer {}", session["token"].as_str().unwrap());
    let agent = ureq::agent();

    // no-op round trips
    for _ in 0..200 {
        agent.get(&format!("{url}/v1/ping")).set("Authorization", &auth).call().unwrap();
    }
    let mut rtt: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            agent.get(&format!("{url}/v1/ping")).set("Authorization", &auth).call().unwrap().into_string().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    rtt.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (rtt[rtt.len() / 2], rtt[rtt.len() * 99 / 100]);

    // forward_backward: server vs engine
    let tokens: Vec<u32> = (0..257).map(|i| (i * 7919 % 49152) as u32).collect();
    let datum = Datum::new(tokens[..256].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), vec![1.0; 256]));
    let input = ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy };
    let body = serde_json::to_value(&input).unwrap();
    agent
        .post(&format!("{url}/v1/runs"))
        .set("Authorization", &auth)
        .send_json(serde_json::json!({"name": "bench"}))
        .unwrap();
    let fb_url = format!("{url}/v1/runs/bench/forward_backward");
    let dir = Preset::Smollm2_135mShape.ensure(&home.join("models")).unwrap();
    let base = Arc::new(BaseModel::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap());
    let mut direct_session = Run::new(base, TrainingConfig::default()).unwrap();
    // interleaved in ABBA order, so drift and which-goes-first effects hit both sides alike
    let (mut through_server, mut direct) = (Vec::new(), Vec::new());
    let server_fb = || {
        let t = Instant::now();
        agent.post(&fb_url).set("Authorization", &auth).send_json(body.clone()).unwrap().into_string().unwrap();
        t.elapsed().as_secs_f64()
    };
    let mut direct_fb = || {
        let t = Instant::now();
        direct_session.forward_backward(&input).unwrap();
        t.elapsed().as_secs_f64()
    };
    server_fb();
    direct_fb();
    for i in 0..12 {
        if i % 2 == 0 {
            direct.push(direct_fb());
            through_server.push(server_fb());
        } else {
            through_server.push(server_fb());
            direct.push(direct_fb());
        }
    }
    agent.post(&format!("{url}/v1/shutdown")).set("Authorization", &auth).call().unwrap();
    server.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&home);
    let (ms, md) = (median(through_server), median(direct));
    println!(
        "{}",
        serde_json::json!({
            "noop_rtt_ms_p50": p50, "noop_rtt_ms_p99": p99,
            "forward_backward_s_server": ms, "forward_backward_s_direct": md,
            "forward_backward_overhead_pct": (ms / md - 1.0) * 100.0,
        })
    );
}
