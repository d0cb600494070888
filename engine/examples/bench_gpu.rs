//! hearth's side of `bench/gpu.sh`: parity, LoRA training throughput and decode speed on one
//! device, each printed as one JSON line (the script runs PyTorch + PEFT on the same inputs and
//! prints the comparison). Built for CUDA by `scripts/build-cuda.sh`; the CPU build runs the
//! script's `--cpu` mode with tiny shapes.
//!
//! ```text
//! bench_gpu config       --shape S                                 HF config.json of a shape
//! bench_gpu parity-model --out DIR                                 small random Llama + PEFT adapter + data
//! bench_gpu parity       --dir DIR --device D --dtype T --out F    logits, loss, logprobs, grads, greedy
//! bench_gpu train        --shape S --seq-len N [--batch B] [--steps K] [--warmup W] [--recompute auto|on|off]
//! bench_gpu decode       --shape S --batch B [--new-tokens N] [--prompt-len P]
//! ```
//! Shapes: `tiny` (CPU mode), `llama-3.2-1b`, `llama-3.1-8b` (random init, real dimensions).
//! `--device cpu|cuda|cuda:N`, `--dtype f32|bf16` (default bf16 on CUDA, f32 on the CPU).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use hearth_api::{
    AdamParams, CheckpointKind, Datum, ForwardBackwardInput, LoraConfig, LossFn, LossFnInputs, SampleInput,
    SamplingParams, TargetModule, TrainingConfig,
};
use hearth_engine::recompute::Recompute;
use hearth_engine::rng::Rng;
use hearth_engine::{device, BaseModel, ModelConfig, Run};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).map(String::as_str)
    }
    fn req(&self, name: &str) -> Result<&str> {
        self.get(name).with_context(|| format!("{name} is required"))
    }
    fn num(&self, name: &str, default: usize) -> Result<usize> {
        self.get(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name} needs a number")))
    }
    fn device(&self) -> Result<Device> {
        Ok(hearth_engine::device::open(self.get("--device").unwrap_or("cpu"))?)
    }
    fn dtype(&self, device: &Device) -> Result<DType> {
        Ok(match self.get("--dtype") {
            None if device.is_cpu() => DType::F32,
            None | Some("bf16") => DType::BF16,
            Some("f32") => DType::F32,
            Some(other) => bail!("--dtype {other}: f32 or bf16"),
        })
    }
}

/// HF `config.json` of a benchmark shape (Llama 3 dimensions, Llama 3 rope scaling).
fn shape_json(name: &str) -> Result<Value> {
    let (hidden, inter, layers, heads, kv, vocab, tie, factor) = match name {
        "tiny" => (64, 160, 2, 4, 2, 512, true, 8.0),
        "llama-3.2-1b" => (2048, 8192, 16, 32, 8, 128_256, true, 32.0),
        "llama-3.1-8b" => (4096, 14_336, 32, 32, 8, 128_256, false, 8.0),
        other => bail!("unknown shape {other}: tiny, llama-3.2-1b or llama-3.1-8b"),
    };
    Ok(json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5, "rope_theta": 500_000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": tie, "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "bos_token_id": 0, "eos_token_id": 1,
    }))
}

/// Every base tensor of a Llama config with its shape; `true` for norm weights (ones).
fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c], false)];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", vec![qd, c]),
            ("self_attn.k_proj", vec![kvd, c]),
            ("self_attn.v_proj", vec![kvd, c]),
            ("self_attn.o_proj", vec![c, qd]),
            ("mlp.gate_proj", vec![f, c]),
            ("mlp.up_proj", vec![f, c]),
            ("mlp.down_proj", vec![c, f]),
        ] {
            out.push((format!("{p}.{n}.weight"), s, false));
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![c], true));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![c], true));
    }
    out.push(("model.norm.weight".to_string(), vec![c], true));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, c], false));
    }
    out
}

