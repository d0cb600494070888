//! The real `hearth` binary in a real terminal (tmux: send-keys, capture-pane) and on pipes.
//! Each test has its own hearth home and tmux server; the session server they start is the
//! `hearth` binary itself (`hearth serve`), stopped at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests compile cells on a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HEARTH: &str = env!("CARGO_BIN_EXE_hearth");

fn temp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hearth-repl-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Stops the session server of `home` (SIGTERM, which saves every run) and waits for it.
fn stop_server(home: &Path) {
    let Ok(text) = std::fs::read_to_string(home.join("session.json")) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pid = v["pid"].as_i64().unwrap() as i32;
    // SAFETY: plain kill(2) calls.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Tmux {
    socket: String,
    home: PathBuf,
}

impl Tmux {
    fn new(home: &Path) -> Tmux {
        Tmux { socket: format!("hearth-test-{}", std::process::id()), home: home.to_path_buf() }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux is installed");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `hearth` in a fresh 160×50 window; the pane stays after it exits.
    fn launch(&self) {
        let cmd = format!(
            // a long grace period: only the server-side cancel can end a long sample in time
            "env HEARTH_HOME={} HEARTH_SERVER_BIN={HEARTH} HEARTH_INTERRUPT_GRACE_MS=120000 {HEARTH}",
            self.home.display()
        );
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
        self.tmux(&["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "160", "-y", "50", &cmd]);
        self.tmux(&["set-option", "-t", "t", "remain-on-exit", "on"]);
        self.tmux(&["set-option", "-t", "t", "history-limit", "5000"]);
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// Types `line` and presses Enter (as hex: tmux would take a trailing `;` for its own
    /// command separator).
    fn line(&self, line: &str) {
        let hex: Vec<String> = line.bytes().chain([b'\r']).map(|b| format!("{b:02x}")).collect();
        let mut args = vec!["send-keys", "-t", "t", "-H"];
        args.extend(hex.iter().map(String::as_str));
        self.tmux(&args);
    }

    /// Runs one cell (or one line of a block when `block_open`) and waits for the next prompt.
    fn cell(&self, line: &str, timeout_s: u64) -> String {
        let prompts = self.screen().matches("hearth>").count();
        self.line(line);
        self.wait_for("hearth>", prompts + 1, timeout_s)
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "t", "-S", "-5000"])
    }

    /// Waits until the screen holds `text` `count` times.
    fn wait_for(&self, text: &str, count: usize, timeout_s: u64) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if s.matches(text).count() >= count {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(timeout_s),
                "no {text:?} (x{count}) after {timeout_s} s; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dead(&self) -> bool {
        self.tmux(&["display-message", "-p", "-t", "t", "#{pane_dead}"]).trim() == "1"
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
        stop_server(&self.home);
    }
}

#[test]
fn a_session_in_a_terminal_trains_interrupts_keeps_history_and_saves_on_ctrl_d() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let home = temp_home("tmux");
    let t = Tmux::new(&home);
    t.launch();
    // the prompt comes at once; `session` a little later (first use compiles the prelude)
    t.wait_for("hearth>", 1, 10);
    t.wait_for("`session` is ready", 1, 900);

    // a multi-line loop, typed line by line: the scanner keeps the block open until `}`
    t.cell("let d = session.supervised(\"2+2=\", \"4\")?;", 120);
    t.cell("let (mut first, mut last) = (0.0, 0.0);", 120);
    for line in [
        "for i in 0..20 {",
        "let out = session.forward_backward(std::slice::from_ref(&d))?;",
        "session.optim_step(&AdamParams { learning_rate: 1e-2, ..Default::default() })?;",
        "if i == 0 { first = out.metrics[\"loss:sum\"]; }",
        "last = out.metrics[\"loss:sum\"];",
    ] {
        t.line(line);
    }
    t.cell("}", 120);
    let s = t.cell("println!(\"trained {} {:.3} -> {:.3}\", last < first / 2.0, first, last);", 120);
    assert!(s.contains("trained true"), "the loss did not halve:\n{s}");

    // a magic, answered without compiling
    let s = t.cell(":runs", 30);
    assert!(s.lines().any(|l| l.starts_with("main") && l.split_whitespace().nth(1) == Some("20")), "{s}");

    // Ctrl-C during a long sample: the cell ends Interrupted, variables and the model stay
    t.cell("let keep = 41;", 120);
    t.line("println!(\"sampling\"); let out = session.sample(&SampleInput { prompt: vec![104, 105], num_samples: 64, sampling_params: SamplingParams { max_tokens: 1000, ..Default::default() }, ..Default::default() })?;");
    t.wait_for("sampling\n", 1, 120);
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["C-c"]);
    // 64 × 1000 tokens take minutes and the kill step waits 120 s: only the cancel ends it now
    let s = t.wait_for("Interrupted", 1, 30);
    assert!(!s.contains("ChildRestarted"), "{s}");
    assert!(s.contains("the operation was cancelled"), "the server's operation was not cancelled:\n{s}");
    let s = t.cell("println!(\"keep {} loads {}\", keep + 1, session.info()?.model_loads);", 120);
    assert!(s.contains("keep 42 loads 1"), "{s}");

