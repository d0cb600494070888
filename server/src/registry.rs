//! The run registry: one SQLite file (`registry.sqlite` in WAL mode) under the hearth home,
//! shared by every server on the machine. Runs, their checkpoints and per-step metrics.
//!
//! Users (a class's students) are rows of `users`: a name and the SHA-256 of their token, never
//! the token itself; a revoked user keeps the row (and their runs) with `revoked_at` set.
//!
//! Order of writes keeps it consistent through `kill -9`: a checkpoint row is added only after
//! its folder is published, and removed before its folder is deleted; metrics rows are keyed by
//! (run, step) and replaced when a resumed run redoes a step.

use hearth_api::{MetricRow, TrainingConfig};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

/// A checkpoint row.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    /// Run id.
    pub run: String,
    /// Checkpoint name.
    pub name: String,
    /// `state`, `adapter`, `merged`.
    pub kind: String,
    /// Step when saved.
    pub step: u64,
    /// Folder.
    pub path: String,
    /// `user`, `autosave`, `shutdown`, `budget`.
    pub reason: String,
}

/// A run row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    /// Run id.
    pub id: String,
    /// Its training config.
    pub training: TrainingConfig,
    /// Step last recorded.
    pub step: u64,
}

/// A user row (the token's hash stays in the registry).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UserRow {
    /// The user's name.
    pub name: String,
    /// Unix seconds when added.
    pub created_at: f64,
    /// Unix seconds when revoked.
    pub revoked_at: Option<f64>,
}

