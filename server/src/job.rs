//! What the worker is asked to do and what it answers, typed: an [`Op`] goes in, a [`JobState`]
//! comes out on the request's watch channel, ending in the operation's own response type
//! ([`Outcome`]) or its error. JSON is made only at the edge: the native protocol serializes an
//! outcome as the body of the blocking call, the Tinker and OpenAI handlers read its fields.

use crate::error::ApiError;
use crate::limits::Limits;
use crate::users::Caller;
use axum::http::StatusCode;
use hearth_api::{
    AdamParams, CreateRunRequest, ForwardBackwardInput, ForwardBackwardOutput, LoadStateRequest, LoadStateResponse,
    OptimStepOutput, RequestState, RunInfo, SampleInput, SampleOutput, SaveStateRequest, SaveStateResponse,
};
use serde::Serialize;
use std::path::PathBuf;
use tokio::sync::watch;

/// An operation on a run.
#[derive(Debug)]
pub enum Op {
    /// Create the run.
    CreateRun(CreateRunRequest),
    /// Logprobs and loss, no gradients.
    Forward(ForwardBackwardInput),
    /// Accumulate gradients.
    ForwardBackward(ForwardBackwardInput),
    /// Apply them.
    OptimStep(AdamParams),
    /// Generate.
    Sample(SampleInput),
    /// Checkpoint.
    SaveState(SaveStateRequest),
    /// Restore.
    LoadState(LoadStateRequest),
    /// Create the run from a checkpoint folder (with its optimizer state, or weights only).
    CreateRunFrom {
        /// The checkpoint folder.
        source: PathBuf,
        /// Restore the optimizer too.
        optimizer: bool,
    },
    /// Copy the run's current weights into a new sampler (the job's run names the source).
    Snapshot {
        /// The sampler's id.
        sampler: String,
    },
    /// Create a sampler (the job's run is its id) from a checkpoint folder, or the base model
    /// alone (`None`).
    CreateSampler(Option<PathBuf>),
    /// Sample from a sampler (the job's run is its id).
    SamplerSample(SampleInput),
    /// Sample, sending each step's new `(sequence, token, logprob)` on while it runs (a live
    /// stream); the channel closes when the job ends.
    SampleStream(SampleInput, tokio::sync::mpsc::UnboundedSender<Vec<hearth_engine::run::Picked>>),
}

impl Op {
    /// Checks this operation against the request limits before it is queued.
    pub(crate) fn check(&self, limits: &Limits) -> Result<(), ApiError> {
        match self {
            Op::CreateRun(req) => limits.check_training(&req.training),
            Op::Forward(input) | Op::ForwardBackward(input) => limits.check_batch(input),
            Op::Sample(input) | Op::SamplerSample(input) | Op::SampleStream(input, _) => limits.check_sample(input),
            _ => Ok(()),
        }
    }

    /// The route name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateRun(_) => "create_run",
            Op::Forward(_) => "forward",
            Op::ForwardBackward(_) => "forward_backward",
            Op::OptimStep(_) => "optim_step",
            Op::Sample(_) => "sample",
            Op::SaveState(_) => "save_state",
            Op::LoadState(_) => "load_state",
            Op::CreateRunFrom { .. } => "create_run",
            Op::Snapshot { .. } => "snapshot",
            Op::CreateSampler(_) => "create_sampler",
            Op::SamplerSample(_) | Op::SampleStream(..) => "sample",
        }
    }

    /// The request of a sampling operation (which joins the decoder, `crate::decoding`).
    pub fn sample_input(&self) -> Option<&SampleInput> {
        match self {
            Op::Sample(i) | Op::SamplerSample(i) | Op::SampleStream(i, _) => Some(i),
            _ => None,
        }
    }

    /// Spends device time (refused once the budget is spent).
    pub fn uses_device(&self) -> bool {
        matches!(
            self,
            Op::Forward(_)
                | Op::ForwardBackward(_)
                | Op::OptimStep(_)
                | Op::Sample(_)
                | Op::SamplerSample(_)
                | Op::SampleStream(..)
        )
    }
}

/// A sampler the worker made (`CreateSampler`) or copied from a run (`Snapshot`, with the run's
/// step at the copy).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerMade {
    /// Its id.
    pub sampler: String,
    /// The source run's step, for a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// What a finished operation produced: its own response type. Serialized, it is the body the
