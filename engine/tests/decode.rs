//! The decoder (continuous batching): requests of runs with different adapters, decoded side by
//! side and joining mid-flight, get exactly the tokens and logprobs each gets alone; a cancelled
//! request leaves the others untouched and gives its run's seed back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ce_datum, input, tiny};
use hearth_api::{
    AdamParams, LoraConfig, LossFn, SampleInput, SampleOutput, SamplingParams, Stop, TargetModule, TrainingConfig,
};
use hearth_engine::run::Decoder;
use hearth_engine::tokenizer::ByteTokenizer;
use hearth_engine::Run;
use std::collections::BTreeMap;

fn detok(ids: &[u32]) -> String {
    ByteTokenizer.decode(ids)
}

/// A run with `training`, moved off its initial adapter by two steps (so B ≠ 0).
fn trained(training: TrainingConfig, text: &str) -> Run {
    let mut run = Run::new(tiny(), training).unwrap();
    for _ in 0..2 {
        run.forward_backward(&input(vec![ce_datum(text)], LossFn::CrossEntropy)).unwrap();
        run.optim_step(&AdamParams { learning_rate: 1e-2, ..AdamParams::default() }).unwrap();
    }
    run
}

/// Runs of different ranks, alphas and target modules (one with LoRA on the head), and one full
/// fine-tune (its own weights: it cannot share the base products).
fn runs() -> Vec<Run> {
    use TargetModule::*;
    vec![
        trained(TrainingConfig::Lora(LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() }), "the cat sat"),
        trained(
            TrainingConfig::Lora(LoraConfig { rank: 2, alpha: 16.0, target_modules: vec![QProj, VProj], seed: 3 }),
            "a dog ran far",
        ),
        trained(
            TrainingConfig::Lora(LoraConfig {
                rank: 8,
                alpha: 8.0,
                target_modules: vec![DownProj, UpProj, LmHead],
                seed: 5,
            }),
            "zebra zebra zebra",
        ),
        trained(TrainingConfig::Full, "full weights here"),
    ]
}

fn request(prompt: &str, num_samples: usize, params: SamplingParams) -> SampleInput {
    SampleInput {
        prompt: prompt.bytes().map(u32::from).collect(),
        num_samples,
        sampling_params: params,
        prompt_logprobs: false,
        base_model_only: false,
    }
}

/// (run index, request): greedy and tempered, top-k, nucleus, stops, prompt logprobs, the base
/// model alone, several samples per prompt, prompts of different lengths.
fn requests() -> Vec<(usize, SampleInput)> {
    let p = |max_tokens, temperature, top_k, top_p, seed| SamplingParams {
        max_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        ..SamplingParams::default()
    };
    let mut with_logprobs = request("prompt logprobs too", 2, p(9, 1.0, 0, 1.0, Some(11)));
    with_logprobs.prompt_logprobs = true;
    let mut base_only = request("the base alone", 1, p(7, 0.8, 0, 1.0, Some(4)));
    base_only.base_model_only = true;
    let stop = SamplingParams {
        stop: vec![Stop::Token(u32::from(b'e')), Stop::Text("a".into())],
        ..p(20, 1.0, 0, 1.0, Some(9))
    };
    vec![
        (0, request("the cat", 1, p(12, 0.0, 0, 1.0, None))),
        (1, request("a much longer prompt than the others, to differ in length", 3, p(10, 1.0, 0, 1.0, Some(1)))),
        (2, request("zeb", 2, p(6, 0.7, 5, 1.0, Some(2)))),
        (0, request("nucleus", 4, p(8, 1.1, 0, 0.9, Some(3)))),
        (3, request("full", 2, p(5, 1.0, 0, 1.0, Some(5)))),
        (1, with_logprobs),
        (2, base_only),
        (0, request("stops early", 3, stop)),
    ]
}

fn alone(runs: &[Run], reqs: &[(usize, SampleInput)]) -> Vec<SampleOutput> {
    reqs.iter().map(|(r, input)| runs[*r].sample(input, &detok, &|| false).unwrap()).collect()
}

/// Drives `decoder` until it is empty, collecting each request's output by id.
fn drain(decoder: &mut Decoder<'_>, done: &mut BTreeMap<u64, SampleOutput>) {
    while !decoder.is_empty() {
        for (id, out) in decoder.step(&detok) {
            done.insert(id, out.unwrap());
        }
    }
}

/// Outputs compared bit for bit (f32 `==` on every logprob).
fn assert_same(got: &SampleOutput, want: &SampleOutput, what: &str) {
    assert_eq!(got, want, "{what}");
}

