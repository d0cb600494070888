//! bf16 training keeps its sums in f32: the key and value gradients summed over query chunks,
//! and the weights a full fine-tuning step updates (an f32 master copy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{ce_datum, input};
use hearth_api::{AdamParams, LoraConfig, LossFn, TargetModule, TrainingConfig};
use hearth_engine::model::Chunking;
use hearth_engine::preset::Preset;
use hearth_engine::recompute::Recompute;
use hearth_engine::{BaseModel, Run};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

fn tiny_bf16() -> Arc<BaseModel> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("presets");
    let dir = Preset::Tiny.ensure(&root).unwrap();
    Arc::new(BaseModel::load(&dir, &Device::Cpu, DType::BF16).unwrap())
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

/// The LoRA gradients of one bf16 step with recompute, attention in chunks of `attn_elements`.
fn lora_grads(attn_elements: usize) -> BTreeMap<String, Tensor> {
    lora_grads_of(tiny_bf16(), attn_elements)
}

fn lora_grads_of(base: Arc<BaseModel>, attn_elements: usize) -> BTreeMap<String, Tensor> {
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        target_modules: vec![TargetModule::KProj, TargetModule::VProj],
        ..LoraConfig::default()
    };
    let mut s = Run::new(base, TrainingConfig::Lora(lora)).unwrap();
    s.set_recompute(Recompute::On);
    s.set_chunking(Chunking { attn_elements, head_elements: 1 << 24 });
    let text = "a long line of text, so that the keys and values are read by many chunks of queries: ".repeat(3);
    let batch = input(vec![ce_datum(&text)], LossFn::CrossEntropy);
    // B starts at zero, which makes A's gradient zero: one step first moves B
    s.forward_backward(&batch).unwrap();
    s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    s.forward_backward(&batch).unwrap();
    s.accumulated_grads().clone()
}

/// With one query row per chunk, each key's gradient is the sum of one partial per later query
/// (over 250 of them here). Summed in bf16 the running sum is rounded at every chunk; summed in
/// f32 and rounded once, the chunked step is as close to the f32 model's gradients as the
/// one-chunk step is. LoRA B's gradient of k_proj and v_proj is the key or value gradient times
/// x·Aᵀ, so it shows the sum directly: summed in bf16 its error against f32 was about 1.25 times
/// the one-chunk step's.
#[test]
fn bf16_key_and_value_gradients_are_summed_over_query_chunks_in_f32() {
    let one_chunk = lora_grads(1 << 20);
    let row_chunks = lora_grads(1);
    let truth = lora_grads_of(common::tiny(), 1 << 20);
    let (mut err_one, mut err_rows) = (0.0, 0.0);
    for (name, g) in truth.iter().filter(|(n, _)| n.contains("lora_B")) {
        let err = |x: &Tensor| norm(&(g - x.to_dtype(DType::F32).unwrap()).unwrap()) / norm(g);
        let (one, rows) = (err(&one_chunk[name]), err(&row_chunks[name]));
        eprintln!("{name}: error against f32 {one:.4} in one chunk, {rows:.4} in chunks of one row");
        err_one += one;
        err_rows += rows;
    }
    assert!(
        err_rows < 1.1 * err_one,
        "summed error against f32: {err_rows:.4} in row chunks, {err_one:.4} in one chunk"
    );
}

/// Updates far below a bf16 weight's precision (lr 1e-4 on weights near 1, whose bf16 spacing
/// is 2⁻⁷) add up in the f32 master copy and reach the weights; rounded into bf16 each step they
/// would vanish and the weights never move.
#[test]
fn full_fine_tuning_in_bf16_accumulates_small_updates_in_an_f32_master_copy() {
    let mut s = Run::new(tiny_bf16(), TrainingConfig::Full).unwrap();
    let batch = input(vec![ce_datum("small steps add up")], LossFn::CrossEntropy);
    let name = "model.norm.weight";
    let before = s.parameters().iter().find(|(n, _)| n == name).unwrap().1.as_tensor().to_dtype(DType::F32).unwrap();
    for _ in 0..40 {
        s.forward_backward(&batch).unwrap();
        s.optim_step(&AdamParams { learning_rate: 1e-4, ..AdamParams::default() }).unwrap();
    }
    let after = s.parameters().iter().find(|(n, _)| n == name).unwrap().1.as_tensor().to_dtype(DType::F32).unwrap();
    let moved = (after - &before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // 40 steps of about 1e-4 each: 4e-3, half a bf16 step at 1.0, so some weights round across
    assert!(moved > 0.0, "40 AdamW steps of lr 1e-4 left every bf16 weight of {name} where it was");
    // and the master copy goes into a `state` checkpoint, so a resumed run goes on from it
    let dir = tempdir();
    s.save_state(&dir.join("s"), hearth_api::CheckpointKind::State).unwrap();
    let mut resumed = Run::new(tiny_bf16(), TrainingConfig::Full).unwrap();
    resumed.load_state(&dir.join("s")).unwrap();
    for s in [&mut s, &mut resumed] {
        s.forward_backward(&batch).unwrap();
        s.optim_step(&AdamParams { learning_rate: 1e-4, ..AdamParams::default() }).unwrap();
    }
    for ((n, a), (_, b)) in s.parameters().iter().zip(resumed.parameters()) {
        let d = (a.as_tensor().to_dtype(DType::F32).unwrap() - b.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        assert_eq!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{n} differs after resume");
    }
}

fn tempdir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("precision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Work from several threads, in the order a server gives it: the model loaded on one thread,
/// steps on another, the accumulated gradients dropped on a third that never touched the
/// device. On a GPU one shared stream orders all of it (`hearth_engine::device`); on the CPU the
/// same sequence checks that nothing depends on the calling thread: the bits equal one thread's.
#[test]
fn work_from_other_threads_gives_the_bits_of_one_thread() {
    let batch = input(vec![ce_datum("one stream for every thread")], LossFn::CrossEntropy);
    let adam = AdamParams { learning_rate: 1e-2, ..AdamParams::default() };
    let run = |threads: bool| -> Vec<Vec<u32>> {
        let device = hearth_engine::device::open("cpu").unwrap();
        assert!(device.is_cpu());
        let spawn = |f: Box<dyn FnOnce() + Send + '_>| {
            if threads {
                std::thread::scope(|sc| sc.spawn(f).join().unwrap())
            } else {
                f()
            }
        };
        let mut s = None;
        spawn(Box::new(|| s = Some(Run::new(common::tiny(), TrainingConfig::default()).unwrap())));
        let mut s = s.unwrap();
        for _ in 0..3 {
            spawn(Box::new(|| {
                s.forward_backward(&batch).unwrap();
            }));
            // a copy of the gradients, dropped on a fresh thread while the session goes on
            let grads = s.accumulated_grads().clone();
            spawn(Box::new(move || drop(grads)));
            spawn(Box::new(|| {
                s.optim_step(&adam).unwrap();
            }));
        }
        s.parameters()
            .iter()
            .map(|(_, v)| {
                v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
            })
            .collect()
    };
    assert_eq!(run(true), run(false));
}
