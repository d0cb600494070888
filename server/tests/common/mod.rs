//! Starting the real `hearth-server` binary on 127.0.0.1:0 and talking to it over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh hearth home under the target dir.
pub fn home(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("server-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running server process.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub token: String,
    pub home: PathBuf,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `hearth-server --home HOME --listen 127.0.0.1:0 ARGS...` and waits for its
    /// "listening on" line.
    pub fn start(home: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth-server"))
            .args(["--home", home.to_str().unwrap(), "--listen", "127.0.0.1:0", "--model", "tiny"])
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "server did not start: {line:?}");
        let session: Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("session.json")).unwrap()).unwrap();
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
        Server {
            child,
            url: session["url"].as_str().unwrap().to_string(),
            token: session["token"].as_str().unwrap().to_string(),
            home: home.to_path_buf(),
            agent,
        }
    }

    /// POST JSON with the token; (status, body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(
            self.agent.post(&format!("{}{path}", self.url)).set("Authorization", &format!("Bearer {}", self.token)),
            Some(body),
        )
    }

    /// POST raw bytes with the token.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let req =
            self.agent.post(&format!("{}{path}", self.url)).set("Authorization", &format!("Bearer {}", self.token));
        respond(req.send_bytes(body))
    }

    /// GET with the token.
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call(
            self.agent.get(&format!("{}{path}", self.url)).set("Authorization", &format!("Bearer {}", self.token)),
            None,
        )
    }

    fn call(&self, req: ureq::Request, body: Option<&Value>) -> (u16, Value) {
        respond(match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        })
    }

    /// POST that must succeed.
    pub fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "POST {path}: {v}");
        v
    }

    /// Waits for the process to exit by itself (at most `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(secs), "server did not exit within {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill only sends a signal to our child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// kill -9 and reap.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn respond(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(resp) => {
            let status = resp.status();
            (status, resp.into_json().unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().unwrap_or(Value::Null)),
        Err(e) => (0, json!({"transport": e.to_string()})),
    }
}

/// A call with `token` as the bearer token (a user's, or the admin's).
pub fn call(s: &Server, token: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let req = ureq::request(method, &format!("{}{path}", s.url))
        .timeout(Duration::from_secs(300))
        .set("Authorization", &format!("Bearer {token}"));
    respond(match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    })
}

/// A POST with `token` that must answer 200; its body.
pub fn ok_as(s: &Server, token: &str, path: &str, body: Value) -> Value {
    let (status, v) = call(s, token, "POST", path, Some(&body));
    assert_eq!(status, 200, "POST {path}: {v}");
    v
}

/// Adds user `name` as the admin; their token.
pub fn add_user(s: &Server, name: &str) -> String {
    let (status, v) = s.post("/v1/users", &json!({"name": name}));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], name);
    v["token"].as_str().unwrap().to_string()
}

/// A cross-entropy batch over `text`'s bytes.
pub fn batch(text: &str) -> Value {
    let t: Vec<u32> = text.bytes().map(u32::from).collect();
    let n = t.len() - 1;
    json!({"data": [{"model_input": &t[..n], "loss_fn_inputs": {"target_tokens": &t[1..], "weights": vec![1.0; n]}}], "loss_fn": "cross_entropy"})
}

/// One training step on run `run` with data chosen by `i`; returns (loss, step).
pub fn train_step(s: &Server, run: &str, i: u64) -> (f64, u64) {
    let texts = ["hearth keeps the model warm", "one cell at a time", "nothing is ever lost"];
    let fb = s.ok(&format!("/v1/runs/{run}/forward_backward"), &batch(texts[(i % 3) as usize]));
    let st = s.ok(
        &format!("/v1/runs/{run}/optim_step"),
        &json!({"learning_rate": 5e-3, "weight_decay": 0.1, "grad_clip_norm": 1.0}),
    );
    (fb["metrics"]["loss:sum"].as_f64().unwrap(), st["step"].as_u64().unwrap())
}
