//! The engine thread: it owns every run (a `Run` on the shared base model) and
//! executes submitted operations one at a time in submission order, so each run's operations
//! keep the order their client sent them in. HTTP handlers never touch the engine; they submit an
//! [`Op`] and wait on (or poll) its request entry, whose [`JobState`] ends in a typed [`Outcome`].

use crate::checkpoints::{autosave, checkpoint_source, save, state_at};
use crate::decoding::Sampling;
use crate::error::ApiError;
use crate::job::{JobState, Op, Outcome, SamplerMade};
use crate::limits::Limits;
use crate::queue::{Full, Job, Next, Queue};
use crate::registry::Registry;
use crate::resident::{trainable_scalars, Resident};
use crate::users::{check_run_id, owner_of, Caller};
use axum::http::StatusCode;
use hearth_api::{LoadStateResponse, MetricRow, ResumedRun, RunInfo, SaveStateResponse, TrainingConfig};
use hearth_engine::recompute::Recompute;
use hearth_engine::tokenizer::ByteTokenizer;
use hearth_engine::{BaseModel, Run};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One submitted request's entry: its state (watched by waiters) and its cancel flag.
pub struct Entry {
    /// The run.
    pub run: String,
    /// The op name.
    pub op: &'static str,
    /// Current state; waiters subscribe.
    pub state: watch::Sender<JobState>,
    /// Set by `cancel`.
    pub cancel: Arc<AtomicBool>,
    /// Unix millis when it ended (0 while queued or running); its result is kept
    /// [`KEEP_RESULTS_MS`] after that for a client that polls.
    pub ended_ms: AtomicU64,
}

impl Entry {
    /// Flags the request for cancellation if it will honour it: a queued one never runs, a
    /// running `sample` stops between tokens; other running operations finish.
    pub fn try_cancel(&self) -> bool {
        let stoppable = match &*self.state.borrow() {
            JobState::Queued => true,
            JobState::Running => self.op == "sample",
            _ => false,
        };
        if stoppable {
            self.cancel.store(true, Ordering::SeqCst);
        }
        stoppable
    }
}

/// How long a finished request's result stays readable (`GET /v1/requests/{id}`).
pub const KEEP_RESULTS_MS: u64 = 10 * 60 * 1000;

/// How long the worker waits with nothing to do before it gives freed memory back.
const IDLE_TRIM: std::time::Duration = std::time::Duration::from_secs(2);

/// What saving every run did: the checkpoints written, and the runs that could not be saved.
#[derive(Debug, Default)]
pub struct SaveReport {
    /// Checkpoints written.
    pub saved: Vec<SaveStateResponse>,
    /// Runs whose save failed, with the step they had reached (unsaved work).
    pub failed: Vec<SaveFailure>,
}

/// A run that could not be saved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SaveFailure {
    /// The run.
    pub run: String,
    /// The step its unsaved state had reached.
    pub step: u64,
    /// Its last saved step, if any.
    pub saved_step: Option<u64>,
    /// Why (`disk_full`, `io_error`, …) and the message.
    pub error: hearth_api::ErrorBody,
}

/// What the worker receives besides jobs ([`crate::queue`] takes these first).
pub enum Msg {
    /// Save every run now (`reason`: autosave kind) and report the checkpoints written.
    SaveAll {
        /// `shutdown`, `idle`, `budget`.
        reason: String,
        /// Whose runs (the admin: every run).
        caller: Caller,
        /// Where to send the result.
        reply: mpsc::Sender<SaveReport>,
    },
    /// Free the samplers whose ids start with `prefix` (a Tinker session finished); `reply`
    /// gets how many.
    DropSamplers {
        /// The session's id prefix (`alice/s1:`).
        prefix: String,
        /// Where to send the count.
        reply: mpsc::Sender<usize>,
    },
    /// Exit the thread.
    Stop,
}

