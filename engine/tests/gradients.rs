//! Gradients reach every trainable parameter, none is made for frozen weights, and autograd
//! agrees with finite differences in f64.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{ce_datum, fixture_dir, input, pg_datum, tiny};
use hearth_api::{AdamParams, LoraConfig, LossFn, PpoConfig, TargetModule, TrainingConfig};
use hearth_engine::model::Chunking;
use hearth_engine::recompute::Recompute;
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

#[test]
fn every_lora_parameter_gets_a_nonzero_gradient() {
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    assert_eq!(s.parameters().len(), 4 * 7 * 2, "A and B on seven projections in four layers");
    let batch = input(vec![ce_datum("the hearth keeps it warm"), ce_datum("never lose work")], LossFn::CrossEntropy);
    // B = 0 at creation, so A's gradient is exactly zero until one step has moved B.
    s.forward_backward(&batch).unwrap();
    s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    s.forward_backward(&batch).unwrap();
    let grads = s.accumulated_grads();
    for (name, _) in s.parameters() {
        let g = grads.get(name).unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(norm(g) > 0.0, "{name} has an all-zero gradient");
    }
}

#[test]
fn frozen_base_weights_get_no_gradient_buffers() {
    let s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let ids = Tensor::new(&[[104u32, 101, 97, 114, 116, 104]], &Device::Cpu).unwrap();
    let loss = s.model().forward(&ids).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    // Everything left in the store after backward is a leaf of the graph. With the frozen ops
    // that is the LoRA variables plus a few activations where the graph starts (layer 0's
    // input, which comes from the frozen embedding). A plain matmul, broadcast_mul or
    // broadcast_add would leave a gradient shaped like a base weight, norm or rotary table.
    let param_ids: Vec<_> = s.parameters().iter().map(|(_, v)| v.as_tensor().id()).collect();
    for (name, var) in s.parameters() {
        assert!(grads.get(var.as_tensor()).is_some(), "{name}");
    }
    let head_dim = s.base().config.head_dim;
    let weight_shapes: Vec<Vec<usize>> = s.base().weights.values().map(|w| w.dims().to_vec()).collect();
    let others: Vec<Vec<usize>> = grads
        .get_ids()
        .filter(|id| !param_ids.contains(id))
        .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
        .collect();
    for shape in &others {
        assert!(!weight_shapes.contains(shape), "a base weight got a gradient buffer: {shape:?}");
        assert_ne!(shape, &vec![6, head_dim], "a rotary table got a gradient buffer");
        assert!(shape.contains(&6), "not an activation of the 6 input positions: {shape:?}");
    }
    assert!(others.len() <= 8, "layer 0's boundary only: {others:?}");
}

#[test]
fn full_fine_tuning_trains_every_weight_and_lowers_the_loss() {
    let mut s = Run::new(tiny(), TrainingConfig::Full).unwrap();
    assert_eq!(s.num_trainable(), s.base().config.num_parameters());
    let batch = input(vec![ce_datum("teach a tiny model from scratch")], LossFn::CrossEntropy);
    let first = s.forward_backward(&batch).unwrap().metrics["loss:sum"];
    assert_eq!(s.accumulated_grads().len(), s.parameters().len(), "a gradient for every weight incl. embeddings");
    s.optim_step(&AdamParams { learning_rate: 3e-3, ..AdamParams::default() }).unwrap();
    for _ in 0..5 {
        s.forward_backward(&batch).unwrap();
        s.optim_step(&AdamParams { learning_rate: 3e-3, ..AdamParams::default() }).unwrap();
    }
    let last = s.forward(&batch).unwrap().metrics["loss:sum"];
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    // The shared base is untouched by full fine-tuning of a copy.
    // (the trained copy runs composed ops, the forward pass the fused CPU kernels on a detached
    // copy: the same values up to the order of additions)
    let fresh = Run::new(tiny(), TrainingConfig::Full).unwrap();
    let again = fresh.forward(&batch).unwrap().metrics["loss:sum"];
    assert!((again - first).abs() <= 1e-6 * first, "{again} vs {first}");
}