/// A random-init base model of `shape` made directly on the device (no files: an 8B model
/// would take minutes to write and read back).
fn random_base(shape: &str, device: &Device, dtype: DType) -> Result<BaseModel> {
    let json = shape_json(shape)?;
    let config = ModelConfig::from_json(&json.to_string(), shape)?;
    let need: u64 = tensor_shapes(&config).iter().map(|(_, s, _)| s.iter().product::<usize>() as u64).sum::<u64>()
        * dtype.size_in_bytes() as u64;
    if let Some(free) = device::available_memory(device) {
        if need > free {
            bail!(
                "{shape} needs {:.1} GB of weights as {dtype:?}; {:.1} GB is free",
                need as f64 / 1e9,
                free as f64 / 1e9
            );
        }
    }
    let mut weights = HashMap::new();
    for (name, s, ones) in tensor_shapes(&config) {
        let t = if ones {
            Tensor::ones(s, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, s, device)?.to_dtype(dtype)?
        };
        weights.insert(name, t);
    }
    Ok(BaseModel {
        config,
        weights,
        device: device.clone(),
        dtype,
        source: PathBuf::from(shape),
        fingerprint: format!("bench-{shape}"),
        text: None,
        gguf: None,
        quantized: HashMap::new(),
        quantize: None,
    })
}

fn lora(rank: usize) -> TrainingConfig {
    TrainingConfig::Lora(LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        target_modules: TargetModule::ALL.to_vec(),
        seed: 0,
    })
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

fn ce_datum(tokens: &[u32]) -> Datum {
    let n = tokens.len() - 1;
    Datum::new(tokens[..n].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), vec![1.0; n]))
}

/// Model FLOPs of one LoRA training token (the convention both sides of the report use):
/// forward 2·N and input-gradient backward 2·N over the N weights of the projections and the
/// output head (frozen weights get no weight gradient), plus causal attention, 2·H·D·T/2·2 per
/// layer forward and twice that backward. Recompute is not counted.
fn flops_per_token(cfg: &ModelConfig, t: usize) -> f64 {
    let (c, f, v) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.vocab_size as f64);
    let (qd, kvd) = ((cfg.num_attention_heads * cfg.head_dim) as f64, (cfg.num_key_value_heads * cfg.head_dim) as f64);
    let per_layer = c * qd * 2.0 + c * kvd * 2.0 + 3.0 * c * f;
    let n = per_layer * cfg.num_hidden_layers as f64 + v * c;
    let attn_fwd = 2.0 * qd * t as f64; // QKᵀ and PV, each 2·H·D per visible key, T/2 keys on average
    4.0 * n + 3.0 * attn_fwd * cfg.num_hidden_layers as f64
}

fn gb(bytes: Option<u64>) -> Value {
    bytes.map_or(Value::Null, |b| json!(b as f64 / 1e9))
}

