//! The Jupyter side: sockets (jupyter-zmq-client; every incoming message's HMAC is verified by
//! `read`, and a bad one is logged and dropped), typed messages (jupyter-protocol), handlers.
//! Shell requests are handled one at a time; control (interrupt, shutdown, kernel_info) has its
//! own task so an interrupt arrives while a cell runs; iopub has one owner task (XPUB, answering
//! each subscription with `iopub_welcome`).

use crate::evaluator::{CellError, Evaluator, LineSink};
use crate::magics;
use crate::scanner::{input_status, Completeness};
use hearth::display::{front_end_only, MARKER};
use jupyter_protocol::messaging::*;
use jupyter_protocol::{ConnectionInfo, ExecutionCount, JupyterMessage, JupyterMessageContent, Media};
use jupyter_zmq_client::connection::SubscriptionEvent;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn log(msg: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "hearth-kernel: {msg}");
}

/// State shared by the handlers.
struct Kernel {
    iopub: UnboundedSender<JupyterMessage>,
    evaluator: OnceLock<Evaluator>,
    session: OnceLock<hearth::Session>,
    /// The execute request whose output is streaming now.
    current: Mutex<Option<JupyterMessage>>,
    executing: AtomicBool,
    /// Set by an interrupt or a panic marker: the running cell ends with this error.
    cell_error: Mutex<Option<CellError>>,
    count: Mutex<ExecutionCount>,
    /// (input, text/plain output) per executed cell, line i+1 of session 1.
    history: Mutex<Vec<(String, String)>>,
    /// Execute requests sent before this instant are aborted (stop_on_error).
    abort_before: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Child output lines being published right now, so a cell's streams all precede its `idle`.
    publishing: AtomicUsize,
    /// The display id of this cell's "compiling x…" status and the crates counted, while shown.
    compile_status: Mutex<Option<(String, usize)>>,
}

impl Kernel {
    fn publish(&self, content: impl Into<JupyterMessageContent>, parent: &JupyterMessage) {
        let _ = self.iopub.send(JupyterMessage::new(content, Some(parent)));
    }

    fn status(&self, state: ExecutionState, parent: &JupyterMessage) {
        self.publish(Status { execution_state: state }, parent);
    }

