//! GGUF models in and out: the format llama.cpp, Ollama and LM Studio keep models in.
//!
//! **In.** [`load`] reads a `.gguf` file into the same shape a Hugging Face folder gives: a
//! [`ModelConfig`] from the `{arch}.*` metadata, tensors under their Hugging Face names,
//! dequantized to the run's dtype (hearth trains on dequantized weights: candle's `QMatMul` has
//! no backward and would silently cut the gradient of the layers below it), and a
//! `tokenizer.json` / `tokenizer_config.json` built from the `tokenizer.*` metadata
//! ([`tokenizer`]). llama.cpp stores `attn_q` and `attn_k` of Llama-architecture models permuted
//! for interleaved rotary; they are permuted back per head so the model, rotary and PEFT export
//! stay in Hugging Face layout. No `output.weight` means tied embeddings. Llama 3's rope scaling
//! arrives as a `rope_freqs.weight` tensor of per-frequency divisors and is mapped back to
//! Llama 3's parameters (refused if it matches none).
//!
//! **Out.** [`export`] writes a merged model as GGUF (F16, Q8_0 or Q4_K_M) with the tokenizer and
//! chat template metadata and q/k permuted again, which llama.cpp loads.
//!
//! Everything is checked before any tensor is read: architecture, shapes, tensor names and types,
//! that the data is all in the file, the tokenizer; errors name the file and what is wrong.

pub mod export;
pub mod file;
pub mod tokenizer;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use file::{GgufFile, MetaValue, TensorInfo};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Architectures hearth trains, by `general.architecture`.
pub const ARCHITECTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// What a model read from GGUF keeps: the Hugging Face files it stands for, and the metadata to
/// write back on export.
#[derive(Debug, Clone)]
pub struct GgufOrigin {
    /// `general.architecture`.
    pub arch: String,
    /// The `general.*` and `tokenizer.*` metadata (minus what describes the tensors' encoding).
    pub metadata: Vec<(String, MetaValue)>,
    /// `config.json` equivalent.
    pub config_json: Value,
    /// `tokenizer.json` built from the vocabulary.
    pub tokenizer_json: Value,
    /// `tokenizer_config.json`: chat template, bos/eos.
    pub tokenizer_config_json: Value,
}

/// True when `path` is a file that starts with GGUF's magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && &magic == file::MAGIC
}

/// Tensors outside the layers: (GGUF name, Hugging Face name).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Modules of layer N: (GGUF `blk.N.X`, Hugging Face `model.layers.N.X`).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a tensor name between the two conventions through the tables above (`to_hf`: GGUF →
/// Hugging Face).
fn map_name(name: &str, to_hf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if to_hf { (pair.0, pair.1) } else { (pair.1, pair.0) };
    if let Some((_, to)) = GLOBAL_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_hf { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, to) = LAYER_NAMES.iter().map(pick).find(|(from, _)| *from == module)?;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// The Hugging Face name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    map_name(gguf, true)
}

/// The GGUF name of a Hugging Face tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    map_name(hf, false)
}

/// Whether llama.cpp permutes q/k of this architecture for interleaved rotary (its Llama
/// converter does; Qwen's use NeoX rotary and are stored as in Hugging Face).
pub fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

/// Reorders the rows of a q or k projection (weight (out, in) or bias (out)) between llama.cpp's
/// interleaved layout and Hugging Face's half-split one. `to_hf` undoes llama.cpp's permutation.
pub fn permute_rows(t: &Tensor, heads: usize, to_hf: bool) -> Result<Tensor> {
    let out = t.dim(0)?;
    let half = out / heads / 2;
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut from: Vec<usize> = if to_hf { vec![heads, half, 2] } else { vec![heads, 2, half] };
    from.extend(&rest);
    // to_hf: (n, D/2, 2, in) -> (n, 2, D/2, in); export: (n, 2, D/2, in) -> (n, D/2, 2, in)
    Ok(t.reshape(from)?.transpose(1, 2)?.contiguous()?.reshape(t.dims())?)
}

/// A GGUF file's header and what it maps to, before any tensor is read.
#[derive(Debug)]
pub struct Plan {
    /// The header.
    pub file: GgufFile,
    /// The model configuration.
    pub config: ModelConfig,
    /// Hugging Face name of each tensor to load, in file order (`rope_freqs` excluded).
    pub names: Vec<(String, TensorInfo)>,
    /// Files and metadata kept for saving and export.
    pub origin: GgufOrigin,
}

