//! Bad input gets a clear error naming the field, and changes nothing: an identical `forward`
//! afterwards returns identical numbers, accumulated gradients and the step are as they were.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ce_datum, input, pg_datum, tiny};
use hearth_api::{AdamParams, Datum, ForwardBackwardInput, LoraConfig, LossFn, PpoConfig, TrainingConfig};
use hearth_engine::{EngineError, Run};

fn snapshot(
    s: &Run,
    probe: &ForwardBackwardInput,
) -> (hearth_api::ForwardBackwardOutput, Vec<(String, Vec<f32>)>, u64) {
    let grads = s
        .accumulated_grads()
        .iter()
        .map(|(k, g)| (k.clone(), g.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    (s.forward(probe).unwrap(), grads, s.step())
}

fn bad_batches() -> Vec<(&'static str, ForwardBackwardInput, &'static str)> {
    let ok = ce_datum("hello hearth");
    let with = |f: &dyn Fn(&mut Datum)| {
        let mut d = ok.clone();
        f(&mut d);
        d
    };
    let ce = LossFn::CrossEntropy;
    let ppo = LossFn::Ppo(PpoConfig::default());
    vec![
        ("empty batch", input(vec![], ce), "empty batch"),
        ("empty datum", input(vec![with(&|d| d.model_input.clear())], ce), "data[0].model_input is empty"),
        (
            "out-of-range input id",
            input(vec![ok.clone(), with(&|d| d.model_input[3] = 259)], ce),
            "data[1].model_input[3] = 259 is out of range: the vocabulary has 259 tokens",
        ),
        (
            "out-of-range target id",
            input(vec![with(&|d| d.loss_fn_inputs.target_tokens.as_mut().unwrap()[0] = 100_000)], ce),
            "data[0].loss_fn_inputs.target_tokens[0] = 100000 is out of range",
        ),
        (
            "length mismatch",
            input(vec![with(&|d| d.loss_fn_inputs.weights.as_mut().unwrap().push(1.0))], ce),
            "data[0].loss_fn_inputs.weights has 12 entries, model_input has 11",
        ),
        (
            "missing weights",
            input(vec![with(&|d| d.loss_fn_inputs.weights = None)], ce),
            "data[0].loss_fn_inputs.weights is missing: loss `cross_entropy` needs target_tokens, weights",
        ),
        (
            "missing advantages for ppo",
            input(vec![with(&|d| d.loss_fn_inputs.logprobs = Some(vec![-1.0; 11]))], ppo),
            "data[0].loss_fn_inputs.advantages is missing: loss `ppo` needs target_tokens, logprobs, advantages",
        ),
        (
            "NaN advantage",
            input(
                vec![{
                    let mut d = pg_datum("hello hearth", 1.0);
                    d.loss_fn_inputs.advantages.as_mut().unwrap()[4] = f32::NAN;
                    d
                }],
                LossFn::ImportanceSampling,
            ),
            "data[0].loss_fn_inputs.advantages[4] is NaN: inputs must be finite",
        ),
        (
            "infinite weight",
            input(vec![with(&|d| d.loss_fn_inputs.weights.as_mut().unwrap()[2] = f32::INFINITY)], ce),
            "data[0].loss_fn_inputs.weights[2] is inf: inputs must be finite",
        ),
        (
            "ppo clip bound",
            input(
                vec![pg_datum("hello", 1.0)],
                LossFn::Ppo(PpoConfig { clip_low_threshold: 1.5, clip_high_threshold: 1.2 }),
            ),
            "invalid clip_low_threshold = 1.5: must be in (0, 1]",
        ),
        (
            "longer than the context",
            input(
                vec![Datum::new(
                    vec![1; 1025],
                    hearth_api::LossFnInputs::cross_entropy(vec![1; 1025], vec![1.0; 1025]),
                )],
                ce,
            ),
            "data[0] has 1025 tokens; the model's context is 1024 tokens",
        ),
    ]
}

#[test]
fn bad_batches_get_clear_errors_and_change_nothing() {
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let probe = input(vec![ce_datum("the probe"), ce_datum("stays the same")], LossFn::CrossEntropy);
    // Move B off zero and leave gradients accumulated, so "unchanged" covers both.
    s.forward_backward(&probe).unwrap();
    s.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    s.forward_backward(&probe).unwrap();
    let before = snapshot(&s, &probe);
    for (case, batch, message) in bad_batches() {
        for forward_only in [false, true] {
            let err = if forward_only { s.forward(&batch) } else { s.forward_backward(&batch) }.unwrap_err();
            assert!(err.is_user_error(), "{case}: {err}");
            assert!(err.to_string().contains(message), "{case}: got `{err}`, want `{message}`");
        }
        assert_eq!(snapshot(&s, &probe), before, "{case} changed the session");
    }
}

#[test]
fn bad_optimizer_params_are_refused_before_anything_moves() {
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let probe = input(vec![ce_datum("optimizer probe")], LossFn::CrossEntropy);
    let err = s.optim_step(&AdamParams::default()).unwrap_err();
    assert!(matches!(err, EngineError::NoGradients), "{err}");
    s.forward_backward(&probe).unwrap();
    let before = snapshot(&s, &probe);
    let cases = [
        (AdamParams { learning_rate: f64::NAN, ..AdamParams::default() }, "invalid learning_rate = NaN"),
        (AdamParams { learning_rate: -1e-3, ..AdamParams::default() }, "invalid learning_rate = -0.001"),
        (AdamParams { beta1: 1.0, ..AdamParams::default() }, "invalid beta1 = 1: must be in [0, 1)"),
        (AdamParams { beta2: -0.1, ..AdamParams::default() }, "invalid beta2 = -0.1"),
        (AdamParams { eps: -1.0, ..AdamParams::default() }, "invalid eps = -1"),
        (AdamParams { weight_decay: f64::INFINITY, ..AdamParams::default() }, "invalid weight_decay = inf"),
        (AdamParams { grad_clip_norm: -1.0, ..AdamParams::default() }, "invalid grad_clip_norm = -1"),
    ];
    for (params, message) in cases {
        let err = s.optim_step(&params).unwrap_err();
        assert!(err.to_string().contains(message), "got `{err}`, want `{message}`");
        assert_eq!(snapshot(&s, &probe), before, "{message} changed the session");
    }
    assert_eq!(s.optim_step(&AdamParams::default()).unwrap().step, 1);
    assert!(s.accumulated_grads().is_empty(), "optim_step clears the gradients");
}

#[test]
fn bad_lora_configs_are_refused() {
    for (lora, message) in [
        (LoraConfig { rank: 0, ..LoraConfig::default() }, "invalid rank = 0"),
        (LoraConfig { alpha: -2.0, ..LoraConfig::default() }, "invalid alpha = -2"),
    ] {
        let err = Run::new(tiny(), TrainingConfig::Lora(lora)).unwrap_err();
        assert!(err.to_string().contains(message), "got `{err}`");
    }
}

#[test]
fn gradients_accumulate_as_a_sum_until_optim_step() {
    let (a, b) = (ce_datum("first half"), ce_datum("second half of it"));
    let mut split = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let mut joint = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let adam = AdamParams { learning_rate: 1e-2, ..AdamParams::default() };
    for s in [&mut split, &mut joint] {
        s.forward_backward(&input(vec![a.clone(), b.clone()], LossFn::CrossEntropy)).unwrap();
        s.optim_step(&adam).unwrap();
    }
    split.forward_backward(&input(vec![a.clone()], LossFn::CrossEntropy)).unwrap();
    split.forward_backward(&input(vec![b.clone()], LossFn::CrossEntropy)).unwrap();
    joint.forward_backward(&input(vec![a, b], LossFn::CrossEntropy)).unwrap();
    for (name, g) in joint.accumulated_grads() {
        let want: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = split.accumulated_grads()[name].flatten_all().unwrap().to_vec1().unwrap();
        let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err / scale < 1e-4, "{name}: rel err {}", err / scale);
    }
}

#[test]
fn a_step_too_large_for_memory_is_refused_before_it_runs_and_changes_nothing() {
    use hearth_engine::recompute::Recompute;
    let mut s = Run::new(tiny(), TrainingConfig::default()).unwrap();
    let probe = input(vec![ce_datum("hello hearth")], LossFn::CrossEntropy);
    s.forward_backward(&probe).unwrap();
    let before = snapshot(&s, &probe);
    // 4096 × 1024 positions: about 170 GB of activations kept whole even with the fused CPU
    // kernels (41 KB a position on `tiny`), far beyond this machine
    let long: Vec<u32> = (0..1025u32).map(|i| 32 + i % 90).collect();
    let datum =
        Datum::new(long[..1024].to_vec(), hearth_api::LossFnInputs::cross_entropy(long[1..].to_vec(), vec![1.0; 1024]));
    let huge = input(vec![datum; 4096], LossFn::CrossEntropy);
    s.set_recompute(Recompute::Off);
    let err = s.forward_backward(&huge).unwrap_err();
    assert!(matches!(err, EngineError::OutOfMemory(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("4096 sequence(s) of 1024 positions")
            && text.contains("--recompute on")
            && text.contains("nothing changed"),
        "{text}"
    );
    let after = snapshot(&s, &probe);
    assert_eq!(before.1, after.1, "accumulated gradients unchanged");
    assert_eq!(before.0.metrics, after.0.metrics);
}
