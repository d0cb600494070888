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
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::Weights(format!("{}: {e}", index.display())))?;
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

/// Loads every tensor of a model folder onto `device` as `dtype`. Files are memory-mapped, so
/// loading does not hold a second copy of the weights in memory.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in safetensors_files(dir)? {
        let bad = |e: candle_core::Error| EngineError::Weights(format!("{}: {e}", file.display()));
        // SAFETY: the mapping is read while this function runs and dropped before it returns;
        // a model folder is not rewritten in place (we publish folders by rename).
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }.map_err(bad)?;
        for (name, _) in mapped.tensors() {
            let t = mapped.load(&name, device).map_err(bad)?;
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(out)
}

/// Opens a safetensors file and reads its JSON header: the open file, the header's length (data
/// starts 8 bytes after it) and the header.
fn read_header(file: &Path) -> Result<(std::fs::File, u64, serde_json::Value)> {
    use std::io::Read;
    let bad = |reason: String| EngineError::Weights(format!("{}: {reason}", file.display()));
    let mut f = std::fs::File::open(file).map_err(EngineError::io("reading", file))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes: not a safetensors file")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    Ok((f, len, header))
}

/// Bytes the weights of a model folder take once loaded as `dtype`, read from the safetensors
/// headers alone (nothing is loaded).
pub fn estimate_bytes(dir: &Path, dtype: DType) -> Result<u64> {
    let mut total = 0u64;
    for file in safetensors_files(dir)? {
        let bad = |reason: String| EngineError::Weights(format!("{}: {reason}", file.display()));
        let (_, _, header) = read_header(&file)?;
        for (name, info) in header.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let shape =
                info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad(format!("`{name}` has no shape")))?;
            let n: u64 = shape.iter().map(|d| d.as_u64().unwrap_or(0)).product();
            total += n * dtype.size_in_bytes() as u64;
        }
    }
    Ok(total)
}

/// Reads a model folder's tensors one at a time with plain reads (no memory map, so nothing of
/// the file stays resident) and hands each, as `dtype` on `device`, to `f`: a quantized load
/// keeps only the blocks, never the whole dense model.
pub fn for_each_tensor(
    dir: &Path,
    device: &Device,
    dtype: DType,
    mut f: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    for file in safetensors_files(dir)? {
        let bad = |reason: String| EngineError::Weights(format!("{}: {reason}", file.display()));
        let (mut fh, len, header) = read_header(&file)?;
        for (name, info) in header.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad(format!("`{name}` has no shape")))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| bad(format!("`{name}` has a bad shape"))))
                .collect::<Result<_>>()?;
            let stored = match info.get("dtype").and_then(|d| d.as_str()) {
                Some("F32") => DType::F32,
                Some("F16") => DType::F16,
                Some("BF16") => DType::BF16,
                Some("F64") => DType::F64,
                other => return Err(bad(format!("`{name}` has dtype {other:?}, not F32, F16, BF16 or F64"))),
            };
            let offsets = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .ok_or_else(|| bad(format!("`{name}` has no data_offsets")))?;
            let (start, end) = match offsets.as_slice() {
                [a, b] => (a.as_u64().unwrap_or(u64::MAX), b.as_u64().unwrap_or(0)),
                _ => return Err(bad(format!("`{name}` has bad data_offsets"))),
            };
            let want = shape.iter().product::<usize>() as u64 * stored.size_in_bytes() as u64;
            if end < start || end - start != want {
                return Err(bad(format!("`{name}`: data_offsets {start}..{end} do not hold {want} bytes")));
            }
            let mut raw = vec![0u8; want as usize];
            fh.seek(SeekFrom::Start(8 + len + start)).map_err(EngineError::io("reading", &file))?;
            fh.read_exact(&mut raw).map_err(|e| bad(format!("reading `{name}`: {e}")))?;
            let t = Tensor::from_raw_buffer(&raw, stored, &shape, &Device::Cpu)?;
            drop(raw);
            f(name.clone(), t.to_dtype(dtype)?.to_device(device)?)?;
        }
    }
    Ok(())
}

