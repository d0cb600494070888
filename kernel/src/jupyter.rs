//! The Jupyter side: sockets (jupyter-zmq-client; every incoming message's HMAC is verified by
//! `read`, and a bad one is logged and dropped), typed messages (jupyter-protocol), handlers.
//! Shell requests are handled one at a time; control (interrupt, shutdown, kernel_info) has its
//! own task so an interrupt arrives while a cell runs; iopub has one owner task (XPUB, answering
//! each subscription with `iopub_welcome`). Cells run in hearth-cells' [`Runner`] (the same as
//! the REPL's); `Iopub` is its output, publishing the lines under the running execute request.

use hearth::display::front_end_only;
use hearth_cells::evaluator::{route_stderr, write_fd, CellError, StderrLine};
use hearth_cells::magics;
use hearth_cells::marker::Display;
use hearth_cells::runner::{Output, Runner};
use hearth_cells::scanner::{input_status, Completeness};
use jupyter_protocol::messaging::*;
use jupyter_protocol::{ConnectionInfo, ExecutionCount, JupyterMessage, JupyterMessageContent, Media};
use jupyter_zmq_client::connection::SubscriptionEvent;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn log(msg: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "hearth-kernel: {msg}");
}

/// State shared by the handlers.
struct Kernel {
    iopub: Arc<Iopub>,
    runner: Arc<Runner>,
    count: Mutex<ExecutionCount>,
    /// (input, text/plain output) per executed cell, line i+1 of session 1.
    history: Mutex<Vec<(String, String)>>,
    /// Execute requests sent before this instant are aborted (stop_on_error).
    abort_before: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
}

/// The iopub side: the runner's [`Output`], publishing the running cell's lines and displays
/// under its execute request.
struct Iopub {
    tx: UnboundedSender<JupyterMessage>,
    /// The execute request whose output is streaming now; lines outside a cell are dropped.
    current: Mutex<Option<JupyterMessage>>,
    /// The display id of this cell's "compiling x…" status and the crates counted, while shown.
    compile_status: Mutex<Option<(String, usize)>>,
}

impl Iopub {
    fn publish(&self, content: impl Into<JupyterMessageContent>, parent: &JupyterMessage) {
        let _ = self.tx.send(JupyterMessage::new(content, Some(parent)));
    }

    fn status(&self, state: ExecutionState, parent: &JupyterMessage) {
        self.publish(Status { execution_state: state }, parent);
    }

    fn parent(&self) -> Option<JupyterMessage> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// cargo compiles `krate` for the running cell: one quiet display, updated in place and
    /// emptied when the cell ends ([`Iopub::end_compile_status`]).
    fn compiling(&self, krate: &str) {
        let Some(parent) = self.parent() else { return };
        let mut status = self.compile_status.lock().unwrap_or_else(|p| p.into_inner());
        let n = status.as_ref().map_or(0, |s| s.1) + 1;
        let text = format!("compiling {krate} ({n})…");
        let data: Media = serde_json::from_value(serde_json::json!({
            "text/plain": text,
            "text/html": format!("<span style=\"opacity:0.6\">{text}</span>"),
        }))
        .unwrap_or_default();
        match status.as_mut() {
            Some((id, count)) => {
                *count = n;
                self.publish(UpdateDisplayData::new(data, id), &parent);
            }
            None => {
                let id = format!("hearth-compile-{}", parent.header.msg_id);
                let mut d = DisplayData::new(data);
                d.transient = Some(Transient { display_id: Some(id.clone()) });
                self.publish(d, &parent);
                *status = Some((id, n));
            }
        }
    }

    /// Empties this cell's compile status, if one was shown.
    fn end_compile_status(&self, parent: &JupyterMessage) {
        if let Some((id, _)) = self.compile_status.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let data: Media =
                serde_json::from_value(serde_json::json!({ "text/plain": "", "text/html": "" })).unwrap_or_default();
            self.publish(UpdateDisplayData::new(data, &id), parent);
        }
    }
}

