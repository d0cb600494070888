//! save_state / load_state: Hugging Face tools read what hearth writes, PEFT adapters load into
//! hearth, `state` resumes exactly in a fresh process, and bad checkpoints change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{ce_datum, fixture_dir, input, tiny};
use hearth_api::{
    AdamParams, CheckpointKind, LoraConfig, LossFn, SampleInput, SamplingParams, TargetModule, TrainingConfig,
};
use hearth_engine::preset::Preset;
use hearth_engine::{BaseModel, EngineError, Run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn adam() -> AdamParams {
    AdamParams { learning_rate: 5e-3, weight_decay: 0.1, grad_clip_norm: 1.0, ..AdamParams::default() }
}

/// One training step on a fixed batch; returns the loss. Byte ids are folded into the
/// vocabulary (the HF fixtures have 97 tokens).
fn step(s: &mut Run, i: usize) -> f64 {
    let texts = ["hearth keeps the model warm", "one cell at a time", "nothing is ever lost"];
    let vocab = s.base().config.vocab_size as u32;
    let datum = |t: &str| {
        let mut d = ce_datum(t);
        let targets = d.loss_fn_inputs.target_tokens.iter_mut().flatten();
        d.model_input.iter_mut().chain(targets).for_each(|x| *x %= vocab);
        d
    };
    let out =
        s.forward_backward(&input(vec![datum(texts[i % 3]), datum(texts[(i + 1) % 3])], LossFn::CrossEntropy)).unwrap();
    s.optim_step(&adam()).unwrap();
    out.metrics["loss:sum"]
}

/// Every trainable value, for "nothing changed" checks.
fn snapshot(s: &Run) -> Vec<(String, Vec<f32>)> {
    s.parameters()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn hearth_adapter_loads_in_peft_and_merged_loads_in_transformers() {
    let Some(python) = common::reference_python("hearth_adapter_loads_in_peft_and_merged_loads_in_transformers") else {
        return;
    };
    // and with LoRA on lm_head (Tinker's train_unembed): untied (llama) and tied (qwen2, whose
    // merged model then gets an lm_head of its own)
    for (fixture, modules) in [
        ("llama", &TargetModule::ALL[..]),
        ("qwen2", &TargetModule::ALL[..]),
        ("llama", &TargetModule::EVERY[..]),
        ("qwen2", &TargetModule::EVERY[..]),
    ] {
        let base = Arc::new(BaseModel::load(&fixture_dir(fixture), &Device::Cpu, DType::F32).unwrap());
        let lora = LoraConfig { rank: 4, alpha: 8.0, seed: 3, target_modules: modules.to_vec() };
        let name = if modules.len() == 8 { format!("{fixture}-lm-head") } else { fixture.to_string() };
        let mut s = Run::new(base, TrainingConfig::Lora(lora)).unwrap();
        for i in 0..4 {
            step(&mut s, i);
        }
        let dir = scratch(&format!("hf-{name}"));
        let adapter = s.save_state(&dir.join("adapter"), CheckpointKind::Adapter).unwrap();
        let merged = s.save_state(&dir.join("merged"), CheckpointKind::Merged).unwrap();
        let tokens: Vec<u32> = vec![5, 17, 42, 8, 63, 21, 9, 88, 3, 3, 50];
        let logits: Vec<Vec<f32>> = s.logits(&tokens).unwrap().to_vec2().unwrap();
        let case = serde_json::json!({"base": fixture_dir(fixture), "adapter": adapter, "merged": merged, "tokens": tokens, "logits": logits});
        let case_path = dir.join("case.json");
        std::fs::write(&case_path, case.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/check_hf_load.py");
        let out = Command::new(&python).arg(&script).arg(&case_path).env("OMP_NUM_THREADS", "1").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: PEFT/transformers disagree with hearth: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{name}: {stdout}");
    }
}

#[test]
fn peft_adapter_folder_loads_into_hearth() {
    // The fixture folders hold adapters written by PEFT (tests/fixtures/gen_fixtures.py); golden.rs
    // checks logits and gradients with those values against PyTorch. load_state must give the
    // same weights as reading the file directly.
    for fixture in ["llama", "qwen2", "qwen3", "mistral"] {
        let base = Arc::new(BaseModel::load(&fixture_dir(fixture), &Device::Cpu, DType::F32).unwrap());
        let s = Run::from_checkpoint(base.clone(), &fixture_dir(fixture)).unwrap();
        let TrainingConfig::Lora(l) = s.training() else { panic!("LoRA expected") };
        assert_eq!((l.rank, l.alpha), (4, 8.0));
        let raw = candle_core::safetensors::load(fixture_dir(fixture).join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        for (name, var) in s.parameters() {
            let want = raw[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{fixture} {name}");
        }
        assert_eq!(s.step(), 0);
    }
}

const RESUME_DIR: &str = "HEARTH_TEST_RESUME_DIR";

/// Not a test by itself: the second half of `state_resume_is_exact_in_a_fresh_process`, run in
/// a child process.
#[test]
#[ignore]
fn resume_child() {
    let Some(dir) = std::env::var_os(RESUME_DIR).map(PathBuf::from) else { return };
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let loaded = s.load_state(&dir.join("ckpt")).unwrap();
    assert_eq!((loaded.kind, loaded.step), (CheckpointKind::State, 5));
    let losses: Vec<f64> = (5..10).map(|i| step(&mut s, i)).collect();
    let sampled = s.sample(&sample_input(), &|_| String::new(), &|| false).unwrap().sequences[0].tokens.clone();
    std::fs::write(dir.join("child.json"), serde_json::json!({"losses": losses, "sampled": sampled}).to_string())
        .unwrap();
}

/// Unseeded sampling: the run's own generator picks the seed, and it is part of `state`.
fn sample_input() -> SampleInput {
    SampleInput {
        prompt: b"hearth".iter().map(|&b| b as u32).collect(),
        num_samples: 1,
        sampling_params: SamplingParams { max_tokens: 8, temperature: 1.0, seed: None, ..SamplingParams::default() },
        prompt_logprobs: false,
        base_model_only: false,
    }
}

#[test]
fn state_resume_is_exact_in_a_fresh_process() {
    let mut straight = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let mut want = Vec::new();
    for i in 0..10 {
        if i == 5 {
            straight.sample(&sample_input(), &|_| String::new(), &|| false).unwrap();
            // advances the run's RNG
        }
        want.push(step(&mut straight, i));
    }
    let want_sampled =
        straight.sample(&sample_input(), &|_| String::new(), &|| false).unwrap().sequences[0].tokens.clone();

    let dir = scratch("resume");
    let mut first = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let mut got: Vec<f64> = (0..5).map(|i| step(&mut first, i)).collect();
    first.sample(&sample_input(), &|_| String::new(), &|| false).unwrap();
    first.save_state(&dir.join("ckpt"), CheckpointKind::State).unwrap();
    drop(first);

    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_child", "--ignored", "--test-threads", "1"])
        .env(RESUME_DIR, &dir)
        .status()
        .unwrap();
    assert!(status.success(), "the resuming process failed");
    let child: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("child.json")).unwrap()).unwrap();
    got.extend(child["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "step {i}: resumed loss {g} vs straight {w}");
    }
    assert!(want[9] < want[0], "training should lower the loss: {want:?}");
    let sampled: Vec<u32> = child["sampled"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(sampled, want_sampled, "unseeded sampling after resume continues the run's RNG");
}

#[test]
fn bad_checkpoints_are_refused_and_change_nothing() {
    let dir = scratch("bad");
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    for i in 0..3 {
        step(&mut s, i);
    }
    let good = s.save_state(&dir.join("good"), CheckpointKind::State).unwrap();
    for i in 3..5 {
        step(&mut s, i);
    }
    let before = snapshot(&s);

    // Another base model of the same shape (the tiny preset with another seed).
    let other_dir = dir.join("tiny-seed-1");
    Preset::Tiny.write(&other_dir, 1).unwrap();
    let other = Arc::new(BaseModel::load(&other_dir, &Device::Cpu, DType::F32).unwrap());
    let foreign = Run::new(other, TrainingConfig::default()).unwrap();
    foreign.save_state(&dir.join("foreign"), CheckpointKind::State).unwrap();

    // Corrupt copies of the good checkpoint.
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    let truncated = copy("truncated");
    let bytes = std::fs::read(truncated.join("adapter_model.safetensors")).unwrap();
    std::fs::write(truncated.join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let no_optimizer = copy("no-optimizer");
    std::fs::remove_file(no_optimizer.join("optimizer.safetensors")).unwrap();
    let garbage_manifest = copy("garbage-manifest");
    std::fs::write(garbage_manifest.join("hearth.json"), "{\"format\": \"hearth-checkpoint\", \"format_vers").unwrap();
    let future = copy("future");
    let text = std::fs::read_to_string(future.join("hearth.json"))
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 99");
    std::fs::write(future.join("hearth.json"), text).unwrap();
    let other_rank = Run::new(tiny(), TrainingConfig::Lora(LoraConfig { rank: 8, ..LoraConfig::default() })).unwrap();
    other_rank.save_state(&dir.join("rank8"), CheckpointKind::Adapter).unwrap();

    let cases: [(PathBuf, &str); 7] = [
        (dir.join("foreign"), "another base model"),
        (truncated, "truncated or corrupt"),
        (no_optimizer, "optimizer.safetensors is missing"),
        (garbage_manifest, "hearth.json is corrupt"),
        (future, "newer than this hearth reads"),
        (dir.join("rank8"), "create a run from the checkpoint"),
        (dir.join("missing"), "no such checkpoint folder"),
    ];
    for (path, want) in cases {
        let err = s.load_state(&path).unwrap_err();
        assert!(matches!(err, EngineError::Checkpoint { .. }), "{}: {err}", path.display());
        assert!(err.to_string().contains(want), "{}: `{err}` should mention `{want}`", path.display());
        assert!(err.is_user_error());
        assert_eq!(snapshot(&s), before, "{}: parameters changed", path.display());
        assert_eq!(s.step(), 5);
    }

    // A full fine-tuning run has no adapter: refused, nothing written.
    let full = Run::new(tiny(), TrainingConfig::Full).unwrap();
    assert!(full.save_state(&dir.join("full-adapter"), CheckpointKind::Adapter).is_err());
    assert!(!dir.join("full-adapter").exists());

    // The good one still loads, replacing a newer state.
    assert_eq!(s.load_state(&good).unwrap().step, 3);
}

#[test]
fn saving_again_replaces_atomically_and_leaves_no_temporaries() {
    let dir = scratch("replace");
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    step(&mut s, 0);
    s.save_state(&dir.join("latest"), CheckpointKind::State).unwrap();
    step(&mut s, 1);
    s.save_state(&dir.join("latest"), CheckpointKind::State).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["latest".to_string()], "temporaries left behind");
    let manifest = hearth_engine::run::read_manifest(&dir.join("latest")).unwrap().unwrap();
    assert_eq!(manifest.step, 2);
    let files: Vec<String> = {
        let mut f: Vec<String> = std::fs::read_dir(dir.join("latest"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        f.sort();
        f
    };
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors", "hearth.json", "optimizer.safetensors"]);
}

#[test]
fn full_fine_tuning_state_and_merged_round_trip() {
    let dir = scratch("full");
    let mut s = Run::new(tiny(), TrainingConfig::Full).unwrap();
    step(&mut s, 0);
    step(&mut s, 1);
    s.save_state(&dir.join("state"), CheckpointKind::State).unwrap();
    s.save_state(&dir.join("merged"), CheckpointKind::Merged).unwrap();
    let resumed = Run::from_checkpoint(tiny(), &dir.join("state")).unwrap();
    assert_eq!(snapshot(&resumed), snapshot(&s));
    assert_eq!(resumed.step(), 2);
    // The merged folder is a model: load it as a base, its logits are the trained run's.
    let merged = Arc::new(BaseModel::load(&dir.join("merged"), &Device::Cpu, DType::F32).unwrap());
    let plain = Run::new(merged, TrainingConfig::Lora(LoraConfig::default())).unwrap();
    let tokens: Vec<u32> = b"warm model".iter().map(|&b| b as u32).collect();
    let diff = (s.logits(&tokens).unwrap() - plain.logits(&tokens).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    let _: Tensor = diff;
}
