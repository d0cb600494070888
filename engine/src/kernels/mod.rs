//! The hand-written ops below the model's layers, and the scheduler they share.
//!
//! - Row kernels with a hand-written backward (`rows`): RMSNorm, SwiGLU, rotary with the head
//!   transpose, the target log-probabilities of a log-softmax over the vocabulary.
//! - [`attention`]: causal grouped-query attention with the flash-attention backward.
//! - [`linear`]: the fused LoRA linear over a [`Frozen`] base weight, forward and backward each
//!   one parallel region; `mm` (`matmul`), the product the kernels run on.
//! - Decoding's whole linear layer for a few rows (`gemv`), and the ops with a constant operand
//!   whose backward gives only the input's gradient ([`frozen_matmul`], [`mul_const`],
//!   [`add_const`]: every backend).
//! - The parallel scheduler (`pool`): [`in_pool`], [`in_pool_for`], guided column slices.
//!
//! The layers ([`crate::linear`], [`crate::model`], …) decide which path a tensor takes; nothing
//! here imports them. The CPU kernels take CPU tensors in f32 or f64 ([`applies`]); every other
//! device or dtype (CUDA, Metal, bf16) uses the composed candle ops at the call sites, which keep
//! working everywhere and are these kernels' reference. [`set_enabled`] switches the CPU paths
//! off process-wide (tests compare both, `bench_train --fused off` measures the difference). Each
//! kernel is checked against finite differences in f64 and against its composed form in its
//! file's tests; the golden and gradient suites run the whole model through them.
//!
//! # Threads
//!
//! - A primitive runs for one caller at a time (the server's engine thread, a cell's session) and
//!   [`in_pool_for`] puts it where its device wants it: on the CPU into rayon's global pool, so
//!   every parallel kernel starts among warm siblings; on a GPU on the calling thread, bound to
//!   the device's one stream ([`crate::device`]).
//! - Training kernels split rows, and large products by output columns, over rayon, each task
//!   running gemm on one thread; small products and those inside a kernel's own tasks stay on the
//!   calling thread.
//! - Decoding's few-rows products (`gemv`) use candle's barrier pool, whose workers spin between
//!   ops; candle's large element-wise ops use rayon (vendored candle-core).
//! - rayon's idle workers look for work for 1 ms before they sleep (vendored rayon-core,
//!   `HEARTH_POOL_SPIN_US`), so a step's short serial stretches do not put the sibling to sleep.
//! - malloc keeps freed memory in one arena ([`crate::alloc`]) instead of returning and
//!   re-faulting it, and gemm keeps its packing buffer per thread (vendored gemm-common), so
//!   threads do not queue on that arena.

use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

mod attention;
mod frozen;
mod gemv;
mod linear;
mod math;
mod matmul;
mod pool;
mod qgemv;
mod real;
mod rows;
#[cfg(test)]
mod testing;

pub use attention::attention;
pub use frozen::{add_const, frozen_matmul, mul_const, Frozen};
pub(crate) use gemv::{linear_few_rows, linear_segments, LoraRows, WeightRows, MAX_SEGMENT_ROWS};
pub use linear::linear;
pub use pool::{in_pool, in_pool_for};
pub(crate) use real::with_cpu;
pub use rows::{rms_norm, rotary_to_heads, swiglu, target_logprobs};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused CPU paths on or off for the whole process (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused CPU paths are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a fused kernel can take `t`: on the CPU, in f32 or f64, and switched on.
pub fn applies(t: &Tensor) -> bool {
    applies_to(t.dtype(), t.device())
}

/// Whether the fused kernels take tensors of `dtype` on `device`.
pub fn applies_to(dtype: DType, device: &candle_core::Device) -> bool {
    enabled() && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}