impl Output for Iopub {
    fn stdout(&self, line: &str) {
        if let Some(parent) = self.parent() {
            self.publish(StreamContent::stdout(&format!("{line}\n")), &parent);
        }
    }

    fn stderr(&self, line: &str) {
        if let Some(parent) = self.parent() {
            self.publish(StreamContent::stderr(&format!("{line}\n")), &parent);
        }
    }

    fn display(&self, d: &Display) {
        let Some(parent) = self.parent() else { return };
        let data = media(d.data.iter());
        match (d.update, d.display_id.as_deref()) {
            (true, Some(id)) => self.publish(UpdateDisplayData::new(data, id), &parent),
            (true, None) => {}
            (false, id) => {
                let mut shown = DisplayData::new(data);
                shown.transient = id.map(|id| Transient { display_id: Some(id.to_string()) });
                self.publish(shown, &parent);
            }
        }
    }

    fn clear(&self, wait: bool) {
        if let Some(parent) = self.parent() {
            self.publish(ClearOutput { wait }, &parent);
        }
    }

    fn evaluated(&self) {
        if let Some(parent) = self.parent() {
            self.end_compile_status(&parent);
        }
    }

    fn connected(&self, session: &Result<hearth::Session, String>) {
        if let Err(e) = session {
            log(format!("session server: {e}"));
        }
    }
}

fn bundle_media(b: &hearth::Bundle) -> Media {
    media(b.data.iter())
}

/// A MIME bundle for Jupyter, without the types only hearth's own front-ends read.
fn media<'a>(data: impl Iterator<Item = (&'a String, &'a String)>) -> Media {
    let kept: serde_json::Map<String, serde_json::Value> = data
        .filter(|(mime, _)| !front_end_only(mime))
        .map(|(m, c)| (m.clone(), serde_json::Value::String(c.clone())))
        .collect();
    serde_json::from_value(serde_json::Value::Object(kept)).unwrap_or_default()
}

fn kernel_info() -> KernelInfoReply {
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1).unwrap_or("").to_string())
        .unwrap_or_default();
    KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: "5.3".into(),
        implementation: "hearth".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        language_info: LanguageInfo {
            name: "rust".into(),
            version: rustc,
            mimetype: Some("text/rust".into()),
            file_extension: Some(".rs".into()),
            pygments_lexer: Some("rust".into()),
            codemirror_mode: Some(CodeMirrorMode::Simple("rust".into())),
            nbconvert_exporter: Some("rust".into()),
        },
        banner: "hearth: Rust cells with a warm `session` (evcxr). :help lists the magics.".into(),
        help_links: vec![HelpLink { text: "hearth magics".into(), url: "https://github.com/hearth-dev/hearth".into() }],
        debugger: false,
        error: None,
    }
}

/// Reads one message, verifying its HMAC like `Connection::read`, but filling the fields that
/// clients may leave out of a `history_request` (jupyter_client sends a search without `n` or
/// `unique`), which the typed parser would otherwise reject and the request would go unanswered.
async fn read_lenient<S: zeromq::SocketRecv>(conn: &mut jupyter_zmq_client::Connection<S>) -> Res<JupyterMessage> {
    let raw = jupyter_zmq_client::RawMessage::from_multipart(conn.socket.recv().await?, &conn.mac)?;
    if raw.jparts.len() < 4 {
        return Err(format!("a message with {} parts", raw.jparts.len()).into());
    }
    let header: Header = serde_json::from_slice(&raw.jparts[0])?;
    let mut content: serde_json::Value = serde_json::from_slice(&raw.jparts[3])?;
    if header.msg_type == "history_request" {
        if let Some(obj) = content.as_object_mut() {
            let defaults = [
                ("output", serde_json::json!(false)),
                ("raw", serde_json::json!(true)),
                ("unique", serde_json::json!(false)),
                ("n", serde_json::json!(0)),
                ("start", serde_json::json!(0)),
                ("stop", serde_json::json!(0)),
                ("pattern", serde_json::json!("*")),
            ];
            for (k, v) in defaults {
                obj.entry(k).or_insert(v);
            }
        }
    }
    let content = JupyterMessageContent::from_type_and_content(&header.msg_type, content)?;
    Ok(JupyterMessage {
        zmq_identities: raw.zmq_identities,
        header,
        parent_header: serde_json::from_slice(&raw.jparts[1]).ok(),
        metadata: serde_json::from_slice(&raw.jparts[2]).unwrap_or_default(),
        content,
        buffers: raw.jparts.get(4..).map(<[_]>::to_vec).unwrap_or_default(),
        channel: None,
    })
}