/// State shared by the HTTP side and the worker.
pub struct Shared {
    /// The warm base model.
    pub base: Arc<BaseModel>,
    /// Registry.
    pub registry: Registry,
    /// hearth home.
    pub home: PathBuf,
    /// Submitted requests by id.
    pub requests: Mutex<HashMap<u64, Entry>>,
    /// Next request id.
    pub next_id: AtomicU64,
    /// Requests queued or running.
    pub in_flight: AtomicUsize,
    /// Snapshot of the runs for `GET /v1/runs` and `/v1/info` (updated after every job).
    pub runs: Mutex<Vec<RunInfo>>,
    /// Samplers holding weights in memory (updated after every job).
    pub samplers_in_memory: AtomicUsize,
    /// Nanoseconds spent executing jobs.
    pub busy_ns: AtomicU64,
    /// Unix millis of the last work submitted or ended: the idle timer's clock (heartbeats,
    /// polls and reads do not move it).
    pub last_activity_ms: AtomicU64,
    /// Set once shutdown begins: new jobs are refused, queued ones fail.
    pub shutting_down: AtomicBool,
    /// Autosave period in optimizer steps (0 = never).
    pub autosave_every: u64,
    /// Autosaves kept per run.
    pub keep_autosaves: usize,
    /// When training steps recompute activations (`--recompute`).
    pub recompute: Recompute,
    /// The queue into the worker: control messages, and a line of jobs per user.
    pub queue: Queue,
    /// What one request may cost; every submitted operation is checked against it.
    pub limits: Limits,
    /// `--memory-budget-mb` in bytes (0: none beyond the device's available memory).
    pub memory_budget: u64,
    /// Each user's quota and usage.
    pub quotas: crate::quota::Quotas,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// Names of runs and checkpoints: safe as one path component.
pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

impl Shared {
    /// The base model's key in the registry.
    pub fn base_key(&self) -> &str {
        &self.base.fingerprint
    }

    /// A run's folder: `runs/NAME` for the admin's run `NAME`, `users/USER/runs/NAME` for a
    /// user's run `USER/NAME` (a run id is [`crate::users::check_run_id`]-checked before any
    /// folder is made for it).
    pub fn run_dir(&self, run: &str) -> PathBuf {
        match run.split_once('/') {
            None => self.home.join("runs").join(run),
            Some((user, name)) => self.home.join("users").join(user).join("runs").join(name),
        }
    }

    /// Where a run's checkpoints live.
    pub fn checkpoints_dir(&self, run: &str) -> PathBuf {
        self.run_dir(run).join("checkpoints")
    }

    /// Queues a job in its owner's line (refused with a 429 when the line is full); returns its
    /// id and a receiver of its state.
    pub fn submit(&self, run: String, op: Op) -> Result<(u64, watch::Receiver<JobState>), ApiError> {
        let limit = self.queue_limit(owner_of(&run));
        self.submit_within(run, op, limit)
    }

    /// Requests `user` may have queued: their quota, within `--max-queued-per-user`.
    fn queue_limit(&self, user: &str) -> usize {
        self.quotas.queued_limit(user, self.limits.max_queued_per_user)
    }

    /// [`Shared::submit`] of a job whose room in the line was checked ([`Shared::check_room`])
    /// when it was accepted, before it waited for its turn (Tinker's ordered requests).
    pub fn submit_accepted(&self, run: String, op: Op) -> Result<(u64, watch::Receiver<JobState>), ApiError> {
        self.submit_within(run, op, usize::MAX)
    }

    /// A 429 when the line of run `run`'s owner is full.
    pub fn check_room(&self, run: &str) -> Result<(), ApiError> {
        let user = owner_of(run);
        let queued = self.queue.queued(user);
        if queued >= self.queue_limit(user) {
            return Err(ApiError::queue_full(queued));
        }
        Ok(())
    }

    fn submit_within(&self, run: String, op: Op, limit: usize) -> Result<(u64, watch::Receiver<JobState>), ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        op.check(&self.limits)?;
        self.quotas.check(owner_of(&run), &op)?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (state, rx) = watch::channel(JobState::Queued);
        {
            let mut reqs = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            if reqs.len() >= 256 {
                prune_finished(&mut reqs);
            }
            reqs.insert(
                id,
                Entry {
                    run: run.clone(),
                    op: op.name(),
                    state,
                    cancel: Arc::new(AtomicBool::new(false)),
                    ended_ms: AtomicU64::new(0),
                },
            );
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let user = owner_of(&run).to_string();
        let pushed = self.queue.push_job(&user, Job { id, run, op }, limit);
        if pushed != Ok(true) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.requests.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(match pushed {
                Err(Full { queued }) => ApiError::queue_full(queued),
                _ => ApiError::shutting_down(),
            });
        }
        self.last_activity_ms.store(now_ms(), Ordering::SeqCst);
        Ok((id, rx))
    }

