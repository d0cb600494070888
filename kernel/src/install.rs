//! `hearth-kernel install`: writes the kernelspec Jupyter finds the kernel by.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The hearth logo (a flame over a hearth) as SVG.
pub const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64"><rect x="6" y="46" width="52" height="12" rx="3" fill="#6b3e26"/><path d="M32 6c4 10 14 14 14 26a14 14 0 0 1-28 0c0-8 6-11 7-18 3 5 4 8 7 9 0-6 0-11 0-17z" fill="#f28c28"/><path d="M32 24c2 6 7 8 7 14a7 7 0 0 1-14 0c0-4 3-6 4-9 1 2 2 3 3 4 0-3 0-6 0-9z" fill="#ffd34d"/></svg>"##;

/// Where `--user` (default) or `--prefix P` puts the kernelspec.
pub fn kernelspec_dir(prefix: Option<&Path>) -> Result<PathBuf, String> {
    let base = match prefix {
        Some(p) => p.join("share").join("jupyter"),
        None => jupyter_zmq_client::dirs::user_data_dir().map_err(|e| e.to_string())?,
    };
    Ok(base.join("kernels").join("hearth"))
}

/// The kernel.json contents for the binary at `exe`.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    serde_json::json!({
        "argv": [exe.display().to_string(), "run", "{connection_file}"],
        "display_name": "Rust (hearth)",
        "language": "rust",
        "interrupt_mode": "message",
        "metadata": {"debugger": false},
    })
}

/// Writes kernel.json and the logo; returns the folder.
pub fn install(prefix: Option<&Path>) -> Result<PathBuf, String> {
    let dir = kernelspec_dir(prefix)?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&kernel_json(&exe)).map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), String> {
        let p = dir.join(name);
        std::fs::File::create(&p).and_then(|mut f| f.write_all(bytes)).map_err(|e| format!("{}: {e}", p.display()))
    };
    write("kernel.json", json.as_bytes())?;
    write("logo-svg.svg", LOGO_SVG.as_bytes())?;
    Ok(dir)
}
