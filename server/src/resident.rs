//! What the worker holds in memory: the runs and the samplers, within their caps.
//!
//! - **Runs past `--max-resident-runs`** are evicted least recently used first: saved as a
//!   `state` checkpoint (an `autosave-STEP`, registered like any other, so a kill -9 afterwards
//!   loses nothing more than it would have) and dropped. The next operation on an evicted run
//!   brings it back from that checkpoint, adapter, optimizer moments, step and sampling RNG,
//!   bit for bit, before it runs. A run with gradients accumulated since its last `optim_step`
//!   is never evicted (they are not in a checkpoint). Listings show evicted runs as any other.
//! - **Samplers past `--max-samplers`** (Tinker's sampling sessions) are evicted least recently
//!   used first: one made from a checkpoint keeps its place and is loaded again when used; a
//!   snapshot of a run's weights (in memory only) is dropped, and a later use of it answers
//!   404 saying so. The samplers of a Tinker session are freed when the session finishes.
//! - **Memory admission**: a new run or sampler whose weights and optimizer state would not fit
//!   in the device's available memory, or a sample whose caches would not, is refused with 507
//!   before anything is allocated.

use crate::error::ApiError;
use crate::worker::{HeldRun, Shared};
use axum::http::StatusCode;
use hearth_api::{RunInfo, TrainingConfig};
use hearth_engine::Run;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// A run saved aside to make room.
struct Evicted {
    info: RunInfo,
    checkpoint: PathBuf,
    /// `HeldRun`'s bookkeeping of the steps in progress (loss, tokens, seconds).
    pending: (f64, f64, f64),
    saved_step: Option<u64>,
}

/// A sampler: frozen weights to sample from (`None`: the base model alone).
struct Sampler {
    run: Option<Run>,
    /// The checkpoint it was made from: it can be loaded again after an eviction.
    source: Option<PathBuf>,
    /// Weights dropped to make room (reloaded from `source` when used).
    evicted: bool,
    last_used: u64,
}

/// The runs and samplers in memory, and those saved aside.
pub struct Resident {
    /// Runs in memory.
    pub runs: BTreeMap<String, HeldRun>,
    evicted: BTreeMap<String, Evicted>,
    samplers: HashMap<String, Sampler>,
    /// Snapshot samplers dropped by an eviction (their ids answer a clear 404).
    dropped: std::collections::HashSet<String>,
    clock: u64,
    max_runs: usize,
    max_samplers: usize,
}