/// Runs the kernel on a connection file until shutdown.
pub async fn run(connection_file: &Path) -> Res<()> {
    let info: ConnectionInfo = serde_json::from_str(&std::fs::read_to_string(connection_file)?)?;
    let session_id = format!("hearth-{}", std::process::id());
    let mut iopub = jupyter_zmq_client::create_kernel_iopub_xpub_connection(&info, &session_id).await?;
    let shell = jupyter_zmq_client::create_kernel_shell_connection(&info, &session_id).await?;
    let control = jupyter_zmq_client::create_kernel_control_connection(&info, &session_id).await?;
    let _stdin = jupyter_zmq_client::create_kernel_stdin_connection(&info, &session_id).await?;
    let mut heartbeat = jupyter_zmq_client::create_kernel_heartbeat_connection(&info).await?;

    let (iopub_tx, mut iopub_rx) = unbounded_channel::<JupyterMessage>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = iopub_rx.recv() => match msg {
                    Some(m) => { if let Err(e) = iopub.send(m).await { log(format!("iopub: {e}")); } }
                    None => break,
                },
                sub = iopub.recv_subscription() => {
                    if let Ok(SubscriptionEvent::Subscribe(topic)) = sub {
                        let _ = iopub.send(JupyterMessage::new(IoPubWelcome { subscription: topic }, None)).await;
                    }
                }
            }
        }
    });
    tokio::spawn(async move { while heartbeat.single_heartbeat().await.is_ok() {} });

    let io = Arc::new(Iopub { tx: iopub_tx, current: Mutex::new(None), compile_status: Mutex::new(None) });
    // evcxr writes cargo's `Compiling x` lines to this process's stderr (Jupyter's log): they
    // become one status display in the running cell instead; the rest goes on to the log
    let status = io.clone();
    route_stderr(move |line, saved| match line {
        StderrLine::Compiling(krate) => status.compiling(krate),
        StderrLine::Other(line) => write_fd(saved, format!("{line}\n").as_bytes()),
    });
    // In the background, so kernel_info answers at once: evcxr's context is created while the
    // runner attaches to (or starts) the session server; the prelude waits for the connection
    // (its own `Session::connect` then finds that server instead of starting a second one)
    let runner = Runner::start(io.clone(), || hearth::Session::connect().map_err(|e| e.to_string()));
    let kernel = Arc::new(Kernel {
        iopub: io,
        runner,
        count: Mutex::new(ExecutionCount::new(0)),
        history: Mutex::new(Vec::new()),
        abort_before: Mutex::new(None),
    });

    let (mut shell_tx, mut shell_rx) = shell.split();
    let (mut control_tx, mut control_rx) = control.split();
    let (shell_reply_tx, mut shell_reply_rx) = unbounded_channel::<JupyterMessage>();
    tokio::spawn(async move {
        while let Some(m) = shell_reply_rx.recv().await {
            if let Err(e) = shell_tx.send(m).await {
                log(format!("shell: {e}"));
            }
        }
    });

    // control: its own task
    let kc = kernel.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let msg = match control_rx.read().await {
                Ok(m) => m,
                Err(e) => {
                    log(format!("control: rejected a message ({e})"));
                    continue;
                }
            };
            let reply: Option<JupyterMessageContent> = match &msg.content {
                JupyterMessageContent::KernelInfoRequest(_) => {
                    Some(JupyterMessageContent::KernelInfoReply(Box::new(kernel_info())))
                }
                JupyterMessageContent::InterruptRequest(_) => {
                    kc.runner.interrupt();
                    Some(InterruptReply::new().into())
                }
                JupyterMessageContent::ShutdownRequest(r) => {
                    let restart = r.restart;
                    if let Some(s) = kc.runner.session_now().cloned() {
                        // the server keeps running (a restart must find it warm); it saves now
                        let _ = tokio::task::spawn_blocking(move || s.autosave()).await;
                    }
                    let _ = control_tx
                        .send(JupyterMessage::new(
                            ShutdownReply { restart, status: ReplyStatus::Ok, error: None },
                            Some(&msg),
                        ))
                        .await;
                    let _ = stop_tx.send(true);
                    None
                }
                _ => None,
            };
            if let Some(r) = reply {
                let _ = control_tx.send(JupyterMessage::new(r, Some(&msg))).await;
            }
        }
    });

    loop {
        let msg = tokio::select! {
            m = read_lenient(&mut shell_rx) => m,
            _ = stop_rx.wait_for(|s| *s) => break,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                log(format!("shell: rejected a message ({e})"));
                continue;
            }
        };
        if let JupyterMessageContent::ShutdownRequest(r) = &msg.content {
            let _ = shell_reply_tx.send(JupyterMessage::new(
                ShutdownReply { restart: r.restart, status: ReplyStatus::Ok, error: None },
                Some(&msg),
            ));
            break;
        }
        kernel.iopub.status(ExecutionState::Busy, &msg);
        let reply = handle_shell(&kernel, &msg).await;
        if let Some(r) = reply {
            let _ = shell_reply_tx.send(JupyterMessage::new(r, Some(&msg)));
        }
        kernel.iopub.status(ExecutionState::Idle, &msg);
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let the last replies leave
                                                          // evcxr's build directory goes with its context
    let runner = kernel.runner.clone();
    let _ = tokio::task::spawn_blocking(move || runner.shutdown(Duration::from_secs(5))).await;
    Ok(())
}

