//! Generated models in Hugging Face layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`), deterministic from a seed.
//!
//! No model hub is reachable where hearth is developed and tested, so the embedded default and
//! every test use these. Weights are N(0, initializer_range²) as transformers initialises Llama, norms are 1.

use crate::error::{EngineError, Result};
use crate::fsutil::{publish_dir, sync_file, write_json};
use crate::rng::Rng;
use crate::tokenizer::{ByteTokenizer, BYTE_VOCAB_SIZE, EOS_ID};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 4 layers, hidden 128, byte vocabulary: trains in seconds on a CPU.
    Tiny,
    /// SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152, tied):
    /// the benchmark model.
    Smollm2_135mShape,
}

/// ChatML, as SmolLM2 and Qwen use it.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 2] = [Preset::Tiny, Preset::Smollm2_135mShape];

    /// The preset's name (`tiny`, `smollm2-135m-shape`).
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Smollm2_135mShape => "smollm2-135m-shape",
        }
    }

    /// Looks a preset up by name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The `config.json` contents.
    pub fn config_json(&self) -> Value {
        // `tiny` uses a wider init than transformers' 0.02: at 0.02 a random 128-wide model's
        // tied logits span only about ±2.5, and LoRA cannot learn past that bound.
        let (hidden, inter, layers, heads, kv, vocab, theta, max_pos, init) = match self {
            Preset::Tiny => (128, 384, 4, 4, 2, BYTE_VOCAB_SIZE, 10_000.0, 1024, 0.1),
            Preset::Smollm2_135mShape => (576, 1536, 30, 9, 3, 49_152, 100_000.0, 2048, 0.02),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab,
            "max_position_embeddings": max_pos,
            "rms_norm_eps": 1e-5,
            "rope_theta": theta,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "attention_bias": false,
            "initializer_range": init,
            "bos_token_id": EOS_ID,
            "eos_token_id": EOS_ID,
            "torch_dtype": "float32",
            "hearth_preset": self.name(),
        })
    }

    /// Writes the preset into `dir` (which must not exist) atomically: a temporary sibling is
    /// filled, synced and renamed.
    pub fn write(&self, dir: &Path, seed: u64) -> Result<()> {
        publish_dir(dir, false, |tmp| self.write_files(tmp, seed))
    }

    fn write_files(&self, dir: &Path, seed: u64) -> Result<()> {
        let config = self.config_json();
        write_json(&dir.join("config.json"), &config)?;
        let cfg = crate::config::ModelConfig::from_json(&config.to_string(), self.name())?;
        let init = config["initializer_range"].as_f64().unwrap_or(0.02);
        let tensors = random_weights(&cfg, init, seed)?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| EngineError::Weights(format!("{}: {e}", path.display())))?;
        sync_file(&path)?;
        write_json(&dir.join("tokenizer.json"), &ByteTokenizer.to_hf_json())?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                    "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": cfg.max_position_embeddings}),
        )?;
        write_json(&dir.join("generation_config.json"), &json!({"bos_token_id": EOS_ID, "eos_token_id": EOS_ID}))
    }

    /// The preset's folder under `root`, written there first if it is not there yet (seed 0).
    pub fn ensure(&self, root: &Path) -> Result<PathBuf> {
        let dir = root.join(self.name());
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        match self.write(&dir, 0) {
            // Another process may have won the race to the rename; its copy is as good.
            Err(_) if dir.join("config.json").is_file() => Ok(dir),
            other => other.map(|()| dir),
        }
    }
}

/// N(0, std²) matrices and unit norms for every tensor of `cfg`, in checkpoint names.
fn random_weights(cfg: &crate::config::ModelConfig, std: f64, seed: u64) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    let mut normal = |name: String, shape: &[usize], rng: &mut Rng| -> Result<()> {
        let n = shape.iter().product();
        out.insert(name, Tensor::from_vec(rng.normal_vec(n, std), shape, &dev)?);
        Ok(())
    };
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    normal("model.embed_tokens.weight".into(), &[v, c], &mut rng)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        normal(format!("{p}.self_attn.q_proj.weight"), &[qd, c], &mut rng)?;
        normal(format!("{p}.self_attn.k_proj.weight"), &[kvd, c], &mut rng)?;
        normal(format!("{p}.self_attn.v_proj.weight"), &[kvd, c], &mut rng)?;
        normal(format!("{p}.self_attn.o_proj.weight"), &[c, qd], &mut rng)?;
        normal(format!("{p}.mlp.gate_proj.weight"), &[f, c], &mut rng)?;
        normal(format!("{p}.mlp.up_proj.weight"), &[f, c], &mut rng)?;
        normal(format!("{p}.mlp.down_proj.weight"), &[c, f], &mut rng)?;
    }
    if !cfg.tie_word_embeddings {
        normal("lm_head.weight".into(), &[v, c], &mut rng)?;
    }
    for i in 0..cfg.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.insert(format!("model.layers.{i}.{norm}.weight"), Tensor::ones(c, candle_core::DType::F32, &dev)?);
        }
    }
    out.insert("model.norm.weight".into(), Tensor::ones(c, candle_core::DType::F32, &dev)?);
    Ok(out)
}
