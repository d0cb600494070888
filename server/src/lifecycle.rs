//! Starting, serving and stopping: model loading, resume, the session file and token, signals,
//! the idle timer, cost accounting, and saving every run on the way out.

use crate::error::{ApiError, ServerError};
use crate::limits::Limits;
use crate::options::Options;
use crate::registry::Registry;
use crate::users::Caller;
use crate::worker::{self, now_ms, Shared};
use axum::http::StatusCode;
use candle_core::{DType, Device};
use hearth_api::{CostInfo, ResumedRun, RunInfo, ServerInfo, SessionFile};
use hearth_engine::hub::{self, HubOptions};
use hearth_engine::preset::Preset;
use hearth_engine::quant::Quantize;
use hearth_engine::recompute::Recompute;
use hearth_engine::BaseModel;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the caller of [`run`] learns once the server accepts connections.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The session file (URL, token, pid).
    pub session_file: PathBuf,
}

/// Writes the session file atomically, readable by the owner only.
fn write_session_file(file: &SessionFile, path: &Path) -> Result<(), ServerError> {
    let text = serde_json::to_string_pretty(file).map_err(|e| ServerError::Config(e.to_string()))?;
    write_private(path, text.as_bytes())
}

/// True when the session file names a running server whose process still exists.
fn server_alive(file: &SessionFile) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    file.state == "running" && unsafe { libc::kill(file.pid as libc::pid_t, 0) } == 0
}

/// Writes `bytes` to `path` via a 0600 temporary, fsync and rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(ServerError::io("creating", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(ServerError::io("writing", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(ServerError::io("renaming into", path.display()))
}

