//! The cell-side client (`hearth`, the prelude crate) against the real server: the primitives,
//! data builders, futures, displays, and coming back by itself after the server stopped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{home, Server};
use hearth::{AdamParams, ChatMessage, LossFn, SamplingParams, Session};

#[test]
fn a_cell_trains_samples_plots_and_uses_futures() {
    let h = home("prelude-basics");
    let _server = Server::start(&h, &["--idle-timeout", "0"]);
    let s = Session::connect_home(&h, "main").unwrap();
    assert_eq!(s.runs().unwrap()[0].id, "main");
    let datum = s.supervised("2+2=", "4\n").unwrap();
    let first = s.forward(std::slice::from_ref(&datum), LossFn::CrossEntropy).unwrap().loss_fn_outputs[0].loss;
    for _ in 0..15 {
        s.forward_backward(std::slice::from_ref(&datum)).unwrap();
        s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    }
    let last = s.forward(std::slice::from_ref(&datum), LossFn::CrossEntropy).unwrap().loss_fn_outputs[0].loss;
    assert!(last < first * 0.5, "loss {first} -> {last}");
    let plot = s.loss_plot().unwrap();
    assert_eq!(plot.series[0].1.len(), 15);
    assert!(plot.svg().contains("<polyline"));
    let greedy = s
        .sample_text("2+2=", 1, SamplingParams { max_tokens: 2, temperature: 0.0, ..SamplingParams::default() })
        .unwrap();
    assert_eq!(greedy, vec!["4\n".to_string()], "the run learned the answer");
    let table = s
        .sample_table("2+2=", 2, SamplingParams { max_tokens: 4, seed: Some(1), ..SamplingParams::default() })
        .unwrap();
    assert_eq!(table.rows.len(), 2);
    assert!(table.html().contains("<span"));

    // futures: queue forward_backward and optim_step back to back, then wait
    let fb = s.forward_backward_async(std::slice::from_ref(&datum), LossFn::CrossEntropy).unwrap();
    let st = s.optim_step_async(&AdamParams::default()).unwrap();
    assert!(fb.id() < st.id());
    assert!(fb.wait().unwrap().metrics["loss:sum"] >= 0.0);
    assert_eq!(st.wait().unwrap().step, 16);
    let long = s
        .sample_async(&hearth::SampleInput {
            prompt: vec![50, 51],
            num_samples: 8,
            sampling_params: SamplingParams { max_tokens: 900, seed: Some(3), ..SamplingParams::default() },
            ..Default::default()
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(long.cancel().unwrap());
    let err = long.wait().unwrap_err();
    assert!(err.is_interrupted(), "{err}");

    // chat data and a second run on the same warm model
    let chat = s.chat_datum(&[ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "hello")]).unwrap();
    let w = chat.loss_fn_inputs.weights.as_ref().unwrap();
    assert_eq!(w.iter().filter(|x| **x > 0.0).count(), "hello<|im_end|>\n".len() - "<|im_end|>".len() + 1);
    let other = s.new_run("other", hearth::TrainingConfig::default()).unwrap();
    other.forward_backward(&[datum]).unwrap();
    other.optim_step(&AdamParams::default()).unwrap();
    let both = Session::compare_runs(&[&s, &other]).unwrap();
    assert_eq!(both.series.len(), 2);
    let err = s.with_run("nope").unwrap_err();
    assert!(err.to_string().contains("does not exist"));
}

#[test]
fn the_next_call_after_an_idle_shutdown_restarts_the_server_and_restores_the_run() {
    let h = home("prelude-restart");
    let mut server = Server::start(&h, &["--idle-timeout", "1"]);
    let s = Session::connect_home(&h, "main").unwrap();
    let d = s.supervised("abc", "def").unwrap();
    for _ in 0..3 {
        s.forward_backward(std::slice::from_ref(&d)).unwrap();
        s.optim_step(&AdamParams::default()).unwrap();
    }
    assert!(server.wait_exit(30).success(), "idle timeout ends the server");
    // the prelude finds hearth-server through HEARTH_SERVER_BIN
    std::env::set_var("HEARTH_SERVER_BIN", env!("CARGO_BIN_EXE_hearth-server"));
    let out = s.optim_step(&AdamParams::default());
    // the restored run has no gradients yet: a clear error, and it is at step 3
    let err = out.unwrap_err();
    assert!(err.to_string().contains("no gradients"), "{err}");
    let runs = s.runs().unwrap();
    assert_eq!((runs[0].id.as_str(), runs[0].step), ("main", 3));
    s.forward_backward(&[d]).unwrap();
    assert_eq!(s.optim_step(&AdamParams::default()).unwrap().step, 4);
    let info = s.info().unwrap();
    assert_eq!(info.resumed[0].step, 3);
    s.shutdown().unwrap();
}

#[test]
fn a_remote_server_is_reached_by_url_and_token_from_the_environment() {
    let h = home("prelude-remote");
    let server = Server::start(&h, &["--idle-timeout", "0"]);
    let token_file = h.join("token");
    std::fs::write(&token_file, &server.token).unwrap();
    // what a kernel configured for a remote GPU box sees (no session file to follow)
    std::env::set_var("HEARTH_URL", &server.url);
    std::env::set_var("HEARTH_TOKEN_FILE", &token_file);
    let s = Session::connect();
    std::env::remove_var("HEARTH_URL");
    std::env::remove_var("HEARTH_TOKEN_FILE");
    let s = s.unwrap();
    assert_eq!(s.url(), server.url);
    assert_eq!(s.runs().unwrap()[0].id, "main");
}