/// native blocking call answers (each variant as itself, no tag).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// `CreateRun`, `CreateRunFrom`: the new run.
    Run(RunInfo),
    /// `Forward`, `ForwardBackward`.
    Forward(ForwardBackwardOutput),
    /// `OptimStep`.
    OptimStep(OptimStepOutput),
    /// `Sample`, `SamplerSample`, `SampleStream`.
    Sample(SampleOutput),
    /// `SaveState`.
    SaveState(SaveStateResponse),
    /// `LoadState`.
    LoadState(LoadStateResponse),
    /// `CreateSampler`, `Snapshot`.
    Sampler(SamplerMade),
}

impl Outcome {
    /// The outcome as a JSON body. It goes through [`serde_json::Value`], as every other answer
    /// does (the polled state, the OpenAI and Tinker bodies): an `f32` field is written as its
    /// `f64` widening there, so every route prints the same digits for the same logprob (written
    /// straight from the struct it would be the shorter `f32` form, which a Python client reads
    /// as a different float).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The outcome as `caller` sees it: a run or sampler it made, under the name the caller
    /// gives it (a user's `main`, not the server's `alice/main`).
    pub fn seen_by(mut self, caller: &Caller) -> Outcome {
        match &mut self {
            Outcome::Run(info) => info.id = caller.view(&info.id).unwrap_or_default(),
            Outcome::Sampler(made) => made.sampler = caller.view(&made.sampler).unwrap_or_default(),
            _ => {}
        }
        self
    }

    /// The samples of a sampling job.
    pub fn into_sample(self) -> Result<SampleOutput, ApiError> {
        match self {
            Outcome::Sample(out) => Ok(out),
            other => Err(mismatch("sample", &other)),
        }
    }

    /// The output of a `forward` or `forward_backward` job.
    pub fn into_forward(self) -> Result<ForwardBackwardOutput, ApiError> {
        match self {
            Outcome::Forward(out) => Ok(out),
            other => Err(mismatch("forward", &other)),
        }
    }

    /// The output of an `optim_step` job.
    pub fn into_optim_step(self) -> Result<OptimStepOutput, ApiError> {
        match self {
            Outcome::OptimStep(out) => Ok(out),
            other => Err(mismatch("optim_step", &other)),
        }
    }
}

/// A job answered with another operation's outcome: a bug of the handler that submitted it.
fn mismatch(expected: &str, got: &Outcome) -> ApiError {
    let got = match got {
        Outcome::Run(_) => "run",
        Outcome::Forward(_) => "forward",
        Outcome::OptimStep(_) => "optim_step",
        Outcome::Sample(_) => "sample",
        Outcome::SaveState(_) => "save_state",
        Outcome::LoadState(_) => "load_state",
        Outcome::Sampler(_) => "sampler",
    };
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("expected a {expected} result, got a {got} result"),
    )
}

/// Where a submitted request is; the worker sends each change on the request's watch channel.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting behind earlier requests.
    Queued,
    /// Executing now.
    Running,
    /// Finished.
    Done(Outcome),
    /// Failed, or cancelled: the error the blocking call answers with.
    Failed(ApiError),
}

impl JobState {
    /// Whether the request has ended (done or failed).
    pub fn is_over(&self) -> bool {
        matches!(self, JobState::Done(_) | JobState::Failed(_))
    }

    /// The outcome of an ended request, or its error.
    pub fn into_outcome(self) -> Result<Outcome, ApiError> {
        match self {
            JobState::Done(outcome) => Ok(outcome),
            JobState::Failed(e) => Err(e),
            JobState::Queued | JobState::Running => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "request ended without a result"))
            }
        }
    }

    /// The state as `GET /v1/requests/{id}` shows it to `caller`.
    pub fn to_api(&self, caller: &Caller) -> RequestState {
        match self {
            JobState::Queued => RequestState::Queued,
            JobState::Running => RequestState::Running,
            JobState::Done(outcome) => RequestState::Done { result: outcome.clone().seen_by(caller).to_json() },
            JobState::Failed(e) => RequestState::Failed { status: e.status.as_u16(), error: e.body() },
        }
    }
}

/// Waits for a request's end: its outcome, or its error (a worker gone before it ended: shutting
/// down).
pub async fn outcome(rx: &mut watch::Receiver<JobState>) -> Result<Outcome, ApiError> {
    match rx.wait_for(JobState::is_over).await {
        Ok(state) => state.clone().into_outcome(),
        Err(_) => Err(ApiError::shutting_down()),
    }
}
