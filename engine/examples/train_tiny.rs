//! hearth's main job until the REPL exists: warm up the `tiny` preset, teach it three answers
//! with LoRA, and show the loss falling and the samples changing.
//!
//! Run: `cargo run --release -p hearth-engine --example train_tiny`
//!
//! Expected (CPU, 2 threads, about 2 s of training): the mean loss per answer token falls from
//! about 6.3 at step 1 to about 0.2 at step 10 and below 0.01 by step 60, and the greedy
//! samples go from noise to the three trained answers.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use anyhow::Result;
use hearth_api::{AdamParams, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, TrainingConfig};
use hearth_engine::preset::Preset;
use hearth_engine::tokenizer::{ByteTokenizer, EOS_ID};
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;
use std::time::Instant;

const EXAMPLES: [(&str, &str); 3] = [
    ("Q: What keeps the model warm?\nA:", " the hearth"),
    ("Q: What does a cell call?\nA:", " forward_backward"),
    ("Q: What is never lost?\nA:", " your work"),
];

/// Prompt + completion as one datum, the loss on the completion (and its end token) only.
fn datum(prompt: &str, completion: &str) -> Datum {
    let tok = ByteTokenizer;
    let prompt = tok.encode(prompt);
    let mut tokens = prompt.clone();
    tokens.extend(tok.encode(completion));
    tokens.push(EOS_ID);
    let weights = (1..tokens.len()).map(|i| if i < prompt.len() { 0.0 } else { 1.0 }).collect();
    Datum::new(tokens[..tokens.len() - 1].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), weights))
}

/// Greedy continuation until the end token or `max` tokens.
fn greedy(session: &Run, prompt: &str, max: usize) -> Result<String> {
    let mut tokens = ByteTokenizer.encode(prompt);
    let start = tokens.len();
    for _ in 0..max {
        let logits = session.logits(&tokens)?;
        let last: Vec<f32> = logits.get(tokens.len() - 1)?.to_vec1()?;
        let next = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
        if next == EOS_ID {
            break;
        }
        tokens.push(next);
    }
    Ok(ByteTokenizer.decode(&tokens[start..]))
}

fn main() -> Result<()> {
    hearth_engine::alloc::keep_freed_memory();
    let home = std::env::var_os("HEARTH_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hearth"));
    let t0 = Instant::now();
    let dir = Preset::Tiny.ensure(&home.join("models"))?;
    let base = Arc::new(BaseModel::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)?);
    let lora = LoraConfig { rank: 16, alpha: 32.0, ..LoraConfig::default() };
    let mut session = Run::new(base, TrainingConfig::Lora(lora))?;
    println!(
        "warm: tiny preset from {} ({} base parameters, {} LoRA parameters) in {:.2} s",
        dir.display(),
        session.base().config.num_parameters(),
        session.num_trainable(),
        t0.elapsed().as_secs_f64()
    );
    for (prompt, _) in EXAMPLES {
        println!("before: {prompt:?} -> {:?}", greedy(&session, prompt, 20)?);
    }
    let input = ForwardBackwardInput {
        data: EXAMPLES.iter().map(|(p, c)| datum(p, c)).collect(),
        loss_fn: LossFn::CrossEntropy,
    };
    let adam = AdamParams { learning_rate: 3e-3, ..AdamParams::default() };
    let t1 = Instant::now();
    for step in 1..=60 {
        let out = session.forward_backward(&input)?;
        session.optim_step(&adam)?;
        if step == 1 || step % 10 == 0 {
            let mean = out.metrics["loss:sum"] / out.metrics["weights:sum"];
            println!("step {step:3}  loss/token {mean:.4}");
        }
    }
    println!("trained 60 steps in {:.2} s", t1.elapsed().as_secs_f64());
    for (prompt, _) in EXAMPLES {
        println!("after:  {prompt:?} -> {:?}", greedy(&session, prompt, 20)?);
    }
    Ok(())
}