    /// cargo compiles `krate` for the running cell: one quiet display, updated in place and
    /// emptied when the cell ends ([`Kernel::end_compile_status`]).
    fn compiling(&self, krate: &str) {
        let Some(parent) = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
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

    /// One line of the child's stdout or stderr, counted while it is being published. Display
    /// markers come on stdout (in order with the cell's prints), error markers on stderr.
    fn child_line(&self, line: &str, stderr: bool) {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        if stderr || line.starts_with(MARKER) {
            self.child_stderr(line);
        } else {
            self.child_stdout(line);
        }
        self.publishing.fetch_sub(1, Ordering::SeqCst);
    }

    /// A marker line of the child (display or error), or a plain stderr line.
    fn child_stderr(&self, line: &str) {
        let Some(parent) = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        if let Some(json) = line.strip_prefix(MARKER) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                if let Some(e) = v.get("error") {
                    let err = CellError {
                        ename: e["ename"].as_str().unwrap_or("Error").into(),
                        evalue: e["evalue"].as_str().unwrap_or_default().into(),
                        traceback: vec![],
                    };
                    // an interrupt's own error wins over the `?` error it caused
                    let mut flagged = self.cell_error.lock().unwrap_or_else(|p| p.into_inner());
                    if flagged.as_ref().is_none_or(|f| f.ename != "Interrupted") {
                        *flagged = Some(err);
                    }
                    return;
                }
                if v["clear"] == true {
                    self.publish(ClearOutput { wait: v["wait"] == true }, &parent);
                    return;
                }
                let mut data = v["data"].clone();
                if let Some(map) = data.as_object_mut() {
                    map.retain(|mime, _| !front_end_only(mime));
                }
                let data: Media = serde_json::from_value(data).unwrap_or_default();
                let id = v["display_id"].as_str();
                if v["update"] == true {
                    if let Some(id) = id {
                        self.publish(UpdateDisplayData::new(data, id), &parent);
                    }
                } else {
                    let mut d = DisplayData::new(data);
                    d.transient = id.map(|id| Transient { display_id: Some(id.to_string()) });
                    self.publish(d, &parent);
                }
                return;
            }
        }
        self.publish(StreamContent::stderr(&format!("{line}\n")), &parent);
    }

    fn child_stdout(&self, line: &str) {
        if let Some(parent) = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            self.publish(StreamContent::stdout(&format!("{line}\n")), &parent);
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

    let kernel = Arc::new(Kernel {
        iopub: iopub_tx,
        evaluator: OnceLock::new(),
        session: OnceLock::new(),
        current: Mutex::new(None),
        executing: AtomicBool::new(false),
        cell_error: Mutex::new(None),
        count: Mutex::new(ExecutionCount::new(0)),
        history: Mutex::new(Vec::new()),
        abort_before: Mutex::new(None),
        publishing: AtomicUsize::new(0),
        compile_status: Mutex::new(None),
    });
    // evcxr writes cargo's `Compiling x` lines to this process's stderr (Jupyter's log): they
    // become one status display in the running cell instead; the rest goes on to the log
    let k = kernel.clone();
    crate::evaluator::route_stderr(move |line, saved| match line {
        crate::evaluator::StderrLine::Compiling(krate) => k.compiling(krate),
        crate::evaluator::StderrLine::Other(line) => crate::evaluator::write_fd(saved, format!("{line}\n").as_bytes()),
    });

    // In the background, so kernel_info answers at once: evcxr's context is created while this
    // thread attaches to (or starts) the session server; the prelude waits for the connection
    // (its own `Session::connect` then finds that server instead of starting a second one)
    let k = kernel.clone();
    std::thread::spawn(move || {
        let (k1, k2) = (k.clone(), k.clone());
        let out: LineSink = Arc::new(move |l: &str| k1.child_line(l, false));
        let err: LineSink = Arc::new(move |l: &str| k2.child_line(l, true));
        let (gate, wait) = std::sync::mpsc::channel::<()>();
        let ev = Evaluator::start_after(out, err, move || {
            let _ = wait.recv();
            Ok(())
        });
        let _ = k.evaluator.set(ev);
        match hearth::Session::connect() {
            Ok(s) => {
                let _ = k.session.set(s);
            }
            Err(e) => log(format!("session server: {e}")),
        }
        let _ = gate.send(());
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
                    interrupt(&kc);
                    Some(InterruptReply::new().into())
                }
                JupyterMessageContent::ShutdownRequest(r) => {
                    let restart = r.restart;
                    if let Some(s) = kc.session.get().cloned() {
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
        kernel.status(ExecutionState::Busy, &msg);
        let reply = handle_shell(&kernel, &msg).await;
        if let Some(r) = reply {
            let _ = shell_reply_tx.send(JupyterMessage::new(r, Some(&msg)));
        }
        kernel.status(ExecutionState::Idle, &msg);
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let the last replies leave
                                                          // evcxr's build directory goes with its context
    if let Some(ev) = kernel.evaluator.get().cloned() {
        let _ = tokio::task::spawn_blocking(move || ev.shutdown(Duration::from_secs(5))).await;
    }
    Ok(())
}

/// Interrupt, step 1: ask the server to cancel what runs (the cell's call returns
/// `interrupted`); step 2, if the cell still runs after a grace period: kill the child.
fn interrupt(k: &Arc<Kernel>) {
    if !k.executing.load(Ordering::SeqCst) {
        return;
    }
    let current = k.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.header.msg_id.clone());
    *k.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(CellError {
        ename: "Interrupted".into(),
        evalue:
            "the cell was interrupted; the server's operation was cancelled and changed nothing (variables are kept)"
                .into(),
        traceback: vec![],
    });
    let k = k.clone();
    std::thread::spawn(move || {
        if let Some(s) = k.session.get() {
            let _ = s.cancel_all();
        }
        let grace = std::env::var("HEARTH_INTERRUPT_GRACE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        std::thread::sleep(Duration::from_millis(grace));
        let still = k.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.header.msg_id.clone());
        if k.executing.load(Ordering::SeqCst) && still == current {
            if let Some(ev) = k.evaluator.get() {
                ev.kill_child();
            }
        }
    });
}

async fn evaluator(k: &Arc<Kernel>) -> Evaluator {
    loop {
        if let Some(e) = k.evaluator.get() {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
                let ev = evaluator(k).await;
                let code = req.code.clone();
                tokio::task::spawn_blocking(move || ev.complete(&code, pos)).await.unwrap_or((Vec::new(), pos, pos))
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
            let ev = evaluator(k).await;
            let vars = tokio::task::spawn_blocking(move || ev.variables()).await.unwrap_or_default();
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
        k.publish(ExecuteInput { code: req.code.clone(), execution_count: count }, msg);
        if req.store_history {
            k.history.lock().unwrap_or_else(|p| p.into_inner()).push((req.code.clone(), String::new()));
        }
    }
    let fail = |e: CellError| {
        if req.stop_on_error {
            *k.abort_before.lock().unwrap_or_else(|p| p.into_inner()) = Some(chrono::Utc::now());
        }
        let content = error_content(&e);
        k.publish(content.clone(), msg);
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
    if let Some((m, _)) = magics::find(&req.code) {
        let session = k.session.get().cloned();
        let code = req.code.clone();
        let name = m.name;
        let out = tokio::task::spawn_blocking(move || match session {
            Some(s) => magics::run(&code, &s).unwrap_or_else(|| Err("not a magic".into())),
            None => Err("no session server".into()),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        return match out {
            Ok(bundle) => {
                k.publish(DisplayData::new(bundle_media(&bundle)), msg);
                ExecuteReply {
                    status: ReplyStatus::Ok,
                    execution_count: count,
                    user_expressions: Some(Default::default()),
                    ..Default::default()
                }
            }
            Err(e) => fail(CellError { ename: format!("Magic:{name}"), evalue: e, traceback: vec![] }),
        };
    }
    let ev = evaluator(k).await;
    *k.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
    *k.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    k.executing.store(true, Ordering::SeqCst);
    let code = req.code.clone();
    let result = tokio::task::spawn_blocking(move || {
        ev.wait_ready().map_err(|e| CellError { ename: "PreludeError".into(), evalue: e, traceback: vec![] })?;
        ev.eval(&code)
    })
    .await
    .unwrap_or_else(|e| Err(CellError { ename: "InternalError".into(), evalue: e.to_string(), traceback: vec![] }));
    k.executing.store(false, Ordering::SeqCst);
    k.end_compile_status(msg);
    // let the child's last lines reach iopub before this cell's idle
    tokio::time::sleep(Duration::from_millis(15)).await;
    for _ in 0..100 {
        if k.publishing.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *k.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let flagged = k.cell_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    let result = match (result, flagged) {
        (Ok(_), Some(e)) => Err(e),
        (Err(e), Some(f)) if f.ename == "Interrupted" && e.ename == "ChildRestarted" => {
            Err(CellError { ename: "Interrupted".into(), evalue: e.evalue, traceback: vec![] })
        }
        (r, _) => r,
    };
    match result {
        Ok(out) => {
            if let (Some(text), true) = (out.data.get("text/plain"), req.store_history && !req.silent) {
                if let Some(last) = k.history.lock().unwrap_or_else(|p| p.into_inner()).last_mut() {
                    last.1 = text.clone();
                }
            }
            // a cell ending in a loop or a block has the value `()`: nothing to show
            let unit = out.data.len() == 1 && out.data.get("text/plain").is_some_and(|t| t.trim() == "()");
            if !out.data.is_empty() && !req.silent && !unit {
                let media = media(out.data.iter());
                let mut result = ExecuteResult::new(count, media);
                result.transient = Some(Transient { display_id: None });
                k.publish(result, msg);
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