#[test]
fn full_fine_tuning_with_recompute_gives_the_gradients_of_the_whole_graph() {
    let batch = input(vec![ce_datum("recompute every layer"), ce_datum("and the embedding")], LossFn::CrossEntropy);
    let grads = |recompute: Recompute| {
        let mut s = Run::new(tiny(), TrainingConfig::Full).unwrap();
        s.set_recompute(recompute);
        s.set_chunking(Chunking { attn_elements: 1, head_elements: 1 });
        let loss = s.forward_backward(&batch).unwrap().metrics["loss:sum"];
        (loss, s.accumulated_grads().clone())
    };
    let (loss_whole, whole) = grads(Recompute::Off);
    let (loss_re, re) = grads(Recompute::On);
    assert!((loss_whole - loss_re).abs() <= 1e-5 * loss_whole.abs(), "{loss_whole} vs {loss_re}");
    assert_eq!(whole.len(), re.len(), "a gradient for every weight, embeddings included");
    for (name, g) in &whole {
        let diff = norm(&(g - &re[name]).unwrap());
        assert!(diff <= 1e-5 * norm(g).max(1e-12), "{name}: |whole - recompute| = {diff:e}, |whole| = {:e}", norm(g));
    }
}

/// Central differences on a few entries of every LoRA tensor, in f64.
fn finite_difference_check(fixture: &str, loss_fn: LossFn, data: Vec<hearth_api::Datum>) {
    finite_difference_check_with(fixture, loss_fn, data, Recompute::Off)
}

/// The same with a given recompute setting (chunks of one row when on).
fn finite_difference_check_with(fixture: &str, loss_fn: LossFn, data: Vec<hearth_api::Datum>, recompute: Recompute) {
    finite_difference_check_on(fixture, loss_fn, data, recompute, TargetModule::ALL.to_vec())
}