/// 256 random bits as 64 hex digits: the server's token, or a user's.
pub(crate) fn fresh_token() -> Result<String, ServerError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(ServerError::io("reading", "/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn load_token(file: Option<&Path>) -> Result<String, ServerError> {
    let Some(file) = file else { return fresh_token() };
    match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(ServerError::Config(format!("token file {} is empty", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = fresh_token()?;
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(ServerError::io("creating", parent.display()))?;
            }
            write_private(file, token.as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(ServerError::io("reading", file.display())(e)),
    }
}

fn parse_device(spec: &str) -> Result<Device, ServerError> {
    hearth_engine::device::open(spec).map_err(|e| match e {
        hearth_engine::EngineError::Device { spec, reason } => {
            ServerError::Config(format!("--device {spec}: {reason}"))
        }
        other => ServerError::Config(format!("--device {spec}: {other}")),
    })
}

fn parse_dtype(spec: Option<&str>, device: &Device) -> Result<DType, ServerError> {
    match spec {
        None if device.is_cpu() => Ok(DType::F32),
        None => Ok(DType::BF16),
        Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => Err(ServerError::Config(format!("--dtype {other}: expected f32, bf16 or f16"))),
    }
}

/// USD per hour of common GPUs (on-demand cloud prices, late 2026); `--hourly-rate` overrides.
pub const GPU_RATES: [(&str, f64); 8] = [
    ("H200", 3.49),
    ("H100", 2.49),
    ("A100", 1.29),
    ("L40S", 0.99),
    ("A10", 0.75),
    ("L4", 0.48),
    ("4090", 0.39),
    ("T4", 0.35),
];

fn default_rate(device: &Device) -> f64 {
    if device.is_cpu() {
        return 0.0;
    }
    let name = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    GPU_RATES.iter().find(|(k, _)| name.contains(k)).map_or(2.49, |(_, r)| *r)
}

/// The model folder for `--model`: a preset name, a local folder, or a hub repo id.
fn model_dir(spec: &str, home: &Path) -> Result<PathBuf, ServerError> {
    if let Some(p) = Preset::ALL.iter().find(|p| p.name() == spec) {
        return Ok(p.ensure(&home.join("models"))?);
    }
    Ok(hub::resolve(spec, &HubOptions::from_env())?)
}

/// The running server's state, shared by every handler.
pub struct App {
    /// What the worker shares.
    pub shared: Arc<Shared>,
    /// The bearer token.
    pub token: String,
    /// `--model`.
    pub model_spec: String,
    /// Device and dtype names.
    device: String,
    dtype: String,
    started: Instant,
    hourly_rate: f64,
    budget: Option<f64>,
    budget_saved: AtomicBool,
    resumed: Vec<ResumedRun>,
    /// Seconds without work before saving and exiting (0 = never); `POST /v1/settings` changes it.
    pub idle_timeout: AtomicU64,
    model_loads: u64,
    shutdown_tx: watch::Sender<Option<String>>,
    /// Runs the shutdown's save could not save (the exit code and session file say so).
    unsaved: Mutex<Vec<worker::SaveFailure>>,
    /// Tinker protocol state (models' order, futures, samplers).
    pub tinker: crate::tinker::Tinker,
    /// `--max-body-bytes`, for a handler that reads its body itself.
    pub max_body_bytes: usize,
}

/// How long a client may take to send a request's headers (a half-sent request holds a
/// connection, and would hold a graceful shutdown, no longer than this).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl App {
    /// The base model's tokenizer and chat template, or a 400 when its folder has none.
    pub(crate) fn text_model(&self) -> Result<&hearth_engine::text::TextModel, crate::error::ApiError> {
        self.shared
            .base
            .text
            .as_ref()
            .ok_or_else(|| crate::error::ApiError::invalid("this model folder has no tokenizer.json"))
    }

    /// The runs `caller` sees, under the names it gives them.
    pub fn runs_of(&self, caller: &Caller) -> Vec<RunInfo> {
        let runs = self.shared.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.iter().filter_map(|r| Some(RunInfo { id: caller.view(&r.id)?, ..r.clone() })).collect()
    }

    /// `GET /v1/info`, as `caller` sees it (their runs).
    pub fn info(&self, caller: &Caller) -> ServerInfo {
        let base = &self.shared.base;
        ServerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            model: self.model_spec.clone(),
            model_dir: base.source.display().to_string(),
            model_type: base.config.family.model_type().into(),
            num_parameters: base.config.num_parameters(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            quantize: self.shared.base.quantize.map(|q| q.name().to_string()),
            model_loads: self.model_loads,
            uptime_s: self.started.elapsed().as_secs_f64(),
            memory_bytes: worker::rss_bytes(),
            runs: self.runs_of(caller),
            samplers: self.shared.samplers_in_memory.load(Ordering::SeqCst),
            resumed: self
                .resumed
                .iter()
                .filter_map(|r| Some(ResumedRun { run: caller.view(&r.run)?, ..r.clone() }))
                .collect(),
            cost: self.cost(),
            idle_timeout_s: self.idle_timeout.load(Ordering::SeqCst),
            autosave_every: self.shared.autosave_every,
        }
    }

    /// USD per hour of the device (`--hourly-rate`, or the GPU's list price).
    pub fn hourly_rate(&self) -> f64 {
        self.hourly_rate
    }

    fn cost(&self) -> CostInfo {
        let held_s = self.started.elapsed().as_secs_f64();
        CostInfo {
            held_s,
            busy_s: self.shared.busy_ns.load(Ordering::SeqCst) as f64 / 1e9,
            hourly_rate_usd: self.hourly_rate,
            spent_usd: held_s * self.hourly_rate / 3600.0,
            budget_usd: self.budget,
        }
    }

    /// Refuses device work once the budget is spent (saving every run the first time).
    pub fn check_budget(&self) -> Result<(), ApiError> {
        let Some(budget) = self.budget else { return Ok(()) };
        let spent = self.cost().spent_usd;
        if spent < budget {
            return Ok(());
        }
        if !self.budget_saved.swap(true, Ordering::SeqCst) {
            let shared = self.shared.clone();
            std::thread::spawn(move || {
                let report = shared.save_all("budget");
                log::warn!(
                    "budget spent: saved {} run(s), {} could not be saved",
                    report.saved.len(),
                    report.failed.len()
                );
            });
        }
        Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "budget_exhausted",
            format!("the budget of ${budget:.2} is spent (${spent:.2} at ${:.2}/h); every run was saved. Restart with a larger --budget-usd to continue", self.hourly_rate),
        ))
    }

    /// A run name `caller` has not used yet on this base: `run-N`.
    pub fn fresh_run_name(&self, caller: &Caller) -> String {
        let base = self.shared.base_key();
        let mut n = self.shared.registry.run_count(base).unwrap_or(0) + 1;
        loop {
            let name = format!("run-{n}");
            let id = caller.run_id(&name);
            let taken = self.shared.registry.has_run(base, &id).unwrap_or(false)
                || self.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r.id == id);
            if !taken {
                return name;
            }
            n += 1;
        }
    }

    /// Starts the shutdown sequence (the first reason wins).
    pub fn trigger_shutdown(&self, reason: &str) {
        self.shutdown_tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_string());
                true
            } else {
                false
            }
        });
    }
}

