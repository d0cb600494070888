//! Reading a model folder in Hugging Face layout: `config.json` plus `model.safetensors` or a
//! sharded `model.safetensors.index.json`.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The safetensors files of a model folder, in load order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(EngineError::io("reading", &index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Weights(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::Weights(format!("{}: no `weight_map` object", index.display())))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    Err(EngineError::Weights(format!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// Loads every tensor of a model folder onto `device` as `dtype`.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in safetensors_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| EngineError::Weights(format!("{}: {e}", file.display())))?;
        for (name, t) in tensors {
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(out)
}

/// A base model loaded once and shared (read-only) by every run on it.
#[derive(Debug)]
pub struct BaseModel {
    /// Its configuration.
    pub config: ModelConfig,
    /// Tensors by checkpoint name.
    pub weights: HashMap<String, Tensor>,
    /// Where they live.
    pub device: Device,
    /// Their dtype.
    pub dtype: DType,
}

impl BaseModel {
    /// Loads `config.json` and the weights of a local model folder.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = load_dir(dir, device, dtype)?;
        Ok(Self { config, weights, device: device.clone(), dtype })
    }
}