    fn set_state(&self, id: u64, state: JobState) {
        let reqs = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = reqs.get(&id) {
            if state.is_over() {
                e.ended_ms.store(now_ms(), Ordering::SeqCst);
            }
            e.state.send_replace(state);
        }
    }

    /// [`Entry::try_cancel`] on request `id`: whether it will stop, `None` if there is no such
    /// request.
    pub fn cancel(&self, id: u64) -> Option<bool> {
        self.cancel_of(&Caller::Admin, id)
    }

    /// [`Shared::cancel`] of `caller`'s request `id` (another's is `None`, as one that does not
    /// exist).
    pub fn cancel_of(&self, caller: &Caller, id: u64) -> Option<bool> {
        let reqs = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        reqs.get(&id).filter(|e| caller.owns(&e.run)).map(Entry::try_cancel)
    }

    /// [`Entry::try_cancel`] on every request of `caller`'s runs and samplers (an interrupt; the
    /// admin's reaches everyone's): the ids that will stop, in order.
    pub fn cancel_everything(&self, caller: &Caller) -> Vec<u64> {
        let reqs = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut cancelled: Vec<u64> =
            reqs.iter().filter(|(_, e)| caller.owns(&e.run) && e.try_cancel()).map(|(&id, _)| id).collect();
        cancelled.sort_unstable();
        cancelled
    }

    fn cancel_flag(&self, id: u64) -> Arc<AtomicBool> {
        let reqs = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        reqs.get(&id).map(|e| e.cancel.clone()).unwrap_or_default()
    }

    /// Asks the worker to free the samplers whose ids start with `prefix` and waits (blocking);
    /// how many it freed.
    pub fn drop_samplers(&self, prefix: String) -> usize {
        let (reply, rx) = mpsc::channel();
        if !self.queue.push_control(Msg::DropSamplers { prefix, reply }) {
            return 0;
        }
        rx.recv().unwrap_or(0)
    }

    /// Asks the worker to save every run and waits for the report (blocking).
    pub fn save_all(&self, reason: &str) -> SaveReport {
        self.save_runs_of(&Caller::Admin, reason)
    }

    /// Asks the worker to save every run of `caller`'s (the admin's: every run) and waits for
    /// the report (blocking).
    pub fn save_runs_of(&self, caller: &Caller, reason: &str) -> SaveReport {
        let (reply, rx) = mpsc::channel();
        if !self.queue.push_control(Msg::SaveAll { reason: reason.into(), caller: caller.clone(), reply }) {
            return SaveReport::default();
        }
        rx.recv().unwrap_or_default()
    }
}

/// Forgets finished requests whose result has been readable for [`KEEP_RESULTS_MS`].
fn prune_finished(reqs: &mut HashMap<u64, Entry>) {
    let now = now_ms();
    reqs.retain(|_, e| {
        let ended = e.ended_ms.load(Ordering::SeqCst);
        ended == 0 || now.saturating_sub(ended) < KEEP_RESULTS_MS
    });
}

/// One run as the worker holds it.
pub struct HeldRun {
    /// The engine's run.
    pub engine: Run,
    /// Loss summed over forward_backward calls since the last step.
    pub(crate) pending_loss: f64,
    /// Tokens in those calls.
    pub(crate) pending_tokens: f64,
    /// Seconds spent in them.
    pub(crate) pending_secs: f64,
    /// Step of the newest checkpoint of this run (skip re-saving an unchanged run).
    pub saved_step: Option<u64>,
    /// When it was last used ([`crate::resident`]'s clock).
    pub(crate) last_used: u64,
}

impl HeldRun {
    /// Wraps a session.
    pub fn new(engine: Run, saved_step: Option<u64>) -> Self {
        Self { engine, pending_loss: 0.0, pending_tokens: 0.0, pending_secs: 0.0, saved_step, last_used: 0 }
    }

    pub(crate) fn info(&self, id: &str) -> RunInfo {
        RunInfo {
            id: id.to_string(),
            training: self.engine.training().clone(),
            step: self.engine.step(),
            trainable_parameters: self.engine.num_trainable(),
            last_checkpoint_step: self.saved_step,
        }
    }
}