/// Loads the model, restores runs, serves until shutdown (idle timeout, SIGTERM, SIGINT or
/// `POST /v1/shutdown`), saves every run and returns. `on_ready` runs once the port is bound.
pub fn run(opts: Options, on_ready: impl FnOnce(&Ready)) -> Result<(), ServerError> {
    let home = opts.home_dir();
    std::fs::create_dir_all(&home).map_err(ServerError::io("creating", home.display()))?;
    let session_path = home.join("session.json");
    let previous = SessionFile::read(&session_path);
    if let Some(p) = previous.as_ref().filter(|p| server_alive(p) && p.pid != std::process::id()) {
        return Err(ServerError::Config(format!(
            "a server is already running for {} (pid {}, {}); attach to it, or stop it first",
            home.display(),
            p.pid,
            p.url
        )));
    }
    let resume = opts.resume || (!opts.no_resume && previous.is_some());

    let device = parse_device(&opts.device)?;
    let dtype = parse_dtype(opts.dtype.as_deref(), &device)?;
    let recompute = Recompute::parse(&opts.recompute)
        .ok_or_else(|| ServerError::Config(format!("--recompute {}: expected auto, on or off", opts.recompute)))?;
    let quantize = match opts.quantize.as_deref() {
        None => None,
        Some(q) => {
            Some(Quantize::parse(q).ok_or_else(|| ServerError::Config(format!("--quantize {q}: expected q8 or q4")))?)
        }
    };
    let dir = model_dir(&opts.model, &home)?;
    log::info!(
        "loading {} from {} ({dtype:?} on {}{})",
        opts.model,
        dir.display(),
        opts.device,
        quantize.map_or(String::new(), |q| format!(", quantized {}", q.name()))
    );
    let base = Arc::new(BaseModel::load_quantized(&dir, &device, dtype, quantize)?);
    let base_context = base.config.max_position_embeddings;
    let registry = Registry::open(&home.join("registry.sqlite"))?;
    worker::clean_temporaries(&home);
    let token = load_token(opts.token_file.as_deref())?;
    let defaults = hearth_api::Quota {
        runs: Some(opts.user_runs),
        lora_rank: Some(opts.user_lora_rank),
        request_tokens: Some(opts.user_request_tokens),
        queued: Some(opts.max_queued_per_user),
        device_seconds: Some(opts.user_device_seconds),
    };
    let quotas = crate::quota::Quotas::load(defaults, &registry)?;

    let shared = Arc::new(Shared {
        base,
        registry,
        home: home.clone(),
        requests: Mutex::new(Default::default()),
        next_id: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
        runs: Mutex::new(Vec::new()),
        samplers_in_memory: AtomicUsize::new(0),
        busy_ns: AtomicU64::new(0),
        last_activity_ms: AtomicU64::new(now_ms()),
        shutting_down: AtomicBool::new(false),
        autosave_every: opts.autosave_every,
        keep_autosaves: opts.keep_autosaves,
        recompute,
        queue: crate::queue::Queue::default(),
        memory_budget: opts.memory_budget_mb.saturating_mul(1 << 20),
        quotas,
        limits: Limits {
            max_request_tokens: opts.max_request_tokens,
            max_text_bytes: opts.max_text_bytes,
            max_samples: opts.max_samples.min(hearth_engine::run::MAX_SAMPLES),
            max_lora_rank: opts.max_lora_rank,
            max_queued_per_user: opts.max_queued_per_user,
            context: base_context,
        },
    });
    let (runs, resumed) = if resume {
        worker::resume_runs(&shared)?
    } else {
        shared.registry.archive_runs(shared.base_key())?;
        Default::default()
    };
    for r in &resumed {
        log::info!("restored run {} at step {} from {}", r.run, r.step, r.checkpoint);
    }
    // every run is listed before the first request is answered: a client reconnecting right
    // after a restart must never see "no such run" for a run being restored
    let resident = crate::resident::Resident::new(runs, opts.max_resident_runs, opts.max_samplers);
    worker::publish_runs(&shared, &resident);
    let worker_shared = shared.clone();
    let worker = std::thread::Builder::new()
        .name("hearth-engine".into())
        .spawn(move || worker::work(worker_shared, resident))
        .map_err(ServerError::io("spawning", "the engine thread"))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(None);
    let app = Arc::new(App {
        shared: shared.clone(),
        token: token.clone(),
        model_spec: opts.model.clone(),
        device: opts.device.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        started: Instant::now(),
        hourly_rate: opts.hourly_rate.unwrap_or_else(|| default_rate(&device)),
        budget: opts.budget_usd,
        budget_saved: AtomicBool::new(false),
        resumed,
        idle_timeout: AtomicU64::new(opts.idle_timeout),
        model_loads: 1,
        shutdown_tx,
        unsaved: Mutex::new(Vec::new()),
        tinker: crate::tinker::Tinker::new(Duration::from_secs(opts.tinker_gap_wait_s)),
        max_body_bytes: opts.max_body_bytes,
    });

    let listener = std::net::TcpListener::bind(&opts.listen).map_err(ServerError::io("binding", &opts.listen))?;
    listener.set_nonblocking(true).map_err(ServerError::io("configuring", &opts.listen))?;
    let addr = listener.local_addr().map_err(ServerError::io("reading the address of", &opts.listen))?;
    let scheme = if opts.tls_cert.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let session = SessionFile {
        url: url.clone(),
        token,
        pid: std::process::id(),
        model: opts.model.clone(),
        state: "running".into(),
        started_at: now_ms() as f64 / 1000.0,
        stop_reason: None,
    };
    write_session_file(&session, &session_path)?;
    shared.registry.server_started(session.pid, &url, &opts.model)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::io("starting", "the async runtime"))?;
    let served = runtime.block_on(serve(
        app.clone(),
        &opts,
        listener,
        shutdown_rx,
        Ready { url, session_file: session_path.clone() },
        on_ready,
    ));
    // handlers still waiting on the worker are dropped, not waited for
    runtime.shutdown_timeout(Duration::from_secs(1));

    // The HTTP side has stopped; stop the engine thread and record the stop.
    let reason = app.shutdown_tx.borrow().clone().unwrap_or_else(|| "server error".into());
    shared.queue.push_control(worker::Msg::Stop);
    let _ = worker.join();
    let unsaved = std::mem::take(&mut *app.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
    let reason = if unsaved.is_empty() {
        reason
    } else {
        let lost: Vec<String> = unsaved
            .iter()
            .map(|f| {
                format!(
                    "run {} at step {} (last saved: {}): {}",
                    f.run,
                    f.step,
                    f.saved_step.map_or("never".into(), |s| format!("step {s}")),
                    f.error.message
                )
            })
            .collect();
        format!("{reason}; NOT SAVED: {}", lost.join("; "))
    };
    shared.registry.server_stopped(session.pid, &reason)?;
    write_session_file(
        &SessionFile { state: "stopped".into(), stop_reason: Some(reason.clone()), ..session },
        &session_path,
    )?;
    log::info!("stopped ({reason})");
    served?;
    if !unsaved.is_empty() {
        return Err(ServerError::Unsaved(reason));
    }
    Ok(())
}

