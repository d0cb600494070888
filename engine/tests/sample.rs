//! `sample`: greedy decoding equals transformers' `generate` token for token, seeded sampling
//! is reproducible, reported logprobs equal `forward`'s, stops and bad parameters behave.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use candle_core::{DType, Device};
use common::{ce_datum, fixture_dir, input, tiny};
use hearth_api::{
    AdamParams, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, SampleInput, SamplingParams, Stop,
    StopReason, TrainingConfig,
};
use hearth_engine::model::Chunking;
use hearth_engine::preset::Preset;
use hearth_engine::tokenizer::ByteTokenizer;
use hearth_engine::{BaseModel, EngineError, Run};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Deserialize)]
struct Greedy {
    cases: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct GreedyCase {
    with_adapter: bool,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

fn never() -> bool {
    false
}

fn detok(ids: &[u32]) -> String {
    ByteTokenizer.decode(ids)
}

fn greedy_matches_transformers(name: &str) {
    let dir = fixture_dir(name);
    let base = Arc::new(BaseModel::load(&dir, &Device::Cpu, DType::F32).unwrap());
    let lora = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
    let mut s = Run::new(base, TrainingConfig::Lora(lora)).unwrap();
    s.set_parameters(&candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap())
        .unwrap();
    let want: Greedy = serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap()).unwrap();
    for case in want.cases {
        let input = SampleInput {
            prompt: case.prompt.clone(),
            num_samples: 1,
            sampling_params: SamplingParams {
                max_tokens: case.tokens.len(),
                temperature: 0.0,
                ..SamplingParams::default()
            },
            prompt_logprobs: false,
            base_model_only: !case.with_adapter,
        };
        let out = s.sample(&input, &detok, &never).unwrap();
        let seq = &out.sequences[0];
        assert_eq!(seq.tokens, case.tokens, "{name} adapter={} prompt {:?}", case.with_adapter, case.prompt);
        assert_eq!(seq.stop_reason, StopReason::Length);
        for (g, w) in seq.logprobs.iter().zip(&case.logprobs) {
            assert!((g - w).abs() < 1e-4, "{name}: logprob {g} vs {w}");
        }
    }
}

#[test]
fn greedy_llama_matches_transformers_generate() {
    greedy_matches_transformers("llama");
}

#[test]
fn greedy_qwen2_matches_transformers_generate() {
    greedy_matches_transformers("qwen2");
}

fn tiny_input(n: usize, seed: Option<u64>) -> SampleInput {
    SampleInput {
        prompt: ByteTokenizer.encode("Once upon a time"),
        num_samples: n,
        sampling_params: SamplingParams {
            max_tokens: 16,
            temperature: 0.9,
            top_k: 60,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        },
        prompt_logprobs: true,
        base_model_only: false,
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let a = s.sample(&tiny_input(4, Some(7)), &detok, &never).unwrap();
    let b = s.sample(&tiny_input(4, Some(7)), &detok, &never).unwrap();
    let c = s.sample(&tiny_input(4, Some(8)), &detok, &never).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.sequences, c.sequences);
    assert_eq!(a.sequences.len(), 4);
    assert_ne!(a.sequences[0].tokens, a.sequences[1].tokens, "samples of one batch differ");
}

#[test]
fn sampled_logprobs_equal_forward_logprobs() {
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    // a few steps so the adapter is not zero: sampling must see the current weights
    for _ in 0..3 {
        s.forward_backward(&input(vec![ce_datum("the adapter moves")], LossFn::CrossEntropy)).unwrap();
        s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    }
    let input = tiny_input(3, Some(1));
    let out = s.sample(&input, &detok, &never).unwrap();
    let p = input.prompt.len();
    let prompt_lp = out.prompt_logprobs.clone().unwrap();
    assert_eq!(prompt_lp.len(), p);
    assert_eq!(prompt_lp[0], None);
    for seq in &out.sequences {
        let mut full = input.prompt.clone();
        full.extend(&seq.tokens);
        let n = full.len() - 1;
        let datum = Datum::new(full[..n].to_vec(), LossFnInputs::cross_entropy(full[1..].to_vec(), vec![1.0; n]));
        let fwd = s.forward(&ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy }).unwrap();
        let lp = &fwd.loss_fn_outputs[0].logprobs;
        for (i, got) in seq.logprobs.iter().enumerate() {
            assert!((got - lp[p - 1 + i]).abs() < 1e-4, "token {i}: sample {got} vs forward {}", lp[p - 1 + i]);
        }
        for (i, got) in prompt_lp[1..].iter().enumerate() {
            assert!((got.unwrap() - lp[i]).abs() < 1e-4, "prompt token {}", i + 1);
        }
    }
}

#[test]
fn device_picks_give_the_host_tokens_for_a_seed() {
    // `sample` on the CPU scores whole rows on the host; the device sampler (here on the CPU
    // too) must give the same tokens for a seed, and the same logprobs. In bf16, as on a GPU,
    // logits tie often, and the attention takes the composed path with its masks.
    let dir = Preset::Tiny.ensure(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("presets")).unwrap();
    let bf16 = Arc::new(BaseModel::load(&dir, &Device::Cpu, DType::BF16).unwrap());
    for base in [tiny(), bf16] {
        device_and_host_picks_agree(&Run::new(base, TrainingConfig::default()).unwrap());
    }
}