/// Restores every active run of this base from its newest readable `state` checkpoint (a run
/// that never saved one starts again from its config: the same seed gives the same adapter).
pub fn resume_runs(shared: &Shared) -> Result<(BTreeMap<String, HeldRun>, Vec<ResumedRun>), crate::error::ServerError> {
    let mut runs = BTreeMap::new();
    let mut resumed = Vec::new();
    let base = shared.base_key().to_string();
    for row in shared.registry.active_runs(&base)? {
        let mut restored = None;
        for ck in shared.registry.checkpoints(&base, &row.id)?.into_iter().filter(|c| c.kind == "state") {
            match Run::from_checkpoint(shared.base.clone(), Path::new(&ck.path)) {
                Ok(mut s) => {
                    s.set_recompute(shared.recompute);
                    restored = Some((s, ck));
                    break;
                }
                Err(e) => log::warn!("run {}: checkpoint {} unusable ({e}); trying an older one", row.id, ck.path),
            }
        }
        let reached = row.step;
        let (session, step, from) = match restored {
            Some((s, ck)) => {
                let step = s.step();
                (s, step, ck.path)
            }
            None => {
                let mut s = Run::new(shared.base.clone(), row.training.clone())?;
                s.set_recompute(shared.recompute);
                (s, 0, "its config (no checkpoint yet)".to_string())
            }
        };
        // the registry records every step as it is taken: a run that had gone further than its
        // newest checkpoint lost those steps (a kill -9, or a save that failed on the way out)
        let lost_from = (reached > step).then_some(step + 1);
        if lost_from.is_some() {
            log::warn!(
                "run {}: steps {} to {reached} were never saved and are lost; it resumes at step {step} from {from}",
                row.id,
                step + 1
            );
        }
        shared.registry.set_step(&base, &row.id, step)?;
        shared.registry.truncate_metrics(&base, &row.id, step)?;
        resumed.push(ResumedRun {
            run: row.id.clone(),
            step,
            checkpoint: from,
            lost_steps: lost_from.map(|f| [f, reached]),
        });
        runs.insert(row.id.clone(), HeldRun::new(session, Some(step)));
    }
    Ok((runs, resumed))
}

/// Removes temporaries a killed save left behind (`.NAME.tmp-PID-N` folders), in the admin's
/// runs and every user's.
pub fn clean_temporaries(home: &Path) {
    let users = std::fs::read_dir(home.join("users")).into_iter().flatten().flatten();
    let homes = std::iter::once(home.to_path_buf()).chain(users.map(|u| u.path()));
    for run in homes.filter_map(|h| std::fs::read_dir(h.join("runs")).ok()).flatten().flatten() {
        let Ok(cks) = std::fs::read_dir(run.path().join("checkpoints")) else { continue };
        for ck in cks.flatten() {
            let name = ck.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_dir_all(ck.path());
            }
        }
    }
}

