//! [`Session`]: a blocking handle on one run of the session server.
//!
//! It holds only the server's URL, the token and a run name, so it survives anything that
//! happens to the process running the cell. When a request cannot reach the server it re-reads
//! the session file (the server may have restarted on another port); when the session file says
//! the server stopped (idle timeout, shutdown), it starts a new one with `--resume` and says so on
//! stderr, then retries.

use crate::error::{HearthError, Result};
use hearth_api::{
    AdamParams, CancelResponse, ChatMessage, CheckpointKind, CreateRunRequest, Datum, DetokenizeRequest,
    ForwardBackwardInput, ForwardBackwardOutput, LoadStateRequest, LoadStateResponse, LossFn, Metrics, OptimStepOutput,
    RenderChatRequest, RenderChatResponse, RequestState, RequestStatus, RunInfo, SampleInput, SampleOutput,
    SamplingParams, SaveStateRequest, SaveStateResponse, ServerInfo, SessionFile, Settings, Text, TokenizeRequest,
    Tokens, TrainingConfig,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use hearth_api::home_dir;

#[derive(Debug, Clone)]
struct Conn {
    url: String,
    token: String,
}

/// A handle on one run of the session server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Session {
    conn: Arc<Mutex<Conn>>,
    /// How long to wait for a TCP (or TLS) connection.
    connect_timeout: Duration,
    home: PathBuf,
    run: String,
    /// Attached by URL and token ([`Session::attach`]: a remote server, or a user's token):
    /// it never takes the home's session file (the admin's token) or starts a server.
    attached: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self.conn.lock().map(|c| c.url.clone()).unwrap_or_default();
        f.debug_struct("Session").field("url", &url).field("run", &self.run).finish()
    }
}

fn read_session_file(home: &Path) -> Option<SessionFile> {
    SessionFile::read(&home.join("session.json"))
}

/// The URL and token of the server a session file names, if that server still runs.
fn running(s: &SessionFile) -> Option<Conn> {
    // SAFETY: signal 0 only checks that the process exists.
    let alive = s.pid > 0 && unsafe { libc::kill(s.pid as libc::pid_t, 0) } == 0;
    (s.state == "running" && alive).then(|| Conn { url: s.url.clone(), token: s.token.clone() })
}

impl Session {
    /// [`Session::connect`] for the cell prelude: panics with the reason when no server can be
    /// reached, which fails the prelude with that message. A plain `Session` return type (no
    /// `Result::expect` to resolve) keeps the prelude cheap for evcxr's rust-analyzer, which
    /// infers the type of every cell variable before the cell compiles.
    #[allow(clippy::panic)] // the prelude's one way to fail with a message
    pub fn connect_for_cells() -> Session {
        match Self::connect() {
            Ok(s) => s,
            Err(e) => panic!("hearth: could not connect to the session server: {e}"),
        }
    }

    /// Attaches to the server of `$HEARTH_HOME` (starting one if none runs) on run `main`,
    /// creating the run if it does not exist.
    /// With `HEARTH_URL` set (a remote GPU box), attaches there instead, with the token from
    /// `HEARTH_TOKEN` or the file named by `HEARTH_TOKEN_FILE`.
    pub fn connect() -> Result<Session> {
        if let Some(url) = std::env::var("HEARTH_URL").ok().filter(|u| !u.is_empty()) {
            let token = match std::env::var("HEARTH_TOKEN") {
                Ok(t) if !t.is_empty() => t,
                _ => {
                    let file = std::env::var_os("HEARTH_TOKEN_FILE").ok_or_else(|| {
                        HearthError::NoServer("HEARTH_URL is set but neither HEARTH_TOKEN nor HEARTH_TOKEN_FILE".into())
                    })?;
                    std::fs::read_to_string(&file)
                        .map_err(|e| HearthError::NoServer(format!("HEARTH_TOKEN_FILE: {e}")))?
                        .trim()
                        .to_string()
                }
            };
            return Self::attach(&url, &token, "main");
        }
        Self::connect_home(&home_dir(), "main")
    }

