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
    /// The folder it was loaded from (its config and tokenizer files go into merged saves).
    pub source: PathBuf,
    /// Identifies these weights whatever the dtype or device (see [`fingerprint`]); checkpoints
    /// record it so one made for another base model is refused.
    pub fingerprint: String,
    /// Tokenizer and chat template, when the folder has a `tokenizer.json`.
    pub text: Option<crate::text::TextModel>,
}

impl BaseModel {
    /// Loads `config.json` and the weights of a local model folder.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = load_dir(dir, device, dtype)?;
        let fingerprint = fingerprint(&weights)?;
        let text = if dir.join("tokenizer.json").is_file() { Some(crate::text::TextModel::from_dir(dir)?) } else { None };
        Ok(Self { config, weights, device: device.clone(), dtype, source: dir.to_path_buf(), fingerprint, text })
    }
}

/// FNV-1a over every tensor's name, shape and first and last 64 values as bf16 (so the
/// same weights loaded as f32 or bf16, on any device, give the same string). Cheap for any size.
pub fn fingerprint(weights: &HashMap<String, Tensor>) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for name in names {
        let t = &weights[name];
        eat(name.as_bytes());
        for d in t.dims() {
            eat(&(*d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let ends = [flat.narrow(0, 0, n.min(64))?, flat.narrow(0, n - n.min(64), n.min(64))?];
        for part in ends {
            for v in part.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                eat(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
    }
    Ok(format!("{h:016x}"))
}
