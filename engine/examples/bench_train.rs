//! Training-step benchmark: forward + backward + AdamW on the `smollm2-135m-shape` preset with
//! LoRA r=16 on all seven projections, f32, batch 1 × T tokens (`--seq-len`, `--recompute
//! auto|on|off`, `--fused on|off`: the fused CPU kernels of `hearth_engine::kernels`, `--base f32|q8|q4`:
//! the base dense or quantized at load (QLoRA), `--model PATH` instead of the preset, `--lr`).
//! Prints one JSON line, with the loss of every step and the base weights' bytes.
//!
//! `--pools 1,2`: every step runs once on a rayon pool of each size, in turn (the order flips
//! each step), and the line adds each pool's tokens/s and the median over steps of the step-time
//! ratio of the first pool to each other one: thread scaling measured a second apart rather than
//! a run apart (a shared machine's speed drifts within minutes).
//!
//! Run through `bench/train_step.sh`, which also runs the PyTorch + PEFT reference
//! (`bench/ref_train_step.py`) in the same run and prints the ratio. Threads come from
//! `RAYON_NUM_THREADS` (candle's CPU backend and gemm use rayon's pool).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use anyhow::{Context, Result};
use hearth_api::{AdamParams, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, TrainingConfig};
use hearth_engine::preset::Preset;
use hearth_engine::rng::Rng;
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;
use std::time::Instant;

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).context("missing value")?.parse().with_context(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    hearth_engine::alloc::keep_freed_memory();
    let (seq_len, warmup, steps) = (arg("--seq-len", 256)?, arg("--warmup", 2)?, arg("--steps", 5)?);
    let home = std::env::var_os("HEARTH_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hearth"));
    let dir = Preset::Smollm2_135mShape.ensure(&home.join("models"))?;
    let args: Vec<String> = std::env::args().collect();
    let quantize = match args.iter().position(|a| a == "--base") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("f32") => None,
            Some(q) => Some(hearth_engine::quant::Quantize::parse(q).context("--base: f32, q8 or q4")?),
            None => anyhow::bail!("--base: f32, q8 or q4"),
        },
        None => None,
    };
    // --model PATH: a model folder or .gguf file instead of the random-init preset
    let path = match args.iter().position(|a| a == "--model") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).context("--model needs a path")?),
        None => dir,
    };
    let base =
        Arc::new(BaseModel::load_quantized(&path, &candle_core::Device::Cpu, candle_core::DType::F32, quantize)?);
    let lora = LoraConfig { rank: 16, alpha: 32.0, ..LoraConfig::default() };
    let mut session = Run::new(base.clone(), TrainingConfig::Lora(lora))?;
    let recompute = match args.iter().position(|a| a == "--recompute") {
        Some(i) => hearth_engine::recompute::Recompute::parse(args.get(i + 1).map_or("", String::as_str))
            .context("--recompute: auto, on or off")?,
        None => hearth_engine::recompute::Recompute::Auto,
    };
    session.set_recompute(recompute);
    let fused = match args.iter().position(|a| a == "--fused") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("on") => true,
            Some("off") => false,
            _ => anyhow::bail!("--fused: on or off"),
        },
        None => true,
    };
    hearth_engine::kernels::set_enabled(fused);
    let mut rng = Rng::new(1);
    let vocab = base.config.vocab_size as u64;
    let tokens: Vec<u32> = (0..=seq_len).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let datum =
        Datum::new(tokens[..seq_len].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), vec![1.0; seq_len]));
    let input = ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy };
    let adam = match args.iter().position(|a| a == "--lr") {
        Some(i) => AdamParams {
            learning_rate: args.get(i + 1).context("--lr needs a number")?.parse().context("--lr needs a number")?,
            ..AdamParams::default()
        },
        None => AdamParams::default(),
    };
    let pools: Vec<usize> = match args.iter().position(|a| a == "--pools") {
        Some(i) => args
            .get(i + 1)
            .context("--pools needs thread counts: 1,2")?
            .split(',')
            .map(|n| n.parse::<usize>().ok().filter(|&n| n > 0).context("--pools: thread counts such as 1,2"))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let pools: Vec<rayon::ThreadPool> =
        pools.iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build()).collect::<Result<_, _>>()?;
    let mut times = Vec::with_capacity(steps);
    let mut optim_times = Vec::with_capacity(steps);
    let mut pool_times = vec![Vec::with_capacity(steps); pools.len()];
    let mut losses = Vec::with_capacity(warmup + steps);
    let step = |session: &mut Run| -> Result<(f64, f64, f64)> {
        let t = Instant::now();
        let out = session.forward_backward(&input)?;
        let o = Instant::now();
        session.optim_step(&adam)?;
        Ok((
            t.elapsed().as_secs_f64(),
            o.elapsed().as_secs_f64(),
            out.metrics.get("loss:sum").copied().unwrap_or(f64::NAN),
        ))
    };
    for i in 0..warmup + steps {
        if pools.is_empty() {
            let (s, o, loss) = step(&mut session)?;
            if i >= warmup {
                times.push(s);
                optim_times.push(o);
            }
            losses.push(loss);
            continue;
        }
        let order: Vec<usize> = if i % 2 == 0 { (0..pools.len()).collect() } else { (0..pools.len()).rev().collect() };
        for p in order {
            let (s, o, loss) = pools[p].install(|| step(&mut session))?;
            if i >= warmup {
                pool_times[p].push(s);
                times.push(s);
                optim_times.push(o);
            }
            losses.push(loss);
        }
    }
    let pool_report: Vec<serde_json::Value> = pools
        .iter()
        .zip(&pool_times)
        .map(|(pool, t)| {
            let ratios: Vec<f64> = pool_times[0].iter().zip(t).map(|(a, b)| a / b).collect();
            serde_json::json!({
                "threads": pool.current_num_threads(), "tokens_per_s": (seq_len * t.len()) as f64 / t.iter().sum::<f64>(),
                "step_s_median": median_of(t.clone()), "speedup_over_first_median": median_of(ratios),
            })
        })
        .collect();
    let median = median_of(times.clone());
    let optim_median = median_of(optim_times);
    let total: f64 = times.iter().sum();
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "impl": "hearth", "candle": "0.11.1", "threads": threads, "seq_len": seq_len, "steps": steps,
            "tokens_per_s": (seq_len * times.len()) as f64 / total, "step_s_median": median, "optim_s_median": optim_median, "peak_rss_gb": hearth_engine::device::peak_bytes(&candle_core::Device::Cpu).map_or(f64::NAN, |b| b as f64 / 1e9),
            "recompute": recompute.applies(session.model(), 1, seq_len), "fused": fused,
            "base": quantize.map_or("f32", |q| q.name()), "weight_gb": base.weight_bytes() as f64 / 1e9,
            "losses": losses, "pools": pool_report,
        })
    );
    Ok(())
}