fn internal(evalue: String) -> CellError {
    CellError { ename: "InternalError".into(), evalue, traceback: vec![] }
}

fn error_content(e: &CellError) -> ErrorOutput {
    let mut traceback = vec![format!("{}: {}", e.ename, e.evalue)];
    traceback.extend(e.traceback.iter().cloned());
    ErrorOutput { ename: e.ename.clone(), evalue: e.evalue.clone(), traceback }
}

async fn handle_shell(k: &Arc<Kernel>, msg: &JupyterMessage) -> Option<JupyterMessageContent> {
    match &msg.content {
        JupyterMessageContent::KernelInfoRequest(_) => {
            Some(JupyterMessageContent::KernelInfoReply(Box::new(kernel_info())))
        }
        JupyterMessageContent::ExecuteRequest(req) => Some(execute(k, msg, req).await.into()),
        JupyterMessageContent::IsCompleteRequest(req) => Some(
            match input_status(&req.code) {
                Completeness::Complete => IsCompleteReply::complete(),
                Completeness::Incomplete(indent) => IsCompleteReply::incomplete(indent),
                Completeness::Invalid => IsCompleteReply::invalid(),
            }
            .into(),
        ),
        JupyterMessageContent::CompleteRequest(req) => {
            let pos = char_to_byte(&req.code, req.cursor_pos);
            let (matches, start, end) = if req.code.trim_start().starts_with(':') {
                let word = req.code[..pos].trim_start().trim_start_matches(':');
                let m: Vec<String> = magics::MAGICS
                    .iter()
                    .filter(|m| m.name.starts_with(word))
                    .map(|m| format!(":{}", m.name))
                    .collect();
                (m, req.code.len() - req.code.trim_start().len(), pos)
            } else {
                let (runner, code) = (k.runner.clone(), req.code.clone());
                tokio::task::spawn_blocking(move || runner.evaluator().complete(&code, pos)).await.unwrap_or((
                    Vec::new(),
                    pos,
                    pos,
                ))
            };
            Some(
                CompleteReply {
                    matches,
                    cursor_start: byte_to_char(&req.code, start),
                    cursor_end: byte_to_char(&req.code, end),
                    metadata: Default::default(),
                    status: ReplyStatus::Ok,
                    error: None,
                }
                .into(),
            )
        }
        JupyterMessageContent::InspectRequest(req) => {
            let pos = char_to_byte(&req.code, req.cursor_pos);
            let word = word_at(&req.code, pos);
            let runner = k.runner.clone();
            let vars = tokio::task::spawn_blocking(move || runner.evaluator().variables()).await.unwrap_or_default();
            let found = vars.iter().find(|(n, _)| *n == word);
            let data = match found {
                Some((n, t)) => Media::new(vec![MediaType::Plain(format!("{n}: {t}"))]),
                None => Media::default(),
            };
            Some(
                InspectReply {
                    found: found.is_some(),
                    data,
                    metadata: Default::default(),
                    status: ReplyStatus::Ok,
                    error: None,
                }
                .into(),
            )
        }
        JupyterMessageContent::HistoryRequest(req) => {
            let h = k.history.lock().unwrap_or_else(|p| p.into_inner());
            Some(HistoryReply::new(history(&h, req)).into())
        }
        JupyterMessageContent::CommInfoRequest(_) => Some(CommInfoReply::default().into()),
        _ => None,
    }
}

