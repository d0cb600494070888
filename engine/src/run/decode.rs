//! The decoder: every sampling request in progress, of any run or sampler, advanced one token
//! at a time together (continuous batching).
//!
//! A request joins with [`Decoder::join`]: its prompt is prefilled once (batch 1, shared by its
//! `num_samples` rows) into a key/value cache of its own, so requests of different lengths sit
//! side by side and nothing is copied when one joins or leaves. Each [`Decoder::step`] picks one
//! token for every row of every request from that request's own logits, with its own seeded
//! generator and parameters, then runs one forward pass over the rows of all requests whose
//! models share the base weights ([`Model::decode_segments`]): the base weights are read once
//! per step for all of them, each request's LoRA pairs and cache stay its own. A request that
//! finishes (every row stopped, or `max_tokens`) leaves at once with its output; a cancelled one
//! ([`Decoder::cancel`]) leaves without touching the others.
//!
//! Alone or beside others, a request gets the same tokens and logprobs for a seed: its rows'
//! arithmetic does not depend on the other rows ([`Model::decode_segments`]), the picks are
//! made per request, and `Run::sample` is this decoder with one request.

use super::sample::{pick, prefill, validate_request, Picked, Picking};
use super::Run;
use crate::error::{EngineError, Result};
use crate::kernels::MAX_SEGMENT_ROWS;
use crate::model::{KvCache, Model};
use crate::rng::Rng;
use candle_core::{DType, Tensor};
use hearth_api::{SampleInput, SampleOutput, SampledSequence, SamplingParams, Stop, StopReason};
use std::sync::{Arc, Mutex};

/// Receives each step's new `(sequence, token, logprob)` of one request.
pub type OnTokens<'a> = Box<dyn Fn(&[Picked]) + Send + 'a>;

/// Text of generated ids, for stop strings.
pub type Detokenize<'d> = dyn Fn(&[u32]) -> String + Sync + 'd;

/// A request id and how it ended.
pub type Finished = (u64, Result<SampleOutput>);

/// The seed a request drew from its run's generator: kept when the request succeeds, given back
/// when it fails or is cancelled and nothing drew after it (so an interrupted call changes no
/// state, as every primitive promises).
struct Drawn {
    rng: Arc<Mutex<Rng>>,
    before: Rng,
    after: Rng,
}

impl Drawn {
    fn give_back(self) {
        let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if *r == self.after {
            *r = self.before;
        }
    }
}

/// One request in progress.
struct Request<'a> {
    id: u64,
    model: Model,
    cache: KvCache,
    /// The logits (R, V) f32 to pick from: the prompt's last position (R = 1, shared by every
    /// row) before the first pick, then one row per sequence.
    logits: Tensor,
    params: SamplingParams,
    picking: Picking,
    rng: Rng,
    drawn: Option<Drawn>,
    stop_ids: Vec<u32>,
    stop_texts: Vec<String>,
    seqs: Vec<SampledSequence>,
    done: Vec<bool>,
    steps: usize,
    prompt_logprobs: Option<Vec<Option<f32>>>,
    on_tokens: Option<OnTokens<'a>>,
}

