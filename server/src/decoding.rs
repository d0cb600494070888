//! The worker's sampling side: every sample request in progress, of every user, run and
//! sampler, decoded together by one [`Decoder`] (continuous batching).
//!
//! A sample job (`sample`, a live stream, a Tinker sampler's) is not run to its end when the
//! worker takes it: its prompt is prefilled and it joins the decoder, and the worker then
//! alternates decode steps (one token for every request in progress, in one pass over the base
//! weights) with the other jobs in the queue. So a request that arrives while others sample
//! starts at the next token boundary instead of waiting for all of them, and a long sample
//! yields to other users' training between its tokens.
//!
//! A run's order is kept: while a request of run R is being decoded, R's other operations wait
//! ([`Sampling::may_run`]): an `optim_step` queued after a `sample` must not change the
//! weights under it. Another sample of R may join (sampling changes nothing). Each step's
//! device time is charged to the users with requests in it, in proportion to their rows.

use crate::error::ApiError;
use crate::job::{Op, Outcome};
use crate::queue::Job;
use crate::resident::{admit_sample, Resident};
use crate::worker::{detokenizer, finish, no_such_run, Shared};
use hearth_api::TrainingConfig;
use hearth_engine::run::{Decoder, OnTokens};
use hearth_engine::Run;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request in the decoder, for its job's bookkeeping.
struct Active {
    user: String,
    run: String,
    cancel: Arc<AtomicBool>,
    /// Device time charged to it so far (its prefill and its share of each step).
    took: Duration,
}

/// The requests being sampled (see the module docs).
#[derive(Default)]
pub struct Sampling {
    decoder: Decoder<'static>,
    active: HashMap<u64, Active>,
}

impl Sampling {
    /// Nothing is being sampled.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether `job` may start now, between two decode steps: a sample if its rows fit the
    /// step (one bigger than a step waits for the decoder to empty, then runs by itself),
    /// anything else if its run has no request in the decoder.
    pub fn may_run(&self, job: &Job) -> bool {
        match job.op.sample_input() {
            Some(i) => self.decoder.has_room(i.num_samples),
            None => !self.active.values().any(|a| a.run == job.run),
        }
    }

    /// Starts `user`'s sample job (on a run or a sampler): checks it, prefills its prompt and
    /// adds it to the decoder. An error ends the job at once (nothing joined).
    pub fn join(
        &mut self,
        shared: &Shared,
        res: &mut Resident,
        user: String,
        job: Job,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ApiError> {
        let Job { id, run, op } = job;
        let t0 = Instant::now();
        let sampler = matches!(op, Op::SamplerSample(_));
        let (mut input, on_tokens): (_, Option<OnTokens<'static>>) = match op {
            Op::Sample(input) | Op::SamplerSample(input) => (input, None),
            Op::SampleStream(input, tx) => (
                input,
                Some(Box::new(move |picked: &[hearth_engine::run::Picked]| {
                    let _ = tx.send(picked.to_vec());
                })),
            ),
            _ => return Err(ApiError::invalid("only sampling joins the decoder")),
        };
        admit_sample(shared, &input)?;
        let scratch;
        let source: &Run = if sampler {
            match res.sampler(shared, &run)? {
                Some(s) => s,
                None => {
                    // the base model alone: any run's session samples it with `base_model_only`
                    input.base_model_only = true;
                    match res.any_run() {
                        Some(r) => r,
                        None => {
                            scratch = Run::new(shared.base.clone(), TrainingConfig::default())?;
                            &scratch
                        }
                    }
                }
            }
        } else {
            &res.get_mut(shared, &run)?.ok_or_else(|| no_such_run(&run))?.engine
        };
        self.decoder.join(id, source, &input, on_tokens)?;
        self.active.insert(id, Active { user, run, cancel, took: t0.elapsed() });
        Ok(())
    }

    /// Cancellations first (a cancelled request leaves; the others go on), then one decode
    /// step; every request that ended is answered. Returns the step's device time.
    pub fn step(&mut self, shared: &Shared) -> Duration {
        let cancelled: Vec<u64> =
            self.active.iter().filter(|(_, a)| a.cancel.load(Ordering::SeqCst)).map(|(&id, _)| id).collect();
        for id in cancelled {
            self.decoder.cancel(id);
            self.end(shared, id, Err(ApiError::from(hearth_engine::EngineError::Interrupted)));
        }
        if self.active.is_empty() {
            return Duration::ZERO;
        }
        let rows: Vec<(u64, usize)> = self.decoder.requests().collect();
        let total = rows.iter().map(|r| r.1).sum::<usize>().max(1);
        let detok = detokenizer(shared);
        let t0 = Instant::now();
        let ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decoder.step(&detok))) {
            Ok(ended) => ended,
            Err(_) => {
                // nothing of a run changes while it samples: only the requests are lost
                self.decoder = Decoder::default();
                self.fail_all(shared, || ApiError::internal("sampling panicked; the runs are unchanged"));
                return t0.elapsed();
            }
        };
        let took = t0.elapsed();
        shared.busy_ns.fetch_add(took.as_nanos() as u64, Ordering::SeqCst);
        for (id, n) in rows {
            if let Some(a) = self.active.get_mut(&id) {
                let share = took.mul_f64(n as f64 / total as f64);
                a.took += share;
                shared.queue.charge(&a.user, share);
            }
        }
        for (id, result) in ended {
            self.end(shared, id, result.map(Outcome::Sample).map_err(ApiError::from));
        }
        took
    }

    /// Fails every request in progress with `error` (the server is stopping).
    pub fn fail_all(&mut self, shared: &Shared, error: impl Fn() -> ApiError) {
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for id in ids {
            self.decoder.cancel(id);
            self.end(shared, id, Err(error()));
        }
    }

    fn end(&mut self, shared: &Shared, id: u64, result: Result<Outcome, ApiError>) {
        if let Some(a) = self.active.remove(&id) {
            finish(shared, &a.user, id, "sample", a.took, result);
        }
    }
}