impl Plan {
    /// Bytes the weights take once loaded as `dtype`.
    pub fn bytes(&self, dtype: DType) -> u64 {
        self.names.iter().map(|(_, t)| t.elem_count() * dtype.size_in_bytes() as u64).sum()
    }
}

/// Reads and checks a GGUF file's header: configuration, tensor names, shapes and types, and
/// tokenizer. Nothing is loaded.
pub fn plan(path: &Path) -> Result<Plan> {
    let file = GgufFile::open(path)?;
    let bad = |reason: String| EngineError::Gguf { path: path.to_path_buf(), reason };
    let arch = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| bad("general.architecture is missing".into()))?
        .to_string();
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(bad(format!(
            "architecture {arch:?} is not one hearth trains (supported: {})",
            ARCHITECTURES.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> std::result::Result<u64, String> {
        let v = file.get(&key(k)).ok_or_else(|| format!("{} is missing", key(k)))?;
        v.as_u64().ok_or_else(|| format!("{} is not a single integer ({v:?})", key(k)))
    };
    let opt_num = |k: &str| file.get(&key(k)).and_then(MetaValue::as_u64);
    let float = |k: &str| file.get(&key(k)).and_then(MetaValue::as_f64);
    let hidden = num("embedding_length").map_err(bad)?;
    let heads = num("attention.head_count").map_err(bad)?;
    let kv_heads = match file.get(&key("attention.head_count_kv")) {
        None => heads,
        Some(v) => v.as_u64().ok_or_else(|| {
            bad(format!("{} varies per layer; hearth needs one value", key("attention.head_count_kv")))
        })?,
    };
    let head_dim =
        opt_num("attention.key_length").or_else(|| opt_num("rope.dimension_count")).unwrap_or(hidden / heads.max(1));
    let embd = file.tensor("token_embd.weight").ok_or_else(|| bad("token_embd.weight is missing".into()))?;
    let vocab = opt_num("vocab_size").unwrap_or_else(|| embd.shape()[0] as u64);
    let tied = file.tensor("output.weight").is_none();
    let qkv_bias = file.tensor("blk.0.attn_q.bias").is_some();
    let o_bias = file.tensor("blk.0.attn_output.bias").is_some();

    // Rotary scaling: `rope.scaling.type` (linear), or Llama 3's as per-frequency factors.
    let mut rope_scaling = Value::Null;
    match file.get(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = float("rope.scaling.factor")
                .ok_or_else(|| bad(format!("{} is missing", key("rope.scaling.factor"))))?;
            rope_scaling = json!({"rope_type": "linear", "factor": factor});
        }
        Some(other) => return Err(bad(format!("rope scaling {other:?} is not supported (linear and Llama 3's are)"))),
    }
    let theta = float("rope.freq_base").unwrap_or(10_000.0);
    let mut reader = std::fs::File::open(path).map_err(EngineError::io("reading", path))?;
    if let Some(info) = file.tensor("rope_freqs.weight") {
        let factors = file.read_f32(&mut reader, info)?.to_vec1::<f32>()?;
        let orig = opt_num("rope.scaling.original_context_length").unwrap_or(8192);
        rope_scaling = llama3_scaling(&factors, theta, head_dim as usize, orig as usize).map_err(bad)?;
    }
    let eos = file.get("tokenizer.ggml.eos_token_id").and_then(MetaValue::as_u64);
    let bos = file.get("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64);
    let model_type = if arch == "mistral" { "mistral" } else { arch.as_str() };
    let config_json = json!({
        "architectures": [match model_type { "llama" => "LlamaForCausalLM", "mistral" => "MistralForCausalLM", "qwen2" => "Qwen2ForCausalLM", _ => "Qwen3ForCausalLM" }],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length").map_err(bad)?,
        "num_hidden_layers": num("block_count").map_err(bad)?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": opt_num("context_length").unwrap_or(2048),
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tied,
        "attention_bias": qkv_bias || o_bias,
        "sliding_window": opt_num("attention.sliding_window"),
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    let config = ModelConfig::from_json(&config_json.to_string(), &path.display().to_string())?;
    if arch == "llama" && o_bias != qkv_bias {
        return Err(bad(
            "llama with a bias on q/k/v but not on the output projection (or the reverse) is not supported".into(),
        ));
    }

    let mut names = Vec::with_capacity(file.tensors.len());
    for t in &file.tensors {
        if t.name == "rope_freqs.weight" {
            continue;
        }
        let hf = hf_name(&t.name)
            .ok_or_else(|| bad(format!("tensor `{}` is not part of a {arch} model as hearth knows it", t.name)))?;
        names.push((hf, t.clone()));
    }
    // Every tensor the model needs, with its shape, before anything is read.
    let expected = expected_shapes(&config);
    for (hf, t) in &names {
        match expected.get(hf.as_str()) {
            Some(shape) if *shape == t.shape() => {}
            Some(shape) => {
                return Err(bad(format!("tensor `{}` has shape {:?}, expected {shape:?}", t.name, t.shape())))
            }
            None => return Err(bad(format!("tensor `{}` does not belong in this {arch} model", t.name))),
        }
    }
    let have: std::collections::HashSet<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(missing) = expected.keys().filter(|n| !have.contains(n.as_str())).min() {
        return Err(bad(format!("tensor `{}` is missing", gguf_name(missing).unwrap_or_else(|| missing.clone()))));
    }

    let vocab_meta = tokenizer::GgufVocab::from_metadata(|k| file.get(k)).map_err(bad)?;
    if vocab_meta.tokens.len() > config.vocab_size {
        return Err(bad(format!(
            "the tokenizer has {} tokens, the embedding {} rows",
            vocab_meta.tokens.len(),
            config.vocab_size
        )));
    }
    let tokenizer_json = vocab_meta.to_hf_json().map_err(bad)?;
    let token = |id: Option<u32>| id.and_then(|i| vocab_meta.tokens.get(i as usize)).cloned();
    let tokenizer_config_json = json!({
        "chat_template": file.get("tokenizer.chat_template").and_then(MetaValue::as_str),
        "bos_token": token(vocab_meta.bos),
        "eos_token": token(vocab_meta.eos),
        "add_bos_token": vocab_meta.add_bos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let metadata = file
        .metadata
        .iter()
        .filter(|(k, _)| {
            (k.starts_with("general.") || k.starts_with("tokenizer."))
                && !matches!(k.as_str(), "general.alignment" | "general.file_type" | "general.quantization_version")
        })
        .cloned()
        .collect();
    let origin = GgufOrigin { arch, metadata, config_json, tokenizer_json, tokenizer_config_json };
    Ok(Plan { file, config, names, origin })
}

/// Hugging Face names and shapes of every tensor of a model.
pub fn expected_shapes(cfg: &ModelConfig) -> HashMap<String, Vec<usize>> {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, k, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let mut out = HashMap::new();
    out.insert("model.embed_tokens.weight".to_string(), vec![v, c]);
    out.insert("model.norm.weight".to_string(), vec![c]);
    if !cfg.tie_word_embeddings {
        out.insert("lm_head.weight".to_string(), vec![v, c]);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.insert(format!("{p}.input_layernorm.weight"), vec![c]);
        out.insert(format!("{p}.post_attention_layernorm.weight"), vec![c]);
        for (name, rows, cols) in
            [("q_proj", h * d, c), ("k_proj", k * d, c), ("v_proj", k * d, c), ("o_proj", c, h * d)]
        {
            out.insert(format!("{p}.self_attn.{name}.weight"), vec![rows, cols]);
        }
        if cfg.qkv_bias {
            for (name, rows) in [("q_proj", h * d), ("k_proj", k * d), ("v_proj", k * d)] {
                out.insert(format!("{p}.self_attn.{name}.bias"), vec![rows]);
            }
        }
        if cfg.o_bias {
            out.insert(format!("{p}.self_attn.o_proj.bias"), vec![c]);
        }
        if cfg.qk_norm {
            out.insert(format!("{p}.self_attn.q_norm.weight"), vec![d]);
            out.insert(format!("{p}.self_attn.k_norm.weight"), vec![d]);
        }
        for (name, rows, cols) in [("gate_proj", f, c), ("up_proj", f, c), ("down_proj", c, f)] {
            out.insert(format!("{p}.mlp.{name}.weight"), vec![rows, cols]);
        }
    }
    out
}

/// Llama 3's rope parameters from llama.cpp's per-frequency divisors (`rope_freqs.weight`),
/// checked by recomputing them.
fn llama3_scaling(factors: &[f32], theta: f64, head_dim: usize, orig: usize) -> std::result::Result<Value, String> {
    let factor = factors.iter().copied().fold(1.0f32, f32::max) as f64;
    let (low, high) = (1.0, 4.0);
    let cfg = RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: orig,
    };
    let want = llama3_factors(&cfg, theta, head_dim);
    let close = want.len() == factors.len()
        && want.iter().zip(factors).all(|(a, b)| (a - *b as f64).abs() <= 1e-3 * a.abs().max(1.0));
    if !close {
        return Err(format!(
            "rope_freqs.weight ({} factors, max {factor}) matches no Llama 3 rope scaling (low 1, high 4, original context {orig})",
            factors.len()
        ));
    }
    Ok(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": orig}))
}

/// llama.cpp's `rope_freqs` for Llama 3 scaling: the divisor of each inverse frequency.
pub fn llama3_factors(scaling: &RopeScaling, theta: f64, head_dim: usize) -> Vec<f64> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = *scaling
    else {
        return vec![1.0; head_dim / 2];
    };
    let old = original_max_position_embeddings as f64;
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high_freq_factor {
                1.0
            } else if wavelen > old / low_freq_factor {
                factor
            } else {
                let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Loads a planned GGUF model: every tensor dequantized, q/k permuted back where llama.cpp
/// permuted them, as `dtype` on `device`, under Hugging Face names.
pub fn load(plan: &Plan, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    Ok(load_quantized(plan, device, dtype, None)?.0)
}

/// [`load`], except that with `quantize` every 2-D weight stays quantized: as the file's blocks
/// where the file stores it quantized (rows reordered for q/k like the dense path), quantized to
/// `quantize`'s blocks where it stores it as floats. Returns the dense tensors and the quantized
/// ones (none without `quantize`).
pub fn load_quantized(
    plan: &Plan,
    device: &Device,
    dtype: DType,
    quantize: Option<crate::quant::Quantize>,
) -> Result<(HashMap<String, Tensor>, HashMap<String, crate::quant::QWeight>)> {
    use candle_core::quantized::GgmlDType;
    let path = &plan.file.path;
    let mut reader = std::fs::File::open(path).map_err(EngineError::io("reading", path))?;
    let permute = permutes_qk(&plan.origin.arch);
    let cfg = &plan.config;
    let (mut dense, mut quant) = (HashMap::with_capacity(plan.names.len()), HashMap::new());
    for (hf, info) in &plan.names {
        let heads = if permute && hf.contains(".self_attn.q_proj.") {
            Some(cfg.num_attention_heads)
        } else if permute && hf.contains(".self_attn.k_proj.") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        let quantizable = quantize.is_some() && crate::quant::quantizable(hf, &info.shape());
        let stored_quantized = !matches!(info.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if quantizable && stored_quantized {
            let order = match heads {
                Some(h) => {
                    let rows = info.shape()[0];
                    let idx = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
                    Some(
                        permute_rows(&idx, h, true)?
                            .flatten_all()?
                            .to_vec1::<u32>()?
                            .into_iter()
                            .map(|i| i as usize)
                            .collect::<Vec<_>>(),
                    )
                }
                None => None,
            };
            let q = plan.file.read_blocks(&mut reader, info, order.as_deref())?;
            let q = if device.is_cpu() {
                q
            } else {
                candle_core::quantized::QTensor::quantize_onto(&q.dequantize(&Device::Cpu)?, q.dtype(), device)?
            };
            quant.insert(hf.clone(), crate::quant::QWeight::from_qtensor(q)?);
            continue;
        }
        let mut t = plan.file.read_f32(&mut reader, info)?;
        if let Some(h) = heads {
            t = permute_rows(&t, h, true)?;
        }
        let t = t.to_dtype(dtype)?.to_device(device)?;
        match quantize {
            Some(kind) if quantizable => {
                quant.insert(hf.clone(), crate::quant::QWeight::quantize(hf, &t, kind)?);
            }
            _ => {
                dense.insert(hf.clone(), t);
            }
        }
    }
    Ok((dense, quant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for g in [
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "blk.3.attn_q.bias",
            "blk.12.ffn_down.weight",
            "blk.0.attn_k_norm.weight",
        ] {
            let hf = hf_name(g).unwrap();
            assert_eq!(gguf_name(&hf).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(hf_name("blk.1.attn_qkv.weight"), None);
    }

    #[test]
    fn the_qk_permutation_round_trips_and_interleaves_pairs() {
        // 2 heads of dim 4, 1 input column: rows 0..8
        let t = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let gg = permute_rows(&t, 2, false).unwrap();
        // head 0 rows [0,1 | 2,3] -> interleaved [0,2,1,3]
        assert_eq!(gg.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = permute_rows(&gg, 2, true).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..8).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn llama3_factors_map_back_to_their_parameters() {
        let cfg = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let f: Vec<f32> = llama3_factors(&cfg, 500_000.0, 64).iter().map(|&x| x as f32).collect();
        let v = llama3_scaling(&f, 500_000.0, 64, 8192).unwrap();
        assert_eq!(v["factor"], 32.0);
        let mut wrong = f.clone();
        wrong[10] *= 1.5;
        assert!(llama3_scaling(&wrong, 500_000.0, 64, 8192).is_err());
    }
}