impl Request<'_> {
    fn rows(&self) -> usize {
        self.seqs.len()
    }

    fn fail(self, e: EngineError) -> Finished {
        if let Some(d) = self.drawn {
            d.give_back();
        }
        (self.id, Err(e))
    }

    fn finish(self) -> Finished {
        (self.id, Ok(SampleOutput { sequences: self.seqs, prompt_logprobs: self.prompt_logprobs }))
    }

    /// Picks this step's tokens: `None` when the request is over, else its next ids (n, 1).
    fn pick(&mut self, detokenize: &Detokenize<'_>) -> Result<Option<Tensor>> {
        let p = &self.params;
        let active: Vec<usize> = (0..self.rows()).filter(|&i| !self.done[i]).collect();
        // One uniform per tempered pick, drawn in sequence order (so the rows can be scored in
        // parallel and a seed still gives the same samples).
        let us: Vec<f64> = active.iter().map(|_| if p.temperature > 0.0 { self.rng.uniform() } else { 0.0 }).collect();
        // the first pick reads the prompt's last position, one row shared by every sequence
        let rows: Vec<usize> = if self.steps == 0 { vec![0; active.len()] } else { active.clone() };
        let picks = pick(&self.logits, &rows, &us, p, self.picking)?;
        let picked: Vec<Picked> = active.iter().zip(&picks).map(|(&i, &(tok, lp))| (i, tok, lp)).collect();
        if let Some(f) = &self.on_tokens {
            f(&picked);
        }
        for (&i, (tok, logprob)) in active.iter().zip(picks) {
            let seq = &mut self.seqs[i];
            seq.tokens.push(tok);
            seq.logprobs.push(logprob);
            let text_stop = !self.stop_texts.is_empty() && {
                let text = detokenize(&seq.tokens);
                self.stop_texts.iter().any(|s| text.contains(s.as_str()))
            };
            if self.stop_ids.contains(&tok) || text_stop {
                seq.stop_reason = StopReason::Stop;
                self.done[i] = true;
            }
        }
        self.steps += 1;
        if self.done.iter().all(|&d| d) || self.steps == p.max_tokens {
            return Ok(None);
        }
        // finished rows keep decoding (their last token) until the whole request ends
        let next: Vec<u32> = self.seqs.iter().map(|s| s.tokens.last().copied().unwrap_or(0)).collect();
        Ok(Some(Tensor::from_vec(next, (self.rows(), 1), self.model.device())?))
    }
}

/// The requests being decoded together (see the module docs).
#[derive(Default)]
pub struct Decoder<'a> {
    requests: Vec<Request<'a>>,
}

impl<'a> Decoder<'a> {
    /// No request in progress.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Rows (sequences) being decoded.
    pub fn rows(&self) -> usize {
        self.requests.iter().map(Request::rows).sum()
    }

    /// The ids of the requests in progress, with their rows.
    pub fn requests(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.requests.iter().map(|r| (r.id, r.rows()))
    }

    /// Whether a request of `num_samples` rows fits beside the ones in progress in one step
    /// (at most 64 rows; a bigger request runs by itself, so it joins an empty decoder).
    pub fn has_room(&self, num_samples: usize) -> bool {
        self.rows() + num_samples <= MAX_SEGMENT_ROWS
    }

    /// Validates `input`, prefills its prompt with `run`'s current weights (or the base model's)
    /// and adds it as request `id`; `on_tokens` gets each step's new tokens. An error adds
    /// nothing and changes nothing.
    pub fn join(&mut self, id: u64, run: &Run, input: &SampleInput, on_tokens: Option<OnTokens<'a>>) -> Result<()> {
        self.join_picking(id, run, input, on_tokens, Picking::for_device(&run.base.device))
    }

    pub(super) fn join_picking(
        &mut self,
        id: u64,
        run: &Run,
        input: &SampleInput,
        on_tokens: Option<OnTokens<'a>>,
        picking: Picking,
    ) -> Result<()> {
        let device = run.base.device.clone();
        let request = crate::kernels::in_pool_for(&device, || start(id, run, input, picking, on_tokens))
            .map_err(crate::recompute::classify)?;
        self.requests.push(request);
        Ok(())
    }