/// The same on given target modules: the fixture's adapter, and small fixed values for LoRA
/// pairs it does not have (`lm_head`'s).
fn finite_difference_check_on(
    fixture: &str,
    loss_fn: LossFn,
    data: Vec<hearth_api::Datum>,
    recompute: Recompute,
    modules: Vec<TargetModule>,
) {
    let base = Arc::new(BaseModel::load(&fixture_dir(fixture), &Device::Cpu, DType::F64).unwrap());
    let lora = LoraConfig { rank: 4, alpha: 8.0, target_modules: modules, ..LoraConfig::default() };
    let mut s = Run::new(base, TrainingConfig::Lora(lora)).unwrap();
    let mut adapter =
        candle_core::safetensors::load(fixture_dir(fixture).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (name, var) in s.parameters() {
        if !adapter.contains_key(name) {
            let n = var.as_tensor().elem_count();
            let v = ((Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap() * 0.37)
                .unwrap()
                .sin()
                .unwrap()
                * 0.05)
                .unwrap();
            adapter.insert(name.clone(), v.reshape(var.dims()).unwrap());
        }
    }
    s.set_parameters(&adapter).unwrap();
    s.set_recompute(recompute);
    if recompute == Recompute::On {
        s.set_chunking(Chunking { attn_elements: 1, head_elements: 1 });
    }
    let batch = input(data, loss_fn);
    s.forward_backward(&batch).unwrap();
    let grads = s.accumulated_grads().clone();
    let params: Vec<_> = s.parameters().to_vec();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in &params {
        let orig = var.as_tensor().copy().unwrap();
        let (rows, cols) = orig.dims2().unwrap();
        let g = grads[name].to_dtype(DType::F64).unwrap();
        for k in 0..3 {
            let (r, c) = ((k * 7 + 1) % rows, (k * 13 + 2) % cols);
            let at = |delta: f64| {
                let mut v: Vec<Vec<f64>> = orig.to_vec2().unwrap();
                v[r][c] += delta;
                var.set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
                s.forward(&batch).unwrap().metrics["loss:sum"]
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&orig).unwrap();
            let ag: f64 = g.i((r, c)).unwrap().to_scalar().unwrap();
            assert!(
                (fd - ag).abs() <= 1e-6 + 1e-5 * ag.abs(),
                "{fixture} {name}[{r},{c}]: finite difference {fd} vs autograd {ag}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * params.len());
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_lora_on_lm_head_tied_and_untied() {
    // qwen2's fixture ties lm_head to the embeddings, llama's does not; with recompute too
    for (fixture, recompute) in [("qwen2", Recompute::Off), ("llama", Recompute::Off), ("qwen2", Recompute::On)] {
        finite_difference_check_on(
            fixture,
            LossFn::CrossEntropy,
            vec![ce_datum("ABCDEF"), ce_datum("4321")],
            recompute,
            TargetModule::EVERY.to_vec(),
        );
    }
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_cross_entropy_qwen3() {
    finite_difference_check("qwen3", LossFn::CrossEntropy, vec![ce_datum("ABCDEFGH"), ce_datum("0123")]);
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_importance_sampling_qwen2() {
    finite_difference_check("qwen2", LossFn::ImportanceSampling, vec![pg_datum("ABCDEF", 0.7), pg_datum("4321", -1.2)]);
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_ppo_llama() {
    // Sampler logprobs of -5.5 against a model near -4.6 put every ratio above 1.2 with a
    // positive advantage (clipped, zero gradient) and negative advantages unclipped: both arms.
    let ppo = LossFn::Ppo(PpoConfig::default());
    finite_difference_check("llama", ppo, vec![pg_datum("=>?@AB", 0.5), pg_datum("+,-./", -0.8)]);
}

#[test]
fn finite_differences_agree_with_recomputed_gradients_in_f64_cross_entropy_mistral() {
    // sliding window 4 over 7 positions: the chunked attention masks keys by window and by causality
    let data = vec![ce_datum("ABCDEFG"), ce_datum("HIJK")];
    finite_difference_check_with("mistral", LossFn::CrossEntropy, data, Recompute::On);
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_dro_mistral() {
    let dro = LossFn::Dro(hearth_api::DroConfig { beta: 0.3 });
    finite_difference_check("mistral", dro, vec![pg_datum("=>?@AB", 0.5), pg_datum("+,-./", -0.8)]);
}

/// CISPO's clipped ratio is a constant (stop-gradient), so its gradient is that of cross-entropy
/// with weights clip(p/q)·A, and its loss is −Σ clip(p/q)·log p·A; DRO's loss is
/// −Σ (log p·A − β/2·(log p − log q)²). Both checked against the logprobs `forward` returns.
#[test]
fn cispo_and_dro_follow_tinkers_formulas() {
    let mut base = Run::new(tiny(), TrainingConfig::default()).unwrap();
    // move B off zero so every LoRA tensor has a gradient
    base.forward_backward(&input(vec![ce_datum("warm up the adapter")], LossFn::CrossEntropy)).unwrap();
    base.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    let params: std::collections::HashMap<String, Tensor> =
        base.parameters().iter().map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap())).collect();
    let session = || {
        let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
        s.set_parameters(&params).unwrap();
        s
    };
    // sampler logprobs near the model's, so some ratios fall inside the clip range and some outside
    let probe = input(vec![ce_datum("policy gradients"), ce_datum("clip the ratio")], LossFn::CrossEntropy);
    let model_lp: Vec<Vec<f32>> =
        session().forward(&probe).unwrap().loss_fn_outputs.into_iter().map(|o| o.logprobs).collect();
    let data: Vec<hearth_api::Datum> = probe
        .data
        .iter()
        .zip(&model_lp)
        .map(|(d, lp)| {
            let n = lp.len();
            let q: Vec<f32> = lp.iter().enumerate().map(|(i, l)| l + [-0.5, 0.1, 0.4, -0.05][i % 4]).collect();
            let adv: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { -1.0 } else { 0.5 + i as f32 * 0.1 }).collect();
            let targets = d.loss_fn_inputs.target_tokens.clone().unwrap();
            hearth_api::Datum::new(d.model_input.clone(), hearth_api::LossFnInputs::policy_gradient(targets, q, adv))
        })
        .collect();
    let (lo, hi) = (0.8f32, 1.2f32);
    let cispo = LossFn::Cispo(PpoConfig { clip_low_threshold: lo, clip_high_threshold: hi });
    let mut s = session();
    let out = s.forward_backward(&input(data.clone(), cispo)).unwrap();
    let mut want_loss = 0.0f64;
    let mut ce_data = Vec::new();
    let mut clipped = 0;
    for (d, o) in data.iter().zip(&out.loss_fn_outputs) {
        let inputs = &d.loss_fn_inputs;
        let (q, a) = (inputs.logprobs.as_ref().unwrap(), inputs.advantages.as_ref().unwrap());
        let w: Vec<f32> = o
            .logprobs
            .iter()
            .zip(q)
            .zip(a)
            .map(|((&lp, &q), &a)| {
                let r = (lp - q).exp();
                clipped += usize::from(!(lo..=hi).contains(&r));
                r.clamp(lo, hi) * a
            })
            .collect();
        want_loss -= o.logprobs.iter().zip(&w).map(|(&lp, &w)| (lp * w) as f64).sum::<f64>();
        ce_data.push(hearth_api::Datum::new(
            d.model_input.clone(),
            hearth_api::LossFnInputs::cross_entropy(inputs.target_tokens.clone().unwrap(), w),
        ));
    }
    assert!(
        clipped > 0 && clipped < out.loss_fn_outputs.iter().map(|o| o.logprobs.len()).sum::<usize>(),
        "both arms: {clipped} clipped"
    );
    let got = out.metrics["loss:sum"];
    assert!((got - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0), "cispo loss {got} vs {want_loss}");
    let mut ce = session();
    ce.forward_backward(&input(ce_data, LossFn::CrossEntropy)).unwrap();
    for (name, g) in s.accumulated_grads() {
        let w = &ce.accumulated_grads()[name];
        let diff = norm(&(g - w).unwrap());
        assert!(
            diff <= 1e-5 * norm(w).max(1e-12),
            "{name}: cispo gradient differs from weighted cross-entropy's by {diff:e}"
        );
    }

    let beta = 0.7f32;
    let out = session().forward(&input(data.clone(), LossFn::Dro(hearth_api::DroConfig { beta }))).unwrap();
    let mut want = 0.0f64;
    for (d, o) in data.iter().zip(&out.loss_fn_outputs) {
        let inputs = &d.loss_fn_inputs;
        for ((&lp, &q), &a) in
            o.logprobs.iter().zip(inputs.logprobs.as_ref().unwrap()).zip(inputs.advantages.as_ref().unwrap())
        {
            want -= (lp * a) as f64 - 0.5 * beta as f64 * ((lp - q) as f64).powi(2);
        }
    }
    let got = out.metrics["loss:sum"];
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "dro loss {got} vs {want}");
}

/// QLoRA on `tiny` quantized at load: the weights take a fraction of the dense bytes, training
/// lowers the loss along the dense base's curve (within 2% (q8) or 5% (q4) of the starting
/// loss at every step), and recompute on
/// and off give the same loss and gradients on the quantized base.
#[test]
fn a_quantized_base_trains_like_the_dense_one_with_recompute_on_and_off() {
    use hearth_engine::quant::Quantize;
    let dir = tiny().source.clone();
    let batch = input(vec![ce_datum("the hearth keeps it warm"), ce_datum("never lose work")], LossFn::CrossEntropy);
    let run = |base: &Arc<BaseModel>, recompute: Recompute, steps: usize| {
        let mut s = Run::new(base.clone(), TrainingConfig::default()).unwrap();
        s.set_recompute(recompute);
        let mut losses = Vec::new();
        for _ in 0..steps {
            losses.push(s.forward_backward(&batch).unwrap().metrics["loss:sum"]);
            s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
        }
        losses.push(s.forward_backward(&batch).unwrap().metrics["loss:sum"]);
        (losses, s.accumulated_grads().clone())
    };
    let dense = tiny();
    let (dense_curve, _) = run(&dense, Recompute::Off, 6);
    for (kind, tol, max_ratio) in [(Quantize::Q8, 0.02, 0.3), (Quantize::Q4, 0.05, 0.2)] {
        let q = Arc::new(BaseModel::load_quantized(&dir, &Device::Cpu, DType::F32, Some(kind)).unwrap());
        assert_eq!(q.fingerprint, dense.fingerprint);
        let ratio = q.weight_bytes() as f64 / dense.weight_bytes() as f64;
        assert!(ratio < max_ratio, "{kind:?}: weights take {ratio:.3} of the dense bytes");
        let (curve, grads_off) = run(&q, Recompute::Off, 6);
        let (curve_on, grads_on) = run(&q, Recompute::On, 6);
        eprintln!("{kind:?}: dense {dense_curve:?}\n  quantized {curve:?}\n  recompute {curve_on:?}");
        for (a, b) in dense_curve.iter().zip(&curve) {
            assert!((a - b).abs() <= tol * dense_curve[0], "{kind:?}: dense loss {a} vs quantized {b}");
        }
        assert!(curve[6] < 0.9 * curve[0], "{kind:?}: training lowers the loss: {curve:?}");
        for (a, b) in curve.iter().zip(&curve_on) {
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{kind:?}: recompute changes the loss: {a} vs {b}");
        }
        for (name, g) in &grads_off {
            let d = norm(&(g - &grads_on[name]).unwrap()) / norm(g).max(1e-12);
            assert!(d < 1e-3, "{kind:?}: {name}: recompute changes the gradient by {d:.2e}");
        }
    }
}