/// The worker loop. Runs until [`Msg::Stop`]; the jobs still queued then fail as the server
/// shuts down. While requests are being sampled it alternates decode steps with the jobs that
/// may run meanwhile ([`crate::decoding`]), giving those jobs as much device time between two
/// steps as a step took for each user waiting, so that sampling and each waiting user share the
/// device evenly.
pub fn work(shared: Arc<Shared>, mut res: Resident) {
    // every tensor this thread drops is freed in the device's context
    hearth_engine::device::bind(&shared.base.device);
    publish_runs(&shared, &res);
    let mut sampling = Sampling::default();
    let mut last_step = Duration::ZERO;
    let mut trimmed_at = 0;
    'work: loop {
        if !sampling.is_empty() {
            let share = last_step * shared.queue.users_waiting().max(1) as u32;
            let mut spent = Duration::ZERO;
            while spent <= share {
                let t0 = Instant::now();
                match shared.queue.pop_where(Duration::ZERO, |j| sampling.may_run(j)) {
                    None => break,
                    Some(Next::Control(Msg::Stop)) => break 'work,
                    Some(Next::Control(msg)) => control(&shared, &mut res, msg),
                    Some(Next::Job(user, job)) => take(&shared, &mut res, &mut sampling, user, job),
                }
                spent += t0.elapsed();
            }
            last_step = sampling.step(&shared);
            if sampling.is_empty() {
                publish_runs(&shared, &res);
            }
            continue;
        }
        match shared.queue.pop(IDLE_TRIM) {
            Some(Next::Job(user, job)) => take(&shared, &mut res, &mut sampling, user, job),
            Some(Next::Control(Msg::Stop)) => break,
            Some(Next::Control(msg)) => control(&shared, &mut res, msg),
            None => {
                // idle: give back what the last requests freed (anything since the last trim)
                if shared.last_activity_ms.load(Ordering::SeqCst) > trimmed_at {
                    shared.quotas.flush(&shared.registry);
                    prune_finished(&mut shared.requests.lock().unwrap_or_else(|p| p.into_inner()));
                    hearth_engine::alloc::give_back_freed_memory();
                    hearth_engine::device::give_back_freed_memory(&shared.base.device);
                    trimmed_at = now_ms();
                }
            }
        }
    }
    sampling.fail_all(&shared, ApiError::shutting_down);
    shared.quotas.flush(&shared.registry);
    shared.queue.close();
    for job in shared.queue.drain() {
        shared.set_state(job.id, JobState::Failed(ApiError::shutting_down()));
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts a job the queue gave: a sample joins the decoder (and is answered when it ends),
/// anything else runs to its end now.
fn take(shared: &Shared, res: &mut Resident, sampling: &mut Sampling, user: String, job: Job) {
    let (id, op_name) = (job.id, job.op.name());
    let cancel = shared.cancel_flag(id);
    if cancel.load(Ordering::SeqCst) {
        return finish(shared, &user, id, op_name, Duration::ZERO, Err(hearth_engine::EngineError::Interrupted.into()));
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        return finish(shared, &user, id, op_name, Duration::ZERO, Err(ApiError::shutting_down()));
    }
    shared.set_state(id, JobState::Running);
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if job.op.sample_input().is_some() {
            sampling.join(shared, res, user.clone(), job, cancel.clone()).map(|()| None)
        } else {
            execute(shared, res, &job.run, job.op).map(Some)
        }
    }))
    .unwrap_or_else(|_| Err(ApiError::internal("the operation panicked; the run is unchanged")));
    let took = t0.elapsed();
    shared.busy_ns.fetch_add(took.as_nanos() as u64, Ordering::SeqCst);
    shared.queue.charge(&user, took);
    let result = match result {
        // in the decoder, which counts its prefill and answers it when it ends
        Ok(None) => return,
        Ok(Some(outcome)) => Ok(outcome),
        Err(e) => Err(e),
    };
    publish_runs(shared, res);
    finish(shared, &user, id, op_name, took, result);
}

/// Answers job `id` of `user` with `result`, after `took` of device time (counted in the
/// user's usage; their turn in the queue was charged as it was spent).
pub(crate) fn finish(
    shared: &Shared,
    user: &str,
    id: u64,
    op_name: &'static str,
    took: Duration,
    result: Result<Outcome, ApiError>,
) {
    shared.quotas.record(user, took, op_name, result.as_ref().ok());
    let state = match result {
        Ok(outcome) => JobState::Done(outcome),
        Err(e) => JobState::Failed(e),
    };
    shared.set_state(id, state);
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    shared.last_activity_ms.store(now_ms(), Ordering::SeqCst);
}

/// A control message between jobs.
fn control(shared: &Shared, res: &mut Resident, msg: Msg) {
    match msg {
        Msg::SaveAll { reason, caller, reply } => {
            let mut report = SaveReport::default();
            // evicted runs are saved already
            for (id, r) in res.runs.iter_mut().filter(|(id, _)| caller.owns(id)) {
                if r.saved_step == Some(r.engine.step()) && state_at(shared, id, r.engine.step()).is_some() {
                    continue;
                }
                match autosave(shared, id, r, &reason) {
                    Ok(s) => report.saved.push(s),
                    Err(e) => {
                        log::error!("run {id}: saving on {reason} failed at step {}: {}", r.engine.step(), e.message);
                        report.failed.push(SaveFailure {
                            run: id.clone(),
                            step: r.engine.step(),
                            saved_step: r.saved_step,
                            error: e.body(),
                        });
                    }
                }
            }
            publish_runs(shared, res);
            shared.quotas.flush(&shared.registry);
            let _ = reply.send(report);
        }
        Msg::DropSamplers { prefix, reply } => {
            let freed = res.drop_samplers(&prefix);
            publish_runs(shared, res);
            let _ = reply.send(freed);
        }
        Msg::Stop => {}
    }
}

/// Publishes the runs' snapshot that `GET /v1/runs`, `/v1/info` and the other protocols read.
pub fn publish_runs(shared: &Shared, res: &Resident) {
    *shared.runs.lock().unwrap_or_else(|p| p.into_inner()) = res.infos();
    shared.samplers_in_memory.store(res.samplers_in_memory(), Ordering::SeqCst);
}

