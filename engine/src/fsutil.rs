//! Durable, atomic writes: a directory is filled under a temporary sibling, every file and the
//! directory are fsynced, and one rename publishes it, so a crash (kill -9, power loss, a full
//! disk) leaves either the old directory or the new one, never a half-written one.

use crate::error::{EngineError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Writes JSON (pretty) and fsyncs it.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    // a Value always serializes
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::Internal(e.to_string()))?;
    std::fs::write(path, text).map_err(EngineError::io("writing", path))?;
    sync_file(path)
}

/// fsyncs one file.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(EngineError::io("syncing", path))
}

/// fsyncs a directory (its entries); best effort where directories cannot be opened.
pub fn sync_dir(path: &Path) -> Result<()> {
    match std::fs::File::open(path).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if cfg!(unix) => Err(EngineError::Io { op: "syncing", path: path.to_path_buf(), source: e }),
        Err(_) => Ok(()),
    }
}

/// A temporary sibling of `dir` for this process: `.NAME.tmp-PID-NANOS`.
fn temp_sibling(dir: &Path) -> PathBuf {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Publishes a new `dir` filled by `fill` (which gets the temporary directory and must sync the
/// files it writes). With `replace`, an existing `dir` is swapped out atomically (Linux
/// `renameat2(RENAME_EXCHANGE)`) and then removed; without it, an existing `dir` is an error.
/// On any error the temporary directory is removed and `dir` is as it was.
pub fn publish_dir(dir: &Path, replace: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(EngineError::io("creating", parent))?;
    let tmp = temp_sibling(dir);
    std::fs::create_dir_all(&tmp).map_err(EngineError::io("creating", &tmp))?;
    let result = fill(&tmp).and_then(|()| sync_dir(&tmp)).and_then(|()| {
        if dir.exists() {
            if !replace {
                return Err(EngineError::Io {
                    op: "publishing",
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
                });
            }
            exchange(&tmp, dir)?;
            // `tmp` now holds the previous contents.
            let _ = std::fs::remove_dir_all(&tmp);
        } else {
            std::fs::rename(&tmp, dir).map_err(EngineError::io("renaming into", dir))?;
        }
        sync_dir(parent)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Atomically swaps two directory entries.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // both entries exist on disk, so neither path holds a NUL byte
    let cstr =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| EngineError::Internal(e.to_string()));
    let (ca, cb) = (cstr(a)?, cstr(b)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 reads them and touches no memory of ours.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(EngineError::Io { op: "swapping in", path: b.to_path_buf(), source: std::io::Error::last_os_error() })
    }
}

/// Elsewhere: move the old one aside, then rename (a crash in between leaves the old one
/// under its `.old` name).
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let old = temp_sibling(b).with_extension("old");
    std::fs::rename(b, &old).map_err(EngineError::io("moving aside", b))?;
    std::fs::rename(a, b).map_err(EngineError::io("renaming into", b))?;
    std::fs::rename(&old, a).map_err(EngineError::io("renaming", &old))
}