    // a cell that does not call the server: a second Ctrl-C restarts the cell process
    t.line("std::thread::sleep(std::time::Duration::from_secs(600));");
    std::thread::sleep(Duration::from_secs(2));
    t.keys(&["C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["C-c"]);
    t.wait_for("Interrupted", 2, 30);
    let s = t.cell("println!(\"back {} loads {}\", session.run_name(), session.info()?.model_loads);", 120);
    assert!(s.contains("back main loads 1"), "the cell process did not come back with `session`:\n{s}");

    // Ctrl-D: the server saves the run (step 20) and the REPL exits, removing its temp folder
    let pid = t.tmux(&["display-message", "-p", "-t", "t", "#{pane_pid}"]).trim().to_string();
    let tmp = std::env::temp_dir().join("hearth-evcxr").join(&pid);
    assert!(tmp.is_dir(), "evcxr does not build in {}", tmp.display());
    t.keys(&["C-d"]);
    let s = t.wait_for("saved step 20", 1, 60);
    let t0 = Instant::now();
    while !t.dead() {
        assert!(t0.elapsed() < Duration::from_secs(20), "hearth did not exit after Ctrl-D:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(home.join("runs/main/checkpoints/autosave-00000020/hearth.json").is_file(), "no autosave at step 20");
    assert!(!tmp.exists(), "{} was left behind", tmp.display());

    // the history survives a restart: Up recalls the last line
    t.launch();
    t.wait_for("hearth>", 1, 10);
    // Tab completes magics (Rust completes through evcxr once `session` is ready)
    t.keys(&[":ru", "Tab"]);
    t.wait_for("hearth> :runs", 1, 10);
    t.keys(&["C-u"]);
    t.keys(&["Up"]);
    t.wait_for("hearth> println!(\"back {} loads {}\"", 1, 10);
    t.keys(&["C-u", "C-d"]);
}

fn run_piped(home: &Path, script: &str) -> (String, String, bool) {
    run_with(&[], home, script)
}

/// Runs `hearth ARGS` on `home` with `script` on stdin: (stdout, stderr, success).
fn run_with(args: &[&str], home: &Path, script: &str) -> (String, String, bool) {
    run_env(args, &[], home, script)
}

/// [`run_with`], with more environment variables.
fn run_env(args: &[&str], envs: &[(&str, &Path)], home: &Path, script: &str) -> (String, String, bool) {
    let mut child = Command::new(HEARTH)
        .args(args)
        .envs(envs.iter().copied())
        .env("HEARTH_HOME", home)
        .env("HEARTH_SERVER_BIN", HEARTH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    // a clean exit removes evcxr's build directory (about 250 MB) with the REPL's temp folder
    let tmp = std::env::temp_dir().join("hearth-evcxr").join(pid.to_string());
    assert!(!tmp.exists(), "{} was left behind", tmp.display());
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned(), out.status.success())
}

const SCRIPT: &str = r#"
let d = session.supervised("2+2=", "4")?;
let mut p = Progress::new("train", 12);
for i in 0..12 {
    let out = session.forward_backward(std::slice::from_ref(&d))?;
    session.optim_step(&AdamParams { learning_rate: 1e-2, ..Default::default() })?;
    println!("step {} loss {:.6}", i + 1, out.metrics["loss:sum"]);
    p.set(i + 1, format!("loss {:.4}", out.metrics["loss:sum"]));
}

for i in 0..200 { println!("print {i}"); Bundle::text(format!("shown {i}")).show(); }

:runs
let s = session.sample(&SampleInput { prompt: session.tokenize("2+2=")?, num_samples: 2, sampling_params: SamplingParams { max_tokens: 8, seed: Some(7), temperature: 1.0, ..Default::default() }, ..Default::default() })?;
println!("{:?}", s.sequences.iter().map(|q| q.tokens.clone()).collect::<Vec<_>>());
session.sample_table("2+2=", 2, SamplingParams { max_tokens: 6, seed: Some(3), ..Default::default() })?

session.loss_plot()?
"#;

#[test]
fn piped_scripts_give_byte_identical_output_without_escape_codes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let home = temp_home("piped");
    let (first, err1, ok) = run_piped(&home, SCRIPT);
    assert!(ok, "the script failed:\n{first}\n{err1}");
    stop_server(&home);
    // the same home path, emptied: the same script and seeds must print the same bytes
    std::fs::remove_dir_all(&home).unwrap();
    // displays come out in order with the cell's prints
    let order: Vec<&str> = first.lines().filter(|l| l.starts_with("print ") || l.starts_with("shown ")).collect();
    let expected: Vec<String> = (0..200).flat_map(|i| [format!("print {i}"), format!("shown {i}")]).collect();
    assert_eq!(order, expected, "prints and displays interleaved out of order");
    let (second, err2, ok) = run_piped(&home, SCRIPT);
    stop_server(&home);
    assert!(ok, "the second run failed:\n{second}\n{err2}");
    assert_eq!(first, second, "piped output differs between two runs of the same script");
    assert!(!first.contains('\u{1b}'), "escape codes on a pipe:\n{first:?}");
    // and it is the output we expect
    assert_eq!(first.lines().filter(|l| l.starts_with("step ")).count(), 12, "{first}");
    assert!(first.contains("train: 12/12 loss "), "the bar's final line: {first}");
    assert!(
        first.lines().any(|l| l.starts_with("main") && l.split_whitespace().nth(1) == Some("12")),
        ":runs: {first}"
    );
    assert!(first.contains("prompt: \"2+2=\"") && first.contains("mean logprob"), "the sample table: {first}");
    let png = first
        .lines()
        .find_map(|l| l.strip_prefix("(plot saved as "))
        .map(|l| l.trim_end_matches(')'))
        .expect("a saved plot");
    assert!(std::fs::read(png).unwrap().starts_with(b"\x89PNG"), "{png}");
    assert!(first.contains("loss · run main"), "the text plot: {first}");
    // the server was told to save on the way out (end of input is Ctrl-D)
    assert!(err2.contains("saved step 12"), "{err2}");
}

#[test]
fn a_failing_cell_stops_a_script_with_exit_code_1() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let home = temp_home("fail");
    let (out, err, ok) = run_piped(&home, "println!(\"one\");\n\nlet x: u32 = \"two\";\n\nprintln!(\"three\");\n");
    stop_server(&home);
    assert!(!ok);
    assert!(out.contains("one") && !out.contains("three"), "{out}");
    assert!(err.contains("mismatched types"), "{err}");
    // a `?` that stops a cell is its error too (evcxr alone would only print it)
    let (out, err, ok) = run_piped(&home, "println!(\"one\");\n\nlet r: Result<u32, String> = Err(\"boom\".into());\nlet x = r?;\n\nprintln!(\"three\");\n");
    stop_server(&home);
    assert!(!ok, "{out}\n{err}");
    assert!(out.contains("one") && !out.contains("three"), "{out}");
    assert!(err.contains("boom") && err.contains("the cell stopped at a `?`"), "{err}");
    // a missing script is refused before anything starts
    let out = Command::new(HEARTH).args(["run", "/nonexistent/script.rs"]).env("HEARTH_HOME", &home).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/script.rs"));
}

#[test]
fn attach_uses_a_server_elsewhere_and_starts_none() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (server_home, home) = (temp_home("attach-server"), temp_home("attach-client"));
    let token_file = server_home.join("token");
    let mut server = Command::new(HEARTH)
        .args(["serve", "--model", "tiny", "--home"])
        .arg(&server_home)
        .arg("--token-file")
        .arg(&token_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let url = loop {
        if let Some(v) = std::fs::read_to_string(server_home.join("session.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            break v["url"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "hearth serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let token_arg = token_file.display().to_string();
    let (stdout, err, ok) = run_with(
        &["--attach", &url, "--token-file", &token_arg, "run", "-"],
        &home,
        "println!(\"at {}\", session.url());\n",
    );
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains(&format!("at {url}")), "{stdout}");
    assert!(!home.join("session.json").exists(), "--attach started a server of its own");
    // a server of another model for that home is refused, and no cell runs
    let (stdout, err, ok) = run_with(&["--model", "smollm2-135m-shape"], &server_home, "println!(\"ran\");\n");
    stop_server(&server_home);
    let _ = server.wait();
    assert!(!ok && !stdout.contains("ran"), "{err}");
    assert!(err.contains("runs model \"tiny\", not \"smollm2-135m-shape\""), "{err}");
}

/// The README's quickstart block, as a user copies it.
fn readme_quickstart() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let after = &readme[readme.find("## Quickstart").expect("a Quickstart section")..];
    let start = after.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let end = start + after[start..].find("```").unwrap();
    after[start..end].to_string()
}

#[test]
fn a_pasted_block_and_lines_typed_ahead_run_as_if_typed_line_by_line() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let home = temp_home("paste");
    let t = Tmux::new(&home);
    t.launch();
    t.wait_for("`session` is ready", 1, 900);
    let block = readme_quickstart();
    assert!(block.starts_with(":sample ") && block.contains("for i in 0..60 {"), "{block}");

    // one bracketed paste, then Enter: the magic on the first line is a magic, the loop a loop
    let file = home.join("paste.txt");
    std::fs::write(&file, &block).unwrap();
    t.tmux(&["load-buffer", file.to_str().unwrap()]);
    t.tmux(&["paste-buffer", "-p", "-t", "t"]);
    t.keys(&["Enter"]);
    let s = t.wait_for("[\"god\"]", 1, 300);
    assert!(s.contains("prompt: \"reverse: cat>\""), "`:sample` did not run as a magic:\n{s}");
    assert_eq!(s.matches("60/60").count(), 1, "{s}");

    // the same block typed without waiting for a prompt: lines typed while a cell compiles
    // are kept and run after it, in order
    for line in block.lines() {
        t.line(line);
    }
    let s = t.wait_for("[\"god\"]", 2, 120);
    assert_eq!(s.matches("60/60").count(), 2, "the loop did not run as one cell:\n{s}");
    assert!(!s.contains("error["), "a cell failed:\n{s}");

    // a pasted block with a magic in the middle
    std::fs::write(&file, "let x = 40_000;\n:runs\nx + 2\n").unwrap();
    t.tmux(&["load-buffer", file.to_str().unwrap()]);
    t.tmux(&["paste-buffer", "-p", "-t", "t"]);
    t.keys(&["Enter"]);
    let s = t.wait_for("40002", 1, 120);
    assert!(
        s.lines().any(|l| l.starts_with("main") && l.split_whitespace().nth(1) == Some("120")),
        "`:runs` in the middle of the paste did not run as a magic:\n{s}"
    );
    assert!(!s.contains("error["), "a cell failed:\n{s}");
    t.keys(&["C-d"]);
    t.wait_for("saved step 120", 1, 60);
}

#[test]
fn after_the_first_cell_no_cell_compiles_a_dependency() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let home = temp_home("nocompile");
    // a fresh folder of build slots: the first start compiles the prelude's crates, which is
    // how we know cargo's reports reach the check below
    let cells = home.join("cells");
    let script: String = (0..11).map(|i| format!("{i} + 1\n\n")).collect();
    let (out, err, ok) = run_env(&[], &[("HEARTH_CELL_CACHE", &cells)], &home, &script);
    assert!(ok, "{out}\n{err}");
    assert!(out.lines().any(|l| l == "11"), "{out}");
    assert!(err.contains("crates once for this build slot"), "the prelude's compile was not reported:\n{err}");
    assert!(!err.contains("for this cell"), "a cell compiled dependencies:\n{err}");
    // a second process on the same slots compiles no dependency at all, not even the prelude's
    let (out, err, ok) = run_env(&[], &[("HEARTH_CELL_CACHE", &cells)], &home, &script);
    stop_server(&home);
    assert!(ok, "{out}\n{err}");
    assert!(!err.contains("compiled"), "the second process compiled dependencies:\n{err}");
}