pub(crate) fn detokenizer(shared: &Shared) -> impl Fn(&[u32]) -> String + Sync + '_ {
    let text = shared.base.text.as_ref();
    move |ids: &[u32]| match text {
        Some(t) => t.decode(ids, false).unwrap_or_default(),
        None => ByteTokenizer.decode(ids),
    }
}

/// Adds run `run_id` with the session `make` builds (called only once the name is known free,
/// within the owner's quota, and the run's `training` fits in memory).
fn create_run(
    shared: &Shared,
    res: &mut Resident,
    run_id: &str,
    training: &TrainingConfig,
    make: impl FnOnce() -> hearth_engine::Result<Run>,
) -> Result<Outcome, ApiError> {
    let base_key = shared.base_key();
    check_run_id("run", run_id)?;
    if res.contains(run_id) || shared.registry.has_active_run(base_key, run_id).map_err(ApiError::registry)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("run {run_id:?} already exists; pick another name"),
        ));
    }
    let user = owner_of(run_id);
    shared.quotas.check_runs(user, res.ids().filter(|id| owner_of(id) == user).count())?;
    // the adapter (or the full weights), its two optimizer moments and its gradients, in f32
    crate::resident::admit(shared, "a new run", 16 * trainable_scalars(shared, training) as u64)?;
    let mut session = make()?;
    session.set_recompute(shared.recompute);
    // an archived run of that name (left by `--no-resume`) is moved aside, files and all, so the
    // name starts afresh and nothing it saved is lost
    if shared.registry.has_run(base_key, run_id).map_err(ApiError::registry)? {
        let old = shared.run_dir(run_id);
        let aside = shared.home.join("archive").join(format!("{}-{}", run_id.replace('/', "@"), now_ms()));
        if old.exists() {
            std::fs::create_dir_all(shared.home.join("archive")).and_then(|()| std::fs::rename(&old, &aside)).map_err(
                |e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "io_error",
                        format!("moving archived run {run_id:?} aside: {e}"),
                    )
                },
            )?;
            log::info!("archived run {run_id} moved to {} for a new run of that name", aside.display());
        }
        shared.registry.forget_run(base_key, run_id).map_err(ApiError::registry)?;
    }
    shared.registry.add_run(base_key, run_id, session.training(), session.step()).map_err(ApiError::registry)?;
    let run = HeldRun::new(session, None);
    let info = run.info(run_id);
    res.insert(shared, run_id, run);
    Ok(Outcome::Run(info))
}

