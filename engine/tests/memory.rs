//! The memory a training step takes, measured, against the estimate that decides recompute and
//! refuses a step that cannot fit (`recompute::step_bytes`).
//!
//! A counting global allocator gives the peak of live heap bytes during one `forward_backward`
//! on the CPU, where every tensor is a heap allocation. The composed ops (fused kernels off) are
//! the ones a GPU runs, in f32 and in bf16 (f32 LoRA on a bf16 base, as on a GPU); the fused
//! f32 kernels are the CPU's own path. This binary holds one test so nothing else allocates
//! while it measures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device};
use hearth_api::{Datum, ForwardBackwardInput, LossFn, LossFnInputs, TrainingConfig};
use hearth_engine::model::Chunking;
use hearth_engine::preset::Preset;
use hearth_engine::recompute::{step_bytes, Recompute};
use hearth_engine::{BaseModel, Run};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn datum(t: usize, seed: usize) -> Datum {
    let toks: Vec<u32> = (0..=t).map(|i| ((i * 7 + seed * 13) % 200 + 30) as u32).collect();
    Datum::new(toks[..t].to_vec(), LossFnInputs::cross_entropy(toks[1..].to_vec(), vec![1.0; t]))
}

/// (measured peak, estimate) in bytes of the second of two identical steps (the first leaves
/// its gradients, the rotary tables and the allocator's caches in place, as a session's earlier
/// steps do).
fn measure(base: &Arc<BaseModel>, b: usize, t: usize, recompute: bool, chunking: Option<Chunking>) -> (u64, u64) {
    let mut s = Run::new(base.clone(), TrainingConfig::default()).unwrap();
    s.set_recompute(if recompute { Recompute::On } else { Recompute::Off });
    if let Some(c) = chunking {
        s.set_chunking(c);
    }
    let input = ForwardBackwardInput { data: (0..b).map(|i| datum(t, i)).collect(), loss_fn: LossFn::CrossEntropy };
    s.forward_backward(&input).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    s.forward_backward(&input).unwrap();
    let peak = PEAK.load(Ordering::Relaxed);
    ((peak - before) as u64, step_bytes(s.model(), b, t, recompute))
}

#[test]
fn the_step_estimate_is_within_15_percent_of_the_measured_peak() {
    let dir = Preset::Tiny.ensure(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("presets")).unwrap();
    // small chunks: the layer phase is the peak; the defaults: one attention chunk of every row
    let small = Chunking { attn_elements: 1 << 18, head_elements: 1 << 14 };
    let mut failures = Vec::new();
    for (name, dtype, fused) in
        [("bf16 composed", DType::BF16, false), ("f32 composed", DType::F32, false), ("f32 fused", DType::F32, true)]
    {
        hearth_engine::kernels::set_enabled(fused);
        let base = Arc::new(BaseModel::load(&dir, &Device::Cpu, dtype).unwrap());
        for (b, t) in [(1, 256), (2, 512), (1, 1024)] {
            for (recompute, chunking) in [(false, None), (true, None), (true, Some(small))] {
                let (measured, estimated) = measure(&base, b, t, recompute, chunking);
                let off = estimated as f64 / measured as f64 - 1.0;
                let case = format!(
                    "{name:13} b={b} t={t:4} recompute={recompute:5} small chunks={:5}: measured {:7.2} MB, estimated {:7.2} MB ({:+.0}%)",
                    chunking.is_some(),
                    measured as f64 / 1e6,
                    estimated as f64 / 1e6,
                    off * 100.0
                );
                println!("{case}");
                if off.abs() > 0.15 {
                    failures.push(case);
                }
            }
        }
    }
    hearth_engine::kernels::set_enabled(true);
    assert!(failures.is_empty(), "estimates off by more than 15%:\n{}", failures.join("\n"));
}
