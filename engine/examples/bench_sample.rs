//! Sampling benchmark on the `smollm2-135m-shape` preset: a 256-token prompt, then 64 greedy
//! tokens at batch 1 (tokens/s including prefill, and decode alone), and `num_samples = 8`
//! aggregate throughput. Prints one JSON line; compare with `bench/ref_sample.py` in the same run.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use anyhow::Result;
use hearth_api::{SampleInput, SamplingParams, TrainingConfig};
use hearth_engine::preset::Preset;
use hearth_engine::rng::Rng;
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<()> {
    hearth_engine::alloc::keep_freed_memory();
    let home = std::env::var_os("HEARTH_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hearth"));
    let dir = Preset::Smollm2_135mShape.ensure(&home.join("models"))?;
    let base = Arc::new(BaseModel::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)?);
    let s = Run::new(base.clone(), TrainingConfig::default())?;
    let mut rng = Rng::new(2);
    let prompt: Vec<u32> = (0..256).map(|_| (rng.next_u64() % base.config.vocab_size as u64) as u32).collect();
    let run = |n: usize, max_tokens: usize, temperature: f32| {
        let input = SampleInput {
            prompt: prompt.clone(),
            num_samples: n,
            sampling_params: SamplingParams { max_tokens, temperature, seed: Some(0), ..SamplingParams::default() },
            prompt_logprobs: false,
            base_model_only: false,
        };
        let t = Instant::now();
        let out = s.sample(&input, &|_| String::new(), &|| false).unwrap();
        (t.elapsed().as_secs_f64(), out.sequences.iter().map(|q| q.tokens.len()).sum::<usize>())
    };
    run(1, 2, 0.0); // warm-up
    let (prefill, _) = run(1, 1, 0.0);
    let (total, tokens) = run(1, 64, 0.0);
    let (total8, tokens8) = run(8, 64, 1.0);
    println!(
        "{}",
        serde_json::json!({
            "impl": "hearth", "prompt_len": 256, "new_tokens": tokens, "total_s": total,
            "tokens_per_s": tokens as f64 / total, "prefill_s": prefill,
            "decode_tokens_per_s": (tokens - 1) as f64 / (total - prefill),
            "num_samples_8_tokens_per_s": tokens8 as f64 / total8,
        })
    );
    Ok(())
}