#[test]
fn requests_decoded_together_equal_each_alone() {
    let runs = runs();
    let reqs = requests();
    let want = alone(&runs, &reqs);
    // every request joins at once
    let mut decoder = Decoder::default();
    for (id, (r, input)) in reqs.iter().enumerate() {
        decoder.join(id as u64, &runs[*r], input, None).unwrap();
    }
    assert_eq!(decoder.rows(), reqs.iter().map(|(_, i)| i.num_samples).sum::<usize>());
    let mut got = BTreeMap::new();
    drain(&mut decoder, &mut got);
    for (id, w) in want.iter().enumerate() {
        assert_same(&got[&(id as u64)], w, &format!("request {id}, all joined at once"));
    }
    // joining while others are mid-way: one more request every two steps
    let mut decoder = Decoder::default();
    let mut got = BTreeMap::new();
    for (id, (r, input)) in reqs.iter().enumerate() {
        decoder.join(id as u64, &runs[*r], input, None).unwrap();
        for _ in 0..2 {
            for (id, out) in decoder.step(&detok) {
                got.insert(id, out.unwrap());
            }
        }
    }
    drain(&mut decoder, &mut got);
    for (id, w) in want.iter().enumerate() {
        assert_same(&got[&(id as u64)], w, &format!("request {id}, joined mid-flight"));
    }
}

#[test]
fn more_rows_than_one_step_takes_are_split_and_still_equal() {
    let runs = runs();
    let p = SamplingParams { max_tokens: 4, temperature: 1.0, seed: Some(8), ..SamplingParams::default() };
    // 40 + 30 rows exceed one step's batch; 70 rows alone take the one-run path
    let reqs = vec![
        (0, request("forty", 40, p.clone())),
        (1, request("thirty", 30, p.clone())),
        (2, request("seventy", 70, p)),
    ];
    let want = alone(&runs, &reqs);
    let mut decoder = Decoder::default();
    for (id, (r, input)) in reqs.iter().enumerate() {
        decoder.join(id as u64, &runs[*r], input, None).unwrap();
    }
    let mut got = BTreeMap::new();
    drain(&mut decoder, &mut got);
    for (id, w) in want.iter().enumerate() {
        assert_same(&got[&(id as u64)], w, &format!("request {id}"));
    }
}

#[test]
fn a_cancelled_request_leaves_the_others_untouched_and_gives_its_seed_back() {
    let (runs, fresh) = (runs(), runs());
    let reqs = requests();
    // the same requests alone on a copy of the runs (request 0 draws its seed from run 0's
    // generator there as here)
    let want = alone(&fresh, &reqs);
    // an unseeded request on run 0 (drawing from the run's generator), cancelled mid-way
    let unseeded =
        request("cancel me", 2, SamplingParams { max_tokens: 30, temperature: 1.0, ..SamplingParams::default() });
    let mut decoder = Decoder::default();
    for (id, (r, input)) in reqs.iter().enumerate() {
        decoder.join(id as u64, &runs[*r], input, None).unwrap();
    }
    decoder.join(99, &runs[0], &unseeded, None).unwrap();
    let mut got = BTreeMap::new();
    for _ in 0..3 {
        for (id, out) in decoder.step(&detok) {
            got.insert(id, out.unwrap());
        }
    }
    assert!(decoder.cancel(99));
    assert!(!decoder.cancel(99), "a request is cancelled once");
    assert!(decoder.requests().all(|(id, _)| id != 99));
    drain(&mut decoder, &mut got);
    assert!(!got.contains_key(&99));
    for (id, w) in want.iter().enumerate() {
        assert_same(&got[&(id as u64)], w, &format!("request {id} beside a cancelled one"));
    }
    // the cancelled request kept no seed: run 0's next unseeded sample is the copy's
    let a = runs[0].sample(&unseeded, &detok, &|| false).unwrap();
    let b = fresh[0].sample(&unseeded, &detok, &|| false).unwrap();
    assert_same(&a, &b, "the run's generator after a cancelled request");
}

#[test]
fn a_bad_request_is_refused_and_joins_nothing() {
    let runs = runs();
    let mut decoder = Decoder::default();
    decoder.join(1, &runs[0], &request("fine", 1, SamplingParams::default()), None).unwrap();
    let bad = request("bad", 0, SamplingParams::default());
    let err = decoder.join(2, &runs[0], &bad, None).unwrap_err();
    assert!(err.to_string().contains("num_samples"), "{err}");
    assert_eq!(decoder.requests().map(|(id, _)| id).collect::<Vec<_>>(), vec![1]);
}
