//! Load time and peak memory of one model: `bench_load PATH` loads a `.gguf` file or a model
//! folder as f32 on the CPU and prints one JSON line. `bench_load --merge GGUF DIR` writes the
//! GGUF's weights as a safetensors model folder (to compare the two formats of the same model).
//! Run each load in its own process (`bench/load.sh` does): peak memory is per process.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use anyhow::{bail, Result};
use hearth_api::{CheckpointKind, TrainingConfig};
use hearth_engine::{BaseModel, Run};
use std::sync::Arc;
use std::time::Instant;

/// `VmHWM` (peak resident memory) of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok());
    kb.unwrap_or(0) * 1024
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dev = candle_core::Device::Cpu;
    match args.as_slice() {
        [flag, gguf, dir] if flag == "--merge" => {
            let base = Arc::new(BaseModel::load(gguf.as_ref(), &dev, candle_core::DType::F32)?);
            // a fresh LoRA run has B = 0: its merged weights are the base's
            Run::new(base, TrainingConfig::default())?.save_state(dir.as_ref(), CheckpointKind::Merged)?;
        }
        [path] => {
            let before = peak_rss();
            let t0 = Instant::now();
            let base = BaseModel::load(path.as_ref(), &dev, candle_core::DType::F32)?;
            let load_s = t0.elapsed().as_secs_f64();
            let weights: usize = base.weights.values().map(|t| t.elem_count() * 4).sum();
            let file_bytes: u64 = if std::path::Path::new(path).is_dir() {
                std::fs::read_dir(path)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()
            } else {
                std::fs::metadata(path)?.len()
            };
            println!(
                "{}",
                serde_json::json!({"path": path, "load_s": load_s, "peak_rss_mb": peak_rss() as f64 / 1e6,
                    "rss_before_mb": before as f64 / 1e6, "weights_mb": weights as f64 / 1e6, "file_mb": file_bytes as f64 / 1e6})
            );
        }
        _ => bail!("usage: bench_load PATH | bench_load --merge GGUF DIR"),
    }
    Ok(())
}
