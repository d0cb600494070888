//! A run: a LoRA adapter or full weights, its optimizer and gradients, over a shared base model.
//! One file per primitive.

mod decode;
mod forward_backward;
mod optim_step;
mod sample;
mod save_state;

pub use decode::{Decoder, Detokenize, Finished, OnTokens};
pub use sample::{Picked, MAX_SAMPLES};
pub use save_state::{
    checkpoint_training_config, read_adapter_config, read_manifest, Loaded, Manifest, FORMAT, FORMAT_VERSION,
};

use crate::error::{EngineError, Result};
use crate::model::{Model, NamedParams};
use crate::optim::AdamW;
use crate::recompute::Recompute;
use crate::weights::BaseModel;
use candle_core::{DType, Tensor};
use hearth_api::TrainingConfig;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One run on a warm base model: the primitives `forward`, `forward_backward`, `optim_step`.
///
/// Gradients accumulate across `forward_backward` calls until `optim_step` applies and clears
/// them. Every primitive validates its input first; an error leaves the run unchanged.
#[derive(Debug)]
pub struct Run {
    base: Arc<BaseModel>,
    model: Model,
    params: NamedParams,
    grads: BTreeMap<String, Tensor>,
    optim: AdamW,
    training: TrainingConfig,
    /// Draws the seed of every `sample` call that brings none (saved in `state` checkpoints).
    rng: Arc<std::sync::Mutex<crate::rng::Rng>>,
    recompute: Recompute,
}

impl Run {
    /// A new run on `base`: LoRA adapters (B = 0) or a trainable copy of every weight.
    pub fn new(base: Arc<BaseModel>, training: TrainingConfig) -> Result<Self> {
        let (model, params) = Model::new_quantized(&base.config, &base.weights, &base.quantized, &training)?;
        let seed = match &training {
            TrainingConfig::Lora(l) => l.seed,
            TrainingConfig::Full => 0,
        };
        let rng = Arc::new(std::sync::Mutex::new(crate::rng::Rng::new(seed ^ 0x5A4D_504C_4552))); // "SAMPLER"
        Ok(Self {
            base,
            model,
            params,
            grads: BTreeMap::new(),
            optim: AdamW::default(),
            training,
            rng,
            recompute: Recompute::default(),
        })
    }

    /// When `forward_backward` recomputes activations instead of keeping them.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Sets when `forward_backward` recomputes activations (same gradients, less memory, about
    /// a third more compute).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// Sets how attention and the loss are split into chunks (see [`crate::model::Chunking`]).
    pub fn set_chunking(&mut self, chunking: crate::model::Chunking) {
        self.model.set_chunking(chunking);
    }

    /// The base model this run trains on.
    pub fn base(&self) -> &Arc<BaseModel> {
        &self.base
    }

    /// The decoder with this run's weights.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// What this run trains.
    pub fn training(&self) -> &TrainingConfig {
        &self.training
    }

    /// Trainable parameters with their checkpoint names (PEFT names for LoRA).
    pub fn parameters(&self) -> &[(String, candle_core::Var)] {
        &self.params
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optim.step
    }

    /// The optimizer state (moments and step).
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// Gradients accumulated since the last `optim_step`, by parameter name.
    pub fn accumulated_grads(&self) -> &BTreeMap<String, Tensor> {
        &self.grads
    }

    /// Replaces trainable values by name (e.g. from a PEFT `adapter_model.safetensors`).
    /// Every parameter must be present with its shape; otherwise nothing changes.
    pub fn set_parameters(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut staged = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let t = tensors.get(name).ok_or_else(|| EngineError::Weights(format!("parameter `{name}` is missing")))?;
            if t.dims() != var.dims() {
                return Err(EngineError::Weights(format!(
                    "parameter `{name}` has shape {:?}, this run expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            staged.push((var, t.to_dtype(var.dtype())?.to_device(var.device())?));
        }
        for (var, t) in staged {
            var.set(&t)?;
        }
        Ok(())
    }

    /// Logits (T, V) of one token sequence, for inspection and greedy decoding. The head runs
    /// over chunks of positions (no graph, no second (T, V) copy in the model's dtype); on a GPU
    /// a result past 2³² − 1 elements is refused ([`crate::recompute::check_indexable`]).
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor> {
        let cfg = &self.base.config;
        crate::batch::check_tokens(tokens, "tokens", cfg.vocab_size, cfg.max_position_embeddings)?;
        let t = tokens.len();
        crate::recompute::check_indexable(&self.model, 1, t)?;
        if !self.base.device.is_cpu()
            && (t as u64) * (cfg.vocab_size as u64) > crate::recompute::MAX_GPU_TENSOR_ELEMENTS
        {
            return Err(EngineError::InvalidParam {
                field: "tokens",
                value: format!("{t} positions"),
                reason: "their logits would pass 2^32 - 1 elements, past what the GPU kernels can index",
            });
        }
        let ids = Tensor::new(tokens, &self.base.device)?.unsqueeze(0)?; // (1,T)
        crate::kernels::in_pool_for(&self.base.device, || {
            let model = self.model.detached();
            let h = model.hidden(&ids)?; // (1,T,C)
            let chunk = model.chunking().head_positions(1, t, cfg.vocab_size);
            let parts = (0..t)
                .step_by(chunk)
                .map(|s| Ok(model.head(&h.narrow(1, s, chunk.min(t - s))?)?.squeeze(0)?.to_dtype(DType::F32)?))
                .collect::<Result<Vec<_>>>()?; // (len,V) each
            Ok(if parts.len() == 1 {
                parts.into_iter().next().ok_or(EngineError::EmptyBatch)?
            } else {
                Tensor::cat(&parts, 0)?
            })
        })
    }
}
