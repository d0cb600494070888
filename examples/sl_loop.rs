//! The quickstart's supervised loop as a flat program: teach the `tiny` preset to reverse eight
//! words with LoRA, print the loss at every step, and sample before and after.
//!
//! ```text
//! cargo build --release -p hearth-server          # once: the session server this talks to
//! cargo run --release -p hearth-prelude --example sl_loop
//! ```
//!
//! It attaches to the session server of `$HEARTH_HOME` (starting one, which finds or generates the
//! `tiny` model) and trains a new run of its own, `sl-loop-N`, next to whatever else that server
//! holds. The expected output, with the loss curve, is in `examples/sl_loop.expected.txt`.
#![allow(clippy::print_stdout)] // a program whose output is its point

use hearth::{AdamParams, Datum, SamplingParams, Session, Stop, TrainingConfig};

const WORDS: [&str; 8] = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star"];
const STEPS: u64 = 40;
const LEARNING_RATE: f64 = 1e-3;

fn reversed(word: &str) -> String {
    word.chars().rev().collect()
}

/// Greedy answers for every word, and how many are right.
fn answers(run: &Session) -> anyhow::Result<(Vec<String>, usize)> {
    let greedy =
        SamplingParams { max_tokens: 6, temperature: 0.0, stop: vec![Stop::Text("\n".into())], ..Default::default() };
    let mut got = Vec::new();
    let mut correct = 0;
    for w in WORDS {
        let answer = run.sample_text(&format!("{w}>"), 1, greedy.clone())?.remove(0);
        correct += usize::from(answer == format!("{}\n", reversed(w)));
        got.push(format!("{w}>{answer:?}"));
    }
    Ok((got, correct))
}

fn main() -> anyhow::Result<()> {
    // `cargo run --example` puts this program in target/<profile>/examples/; the server binary is
    // one folder up. An explicit HEARTH_SERVER_BIN (or one on PATH) wins.
    if std::env::var_os("HEARTH_SERVER_BIN").is_none() {
        let up = std::env::current_exe()?.parent().and_then(|d| d.parent()).map(|d| d.join("hearth-server"));
        if let Some(bin) = up.filter(|p| p.is_file()) {
            std::env::set_var("HEARTH_SERVER_BIN", bin);
        }
    }

    // 1. Attach to the warm model and make a fresh LoRA run.
    let session = Session::connect()?;
    let info = session.info()?;
    println!("server {} · model {} ({} parameters) on {}", session.url(), info.model, info.num_parameters, info.device);
    let run = session.new_run(&format!("sl-loop-{}", session.runs()?.len()), TrainingConfig::default())?;
    println!("run {}", run.run_name());

    // 2. The data: prompt "cat>", completion "tac\n"; the loss counts the completion only.
    let data: Vec<Datum> = WORDS
        .iter()
        .map(|w| session.supervised(&format!("{w}>"), &format!("{}\n", reversed(w))))
        .collect::<Result<_, _>>()?;

    let (before, _) = answers(&run)?;
    println!("before: {}", before.join(" "));

    // 3. The loop: forward_backward accumulates gradients, optim_step applies them.
    let adam = AdamParams { learning_rate: LEARNING_RATE, ..Default::default() };
    println!("step  loss/answer-byte");
    for _ in 0..STEPS {
        let out = run.forward_backward(&data)?;
        let loss = out.metrics["loss:sum"] / out.metrics["weights:sum"];
        let step = run.optim_step(&adam)?.step;
        println!("{step:>4}  {loss:.4}");
    }

    // 4. What it learned.
    let (after, correct) = answers(&run)?;
    println!("after:  {}", after.join(" "));
    println!("{correct}/{} words reversed", WORDS.len());
    anyhow::ensure!(correct >= 7, "only {correct}/{} words reversed after {STEPS} steps", WORDS.len());
    Ok(())
}
