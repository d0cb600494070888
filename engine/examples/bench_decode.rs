//! Continuous-batching benchmark on the `smollm2-135m-shape` preset: K requests (one sample each,
//! a 64-token prompt, 32 new tokens), each from its own run (LoRA r=16 on every projection),
//! decoded together by one `Decoder`, against one request alone and against one request of
//! `num_samples = K`. Prints one JSON line per K: prefill seconds per request, milliseconds per
//! decode step, and aggregate tokens/s. `K` from the command line (default 1 8).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use anyhow::Result;
use hearth_api::{SampleInput, SamplingParams, TrainingConfig};
use hearth_engine::preset::Preset;
use hearth_engine::run::Decoder;
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
    let ks: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ks = if ks.is_empty() { vec![1, 8] } else { ks };
    let runs: Vec<Run> = (0..*ks.iter().max().unwrap_or(&1))
        .map(|_| Run::new(base.clone(), TrainingConfig::default()))
        .collect::<hearth_engine::Result<_>>()?;
    let input = |i: usize, n: usize| SampleInput {
        prompt: (0..64).map(|j| (100 + 37 * (i + j)) as u32 % 49_000).collect(),
        num_samples: n,
        sampling_params: SamplingParams {
            max_tokens: 32,
            temperature: 1.0,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
        prompt_logprobs: false,
        base_model_only: false,
    };
    let detok = |_: &[u32]| String::new();
    // warm-up
    let mut d = Decoder::default();
    d.join(0, &runs[0], &input(0, 1), None)?;
    while !d.is_empty() {
        d.step(&detok);
    }
    for k in ks {
        for (shape, requests) in [("runs", k), ("num_samples", 1)] {
            let mut d = Decoder::default();
            let t0 = Instant::now();
            for (i, run) in runs.iter().enumerate().take(requests) {
                let n = if shape == "runs" { 1 } else { k };
                d.join(i as u64, run, &input(i, n), None)?;
            }
            let prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let mut steps = 0;
            while !d.is_empty() {
                d.step(&detok);
                steps += 1;
            }
            let decode = t1.elapsed().as_secs_f64();
            let total = prefill + decode;
            println!(
                "{{\"k\":{k},\"shape\":\"{shape}\",\"prefill_s_per_request\":{:.3},\"step_ms\":{:.1},\"tokens_per_s\":{:.1}}}",
                prefill / requests as f64,
                1e3 * decode / steps as f64,
                (k * 32) as f64 / total
            );
        }
    }
    Ok(())
}