/// The registry (a connection behind a mutex: writes are small and rare).
#[derive(Debug)]
pub struct Registry {
    conn: Mutex<Connection>,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

type Result<T> = std::result::Result<T, rusqlite::Error>;

impl Registry {
    /// Opens (creating) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS runs (
                id TEXT NOT NULL, base TEXT NOT NULL, training TEXT NOT NULL, step INTEGER NOT NULL,
                status TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (base, id));
             CREATE TABLE IF NOT EXISTS checkpoints (
                id INTEGER PRIMARY KEY AUTOINCREMENT, base TEXT NOT NULL, run TEXT NOT NULL, name TEXT NOT NULL,
                kind TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL, created_at REAL NOT NULL);
             CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (base, run, step);
             CREATE TABLE IF NOT EXISTS metrics (
                base TEXT NOT NULL, run TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, tokens REAL, grad_norm REAL,
                learning_rate REAL, tokens_per_s REAL, memory_bytes INTEGER, time REAL, PRIMARY KEY (base, run, step));
             CREATE TABLE IF NOT EXISTS users (
                name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL);
             CREATE TABLE IF NOT EXISTS quotas (name TEXT PRIMARY KEY, quota TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS usage (
                name TEXT PRIMARY KEY, device_s REAL NOT NULL, tokens_trained INTEGER NOT NULL,
                tokens_sampled INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS servers (
                pid INTEGER NOT NULL, url TEXT NOT NULL, model TEXT NOT NULL, started_at REAL NOT NULL,
                stopped_at REAL, reason TEXT);",
        )?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// Records a new (or re-created) run.
    pub fn add_run(&self, base: &str, id: &str, training: &TrainingConfig, step: u64) -> Result<()> {
        let training = serde_json::to_string(training).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (id, base, training, step, status, created_at) VALUES (?1, ?2, ?3, ?4, 'active', ?5)
                 ON CONFLICT (base, id) DO UPDATE SET training = ?3, step = ?4, status = 'active'",
                params![id, base, training, step as i64, now()],
            )
            .map(|_| ())
        })
    }

    /// True when `id` names a run of this base already (active or not).
    pub fn has_run(&self, base: &str, id: &str) -> Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM runs WHERE base = ?1 AND id = ?2", params![base, id], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    /// True when `id` names an active run of this base (not one archived by `--no-resume`).
    pub fn has_active_run(&self, base: &str, id: &str) -> Result<bool> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM runs WHERE base = ?1 AND id = ?2 AND status = 'active'",
                params![base, id],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        })
    }

    /// Forgets a run with its checkpoints and metrics (an archived run whose name is reused).
    pub fn forget_run(&self, base: &str, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM checkpoints WHERE base = ?1 AND run = ?2", params![base, id])?;
            c.execute("DELETE FROM metrics WHERE base = ?1 AND run = ?2", params![base, id])?;
            c.execute("DELETE FROM runs WHERE base = ?1 AND id = ?2", params![base, id]).map(|_| ())
        })
    }

    /// Every run id of this base ever created (for generating fresh names).
    pub fn run_count(&self, base: &str) -> Result<u64> {
        self.with(|c| {
            c.query_row("SELECT COUNT(*) FROM runs WHERE base = ?1", params![base], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        })
    }

    /// Runs of this base that were active when their server stopped.
    pub fn active_runs(&self, base: &str) -> Result<Vec<RunRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, training, step FROM runs WHERE base = ?1 AND status = 'active' ORDER BY created_at",
            )?;
            let rows = st.query_map(params![base], |r| {
                let training: String = r.get(1)?;
                Ok((r.get::<_, String>(0)?, training, r.get::<_, i64>(2)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, training, step) = row?;
                if let Ok(training) = serde_json::from_str(&training) {
                    out.push(RunRow { id, training, step: step as u64 });
                }
            }
            Ok(out)
        })
    }

    /// Marks runs of this base that were not resumed as archived.
    pub fn archive_runs(&self, base: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE runs SET status = 'archived' WHERE base = ?1 AND status = 'active'", params![base])
                .map(|_| ())
        })
    }

    /// Records a run's current step.
    pub fn set_step(&self, base: &str, run: &str, step: u64) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE runs SET step = ?3 WHERE base = ?1 AND id = ?2", params![base, run, step as i64])
                .map(|_| ())
        })
    }

    /// Records a published checkpoint.
    pub fn add_checkpoint(&self, base: &str, row: &CheckpointRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM checkpoints WHERE base = ?1 AND run = ?2 AND name = ?3",
                params![base, row.run, row.name],
            )?;
            c.execute(
                "INSERT INTO checkpoints (base, run, name, kind, step, path, reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![base, row.run, row.name, row.kind, row.step as i64, row.path, row.reason, now()],
            )
            .map(|_| ())
        })
    }

    /// Forgets a checkpoint (before its folder is deleted).
    pub fn remove_checkpoint(&self, base: &str, run: &str, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM checkpoints WHERE base = ?1 AND run = ?2 AND name = ?3", params![base, run, name])
                .map(|_| ())
        })
    }

    /// A run's checkpoints, newest first.
    pub fn checkpoints(&self, base: &str, run: &str) -> Result<Vec<CheckpointRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT run, name, kind, step, path, reason FROM checkpoints WHERE base = ?1 AND run = ?2 ORDER BY step DESC, id DESC",
            )?;
            let rows = st.query_map(params![base, run], |r| {
                Ok(CheckpointRow {
                    run: r.get(0)?,
                    name: r.get(1)?,
                    kind: r.get(2)?,
                    step: r.get::<_, i64>(3)? as u64,
                    path: r.get(4)?,
                    reason: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Stores (or replaces) one step's metrics.
    pub fn add_metric(&self, base: &str, run: &str, m: &MetricRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO metrics (base, run, step, loss, tokens, grad_norm, learning_rate, tokens_per_s, memory_bytes, time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![base, run, m.step as i64, m.loss, m.tokens, m.grad_norm, m.learning_rate, m.tokens_per_s, m.memory_bytes as i64, m.time],
            )
            .map(|_| ())
        })
    }

    /// Drops metrics after `step` (a run resumed from an earlier checkpoint redoes them).
    pub fn truncate_metrics(&self, base: &str, run: &str, step: u64) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM metrics WHERE base = ?1 AND run = ?2 AND step > ?3", params![base, run, step as i64])
                .map(|_| ())
        })
    }

    /// A run's metrics in step order.
    pub fn metrics(&self, base: &str, run: &str) -> Result<Vec<MetricRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT step, loss, tokens, grad_norm, learning_rate, tokens_per_s, memory_bytes, time FROM metrics
                 WHERE base = ?1 AND run = ?2 ORDER BY step",
            )?;
            let rows = st.query_map(params![base, run], |r| {
                Ok(MetricRow {
                    step: r.get::<_, i64>(0)? as u64,
                    loss: r.get(1)?,
                    tokens: r.get(2)?,
                    grad_norm: r.get(3)?,
                    learning_rate: r.get(4)?,
                    tokens_per_s: r.get(5)?,
                    memory_bytes: r.get::<_, i64>(6)? as u64,
                    time: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Adds user `name` with the hash of their token; `Ok(false)` when the name is taken (by a
    /// user revoked or not: a revoked name stays with its runs).
    pub fn add_user(&self, name: &str, token_sha256: &str) -> Result<bool> {
        self.with(|c| {
            c.execute(
                "INSERT INTO users (name, token_sha256, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
                params![name, token_sha256, now()],
            )
            .map(|n| n == 1)
        })
    }

    /// The user whose (not revoked) token has this hash.
    pub fn user_by_token(&self, token_sha256: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT name FROM users WHERE token_sha256 = ?1 AND revoked_at IS NULL",
                params![token_sha256],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Every user, revoked ones too, in the order they were added.
    pub fn users(&self) -> Result<Vec<UserRow>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, created_at, revoked_at FROM users ORDER BY created_at, name")?;
            let rows =
                st.query_map([], |r| Ok(UserRow { name: r.get(0)?, created_at: r.get(1)?, revoked_at: r.get(2)? }))?;
            rows.collect()
        })
    }

    /// Revokes user `name`'s token; `Ok(false)` when there is no such user or it was revoked.
    pub fn revoke_user(&self, name: &str) -> Result<bool> {
        self.with(|c| {
            c.execute("UPDATE users SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL", params![name, now()])
                .map(|n| n == 1)
        })
    }

    /// Every quota the admin set, by user.
    pub fn quotas(&self) -> Result<Vec<(String, hearth_api::Quota)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, quota FROM quotas")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (name, quota) = row?;
                if let Ok(q) = serde_json::from_str(&quota) {
                    out.push((name, q));
                }
            }
            Ok(out)
        })
    }

    /// Sets user `name`'s quota.
    pub fn set_quota(&self, name: &str, quota: &hearth_api::Quota) -> Result<()> {
        let json = serde_json::to_string(quota).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT INTO quotas (name, quota) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET quota = ?2",
                params![name, json],
            )
            .map(|_| ())
        })
    }

    /// Every user's recorded use: (name, device seconds, tokens trained, tokens sampled).
    pub fn usage(&self) -> Result<Vec<(String, f64, u64, u64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, device_s, tokens_trained, tokens_sampled FROM usage")?;
            let rows = st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64))
            })?;
            rows.collect()
        })
    }

    /// Records users' use (replacing what was recorded), in one transaction.
    pub fn set_usage(&self, rows: &[(String, f64, u64, u64)]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        for (name, device_s, trained, sampled) in rows {
            tx.execute(
                "INSERT INTO usage (name, device_s, tokens_trained, tokens_sampled) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET device_s = ?2, tokens_trained = ?3, tokens_sampled = ?4",
                params![name, device_s, *trained as i64, *sampled as i64],
            )?;
        }
        tx.commit()
    }

    /// Checkpoints of this base's runs of user `owner` (`""`: the admin's runs).
    pub fn checkpoint_count(&self, base: &str, owner: &str) -> Result<usize> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM checkpoints WHERE base = ?1 AND substr(run, 1, instr(run, '/') - 1) = ?2",
                params![base, owner],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
        })
    }

    /// Records this server's start.
    pub fn server_started(&self, pid: u32, url: &str, model: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO servers (pid, url, model, started_at) VALUES (?1, ?2, ?3, ?4)",
                params![pid, url, model, now()],
            )
            .map(|_| ())
        })
    }

    /// Records this server's stop and why.
    pub fn server_stopped(&self, pid: u32, reason: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE servers SET stopped_at = ?2, reason = ?3 WHERE pid = ?1 AND stopped_at IS NULL",
                params![pid, now(), reason],
            )
            .map(|_| ())
        })
    }
}