    /// Attaches to the server of `home` on run `run`, starting one if none runs: on `model`, else
    /// on the model of the last server of `home`, else on `tiny` (`resume`: `Some` passes
    /// `--resume` / `--no-resume`, `None` leaves the server's default). When `model` is given, a
    /// running server on another model is an error, not silently used.
    pub fn connect_or_start(home: &Path, run: &str, model: Option<&str>, resume: Option<bool>) -> Result<Session> {
        let file = read_session_file(home);
        let conn = file.as_ref().and_then(running);
        if let (Some(_), Some(f), Some(model)) = (&conn, &file, model) {
            if f.model != model {
                return Err(HearthError::NoServer(format!(
                    "the server for {} (pid {}) runs model {:?}, not {model:?}: use it, stop it, or pick another --home",
                    home.display(),
                    f.pid,
                    f.model
                )));
            }
        }
        let s = Session {
            conn: Arc::new(Mutex::new(conn.clone().unwrap_or(Conn { url: String::new(), token: String::new() }))),
            connect_timeout: Duration::from_secs(5),
            home: home.to_path_buf(),
            run: run.to_string(),
            attached: false,
        };
        if conn.is_none() {
            let last = file.map(|f| f.model);
            s.start_server(model.or(last.as_deref()).unwrap_or("tiny"), resume)?;
        }
        s.ensure_run(run, None)?;
        Ok(s)
    }

    /// Attaches to the server of `home` on run `run` (created with the default LoRA if missing).
    pub fn connect_home(home: &Path, run: &str) -> Result<Session> {
        let conn = read_session_file(home)
            .as_ref()
            .and_then(running)
            .unwrap_or(Conn { url: String::new(), token: String::new() });
        let s = Session {
            conn: Arc::new(Mutex::new(conn)),
            connect_timeout: Duration::from_secs(5),
            home: home.to_path_buf(),
            run: run.to_string(),
            attached: false,
        };
        if s.conn().url.is_empty() {
            s.reconnect()?;
        }
        s.ensure_run(run, None)?;
        Ok(s)
    }

    /// Attaches to a server by URL and token (a remote GPU box), on run `run`.
    pub fn attach(url: &str, token: &str, run: &str) -> Result<Session> {
        let s = Session {
            conn: Arc::new(Mutex::new(Conn { url: url.trim_end_matches('/').into(), token: token.into() })),
            connect_timeout: Duration::from_secs(10),
            home: home_dir(),
            run: run.into(),
            attached: true,
        };
        s.ensure_run(run, None)?;
        Ok(s)
    }

    /// A handle on the same server with another token, on that token's run `main`: a user's
    /// session, for a teacher trying the class's view (`add_user` gives the token).
    pub fn as_user(&self, token: &str) -> Result<Session> {
        Session::attach(&self.url(), token, "main")
    }

    /// Adds a user (the admin's token only); their token, shown this once.
    pub fn add_user(&self, name: &str) -> Result<hearth_api::NewUser> {
        self.post("/v1/users", &serde_json::json!({ "name": name }))
    }

    /// Sets fields of user `name`'s quota (the admin's token only); the quota in force after.
    pub fn set_quota(&self, name: &str, quota: &hearth_api::Quota) -> Result<hearth_api::Quota> {
        let body = serde_json::to_value(quota).map_err(|e| HearthError::Decode(e.to_string()))?;
        serde_json::from_value(self.send("PUT", &format!("/v1/users/{name}/quota"), Some(&body))?)
            .map_err(|e| HearthError::Decode(e.to_string()))
    }

    /// Publishes this run's checkpoint `checkpoint` read-only to every user as `name` (the admin's
    /// token only); users load it with `load_state("published:NAME")`.
    pub fn publish(&self, checkpoint: &str, name: &str) -> Result<()> {
        let body = serde_json::json!({"name": name, "source": format!("{}/{checkpoint}", self.run)});
        self.send("POST", "/v1/published", Some(&body)).map(|_| ())
    }