async fn execute(k: &Arc<Kernel>, msg: &JupyterMessage, req: &ExecuteRequest) -> ExecuteReply {
    let aborted = k.abort_before.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| msg.header.date < t);
    let count = {
        let mut c = k.count.lock().unwrap_or_else(|p| p.into_inner());
        if !req.silent && !aborted {
            c.increment();
        }
        *c
    };
    if aborted {
        return ExecuteReply {
            status: ReplyStatus::Aborted,
            execution_count: count,
            user_expressions: Some(Default::default()),
            ..Default::default()
        };
    }
    if !req.silent {
        k.iopub.publish(ExecuteInput { code: req.code.clone(), execution_count: count }, msg);
        if req.store_history {
            k.history.lock().unwrap_or_else(|p| p.into_inner()).push((req.code.clone(), String::new()));
        }
    }
    let fail = |e: CellError| {
        if req.stop_on_error {
            *k.abort_before.lock().unwrap_or_else(|p| p.into_inner()) = Some(chrono::Utc::now());
        }
        let content = error_content(&e);
        k.iopub.publish(content.clone(), msg);
        ExecuteReply {
            status: ReplyStatus::Error,
            execution_count: count,
            error: Some(Box::new(ReplyError {
                ename: content.ename,
                evalue: content.evalue,
                traceback: content.traceback,
            })),
            user_expressions: Some(Default::default()),
            ..Default::default()
        }
    };
    // evcxr's `:quit` would exit this process, taking the kernel with it
    if req.code.trim_start().starts_with(":quit") {
        return fail(CellError {
            ename: "Unsupported".into(),
            evalue: ":quit would end the kernel; use Kernel → Shut Down (the server saves every run)".into(),
            traceback: vec![],
        });
    }
    // a magic is a line of its own: evcxr would call `:sample` an unknown command
    let first = req.code.trim_start().lines().next().unwrap_or_default();
    if req.code.trim().contains('\n') && magics::find(first).is_some() {
        return fail(CellError {
            ename: "Magic".into(),
            evalue: format!(
                "`{}` is a magic: give it a cell of its own (the Rust lines after it go in the next cell)",
                first.trim()
            ),
            traceback: vec![],
        });
    }
    // a magic: answered here, no compile
    if magics::find(&req.code).is_some() {
        let (runner, code) = (k.runner.clone(), req.code.clone());
        let out = tokio::task::spawn_blocking(move || runner.magic(&code))
            .await
            .map_err(|e| internal(e.to_string()))
            .and_then(|out| out.unwrap_or_else(|| Err(internal("not a magic".into()))));
        return match out {
            Ok(bundle) => {
                k.iopub.publish(DisplayData::new(bundle_media(&bundle)), msg);
                ExecuteReply {
                    status: ReplyStatus::Ok,
                    execution_count: count,
                    user_expressions: Some(Default::default()),
                    ..Default::default()
                }
            }
            Err(e) => fail(e),
        };
    }
    *k.iopub.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
    let (runner, code) = (k.runner.clone(), req.code.clone());
    let result =
        tokio::task::spawn_blocking(move || runner.run(&code)).await.unwrap_or_else(|e| Err(internal(e.to_string())));
    // a cell that never ran (no server, the prelude failed) may still show the prelude's status
    k.iopub.end_compile_status(msg);
    *k.iopub.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    match result {
        Ok(out) => {
            if let (Some(text), true) = (out.data.get("text/plain"), req.store_history && !req.silent) {
                if let Some(last) = k.history.lock().unwrap_or_else(|p| p.into_inner()).last_mut() {
                    last.1 = text.clone();
                }
            }
            if out.has_value() && !req.silent {
                let media = media(out.data.iter());
                let mut result = ExecuteResult::new(count, media);
                result.transient = Some(Transient { display_id: None });
                k.iopub.publish(result, msg);
            }
            ExecuteReply {
                status: ReplyStatus::Ok,
                execution_count: count,
                user_expressions: Some(Default::default()),
                ..Default::default()
            }
        }
        Err(e) => fail(e),
    }
}

