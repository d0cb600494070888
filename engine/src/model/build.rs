//! Building a [`Model`] for one run from a checkpoint's tensors: frozen base weights shared with
//! the base model (cheap clones, dense or quantized), trained ones fresh variables, LoRA pairs
//! initialised as PEFT does. Every tensor's presence and shape is checked here, so the layers can
//! rely on them.

use super::{Attention, Chunking, DecoderLayer, Mlp, Model, Rotary};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::linear::{Linear, Lora, RmsNorm, Weight};
use crate::quant::QWeight;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use hearth_api::{LoraConfig, TargetModule, TrainingConfig};
use std::collections::HashMap;

/// A trainable parameter with its checkpoint name (PEFT names for LoRA, HF names for full).
pub type NamedParams = Vec<(String, Var)>;

/// Builds weights for one run: frozen base tensors are shared (cheap clones), trained ones are
/// fresh variables.
struct Builder<'a> {
    weights: &'a HashMap<String, Tensor>,
    quantized: &'a HashMap<String, QWeight>,
    device: Device,
    training: &'a TrainingConfig,
    rng: Rng,
    params: NamedParams,
    lora_dtype: DType,
}

impl Builder<'_> {
    fn base(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .ok_or_else(|| EngineError::Weights(format!("tensor `{name}` is missing from the checkpoint")))
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        if let Some(q) = self.quantized.get(name) {
            let (r, c) = q.dims2();
            if [r, c] != shape {
                return Err(EngineError::Weights(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    [r, c]
                )));
            }
            return match self.training {
                TrainingConfig::Full => Err(EngineError::Weights(
                    "full fine-tuning needs a dense base, and this one is quantized: load it without quantization, or train LoRA".into(),
                )),
                TrainingConfig::Lora(_) => Ok(Weight::Quantized(q.clone())),
            };
        }
        let t = self.base(name)?;
        if t.dims() != shape {
            return Err(EngineError::Weights(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(match self.training {
            TrainingConfig::Full => {
                let var = Var::from_tensor(t)?;
                self.params.push((name.to_string(), var.clone()));
                Weight::Trainable(var)
            }
            TrainingConfig::Lora(_) => Weight::Frozen(t.clone()),
        })
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool, module: TargetModule) -> Result<Linear> {
        let weight = self.weight(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias { Some(self.weight(&format!("{prefix}.bias"), &[out])?) } else { None };
        let lora = match self.training {
            TrainingConfig::Lora(cfg) if cfg.target_modules.contains(&module) => {
                Some(self.lora(prefix, out, inp, cfg)?)
            }
            _ => None,
        };
        Ok(Linear { weight, bias, lora })
    }

    fn lora(&mut self, prefix: &str, out: usize, inp: usize, cfg: &LoraConfig) -> Result<Lora> {
        let device = self.device.clone();
        let r = cfg.rank;
        // PEFT: kaiming_uniform_(a=√5) → U(-1/√in, 1/√in); B = 0.
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::from_vec(self.rng.uniform_vec(r * inp, -bound, bound), (r, inp), &device)?;
        let a = Var::from_tensor(&a.to_dtype(self.lora_dtype)?)?;
        let b = Var::zeros((out, r), self.lora_dtype, &device)?;
        let peft = format!("base_model.model.{prefix}");
        self.params.push((format!("{peft}.lora_A.weight"), a.clone()));
        self.params.push((format!("{peft}.lora_B.weight"), b.clone()));
        Ok(Lora { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: cfg.alpha / r as f64, bt: None })
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.weight(name, &[dim])?, eps })
    }
}

impl Model {
    /// Builds the decoder over `weights` (HF tensor names, already on the device) for one run.
    /// LoRA parameters are f32 (f64 when the base is f64); returns the trainable parameters.
    pub fn new(
        config: &ModelConfig,
        weights: &HashMap<String, Tensor>,
        training: &TrainingConfig,
    ) -> Result<(Self, NamedParams)> {
        Self::new_quantized(config, weights, &HashMap::new(), training)
    }