async fn serve(
    app: Arc<App>,
    opts: &Options,
    listener: std::net::TcpListener,
    mut shutdown_rx: watch::Receiver<Option<String>>,
    ready: Ready,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServerError> {
    let router = crate::routes::router(app.clone(), opts.max_body_bytes);
    let (http_stop_tx, http_stop_rx) = watch::channel(false);

    // Signals and the idle timer only trigger; the sequence below does the work once.
    let sig_app = app.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        let reason = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        sig_app.trigger_shutdown(reason);
    });
    // The limit is read on every tick, so `POST /v1/settings` can change it (0 = never).
    let idle_app = app.clone();
    tokio::spawn(async move {
        loop {
            let limit_ms = idle_app.idle_timeout.load(Ordering::SeqCst).saturating_mul(1000);
            tokio::time::sleep(Duration::from_millis((limit_ms / 4).clamp(50, 1000))).await;
            let s = &idle_app.shared;
            let idle = now_ms().saturating_sub(s.last_activity_ms.load(Ordering::SeqCst));
            if limit_ms > 0 && s.in_flight.load(Ordering::SeqCst) == 0 && idle >= limit_ms {
                idle_app.trigger_shutdown("idle timeout");
                return;
            }
        }
    });
    let seq_app = app.clone();
    tokio::spawn(async move {
        let reason = match shutdown_rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => return,
        };
        log::info!("{reason}: saving every run");
        seq_app.shared.shutting_down.store(true, Ordering::SeqCst);
        // queued requests never start, a running sample stops at its next token: the save
        // below waits for neither
        let cancelled = seq_app.shared.cancel_everything(&crate::users::Caller::Admin);
        if !cancelled.is_empty() {
            log::info!("cancelled {} queued or running request(s)", cancelled.len());
        }
        let shared = seq_app.shared.clone();
        let why = reason.clone();
        let report = tokio::task::spawn_blocking(move || shared.save_all(&why)).await.unwrap_or_default();
        for s in &report.saved {
            log::info!("saved {} at step {}", s.path, s.step);
        }
        *seq_app.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = report.failed;
        let _ = http_stop_tx.send(true);
    });

    // once every run is saved, open connections (a half-sent request, an unread stream) get a
    // short grace and are then closed: nothing a client holds keeps the server from exiting
    let handle = axum_server::Handle::new();
    let (h, grace) = (handle.clone(), Duration::from_secs(opts.shutdown_grace_s));
    let mut stop = http_stop_rx.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        h.graceful_shutdown(Some(grace));
    });
    let service = router.into_make_service();
    let serving = ServerError::io("serving", &opts.listen);
    if let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
            .await
            .map_err(|e| ServerError::Config(format!("TLS certificate/key: {e}")))?;
        let mut server = axum_server::from_tcp_rustls(listener, config)
            .map_err(ServerError::io("listening on", &opts.listen))?
            .first_request_timeout(HEADER_READ_TIMEOUT)
            .handle(handle);
        server.http_builder().http1().header_read_timeout(HEADER_READ_TIMEOUT);
        on_ready(&ready);
        server.serve(service).await.map_err(serving)
    } else {
        let mut server = axum_server::from_tcp(listener)
            .map_err(ServerError::io("listening on", &opts.listen))?
            .first_request_timeout(HEADER_READ_TIMEOUT)
            .handle(handle);
        server.http_builder().http1().header_read_timeout(HEADER_READ_TIMEOUT);
        on_ready(&ready);
        server.serve(service).await.map_err(serving)
    }
}
