//! hearth's engine: the warm model that cells train.
//!
//! A Llama-family decoder ([`model`]: Llama, Mistral, Qwen2, Qwen3) built from differentiable
//! candle ops, LoRA adapters on any of its seven projections ([`linear`]), Tinker's losses
//! ([`loss`]), AdamW with torch semantics ([`optim`]), and a [`Run`] that exposes
//! `forward`, `forward_backward` and `optim_step` over the [`hearth_api`] data types. Models come
//! from a local Hugging Face folder ([`weights`]), a GGUF file ([`gguf`]) or a generated [`preset`],
//! dense or with a quantized frozen base ([`quant`], QLoRA). On the CPU the step runs through
//! fused kernels with hand-written backward passes ([`fused`]).
//!
//! This crate knows nothing of HTTP, async runtimes or front-ends.
//!
//! # Threads
//!
//! - A primitive runs for one caller at a time (the server's engine thread, a cell's session) and
//!   `fused::in_pool_for` puts it where its device wants it: on the CPU into rayon's global pool,
//!   so every parallel kernel starts among warm siblings; on a GPU on the calling thread, bound
//!   to the device's one stream ([`device`]).
//! - Training kernels ([`fused`]) split large products by output columns over rayon, each task
//!   running gemm on one thread; small products stay on the calling thread.
//! - Decoding's few-rows products (`gemv`) use candle's barrier pool, whose workers spin between
//!   ops; candle's large element-wise ops use rayon (vendored candle-core).
//! - rayon's idle workers look for work for 1 ms before they sleep (vendored rayon-core,
//!   `HEARTH_POOL_SPIN_US`), so a step's short serial stretches do not put the sibling to sleep.
//! - malloc keeps freed memory in one arena ([`alloc`]) instead of returning and re-faulting it,
//!   and gemm keeps its packing buffer per thread (vendored gemm-common), so threads do not queue
//!   on that arena.
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
pub mod fused;
mod gemv;
pub mod gguf;
pub mod hub;
pub mod linear;
mod lora_ops;
pub mod loss;
pub mod model;
pub mod ops;
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