    /// [`Model::new`] over a base whose 2-D weights may be held as quantized blocks
    /// (`quantized`, by checkpoint name, not in `weights`).
    pub fn new_quantized(
        config: &ModelConfig,
        weights: &HashMap<String, Tensor>,
        quantized: &HashMap<String, QWeight>,
        training: &TrainingConfig,
    ) -> Result<(Self, NamedParams)> {
        let cfg = config;
        if let TrainingConfig::Lora(l) = training {
            if l.rank == 0 {
                return Err(EngineError::InvalidParam {
                    field: "rank",
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return Err(EngineError::InvalidParam {
                    field: "alpha",
                    value: l.alpha.to_string(),
                    reason: "must be a positive number",
                });
            }
        }
        let embed_name = "model.embed_tokens.weight";
        // the device and dtype of a dense tensor (the norms always are)
        let norm_name = "model.norm.weight";
        let dense = weights
            .get(embed_name)
            .or_else(|| weights.get(norm_name))
            .ok_or_else(|| EngineError::Weights(format!("tensor `{norm_name}` is missing from the checkpoint")))?;
        let (device, dtype) = (dense.device().clone(), dense.dtype());
        let lora_dtype = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let seed = match training {
            TrainingConfig::Lora(l) => l.seed,
            TrainingConfig::Full => 0,
        };
        let mut bld = Builder {
            weights,
            quantized,
            device: device.clone(),
            training,
            rng: Rng::new(seed),
            params: Vec::new(),
            lora_dtype,
        };
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let (h, k, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let embed_tokens = bld.weight(embed_name, &[cfg.vocab_size, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(bld.norm(&format!("{a}.q_norm.weight"), d, eps)?),
                    Some(bld.norm(&format!("{a}.k_norm.weight"), d, eps)?),
                )
            } else {
                (None, None)
            };
            layers.push(DecoderLayer {
                input_layernorm: bld.norm(&format!("{p}.input_layernorm.weight"), c, eps)?,
                self_attn: Attention {
                    q_proj: bld.linear(&format!("{a}.q_proj"), h * d, c, cfg.qkv_bias, TargetModule::QProj)?,
                    k_proj: bld.linear(&format!("{a}.k_proj"), k * d, c, cfg.qkv_bias, TargetModule::KProj)?,
                    v_proj: bld.linear(&format!("{a}.v_proj"), k * d, c, cfg.qkv_bias, TargetModule::VProj)?,
                    o_proj: bld.linear(&format!("{a}.o_proj"), c, h * d, cfg.o_bias, TargetModule::OProj)?,
                    q_norm,
                    k_norm,
                    num_heads: h,
                    num_kv_heads: k,
                    head_dim: d,
                },
                post_attention_layernorm: bld.norm(&format!("{p}.post_attention_layernorm.weight"), c, eps)?,
                mlp: Mlp {
                    gate_proj: bld.linear(&format!("{m}.gate_proj"), f, c, false, TargetModule::GateProj)?,
                    up_proj: bld.linear(&format!("{m}.up_proj"), f, c, false, TargetModule::UpProj)?,
                    down_proj: bld.linear(&format!("{m}.down_proj"), c, f, false, TargetModule::DownProj)?,
                },
            });
        }
        let norm = bld.norm("model.norm.weight", c, eps)?;
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(bld.weight("lm_head.weight", &[cfg.vocab_size, c])?) };
        let rotary = Rotary::new(cfg, dtype, &device)?;
        let head_lora = match training {
            TrainingConfig::Lora(l) if l.target_modules.contains(&TargetModule::LmHead) => {
                Some(bld.lora("lm_head", cfg.vocab_size, c, l)?)
            }
            _ => None,
        };
        let trained_bytes = bld.params.iter().map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64).sum();
        let chunking = Chunking::for_device(&device);
        let model = Model {
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_lora,
            rotary,
            config: cfg.clone(),
            chunking,
            trained_bytes,
        };
        Ok((model, bld.params))
    }
}