fn device_and_host_picks_agree(s: &Run) {
    // (temperature, top_k, top_p); 300 is past the vocabulary, 0.999 needs a nucleus wider
    // than the first 256 candidates
    let settings = [
        (0.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 0, 1.0),
        (1.3, 0, 1.0),
        (1.0, 1, 1.0),
        (0.7, 5, 1.0),
        (1.3, 40, 1.0),
        (1.0, 300, 1.0),
        (1.0, 0, 0.5),
        (0.7, 0, 0.9),
        (1.3, 0, 0.95),
        (1.0, 40, 0.9),
        (1.3, 5, 0.95),
        (0.7, 40, 0.5),
        (1.3, 0, 0.999),
    ];
    for (temperature, top_k, top_p) in settings {
        let input = SampleInput {
            prompt: ByteTokenizer.encode("Once upon a time"),
            num_samples: 6,
            sampling_params: SamplingParams {
                max_tokens: 32,
                temperature,
                top_k,
                top_p,
                seed: Some(11),
                ..SamplingParams::default()
            },
            prompt_logprobs: false,
            base_model_only: false,
        };
        let host = s.sample(&input, &detok, &never).unwrap();
        let device = s.sample_with_device_picks(&input, &detok, &never).unwrap();
        for (i, (h, d)) in host.sequences.iter().zip(&device.sequences).enumerate() {
            let case = format!("temperature {temperature}, top_k {top_k}, top_p {top_p}, sequence {i}");
            assert_eq!(h.tokens, d.tokens, "{case}");
            assert_eq!(h.stop_reason, d.stop_reason, "{case}");
            for (a, b) in h.logprobs.iter().zip(&d.logprobs) {
                assert!((a - b).abs() < 1e-5, "{case}: logprob {a} vs {b}");
            }
        }
        if temperature > 0.0 && top_k != 1 {
            assert_ne!(
                host.sequences[0].tokens, host.sequences[1].tokens,
                "temperature {temperature}, top_k {top_k}: samples differ"
            );
        }
    }
}

#[test]
fn prompt_logprobs_are_the_same_one_position_at_a_time() {
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let mut input = tiny_input(2, Some(5));
    input.sampling_params.temperature = 0.0;
    let whole = s.sample(&input, &detok, &never).unwrap();
    // one position's logits per chunk of the head
    s.set_chunking(Chunking { attn_elements: 1 << 26, head_elements: 1 });
    let chunked = s.sample(&input, &detok, &never).unwrap();
    let (a, b) = (whole.prompt_logprobs.unwrap(), chunked.prompt_logprobs.unwrap());
    assert_eq!(a.len(), input.prompt.len());
    assert_eq!((a[0], b[0]), (None, None));
    for (x, y) in a[1..].iter().zip(&b[1..]) {
        assert!((x.unwrap() - y.unwrap()).abs() < 1e-5, "{x:?} vs {y:?}");
    }
    // the first pick's row comes from a one-position head instead of the whole prompt's
    for (x, y) in whole.sequences.iter().zip(&chunked.sequences) {
        assert_eq!(x.tokens, y.tokens);
        assert!(x.logprobs.iter().zip(&y.logprobs).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}

#[test]
fn stop_tokens_and_strings_end_sequences() {
    let s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let free = s.sample(&tiny_input(1, Some(3)), &detok, &never).unwrap().sequences.remove(0);
    assert_eq!(free.stop_reason, StopReason::Length);
    assert_eq!(free.tokens.len(), 16);
    // Stop on the 5th token produced by the same seed: output ends there, reason `stop`.
    let mut input = tiny_input(1, Some(3));
    input.sampling_params.stop = vec![Stop::Token(free.tokens[4])];
    let stopped = s.sample(&input, &detok, &never).unwrap().sequences.remove(0);
    let first = free.tokens.iter().position(|&t| t == free.tokens[4]).unwrap();
    assert_eq!(stopped.tokens, free.tokens[..=first].to_vec());
    assert_eq!(stopped.stop_reason, StopReason::Stop);
    let text = detok(&free.tokens[..6]);
    let tail: String = text.chars().rev().take(1).collect();
    input.sampling_params.stop = vec![Stop::Text(tail.clone())];
    let by_text = s.sample(&input, &detok, &never).unwrap().sequences.remove(0);
    assert_eq!(by_text.stop_reason, StopReason::Stop);
    assert!(detok(&by_text.tokens).contains(&tail) && by_text.tokens.len() <= 6);
}

#[test]
fn bad_sampling_params_and_cancellation_are_errors() {
    let s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    type Edit = Box<dyn Fn(&mut SampleInput)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|i| i.sampling_params.max_tokens = 0), "invalid max_tokens = 0"),
        (Box::new(|i| i.sampling_params.temperature = -1.0), "invalid temperature = -1"),
        (Box::new(|i| i.sampling_params.top_p = 0.0), "invalid top_p = 0"),
        (Box::new(|i| i.num_samples = 0), "invalid num_samples = 0"),
        (Box::new(|i| i.prompt = vec![]), "invalid tokens = []"),
        (Box::new(|i| i.prompt[0] = 999), "prompt[0] = 999 is out of range"),
        (Box::new(|i| i.sampling_params.max_tokens = 5000), "invalid max_tokens = 5000"),
    ];
    for (edit, message) in cases {
        let mut input = tiny_input(1, Some(0));
        edit(&mut input);
        let err = s.sample(&input, &detok, &never).unwrap_err();
        assert!(err.to_string().contains(message), "got `{err}`, want `{message}`");
    }
    let err = s.sample(&tiny_input(2, Some(0)), &detok, &|| true).unwrap_err();
    assert!(matches!(err, EngineError::Interrupted), "{err}");
}