impl Resident {
    /// `runs` as resumed; at most `max_runs` runs and `max_samplers` samplers in memory (0: no
    /// cap).
    pub fn new(runs: BTreeMap<String, HeldRun>, max_runs: usize, max_samplers: usize) -> Self {
        Resident {
            runs,
            evicted: BTreeMap::new(),
            samplers: HashMap::new(),
            dropped: Default::default(),
            clock: 0,
            max_runs,
            max_samplers,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Whether run `id` exists (in memory or evicted).
    pub fn contains(&self, id: &str) -> bool {
        self.runs.contains_key(id) || self.evicted.contains_key(id)
    }

    /// Ids of every run, in memory or evicted.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.runs.keys().chain(self.evicted.keys())
    }

    /// Every run as listings show it, by id.
    pub fn infos(&self) -> Vec<RunInfo> {
        let mut out: Vec<RunInfo> = self.runs.iter().map(|(id, r)| r.info(id)).collect();
        out.extend(self.evicted.values().map(|e| e.info.clone()));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Adds a new run, evicting others if the cap says so.
    pub fn insert(&mut self, shared: &Shared, id: &str, mut run: HeldRun) {
        run.last_used = self.tick();
        self.runs.insert(id.to_string(), run);
        self.make_room(shared, id);
    }

    /// Run `id` in memory (brought back if it was evicted), or `None` when there is no such run.
    pub fn get_mut(&mut self, shared: &Shared, id: &str) -> Result<Option<&mut HeldRun>, ApiError> {
        if let Some(e) = self.evicted.remove(id) {
            let mut engine = match Run::from_checkpoint(shared.base.clone(), &e.checkpoint) {
                Ok(r) => r,
                Err(err) => {
                    let message = format!("bringing back run {id:?} from {}: {err}", e.checkpoint.display());
                    self.evicted.insert(id.to_string(), e);
                    return Err(ApiError::internal(message));
                }
            };
            engine.set_recompute(shared.recompute);
            let mut held = HeldRun::new(engine, e.saved_step);
            (held.pending_loss, held.pending_tokens, held.pending_secs) = e.pending;
            log::info!("run {id}: brought back from {}", e.checkpoint.display());
            self.runs.insert(id.to_string(), held);
        }
        if self.runs.contains_key(id) {
            self.make_room(shared, id);
        }
        let now = self.tick();
        let run = self.runs.get_mut(id);
        if let Some(r) = run {
            r.last_used = now;
            return Ok(Some(r));
        }
        Ok(None)
    }

    /// Evicts the least recently used runs (never `keep`, never one with gradients waiting for
    /// its `optim_step`) until at most `max_runs` are in memory.
    fn make_room(&mut self, shared: &Shared, keep: &str) {
        while self.max_runs > 0 && self.runs.len() > self.max_runs {
            let victim = self
                .runs
                .iter()
                .filter(|(id, r)| *id != keep && r.engine.accumulated_grads().is_empty())
                .min_by_key(|(_, r)| r.last_used)
                .map(|(id, _)| id.clone());
            let Some(id) = victim else { return };
            if let Err(e) = self.evict(shared, &id) {
                log::warn!("run {id}: not evicted ({}); it stays in memory", e.message);
                return;
            }
        }
    }

    fn evict(&mut self, shared: &Shared, id: &str) -> Result<(), ApiError> {
        let Some(run) = self.runs.get_mut(id) else { return Ok(()) };
        let step = run.engine.step();
        let checkpoint = match crate::checkpoints::state_at(shared, id, step) {
            Some(dir) if run.saved_step == Some(step) => dir,
            _ => PathBuf::from(crate::checkpoints::autosave(shared, id, run, "evict")?.path),
        };
        let info = run.info(id);
        let pending = (run.pending_loss, run.pending_tokens, run.pending_secs);
        let saved_step = run.saved_step;
        self.runs.remove(id);
        log::info!("run {id}: evicted to {} (more than --max-resident-runs in memory)", checkpoint.display());
        self.evicted.insert(id.to_string(), Evicted { info, checkpoint, pending, saved_step });
        Ok(())
    }

    /// Adds sampler `id` (`source`: the checkpoint it was made from, if any).
    pub fn insert_sampler(&mut self, id: &str, run: Option<Run>, source: Option<PathBuf>) {
        let last_used = self.tick();
        self.dropped.remove(id);
        self.samplers.insert(id.to_string(), Sampler { run, source, evicted: false, last_used });
        self.make_sampler_room(id);
    }

    /// Sampler `id`'s weights (`Some(None)`: the base model alone), loaded again if they were
    /// evicted; a 404 when there is no such sampler.
    pub fn sampler(&mut self, shared: &Shared, id: &str) -> Result<Option<&Run>, ApiError> {
        let now = self.tick();
        let Some(s) = self.samplers.get_mut(id) else {
            let why = if self.dropped.contains(id) {
                "was evicted to make room for newer samplers (--max-samplers); create it again"
            } else {
                "does not exist (samplers live until their session finishes or the server stops)"
            };
            let shown = id.split_once('/').map_or(id, |(_, s)| s);
            return Err(ApiError::not_found(format!("sampler {shown:?} {why}")));
        };
        s.last_used = now;
        if s.evicted {
            if let Some(dir) = &s.source {
                s.run = Some(Run::from_checkpoint_weights(shared.base.clone(), dir)?);
                s.evicted = false;
                self.make_sampler_room(id);
            }
        }
        Ok(self.samplers.get(id).and_then(|s| s.run.as_ref()))
    }

    fn make_sampler_room(&mut self, keep: &str) {
        loop {
            let held: Vec<(&String, &Sampler)> =
                self.samplers.iter().filter(|(_, s)| s.run.is_some() && !s.evicted).collect();
            if self.max_samplers == 0 || held.len() <= self.max_samplers {
                return;
            }
            let Some(id) =
                held.iter().filter(|(id, _)| *id != keep).min_by_key(|(_, s)| s.last_used).map(|(id, _)| (*id).clone())
            else {
                return;
            };
            let Some(s) = self.samplers.get_mut(&id) else { return };
            s.run = None;
            if s.source.is_some() {
                s.evicted = true;
            } else {
                self.samplers.remove(&id);
                self.dropped.insert(id);
            }
        }
    }

    /// Frees every sampler whose id starts with `prefix` (a Tinker session's, when it finishes).
    pub fn drop_samplers(&mut self, prefix: &str) -> usize {
        let before = self.samplers.len();
        self.samplers.retain(|id, _| !id.starts_with(prefix));
        before - self.samplers.len()
    }

    /// Samplers holding weights in memory now.
    pub fn samplers_in_memory(&self) -> usize {
        self.samplers.values().filter(|s| s.run.is_some()).count()
    }

    /// Any run's engine, for sampling the base model alone (`None` when there is no run in
    /// memory).
    pub fn any_run(&self) -> Option<&Run> {
        self.runs.values().next().map(|r| &r.engine)
    }
}

/// Trainable scalars a run with `training` will have on `shared`'s base model.
pub fn trainable_scalars(shared: &Shared, training: &TrainingConfig) -> usize {
    let c = &shared.base.config;
    let TrainingConfig::Lora(l) = training else { return c.num_parameters() };
    let (h, q, kv) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let per_layer: usize = l
        .target_modules
        .iter()
        .map(|m| {
            use hearth_api::TargetModule as T;
            let (i, o) = match m {
                T::QProj => (h, q),
                T::KProj | T::VProj => (h, kv),
                T::OProj => (q, h),
                T::GateProj | T::UpProj => (h, c.intermediate_size),
                T::DownProj => (c.intermediate_size, h),
                T::LmHead => return 0,
            };
            l.rank * (i + o)
        })
        .sum();
    let head =
        if l.target_modules.contains(&hearth_api::TargetModule::LmHead) { l.rank * (h + c.vocab_size) } else { 0 };
    per_layer * c.num_hidden_layers + head
}

/// A 507 when sample `input` would not fit ([`admit`] of [`sample_bytes`]).
pub fn admit_sample(shared: &Shared, input: &hearth_api::SampleInput) -> Result<(), ApiError> {
    admit(shared, "this sample", sample_bytes(shared, input))
}

/// Bytes a sample takes while it runs: every sequence's key/value cache over the prompt and
/// `max_tokens`, and a row of logits per sequence.
pub fn sample_bytes(shared: &Shared, input: &hearth_api::SampleInput) -> u64 {
    let c = &shared.base.config;
    let elem = shared.base.dtype.size_in_bytes().max(2) as u64;
    let positions = (input.prompt.len() + input.sampling_params.max_tokens) as u64;
    let per_position = 2 * (c.num_key_value_heads * c.head_dim * c.num_hidden_layers) as u64 * elem;
    let rows = input.num_samples.max(1) as u64;
    rows.saturating_mul(positions.saturating_mul(per_position).saturating_add(4 * c.vocab_size as u64))
}

/// A 507 when `bytes` more would not fit in the device's available memory, or in what
/// `--memory-budget-mb` leaves (with a margin for the work around them); nothing where neither
/// says.
pub fn admit(shared: &Shared, what: &str, bytes: u64) -> Result<(), ApiError> {
    let available = hearth_engine::device::available_memory(&shared.base.device);
    let budget = (shared.memory_budget > 0).then(|| shared.memory_budget.saturating_sub(crate::worker::rss_bytes()));
    let free = match (available, budget) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => match a.or(b) {
            Some(f) => f,
            None => return Ok(()),
        },
    };
    let margin = 64 << 20;
    if bytes + margin > free {
        let mb = |b: u64| b >> 20;
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "out_of_memory",
            format!(
                "{what} needs about {} MB and {} MB is available: save and leave idle runs (the server evicts runs past --max-resident-runs), or ask the admin for room",
                mb(bytes),
                mb(free)
            ),
        ));
    }
    Ok(())
}
