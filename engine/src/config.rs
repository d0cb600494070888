//! Model configuration: the fields of a Hugging Face `config.json` that a Llama-family decoder needs.
//!
//! Llama, Mistral, Qwen2 and Qwen3 are one decoder that differs only in these switches, so they
//! share one model file (`model.rs`) instead of four near-copies:
//!
//! | family  | q/k/v bias | q/k norm | sliding window | rope scaling |
//! |---------|------------|----------|----------------|--------------|
//! | llama   | `attention_bias` | no | no | `llama3`, `linear` |
//! | mistral | no         | no       | `sliding_window` | no |
//! | qwen2   | yes        | no       | no (refused if `use_sliding_window`) | no |
//! | qwen3   | `attention_bias` | yes | no | no |

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 1/2/3 (incl. SmolLM2).
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on q, k, v).
    Qwen2,
    /// Qwen3 (RMSNorm on q and k per head).
    Qwen3,
}

impl Family {
    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rope_type")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelength bound below which… see Llama 3.1's `apply_scaling`.
        low_freq_factor: f64,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f64,
        /// Context the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// The decoder's shape and switches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family.
    pub family: Family,
    /// C: width of the residual stream.
    pub hidden_size: usize,
    /// F: width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// H: query heads.
    pub num_attention_heads: usize,
    /// K: key/value heads (grouped-query attention when < H).
    pub num_key_value_heads: usize,
    /// D: width of one head.
    pub head_dim: usize,
    /// V: vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the rotary tables cover.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` also adds it there).
    pub o_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
    /// Attend to at most this many previous positions (Mistral).
    pub sliding_window: Option<usize>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
}

/// The raw `config.json` fields we read (others are ignored).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `rope_theta` and the scaling here.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    mlp_bias: bool,
    eos_token_id: Option<serde_json::Value>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(EngineError::io("reading", &path))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let bad = |reason: String| EngineError::Config { path: origin.to_string(), reason };
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let model_type = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first()).map(|a| arch_to_type(a)))
            .ok_or_else(|| bad("neither `model_type` nor `architectures` is set".into()))?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(bad(format!(
                    "model_type `{other}` is not supported (supported: llama, mistral, qwen2, qwen3)"
                )))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(bad(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if raw.mlp_bias {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be positive and even")));
        }
        let rope_params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref().or(rope_params)).map_err(bad)?;
        if family != Family::Llama && rope_scaling != RopeScaling::Default {
            return Err(bad(format!("rope scaling {rope_scaling:?} is only supported for llama")));
        }
        if family == Family::Qwen2 && raw.use_sliding_window == Some(true) {
            return Err(bad("qwen2 with use_sliding_window = true is not supported".into()));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
            Family::Mistral => (false, false),
        };
        let eos_token_ids = match &raw.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => Vec::new(),
        };
        Ok(ModelConfig {
            family,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            qk_norm: family == Family::Qwen3,
            sliding_window: if family == Family::Mistral { raw.sliding_window } else { None },
            eos_token_ids,
        })
    }

    /// Number of parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let (c, f, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (h, k) = (self.num_attention_heads, self.num_key_value_heads);
        let attn = c * h * d + 2 * c * k * d + h * d * c;
        let bias = if self.qkv_bias { h * d + 2 * k * d } else { 0 } + if self.o_bias { c } else { 0 };
        let norms = 2 * c + if self.qk_norm { 2 * d } else { 0 };
        let layer = attn + bias + 3 * c * f + norms;
        let embed = self.vocab_size * c;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * layer + embed + head + c
    }
}

fn arch_to_type(arch: &str) -> String {
    arch.trim_end_matches("ForCausalLM").to_lowercase()
}

fn parse_rope_scaling(value: Option<&serde_json::Value>) -> std::result::Result<RopeScaling, String> {
    let Some(v) = value.filter(|v| !v.is_null()) else { return Ok(RopeScaling::Default) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num =
        |key: &str| v.get(key).and_then(|x| x.as_f64()).ok_or_else(|| format!("rope scaling `{kind}` needs `{key}`"));
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(format!("rope scaling `{other}` is not supported (supported: default, linear, llama3)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_gets_qkv_bias_and_unknown_types_are_refused() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"qwen2","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"num_key_value_heads":1,"vocab_size":10}"#,
            "test",
        )
        .unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias && !cfg.qk_norm);
        assert_eq!(cfg.head_dim, 4);
        let err = ModelConfig::from_json(
            r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"vocab_size":10}"#,
            "test",
        )
        .unwrap_err();
        assert!(err.to_string().contains("model_type `gpt2` is not supported"), "{err}");
    }
}