/// Memory the process can still use on `device`: `MemAvailable` on Linux CPUs, the driver's free
/// memory on CUDA; `None` where it is not known (then loading is not checked).
pub fn available_memory(device: &Device) -> Option<u64> {
    crate::device::available_memory(device)
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
    /// Tokenizer and chat template, when the folder has a `tokenizer.json` (always for GGUF).
    pub text: Option<crate::text::TextModel>,
    /// Set when the model came from a GGUF file: the Hugging Face files it stands for and the
    /// metadata that GGUF exports carry over.
    pub gguf: Option<crate::gguf::GgufOrigin>,
    /// The 2-D weights held as quantized blocks (QLoRA, [`BaseModel::load_quantized`]); they are
    /// not in `weights`. Empty for a dense base.
    pub quantized: HashMap<String, crate::quant::QWeight>,
    /// How the base was quantized at load (`None`: dense).
    pub quantize: Option<crate::quant::Quantize>,
}

impl BaseModel {
    /// Loads a model: a local folder (`config.json` and safetensors weights) or a `.gguf` file,
    /// refusing first (with [`EngineError::OutOfMemory`]) when the weights will not fit in the
    /// device's memory.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_within(path, device, dtype, available_memory(device))
    }

    /// [`BaseModel::load`] against an explicit memory budget in bytes (`None`: no check).
    pub fn load_within(path: &Path, device: &Device, dtype: DType, budget: Option<u64>) -> Result<Self> {
        Self::load_within_quantized(path, device, dtype, budget, None)
    }

    /// [`BaseModel::load`] with the 2-D weights kept as quantized blocks (QLoRA): a GGUF file's
    /// own blocks where it stores them quantized, else quantized at load to `quantize`. LoRA
    /// runs train on it as on a dense base; full fine-tuning refuses it. The fingerprint is the
    /// dense weights' (a GGUF file's blocks dequantize to the values its dense load has), so
    /// adapters move between a quantized and a dense load of the same model.
    pub fn load_quantized(
        path: &Path,
        device: &Device,
        dtype: DType,
        quantize: Option<crate::quant::Quantize>,
    ) -> Result<Self> {
        Self::load_within_quantized(path, device, dtype, available_memory(device), quantize)
    }

    fn load_within_quantized(
        path: &Path,
        device: &Device,
        dtype: DType,
        budget: Option<u64>,
        quantize: Option<crate::quant::Quantize>,
    ) -> Result<Self> {
        if crate::gguf::is_gguf(path) || (path.is_file() && path.extension().is_some_and(|e| e == "gguf")) {
            return Self::load_gguf(path, device, dtype, budget, quantize);
        }
        let dir = path;
        let config = ModelConfig::from_dir(dir)?;
        check_fits(dir, estimate_bytes(dir, dtype)?, dtype, budget)?;
        let (weights, quantized, fingerprint) = match quantize {
            None => {
                let weights = load_dir(dir, device, dtype)?;
                let fingerprint = fingerprint(&weights, &HashMap::new())?;
                (weights, HashMap::new(), fingerprint)
            }
            Some(kind) => {
                // one tensor at a time: its fingerprint part from the dense values, then blocks
                let (mut weights, mut quantized, mut parts) = (HashMap::new(), HashMap::new(), Fingerprint::default());
                for_each_tensor(dir, device, dtype, |name, t| {
                    parts.add(&name, &t)?;
                    if crate::quant::quantizable(&name, t.dims()) {
                        quantized.insert(name.clone(), crate::quant::QWeight::quantize(&name, &t, kind)?);
                    } else {
                        weights.insert(name, t);
                    }
                    Ok(())
                })?;
                (weights, quantized, parts.finish())
            }
        };
        let text =
            if dir.join("tokenizer.json").is_file() { Some(crate::text::TextModel::from_dir(dir)?) } else { None };
        Ok(Self {
            config,
            weights,
            device: device.clone(),
            dtype,
            source: dir.to_path_buf(),
            fingerprint,
            text,
            gguf: None,
            quantized,
            quantize,
        })
    }

    /// Bytes the base weights take on the device: dense tensors plus quantized blocks.
    pub fn weight_bytes(&self) -> u64 {
        let dense: u64 = self.weights.values().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
        dense + self.quantized.values().map(|q| q.bytes() as u64).sum::<u64>()
    }

    /// A base weight's value as `dtype`, dense or dequantized (a temporary); `None` if absent.
    pub fn weight_value(&self, name: &str) -> Result<Option<Tensor>> {
        match (self.weights.get(name), self.quantized.get(name)) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(q)) => Ok(Some(q.dequantize(self.dtype)?)),
            (None, None) => Ok(None),
        }
    }

    /// A GGUF file: header, tokenizer and every tensor's place checked before any is read, then
    /// each tensor dequantized to `dtype`.
    fn load_gguf(
        path: &Path,
        device: &Device,
        dtype: DType,
        budget: Option<u64>,
        quantize: Option<crate::quant::Quantize>,
    ) -> Result<Self> {
        let plan = crate::gguf::plan(path)?;
        check_fits(path, plan.bytes(dtype), dtype, budget)?;
        let text =
            crate::text::TextModel::from_json(&plan.origin.tokenizer_json, &plan.origin.tokenizer_config_json, path)?;
        let (weights, quantized) = crate::gguf::load_quantized(&plan, device, dtype, quantize)?;
        let fingerprint = fingerprint(&weights, &quantized)?;
        Ok(Self {
            config: plan.config,
            weights,
            device: device.clone(),
            dtype,
            source: path.to_path_buf(),
            fingerprint,
            text: Some(text),
            gguf: Some(plan.origin),
            quantized,
            quantize,
        })
    }
}