    /// The run this handle trains.
    pub fn run_name(&self) -> &str {
        &self.run
    }

    /// The hearth home whose session file this handle follows.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        self.conn().url
    }

    fn conn(&self) -> Conn {
        self.conn.lock().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// A handle on another run of the same server, created with `training` if it does not
    /// exist (two learning rates side by side on one warm model).
    pub fn new_run(&self, name: &str, training: TrainingConfig) -> Result<Session> {
        let s = Session { run: name.into(), ..self.clone() };
        s.ensure_run(name, Some(training))?;
        Ok(s)
    }

    /// A handle on an existing run.
    pub fn with_run(&self, name: &str) -> Result<Session> {
        if !self.runs()?.iter().any(|r| r.id == name) {
            return Err(HearthError::Api {
                status: 404,
                kind: "not_found".into(),
                message: format!("run {name:?} does not exist"),
            });
        }
        Ok(Session { run: name.into(), ..self.clone() })
    }

    fn ensure_run(&self, name: &str, training: Option<TrainingConfig>) -> Result<()> {
        if self.runs()?.iter().any(|r| r.id == name) {
            return Ok(());
        }
        let req = CreateRunRequest { name: Some(name.into()), training: training.unwrap_or_default() };
        match self.post::<_, RunInfo>("/v1/runs", &req) {
            Ok(_) => Ok(()),
            Err(HearthError::Api { status: 409, .. }) => Ok(()), // created meanwhile
            Err(e) => Err(e),
        }
    }

    // ---- transport ----

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut last = String::new();
        for attempt in 0..2 {
            let c = self.conn();
            match crate::http::request(&c.url, method, path, &c.token, body, self.connect_timeout) {
                crate::http::Reply::Ok(v) => return Ok(v),
                crate::http::Reply::Status(status, v) => {
                    let kind = v["error"]["kind"].as_str().unwrap_or("http").to_string();
                    let message =
                        v["error"]["message"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_string);
                    if status == 503 && kind == "shutting_down" && attempt == 0 {
                        std::thread::sleep(Duration::from_millis(500));
                        self.reconnect()?;
                        continue;
                    }
                    if status == 401 && attempt == 0 && !self.attached && self.reconnect().is_ok() {
                        continue; // a restarted server has a new token
                    }
                    return Err(HearthError::Api { status, kind, message });
                }
                crate::http::Reply::Decode(e) => return Err(HearthError::Decode(e)),
                crate::http::Reply::Transport(e) => {
                    last = e;
                    if attempt == 0 {
                        self.reconnect()?;
                    }
                }
            }
        }
        Err(HearthError::Transport(last))
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = serde_json::to_value(body).map_err(|e| HearthError::Decode(e.to_string()))?;
        serde_json::from_value(self.send("POST", path, Some(&body))?).map_err(|e| HearthError::Decode(e.to_string()))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        serde_json::from_value(self.send("GET", path, None)?).map_err(|e| HearthError::Decode(e.to_string()))
    }

    /// Re-reads the session file; starts a server with `--resume` if the last one stopped. An
    /// attached handle keeps its URL and token and only waits a moment before the retry.
    fn reconnect(&self) -> Result<()> {
        if self.attached {
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        if let Some(c) = read_session_file(&self.home).as_ref().and_then(running) {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = c;
            return Ok(());
        }
        let model = read_session_file(&self.home).map(|s| s.model);
        self.start_server(model.as_deref().unwrap_or("tiny"), None)
    }

    /// The program that serves, and the arguments before its flags: `HEARTH_SERVER_BIN`, else
    /// `hearth-server` next to this executable, else the `hearth` REPL next to it (or this
    /// executable itself, when it is the REPL or its cell process) as `hearth serve`, else
    /// `hearth-server` on `PATH`.
    fn server_binary() -> Result<(PathBuf, Vec<&'static str>)> {
        let with_args = |p: PathBuf| {
            let serve = p.file_name().is_some_and(|n| n == "hearth");
            (p, if serve { vec!["serve"] } else { vec![] })
        };
        if let Some(p) = std::env::var_os("HEARTH_SERVER_BIN") {
            return Ok(with_args(PathBuf::from(p)));
        }
        let exe = std::env::current_exe().ok();
        let beside = |name: &str| exe.as_ref().and_then(|e| e.parent().map(|d| d.join(name))).filter(|p| p.is_file());
        if let Some(p) = beside("hearth-server").or_else(|| beside("hearth")) {
            return Ok(with_args(p));
        }
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("hearth-server")).find(|p| p.is_file()))
            .map(with_args)
            .ok_or_else(|| HearthError::NoServer("hearth-server is not on PATH (set HEARTH_SERVER_BIN)".into()))
    }

    fn start_server(&self, model: &str, resume: Option<bool>) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let (bin, lead) = Self::server_binary()?;
        let t0 = Instant::now();
        std::fs::create_dir_all(&self.home).map_err(|e| HearthError::NoServer(e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("server.log"))
            .map_err(|e| HearthError::NoServer(format!("server.log: {e}")))?;
        let before = read_session_file(&self.home).map(|s| s.pid);
        let resume = match resume {
            Some(true) => Some("--resume"),
            Some(false) => Some("--no-resume"),
            None => None,
        };
        std::process::Command::new(&bin)
            .args(lead)
            .args(["--model", model, "--home"])
            .arg(&self.home)
            .args(resume)
            // started from a cell process, it must not inherit evcxr's "be a cell runner" switch
            .env_remove("EVCXR_IS_RUNTIME")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0) // its own group: a Ctrl-C or kill of the cell's process leaves it running
            .spawn()
            .map_err(|e| HearthError::NoServer(format!("{}: {e}", bin.display())))?;
        loop {
            if let Some(c) = read_session_file(&self.home).filter(|s| Some(s.pid) != before).as_ref().and_then(running)
            {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = c;
                break;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                return Err(HearthError::NoServer(format!(
                    "{} did not start; see {}",
                    bin.display(),
                    self.home.join("server.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let info: ServerInfo = self.get("/v1/info")?;
        let restored: Vec<String> = info
            .resumed
            .iter()
            .map(|r| match r.lost_steps {
                Some([first, last]) => {
                    format!("run {} at step {} (steps {first} to {last} were never saved and are lost)", r.run, r.step)
                }
                None => format!("run {} at step {}", r.run, r.step),
            })
            .collect();
        let what = if restored.is_empty() {
            "no runs to restore".to_string()
        } else {
            format!("restored {}", restored.join(", "))
        };
        let _ = writeln!(
            std::io::stderr(),
            "hearth: started the session server ({model}); {what} ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn run_path(&self, op: &str) -> String {
        format!("/v1/runs/{}/{op}", self.run)
    }

    // ---- the primitives ----

    /// Logprobs and loss without gradients.
    pub fn forward(&self, data: &[Datum], loss_fn: LossFn) -> Result<ForwardBackwardOutput> {
        self.post(&self.run_path("forward"), &ForwardBackwardInput { data: data.to_vec(), loss_fn })
    }

    /// Cross-entropy `forward_backward` (gradients accumulate until `optim_step`).
    pub fn forward_backward(&self, data: &[Datum]) -> Result<ForwardBackwardOutput> {
        self.forward_backward_with(data, LossFn::CrossEntropy)
    }

    /// `forward_backward` with any loss (`importance_sampling`, `ppo`).
    pub fn forward_backward_with(&self, data: &[Datum], loss_fn: LossFn) -> Result<ForwardBackwardOutput> {
        self.post(&self.run_path("forward_backward"), &ForwardBackwardInput { data: data.to_vec(), loss_fn })
    }

    /// Applies the accumulated gradients.
    pub fn optim_step(&self, params: &AdamParams) -> Result<OptimStepOutput> {
        self.post(&self.run_path("optim_step"), params)
    }

    /// Generates from token ids.
    pub fn sample(&self, input: &SampleInput) -> Result<SampleOutput> {
        self.post(&self.run_path("sample"), input)
    }

    /// Generates `num_samples` continuations of `prompt` text; returns their texts.
    pub fn sample_text(&self, prompt: &str, num_samples: usize, params: SamplingParams) -> Result<Vec<String>> {
        let out = self.sample(&SampleInput {
            prompt: self.tokenize(prompt)?,
            num_samples,
            sampling_params: params,
            ..SampleInput::default()
        })?;
        out.sequences.iter().map(|s| self.detokenize(&s.tokens)).collect()
    }

    /// Saves a checkpoint of the run; returns where.
    pub fn save_state(&self, name: &str, kind: CheckpointKind) -> Result<SaveStateResponse> {
        self.post(&self.run_path("save_state"), &SaveStateRequest { name: name.into(), kind })
    }

    /// Loads a checkpoint: a name of this run, a hearth checkpoint path, or a PEFT adapter folder.
    pub fn load_state(&self, source: &str) -> Result<LoadStateResponse> {
        self.post(&self.run_path("load_state"), &LoadStateRequest { source: source.into(), optimizer: true })
    }

    // ---- futures ----

    fn submit<B: Serialize, T>(&self, op: &str, body: &B) -> Result<Pending<T>> {
        let status: RequestStatus = self.post(&format!("{}?wait=false", self.run_path(op)), body)?;
        Ok(Pending { session: self.clone(), id: status.request_id, _t: PhantomData })
    }

    /// `forward_backward` without waiting: queue it and the `optim_step` after it back to back.
    pub fn forward_backward_async(&self, data: &[Datum], loss_fn: LossFn) -> Result<Pending<ForwardBackwardOutput>> {
        self.submit("forward_backward", &ForwardBackwardInput { data: data.to_vec(), loss_fn })
    }

    /// `optim_step` without waiting.
    pub fn optim_step_async(&self, params: &AdamParams) -> Result<Pending<OptimStepOutput>> {
        self.submit("optim_step", params)
    }

    /// `sample` without waiting.
    pub fn sample_async(&self, input: &SampleInput) -> Result<Pending<SampleOutput>> {
        self.submit("sample", input)
    }

    // ---- the rest of the API ----

    /// Text → token ids.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .post::<_, Tokens>("/v1/tokenize", &TokenizeRequest { text: text.into(), add_special_tokens: false })?
            .tokens)
    }

    /// Token ids → text.
    pub fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        Ok(self
            .post::<_, Text>(
                "/v1/detokenize",
                &DetokenizeRequest { tokens: tokens.to_vec(), skip_special_tokens: false },
            )?
            .text)
    }

    /// A conversation through the model's chat template (text and tokens).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<RenderChatResponse> {
        self.post("/v1/render_chat", &RenderChatRequest { messages: messages.to_vec(), add_generation_prompt })
    }

    /// Server, model, runs, cost.
    pub fn info(&self) -> Result<ServerInfo> {
        self.get("/v1/info")
    }

    /// Every run on the server this session's token may see (a user's own; the admin's: all).
    pub fn runs(&self) -> Result<Vec<RunInfo>> {
        self.get("/v1/runs")
    }

    /// Device time, tokens, runs, checkpoints and cost: the caller's own, or every user's for
    /// the admin.
    pub fn usage(&self) -> Result<hearth_api::UsageReport> {
        self.get("/v1/usage")
    }

    /// This run's per-step metrics.
    pub fn metrics(&self) -> Result<Metrics> {
        self.get(&self.run_path("metrics"))
    }

    /// Cancels every queued operation on the server and a running `sample` (an interrupt);
    /// returns the request ids that will end `interrupted`.
    pub fn cancel_all(&self) -> Result<Vec<u64>> {
        let v = self.send("POST", "/v1/cancel", Some(&Value::Object(Default::default())))?;
        Ok(v["cancelled"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default())
    }

    /// Asks the server to save every changed run now (it keeps running).
    pub fn autosave(&self) -> Result<Vec<SaveStateResponse>> {
        let v = self.send("POST", "/v1/autosave", Some(&Value::Object(Default::default())))?;
        serde_json::from_value(v["saved"].clone()).map_err(|e| HearthError::Decode(e.to_string()))
    }

    /// Sets the server's idle timeout while it runs: after `seconds` with no request it saves
    /// every run and exits, and the next call starts it again with the runs restored (0 = never).
    /// Returns the value now in force. It lasts until the server exits; a restarted server uses
    /// its default again.
    pub fn set_idle_timeout(&self, seconds: u64) -> Result<u64> {
        let s: Settings = self.post("/v1/settings", &Settings { idle_timeout_s: Some(seconds) })?;
        Ok(s.idle_timeout_s.unwrap_or(seconds))
    }

    /// Why the server of this handle's home stopped (`idle timeout`, `shutdown request`,
    /// `SIGTERM`), or `None` while it runs. It only reads the session file: no request, so it
    /// does not count as activity.
    pub fn stop_reason(&self) -> Option<String> {
        let s = read_session_file(&self.home)?;
        match running(&s) {
            Some(_) => None,
            None => Some(s.stop_reason.unwrap_or_else(|| "its process is gone".into())),
        }
    }

    /// This home's session on model `spec` (a preset, a `.gguf` file, a model folder, a hub
    /// repo, `owner/name:file.gguf`), on the same run name. When the running server holds
    /// another model, it is asked to save every run and exit, and a server on `spec` starts in
    /// its place (runs of the other model stay saved, and come back when a server on it starts
    /// again). Later cells, and the prelude after a restart, attach to the new server.
    pub fn use_model(&self, spec: &str) -> Result<Session> {
        let spec_path = std::path::Path::new(spec);
        // the server records the spec as given; compare absolute paths for files and folders
        let spec = if spec_path.exists() {
            spec_path.canonicalize().map(|p| p.display().to_string()).unwrap_or_else(|_| spec.to_string())
        } else {
            spec.to_string()
        };
        if let Some(f) = read_session_file(&self.home).filter(|f| running(f).is_some()) {
            if f.model == spec {
                return Session::connect_home(&self.home, &self.run);
            }
            self.shutdown()?;
            let t0 = std::time::Instant::now();
            while read_session_file(&self.home).as_ref().and_then(running).is_some() {
                if t0.elapsed() > Duration::from_secs(120) {
                    return Err(HearthError::NoServer(format!("the server on {} did not stop within 120 s", f.model)));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Session::connect_or_start(&self.home, &self.run, Some(&spec), None)
    }

    /// Asks the server to save every run and exit.
    pub fn shutdown(&self) -> Result<()> {
        self.send("POST", "/v1/shutdown", Some(&Value::Object(Default::default()))).map(|_| ())
    }
}

/// A submitted operation: [`Pending::wait`] for its result, or [`Pending::cancel`] it.
pub struct Pending<T> {
    session: Session,
    id: u64,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("request_id", &self.id).finish()
    }
}

impl<T: DeserializeOwned> Pending<T> {
    /// The server's request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Blocks until the operation ends.
    pub fn wait(self) -> Result<T> {
        loop {
            let status: RequestStatus = self.session.get(&format!("/v1/requests/{}?timeout_s=30", self.id))?;
            match status.state {
                RequestState::Done { result } => {
                    return serde_json::from_value(result).map_err(|e| HearthError::Decode(e.to_string()))
                }
                RequestState::Failed { status, error } => {
                    return Err(HearthError::Api { status, kind: error.kind, message: error.message })
                }
                RequestState::Queued | RequestState::Running => {}
            }
        }
    }

    /// Cancels it if it is queued or a running sample; true when it will end `interrupted`.
    pub fn cancel(&self) -> Result<bool> {
        let r: CancelResponse =
            self.session.post(&format!("/v1/requests/{}/cancel", self.id), &Value::Object(Default::default()))?;
        Ok(r.cancelled)
    }
}
