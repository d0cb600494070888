//! Writing a model (Hugging Face names, any dtype) as a GGUF file that llama.cpp loads.
//!
//! Encodings: `F16` (every matrix F16), `Q8_0` (matrices whose rows are a multiple of 32 in
//! Q8_0, others F16), `Q4_K_M` (llama.cpp's recipe for that file type: Q4_K, with Q6_K for the
//! output matrix, and for `attn_v` and `ffn_down` in the first and last eighth of the layers and
//! every third one between; where a row is not a multiple of 256, llama.cpp's fallbacks Q5_0 for
//! Q4_K and Q8_0 for Q6_K). Norms and biases stay F32, as llama.cpp requires.

use super::file::{self, MetaValue, OutTensor};
use super::{gguf_name, llama3_factors, permute_rows, permutes_qk};
use crate::config::{Family, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A GGUF encoding of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// llama.cpp's "Q4_K_M" mix.
    Q4KM,
}

impl GgufType {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers Q4_K_M gives more bits.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The encoding of one tensor (GGUF name, Hugging Face shape).
fn tensor_type(name: &str, shape: &[usize], ty: GgufType, n_layers: usize, tied: bool) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = shape[shape.len() - 1];
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    match ty {
        GgufType::F16 => GgmlDType::F16,
        GgufType::Q8_0 => {
            if fits(GgmlDType::Q8_0) {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F16
            }
        }
        GgufType::Q4KM => {
            let layer =
                name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
            let more = |i: Option<usize>| i.is_some_and(|i| use_more_bits(i, n_layers));
            let output = name == "output.weight" || (tied && name == "token_embd.weight");
            let wanted = if output || ((name.contains(".attn_v.") || name.contains(".ffn_down.")) && more(layer)) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            match wanted {
                _ if fits(wanted) => wanted,
                GgmlDType::Q6K if fits(GgmlDType::Q8_0) => GgmlDType::Q8_0,
                GgmlDType::Q4K if fits(GgmlDType::Q5_0) => GgmlDType::Q5_0,
                _ => GgmlDType::F16,
            }
        }
    }
}

/// llama.cpp's architecture name for a family (Mistral goes out as `llama`, as llama.cpp's own
/// converter writes it; its sliding window is not kept).
pub fn arch_name(family: Family) -> &'static str {
    match family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    }
}

/// The `{arch}.*` metadata of a configuration.
fn model_metadata(cfg: &ModelConfig) -> Vec<(String, MetaValue)> {
    let arch = arch_name(cfg.family);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut out = vec![
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), MetaValue::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), MetaValue::F32(cfg.rms_norm_eps as f32)),
        (k("vocab_size"), u(cfg.vocab_size)),
    ];
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        out.push((k("rope.scaling.type"), MetaValue::Str("linear".into())));
        out.push((k("rope.scaling.factor"), MetaValue::F32(factor as f32)));
    }
    if let RopeScaling::Llama3 { original_max_position_embeddings, .. } = cfg.rope_scaling {
        out.push((k("rope.scaling.original_context_length"), u(original_max_position_embeddings)));
    }
    out
}

fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
}

/// Writes `weights` (Hugging Face names) of a model with configuration `cfg` to `path` as GGUF
/// of type `ty`. `metadata` brings `general.*` and `tokenizer.*` (vocabulary, merges, chat
/// template); the architecture, shape and encoding keys are written here.
pub fn write(
    path: &Path,
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    metadata: &[(String, MetaValue)],
    ty: GgufType,
) -> Result<()> {
    let arch = arch_name(cfg.family);
    let mut names: Vec<(&String, String)> = Vec::with_capacity(weights.len());
    for name in weights.keys() {
        let g = gguf_name(name).ok_or_else(|| EngineError::Weights(format!("`{name}` has no GGUF name")))?;
        names.push((name, g));
    }
    // token_embd, then the layers in order, then output_norm and output (as llama.cpp writes).
    let rank = |g: &str| -> (usize, usize, String) {
        match g.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => (1, l.parse().unwrap_or(0), rest.to_string()),
            None if g.starts_with("token_embd") => (0, 0, g.to_string()),
            None => (2, 0, g.to_string()),
        }
    };
    names.sort_by_key(|(_, g)| rank(g));
    let mut tensors = Vec::with_capacity(names.len() + 1);
    let permute = permutes_qk(arch);
    for (hf, g) in names {
        let mut t = weights[hf].clone();
        if permute && hf.contains(".self_attn.q_proj.") {
            t = permute_rows(&t.to_dtype(DType::F32)?, cfg.num_attention_heads, false)?;
        } else if permute && hf.contains(".self_attn.k_proj.") {
            t = permute_rows(&t.to_dtype(DType::F32)?, cfg.num_key_value_heads, false)?;
        }
        let shape = t.dims().to_vec();
        let dtype = tensor_type(&g, &shape, ty, cfg.num_hidden_layers, cfg.tie_word_embeddings);
        let data = encode(&t, dtype)?;
        tensors.push(OutTensor { name: g, shape, dtype, data });
    }
    if matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }) {
        let f: Vec<f32> =
            llama3_factors(&cfg.rope_scaling, cfg.rope_theta, cfg.head_dim).iter().map(|&x| x as f32).collect();
        let t = Tensor::from_vec(f, cfg.head_dim / 2, &Device::Cpu)?;
        tensors.push(OutTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![cfg.head_dim / 2],
            dtype: GgmlDType::F32,
            data: encode(&t, GgmlDType::F32)?,
        });
    }
    let mut meta: Vec<(String, MetaValue)> = vec![("general.architecture".into(), MetaValue::Str(arch.into()))];
    meta.extend(
        metadata
            .iter()
            .filter(|(k, _)| {
                k != "general.architecture" && k != "general.file_type" && k != "general.quantization_version"
            })
            .cloned(),
    );
    if !meta.iter().any(|(k, _)| k == "general.name") {
        meta.push(("general.name".into(), MetaValue::Str("hearth merged model".into())));
    }
    meta.push(("general.file_type".into(), MetaValue::U32(ty.file_type())));
    meta.push(("general.quantization_version".into(), MetaValue::U32(2)));
    meta.extend(model_metadata(cfg));
    file::write(path, &meta, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_and_falls_back_on_short_rows() {
        let n = 30;
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &[512, 1536], GgufType::Q4KM, n, true), GgmlDType::Q6K);
        assert_eq!(tensor_type("blk.6.ffn_down.weight", &[512, 1536], GgufType::Q4KM, n, true), GgmlDType::Q4K);
        assert_eq!(tensor_type("blk.5.attn_q.weight", &[576, 576], GgufType::Q4KM, n, true), GgmlDType::Q5_0);
        assert_eq!(tensor_type("token_embd.weight", &[49152, 576], GgufType::Q4KM, n, true), GgmlDType::Q8_0);
        assert_eq!(tensor_type("blk.5.attn_norm.weight", &[576], GgufType::Q4KM, n, true), GgmlDType::F32);
        assert_eq!(tensor_type("blk.5.attn_q.weight", &[64, 40], GgufType::Q8_0, n, true), GgmlDType::F16);
    }
}
