//! Finding the server: the home folder and its `session.json`.

use serde::{Deserialize, Serialize};

/// hearth's home (registry, checkpoints, session file): `$HEARTH_HOME`, else
/// `$XDG_DATA_HOME/hearth`, else `~/.local/share/hearth` — the one rule the server and every
/// client follow.
pub fn home_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HEARTH_HOME").unwrap_or_else(|| {
        var("XDG_DATA_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".local/share")))
            .unwrap_or_else(std::env::temp_dir)
            .join("hearth")
    })
}

/// `$HEARTH_HOME/session.json` (mode 0600): how kernels, REPLs and scripts find the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionFile {
    /// Base URL.
    pub url: String,
    /// Bearer token.
    pub token: String,
    /// Server process id.
    pub pid: u32,
    /// What `--model` named.
    pub model: String,
    /// `running` or `stopped`.
    pub state: String,
    /// Unix seconds.
    pub started_at: f64,
    /// Why it stopped (`idle timeout`, `SIGTERM`, …).
    #[serde(default)]
    pub stop_reason: Option<String>,
}

impl SessionFile {
    /// Reads one, if present and well-formed.
    pub fn read(path: &std::path::Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }
}