fn execute(shared: &Shared, res: &mut Resident, run_id: &str, op: Op) -> Result<Outcome, ApiError> {
    let base_key = shared.base_key().to_string();
    match op {
        Op::CreateSampler(source) => {
            let session = match &source {
                Some(dir) => {
                    let training = hearth_engine::run::checkpoint_training_config(dir)?;
                    crate::resident::admit(shared, "a sampler", 4 * trainable_scalars(shared, &training) as u64)?;
                    Some(Run::from_checkpoint_weights(shared.base.clone(), dir)?)
                }
                None => None,
            };
            res.insert_sampler(run_id, session, source);
            return Ok(Outcome::Sampler(SamplerMade { sampler: run_id.to_string(), step: None }));
        }
        Op::CreateRun(req) => {
            return create_run(shared, res, run_id, &req.training, || {
                Run::new(shared.base.clone(), req.training.clone())
            })
        }
        Op::CreateRunFrom { source, optimizer } => {
            let training = hearth_engine::run::checkpoint_training_config(&source)?;
            return create_run(shared, res, run_id, &training, || {
                if optimizer {
                    Run::from_checkpoint(shared.base.clone(), &source)
                } else {
                    Run::from_checkpoint_weights(shared.base.clone(), &source)
                }
            });
        }
        _ => {}
    }
    if let Op::Snapshot { sampler } = &op {
        let run = res.get_mut(shared, run_id)?.ok_or_else(|| no_such_run(run_id))?;
        crate::resident::admit(shared, "a sampler", 4 * run.engine.num_trainable() as u64)?;
        let (snapshot, step) = (run.engine.snapshot()?, run.engine.step());
        res.insert_sampler(sampler, Some(snapshot), None);
        return Ok(Outcome::Sampler(SamplerMade { sampler: sampler.clone(), step: Some(step) }));
    }
    let run = res.get_mut(shared, run_id)?.ok_or_else(|| no_such_run(run_id))?;
    match op {
        Op::Forward(input) => Ok(Outcome::Forward(run.engine.forward(&input)?)),
        Op::ForwardBackward(input) => {
            let t0 = std::time::Instant::now();
            let out = run.engine.forward_backward(&input)?;
            run.pending_secs += t0.elapsed().as_secs_f64();
            run.pending_loss += out.metrics.get("loss:sum").copied().unwrap_or(0.0);
            run.pending_tokens += out.metrics.get("tokens:sum").copied().unwrap_or(0.0);
            Ok(Outcome::Forward(out))
        }
        Op::OptimStep(params) => {
            let t0 = std::time::Instant::now();
            let out = run.engine.optim_step(&params)?;
            let secs = run.pending_secs + t0.elapsed().as_secs_f64();
            let row = MetricRow {
                step: out.step,
                loss: run.pending_loss,
                tokens: run.pending_tokens,
                grad_norm: out.grad_norm,
                learning_rate: out.learning_rate,
                tokens_per_s: if secs > 0.0 { run.pending_tokens / secs } else { 0.0 },
                memory_bytes: rss_bytes(),
                time: now_ms() as f64 / 1000.0,
            };
            (run.pending_loss, run.pending_tokens, run.pending_secs) = (0.0, 0.0, 0.0);
            shared.registry.add_metric(&base_key, run_id, &row).map_err(ApiError::registry)?;
            shared.registry.set_step(&base_key, run_id, out.step).map_err(ApiError::registry)?;
            if shared.autosave_every > 0 && out.step % shared.autosave_every == 0 {
                autosave(shared, run_id, run, "autosave")?;
            }
            Ok(Outcome::OptimStep(out))
        }
        // handled above
        Op::CreateRun(_) | Op::CreateRunFrom { .. } | Op::CreateSampler(_) | Op::Snapshot { .. } => {
            Err(ApiError::invalid("unreachable"))
        }
        // the decoder's (crate::decoding)
        Op::Sample(_) | Op::SampleStream(..) | Op::SamplerSample(_) => {
            Err(ApiError::invalid("sampling runs in the decoder"))
        }
        Op::SaveState(req) => {
            check_name("name", &req.name)?;
            if req.name.starts_with("autosave-") {
                return Err(ApiError::invalid(format!(
                    "name {:?}: names starting with `autosave-` are the server's",
                    req.name
                )));
            }
            let out = save(shared, run_id, run, &req.name, req.kind, "user")?;
            Ok(Outcome::SaveState(out))
        }
        Op::LoadState(req) => {
            let path = checkpoint_source(shared, Some(run_id), &req.source)?;
            let loaded = if req.optimizer { run.engine.load_state(&path)? } else { run.engine.load_weights(&path)? };
            (run.pending_loss, run.pending_tokens, run.pending_secs) = (0.0, 0.0, 0.0);
            shared.registry.set_step(&base_key, run_id, loaded.step).map_err(ApiError::registry)?;
            shared.registry.truncate_metrics(&base_key, run_id, loaded.step).map_err(ApiError::registry)?;
            run.saved_step = None;
            Ok(Outcome::LoadState(LoadStateResponse {
                path: path.display().to_string(),
                kind: loaded.kind,
                step: loaded.step,
            }))
        }
    }
}

pub(crate) fn no_such_run(run_id: &str) -> ApiError {
    ApiError::not_found(format!("run {run_id:?} does not exist; create it with POST /v1/runs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: JobState, ended_ms: u64) -> Entry {
        Entry {
            run: "r".into(),
            op: "sample",
            state: watch::channel(state).0,
            cancel: Arc::default(),
            ended_ms: AtomicU64::new(ended_ms),
        }
    }

    /// A finished result stays readable for a while, then is forgotten; queued and running
    /// requests are never forgotten.
    #[test]
    fn finished_results_are_kept_for_a_while_not_until_thousands_pile_up() {
        let now = now_ms();
        let done = || JobState::Done(Outcome::Sampler(SamplerMade { sampler: "s".into(), step: None }));
        let mut reqs: HashMap<u64, Entry> = HashMap::from([
            (1, entry(done(), now - KEEP_RESULTS_MS - 1)),
            (2, entry(done(), now - 1000)),
            (3, entry(JobState::Queued, 0)),
            (4, entry(JobState::Running, 0)),
        ]);
        prune_finished(&mut reqs);
        let mut kept: Vec<u64> = reqs.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![2, 3, 4]);
    }
}