/// Refuses (with [`EngineError::OutOfMemory`]) weights of `need` bytes that will not fit in `budget`.
fn check_fits(path: &Path, need: u64, dtype: DType, budget: Option<u64>) -> Result<()> {
    let Some(budget) = budget else { return Ok(()) };
    // weights, plus a margin for rotary tables, activations and the first run's adapter
    let with_margin = need + need / 10 + (64 << 20);
    if with_margin > budget {
        let gb = |b: u64| b as f64 / 1e9;
        return Err(EngineError::OutOfMemory(format!(
            "{}: the weights take {:.2} GB as {dtype:?} ({:.2} GB with working room) and {:.2} GB is available; \
             choose a smaller model, or bf16 on a GPU",
            path.display(),
            gb(need),
            gb(with_margin),
            gb(budget)
        )));
    }
    Ok(())
}

/// FNV-1a over every tensor's name, shape and first and last 64 values as bf16 (so the
/// same weights loaded as f32 or bf16, on any device, give the same string). Cheap for any size.
/// Quantized weights take part dequantized, one at a time.
pub fn fingerprint(
    weights: &HashMap<String, Tensor>,
    quantized: &HashMap<String, crate::quant::QWeight>,
) -> Result<String> {
    let mut parts = Fingerprint::default();
    for (name, t) in weights {
        parts.add(name, t)?;
    }
    for (name, q) in quantized {
        if !weights.contains_key(name) {
            parts.add(name, &q.dequantize(DType::F32)?)?;
        }
    }
    Ok(parts.finish())
}

/// What [`fingerprint`] hashes, gathered tensor by tensor (in any order) as a model loads.
#[derive(Debug, Default)]
pub struct Fingerprint(std::collections::BTreeMap<String, Vec<u8>>);

impl Fingerprint {
    /// Adds a tensor: its name, shape and first and last 64 values as bf16.
    pub fn add(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let mut bytes = name.as_bytes().to_vec();
        for d in t.dims() {
            bytes.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let ends = [flat.narrow(0, 0, n.min(64))?, flat.narrow(0, n - n.min(64), n.min(64))?];
        for part in ends {
            for v in part.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                bytes.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        self.0.insert(name.to_string(), bytes);
        Ok(())
    }

    /// FNV-1a over the tensors in name order.
    pub fn finish(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for bytes in self.0.values() {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }
}