    /// Drops request `id` (cancelled): the others go on untouched. False if it is not here.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.requests.iter().position(|r| r.id == id) {
            Some(i) => {
                let _ = self.requests.remove(i).fail(EngineError::Interrupted);
                true
            }
            None => false,
        }
    }

    /// One token for every request: the picks, then one forward pass per group of requests that
    /// share a base. Returns the requests that ended, each with its output or its error (a
    /// failed pass fails the requests in it; the others go on).
    pub fn step(&mut self, detokenize: &Detokenize<'_>) -> Vec<Finished> {
        let Some(device) = self.requests.first().map(|r| r.model.device().clone()) else { return Vec::new() };
        crate::kernels::in_pool_for(&device, || self.step_in_pool(detokenize))
    }

    fn step_in_pool(&mut self, detokenize: &Detokenize<'_>) -> Vec<Finished> {
        let mut ended = Vec::new();
        let mut going: Vec<(Request<'a>, Tensor)> = Vec::with_capacity(self.requests.len());
        for mut r in self.requests.drain(..) {
            match r.pick(detokenize) {
                Ok(Some(next)) => going.push((r, next)),
                Ok(None) => ended.push(r.finish()),
                Err(e) => ended.push(r.fail(crate::recompute::classify(e))),
            }
        }
        // groups in join order: each request with the later ones that share its base, up to a
        // step's rows; a request of more rows than that runs alone, on the one-run path
        let mut groups: Vec<Vec<(Request<'a>, Tensor)>> = Vec::new();
        for item in going {
            let n = item.0.rows();
            let home = groups.iter_mut().find(|g| {
                let rows: usize = g.iter().map(|(r, _)| r.rows()).sum();
                n <= MAX_SEGMENT_ROWS && rows + n <= MAX_SEGMENT_ROWS && g[0].0.model.shares_base(&item.0.model)
            });
            match home {
                Some(g) => g.push(item),
                None => groups.push(vec![item]),
            }
        }
        for group in groups {
            let (mut reqs, ids): (Vec<Request<'a>>, Vec<Tensor>) = group.into_iter().unzip();
            match forward(&mut reqs, &ids) {
                Ok(logits) => {
                    for (mut r, l) in reqs.into_iter().zip(logits) {
                        r.logits = l;
                        self.requests.push(r);
                    }
                }
                Err(e) => {
                    let e = crate::recompute::classify(e);
                    ended.extend(reqs.into_iter().map(|r| r.fail(same_error(&e))));
                }
            }
        }
        ended
    }
}

/// One forward pass over a group's next ids → each request's logits (n, V) f32.
fn forward(reqs: &mut [Request<'_>], ids: &[Tensor]) -> Result<Vec<Tensor>> {
    if let [r] = reqs {
        if r.rows() > MAX_SEGMENT_ROWS {
            let logits = r.model.forward_cached(&ids[0], &mut r.cache, false)?; // (n,1,V)
            return Ok(vec![logits.squeeze(1)?.to_dtype(DType::F32)?]);
        }
    }
    let mut models = Vec::with_capacity(reqs.len());
    let mut caches = Vec::with_capacity(reqs.len());
    for Request { model, cache, .. } in reqs.iter_mut() {
        models.push(&*model);
        caches.push(cache);
    }
    Model::decode_segments(&models, ids, &mut caches)
}

/// The error of a failed pass, for each request that was in it.
fn same_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::OutOfMemory(m) => EngineError::OutOfMemory(m.clone()),
        EngineError::Interrupted => EngineError::Interrupted,
        other => EngineError::Internal(other.to_string()),
    }
}

/// Validates `input` and prefills its prompt: the request as it starts, before its first pick.
fn start<'a>(
    id: u64,
    run: &Run,
    input: &SampleInput,
    picking: Picking,
    on_tokens: Option<OnTokens<'a>>,
) -> Result<Request<'a>> {
    let p = &input.sampling_params;
    validate_request(&run.base.config, input)?;
    let model = run.sampling_model(input.base_model_only)?;
    let mut cache = KvCache::with_capacity(input.prompt.len() + p.max_tokens);
    let (prompt_logprobs, logits) = prefill(&model, &input.prompt, input.prompt_logprobs, &mut cache)?;
    let cache = cache.expand(input.num_samples)?;
    // No seed: the run's own generator picks one (so a resumed `state` samples as the
    // uninterrupted run would have); given back if the request does not succeed.
    let (seed, drawn) = match p.seed {
        Some(seed) => (seed, None),
        None => {
            let mut r = run.rng.lock().unwrap_or_else(|p| p.into_inner());
            let before = r.clone();
            let seed = r.next_u64();
            (seed, Some(Drawn { rng: run.rng.clone(), before, after: r.clone() }))
        }
    };
    let stop_ids = p.stop.iter().filter_map(|s| if let Stop::Token(t) = s { Some(*t) } else { None }).collect();
    let stop_texts = p.stop.iter().filter_map(|s| if let Stop::Text(t) = s { Some(t.clone()) } else { None }).collect();
    let n = input.num_samples;
    Ok(Request {
        id,
        model,
        cache,
        logits,
        params: p.clone(),
        picking,
        rng: Rng::new(seed),
        drawn,
        stop_ids,
        stop_texts,
        seqs: (0..n)
            .map(|_| SampledSequence { tokens: Vec::new(), logprobs: Vec::new(), stop_reason: StopReason::Length })
            .collect(),
        done: vec![false; n],
        steps: 0,
        prompt_logprobs,
        on_tokens,
    })
}