/// Answers a history request (tail, range, search with `*`/`?` globs) from this kernel's cells.
fn history(h: &[(String, String)], req: &HistoryRequest) -> Vec<HistoryEntry> {
    let entry = |i: usize, output: bool| {
        let (input, out) = &h[i];
        if output {
            HistoryEntry::InputOutput(1, i + 1, (input.clone(), out.clone()))
        } else {
            HistoryEntry::Input(1, i + 1, input.clone())
        }
    };
    match req {
        HistoryRequest::Tail { n, output, .. } => {
            let n = (*n).max(0) as usize;
            (h.len().saturating_sub(n)..h.len()).map(|i| entry(i, *output)).collect()
        }
        HistoryRequest::Range { start, stop, output, .. } => {
            let (a, b) = ((*start).max(1) as usize, (*stop).max(0) as usize);
            (a..b.min(h.len() + 1)).map(|line| entry(line - 1, *output)).collect()
        }
        HistoryRequest::Search { pattern, unique, output, n, .. } => {
            let mut seen = std::collections::HashSet::new();
            let mut hits: Vec<usize> = (0..h.len()).filter(|&i| glob(pattern, &h[i].0)).collect();
            if *unique {
                hits.reverse();
                hits.retain(|&i| seen.insert(h[i].0.clone()));
                hits.reverse();
            }
            let n = if *n > 0 { *n as usize } else { hits.len() };
            let skip = hits.len().saturating_sub(n);
            hits.into_iter().skip(skip).map(|i| entry(i, *output)).collect()
        }
    }
}

/// `*` and `?` wildcards, anchored at both ends (IPython's history search).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn char_to_byte(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b)
}

fn byte_to_char(s: &str, bytes: usize) -> usize {
    s[..bytes.min(s.len())].chars().count()
}

fn word_at(code: &str, pos: usize) -> String {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let start = code[..pos].rfind(|c: char| !is_word(c)).map_or(0, |i| i + 1);
    let end = code[pos..].find(|c: char| !is_word(c)).map_or(code.len(), |i| pos + i);
    code[start..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn history_globs() {
        assert!(glob("6 *", "6 * 7"));
        assert!(glob("*len*", "\"warm\".len()"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("6 *", "x 6 * 7"));
        assert!(!glob("abc", "abcd"));
    }
}