fn train(a: &Args) -> Result<Value> {
    let dev = a.device()?;
    let dtype = a.dtype(&dev)?;
    let shape = a.req("--shape")?;
    let (t, b, steps, warmup) =
        (a.num("--seq-len", 2048)?, a.num("--batch", 1)?, a.num("--steps", 3)?, a.num("--warmup", 1)?);
    let recompute = Recompute::parse(a.get("--recompute").unwrap_or("auto")).context("--recompute: auto, on or off")?;
    let load = Instant::now();
    let base = Arc::new(random_base(shape, &dev, dtype)?);
    let cfg = base.config.clone();
    let mut session = Run::new(base, lora(16))?;
    session.set_recompute(recompute);
    let load_s = load.elapsed().as_secs_f64();
    let mut rng = Rng::new(1);
    let data = (0..b).map(|_| ce_datum(&random_tokens(&mut rng, t + 1, cfg.vocab_size))).collect();
    let input = ForwardBackwardInput { data, loss_fn: LossFn::CrossEntropy };
    let adam = AdamParams { learning_rate: 1e-4, ..AdamParams::default() };
    device::reset_peak(&dev);
    let mut times = Vec::new();
    let mut loss = f64::NAN;
    for i in 0..warmup + steps {
        let start = Instant::now();
        let out = session.forward_backward(&input)?;
        session.optim_step(&adam)?;
        dev.synchronize()?;
        loss = out.metrics["loss:sum"] / (b * t) as f64;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    let tokens_per_s = (b * t * steps) as f64 / total;
    let flops = flops_per_token(&cfg, t);
    Ok(json!({
        "impl": "hearth", "what": "train", "shape": shape, "device": a.get("--device").unwrap_or("cpu"),
        "dtype": format!("{dtype:?}").to_lowercase(), "seq_len": t, "batch": b, "steps": steps,
        "recompute": recompute.applies(session.model(), b, t), "load_s": load_s,
        "tokens_per_s": tokens_per_s, "step_s": times, "flops_per_token": flops, "tflops": flops * tokens_per_s / 1e12,
        "peak_gb": gb(device::peak_bytes(&dev)), "loss_per_token": loss,
    }))
}

fn decode(a: &Args) -> Result<Value> {
    let dev = a.device()?;
    let dtype = a.dtype(&dev)?;
    let shape = a.req("--shape")?;
    let (n, new, prompt_len) = (a.num("--batch", 1)?, a.num("--new-tokens", 128)?, a.num("--prompt-len", 128)?);
    let base = Arc::new(random_base(shape, &dev, dtype)?);
    let vocab = base.config.vocab_size;
    let session = Run::new(base, lora(16))?;
    let prompt = random_tokens(&mut Rng::new(2), prompt_len, vocab);
    // greedy for one sequence, tempered sampling for a batch (what RL rollouts do)
    let temperature = if n == 1 { 0.0 } else { 1.0 };
    let input = |max_tokens| SampleInput {
        prompt: prompt.clone(),
        num_samples: n,
        sampling_params: SamplingParams { max_tokens, temperature, seed: Some(0), ..SamplingParams::default() },
        ..SampleInput::default()
    };
    let none = |_: &[u32]| String::new();
    session.sample(&input(4), &none, &|| false)?; // warm-up
    device::reset_peak(&dev);
    let start = Instant::now();
    let out = session.sample(&input(new), &none, &|| false)?;
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let generated: usize = out.sequences.iter().map(|s| s.tokens.len()).sum();
    Ok(json!({
        "impl": "hearth", "what": "decode", "shape": shape, "device": a.get("--device").unwrap_or("cpu"),
        "dtype": format!("{dtype:?}").to_lowercase(), "batch": n, "prompt_len": prompt_len, "new_tokens": new,
        "temperature": temperature, "seconds": secs, "tokens_per_s": generated as f64 / secs, "generated": generated,
        "peak_gb": gb(device::peak_bytes(&dev)),
    }))
}

/// A small random Llama in HF layout, a PEFT adapter with non-zero B, and the data parity uses.
fn parity_model(a: &Args) -> Result<Value> {
    let out = PathBuf::from(a.req("--out")?);
    std::fs::create_dir_all(&out)?;
    let mut json = shape_json("tiny")?;
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 688),
        ("num_hidden_layers", 4),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("vocab_size", 2048),
    ] {
        json[k] = json!(v);
    }
    json["tie_word_embeddings"] = json!(false);
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    let cfg = ModelConfig::from_json(&json.to_string(), "parity")?;
    let mut rng = Rng::new(11);
    let mut weights = HashMap::new();
    for (name, s, ones) in tensor_shapes(&cfg) {
        let n: usize = s.iter().product();
        let v = if ones { rng.normal_vec(n, 0.1).iter().map(|x| 1.0 + x).collect() } else { rng.normal_vec(n, 0.05) };
        weights.insert(name, Tensor::from_vec(v, s, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&weights, out.join("model.safetensors"))?;
    let base = Arc::new(BaseModel::load(&out, &Device::Cpu, DType::F32)?);
    let mut session = Run::new(base, lora(8))?;
    let mut params = HashMap::new();
    for (name, var) in session.parameters() {
        let t = var.as_tensor();
        let v = if name.contains("lora_B") {
            Tensor::from_vec(rng.normal_vec(t.elem_count(), 0.05), t.shape(), &Device::Cpu)?
        } else {
            t.copy()?
        };
        params.insert(name.clone(), v);
    }
    session.set_parameters(&params)?;
    session.save_state(&out.join("adapter"), CheckpointKind::Adapter)?;
    let data: Vec<Vec<u32>> = [97usize, 64].iter().map(|&n| random_tokens(&mut rng, n + 1, cfg.vocab_size)).collect();
    let prompt = random_tokens(&mut rng, 16, cfg.vocab_size);
    std::fs::write(
        out.join("data.json"),
        serde_json::to_string(&json!({"sequences": data, "greedy_prompt": prompt, "greedy_tokens": 32}))?,
    )?;
    Ok(json!({"what": "parity-model", "dir": out}))
}

fn parity(a: &Args) -> Result<Value> {
    let dev = a.device()?;
    let dtype = a.dtype(&dev)?;
    let dir = Path::new(a.req("--dir")?);
    let data: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("data.json"))?)?;
    let seqs: Vec<Vec<u32>> = serde_json::from_value(data["sequences"].clone())?;
    let prompt: Vec<u32> = serde_json::from_value(data["greedy_prompt"].clone())?;
    let base = Arc::new(BaseModel::load(dir, &dev, dtype)?);
    let mut session = Run::new(base, lora(8))?;
    let adapter = candle_core::safetensors::load(dir.join("adapter/adapter_model.safetensors"), &Device::Cpu)?;
    session.set_parameters(&adapter)?;
    let input =
        ForwardBackwardInput { data: seqs.iter().map(|s| ce_datum(s)).collect(), loss_fn: LossFn::CrossEntropy };
    // Threads as the server uses them: the model loaded on this thread, the step on another, a
    // copy of the gradients dropped on a third that made no device call. On a GPU the one
    // stream of `hearth_engine::device` orders all of it; a race shows up as a parity failure.
    let (out, logits) = std::thread::scope(|s| {
        s.spawn(|| -> Result<_> {
            let out = session.forward_backward(&input)?;
            let logits = session.logits(&seqs[0][..seqs[0].len() - 1])?;
            Ok((out, logits))
        })
        .join()
    })
    .map_err(|_| anyhow::anyhow!("the step's thread panicked"))??;
    let copy = session.accumulated_grads().clone();
    std::thread::spawn(move || drop(copy)).join().map_err(|_| anyhow::anyhow!("the dropping thread panicked"))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("logits.0".into(), logits.to_device(&Device::Cpu)?);
    for (i, o) in out.loss_fn_outputs.iter().enumerate() {
        tensors.insert(format!("logprobs.{i}"), Tensor::new(o.logprobs.as_slice(), &Device::Cpu)?);
    }
    for (name, g) in session.accumulated_grads() {
        tensors.insert(format!("grad.{name}"), g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    let sample = SampleInput {
        prompt,
        num_samples: 1,
        sampling_params: SamplingParams {
            max_tokens: data["greedy_tokens"].as_u64().unwrap_or(32) as usize,
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..SampleInput::default()
    };
    let greedy = session.sample(&sample, &|_: &[u32]| String::new(), &|| false)?;
    let file = PathBuf::from(a.req("--out")?);
    candle_core::safetensors::save(&tensors, file.with_extension("safetensors"))?;
    let summary = json!({
        "impl": "hearth", "what": "parity", "device": a.get("--device").unwrap_or("cpu"), "dtype": format!("{dtype:?}").to_lowercase(),
        "loss": out.metrics["loss:sum"], "greedy": greedy.sequences[0].tokens,
    });
    std::fs::write(file.with_extension("json"), summary.to_string())?;
    Ok(summary)
}

fn main() -> Result<()> {
    hearth_engine::alloc::keep_freed_memory();
    let args = Args(std::env::args().skip(1).collect());
    let result = match args.0.first().map(String::as_str) {
        Some("config") => shape_json(args.req("--shape")?),
        Some("parity-model") => parity_model(&args),
        Some("parity") => parity(&args),
        Some("train") => train(&args),
        Some("decode") => decode(&args),
        _ => bail!("usage: bench_gpu config|parity-model|parity|train|decode [options] (see the file's docs)"),
    };
    match result {
        Ok(v) => println!("{v}"),
        // one JSON line either way, so the script reports an out-of-memory and goes on
        Err(e) => println!("{}", json!({"impl": "hearth", "error": first_line(&format!("{e:#}")), "args": args.0})),
    }
    Ok(())
}

/// An error without the backtrace candle appends when RUST_BACKTRACE is set.
fn first_line(s: &str) -> String {
    s.split("\n   0:").next().unwrap_or(s).trim().to_string()
}
