//! hearth's engine: the warm model that cells train.
//!
//! A Llama-family decoder ([`model`]: Llama, Mistral, Qwen2, Qwen3) built from differentiable
//! candle ops, LoRA adapters on any of its seven projections ([`linear`]), Tinker's losses
//! ([`loss`]), AdamW with torch semantics ([`optim`]), and a [`Run`] that exposes
//! `forward`, `forward_backward` and `optim_step` over the [`hearth_api`] data types. Models come
//! from a local Hugging Face folder ([`weights`]), a GGUF file ([`gguf`]) or a generated [`preset`],
//! dense or with a quantized frozen base ([`quant`], QLoRA). On the CPU the step runs through
//! hand-written kernels with their own backward passes ([`kernels`], the layer below the model's
//! layers).
//!
//! This crate knows nothing of HTTP, async runtimes or front-ends.
//!
//! # Threads
//!
//! The threading model (where each kind of work runs, and which vendored patch keeps which pool
//! awake) is stated once, in [`kernels`], beside the scheduler that implements it.
//!
//! ```
//! use hearth_api::{AdamParams, Datum, ForwardBackwardInput, LossFn, LossFnInputs, TrainingConfig};
//! use hearth_engine::{preset::Preset, BaseModel, Run};
//! use std::sync::Arc;
//!
//! # fn main() -> Result<(), hearth_engine::EngineError> {
//! let root = std::env::temp_dir().join(format!("hearth-doctest-{}", std::process::id()));
//! let dir = Preset::Tiny.ensure(&root)?;
//! let base = Arc::new(BaseModel::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)?);
//! let mut run = Run::new(base, TrainingConfig::default())?;
//! let tokens: Vec<u32> = "hello".bytes().map(u32::from).collect();
//! let datum = Datum::new(tokens[..4].to_vec(), LossFnInputs::cross_entropy(tokens[1..].to_vec(), vec![1.0; 4]));
//! let input = ForwardBackwardInput { data: vec![datum], loss_fn: LossFn::CrossEntropy };
//! let out = run.forward_backward(&input)?;
//! assert!(out.metrics["loss:sum"] > 0.0);
//! let step = run.optim_step(&AdamParams { learning_rate: 1e-3, ..AdamParams::default() })?;
//! assert_eq!(step.step, 1);
//! # std::fs::remove_dir_all(root).ok();
//! # Ok(())
//! # }
//! ```

pub mod alloc;
pub mod batch;
pub mod config;
pub mod device;
pub mod error;
pub mod fsutil;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod linear;
mod lora_ops;
pub mod loss;
pub mod model;
pub mod optim;
pub mod preset;
pub mod quant;
pub mod recompute;
pub mod rng;
pub mod run;
pub mod text;
pub mod tokenizer;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use error::{EngineError, Result};
pub use run::Run;
pub use weights::BaseModel;
