//! `save_state` / `load_state`: checkpoints that Hugging Face tools read.
//!
//! A checkpoint is a folder, published atomically ([`crate::fsutil::publish_dir`]):
//! - `adapter`: `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout and key
//!   names (`PeftModel.from_pretrained` loads it), plus `hearth.json`;
//! - `state`: the adapter files (or, for full fine-tuning, `model.safetensors`), the AdamW
//!   moments in `optimizer.safetensors` (`NAME.exp_avg`, `NAME.exp_avg_sq`, and `NAME.master`,
//!   the f32 master copy of a bf16/f16 weight under full fine-tuning) and `hearth.json`
//!   with the step, the sampling RNG, the training config and the format version: loading it
//!   resumes bit-exactly;
//! - `merged`: a complete model folder in the base model's layout and dtype (W + alpha/r · B A),
//!   with the base's `config.json` and tokenizer files (for a GGUF base, the ones its metadata
//!   stands for), loadable by transformers (and by hearth as a base model);
//! - `gguf_f16`, `gguf_q8_0`, `gguf_q4_k_m`: the merged model as one `model.gguf` with the
//!   tokenizer and chat template, which llama.cpp (and Ollama, LM Studio) runs, and hearth loads
//!   as a base model.
//!
//! `hearth.json` also records the base model's fingerprint; loading a checkpoint made for another
//! base, with other shapes, or with a truncated or corrupt file is refused with
//! [`EngineError::Checkpoint`] and changes nothing. A PEFT adapter folder written by Python (no
//! `hearth.json`) loads too.

use super::Run;
use crate::error::{EngineError, Result};
use crate::fsutil::{publish_dir, sync_file, write_json};
use crate::gguf::export::GgufType;
use crate::gguf::file::MetaValue;
use crate::optim::Moments;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};
use hearth_api::{CheckpointKind, LoraConfig, TargetModule, TrainingConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The `format` field of `hearth.json`.
pub const FORMAT: &str = "hearth-checkpoint";
/// The newest `format_version` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// `hearth.json`: what a checkpoint is and what it was made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// What was saved.
    pub kind: CheckpointKind,
    /// Optimizer steps taken when saved.
    pub step: u64,
    /// The run's training config (LoRA shape or full).
    pub training: TrainingConfig,
    /// Fingerprint of the base model's weights.
    pub base_fingerprint: String,
    /// `model_type` of the base model.
    pub base_model_type: String,
    /// The sampling RNG (state checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Rng>,
}

/// The file name of a GGUF export inside its checkpoint folder.
pub const GGUF_FILE: &str = "model.gguf";

/// What `load_state` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// `State` resumed everything; `Adapter` replaced the weights only (optimizer reset).
    pub kind: CheckpointKind,
    /// The run's step after loading.
    pub step: u64,
    /// True for a folder written by PEFT (no `hearth.json`).
    pub peft: bool,
}

fn bad(dir: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Checkpoint { path: dir.to_path_buf(), reason: reason.into() }
}

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    // a failed write (a full disk) is the machine's fault, not the caller's: keep it an I/O error
    candle_core::safetensors::save(tensors, path).map_err(|e| match crate::error::io_error_in(&e) {
        Some(source) => EngineError::Io { op: "writing", path: path.to_path_buf(), source },
        None => EngineError::Weights(format!("{}: {e}", path.display())),
    })?;
    sync_file(path)
}

fn load_tensors(dir: &Path, file: &str) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(file);
    if !path.is_file() {
        return Err(bad(dir, format!("{file} is missing")));
    }
    candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| bad(dir, format!("{file} is unreadable (truncated or corrupt?): {e}")))
}

/// PEFT's `adapter_config.json` for a LoRA config.
fn adapter_config(l: &LoraConfig, base_model: &str) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": l.rank,
        "lora_alpha": l.alpha,
        "lora_dropout": 0.0,
        "target_modules": l.target_modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Reads a PEFT `adapter_config.json`, refusing what hearth's LoRA does not do.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| bad(dir, format!("adapter_config.json: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(dir, format!("adapter_config.json: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type").and_then(|t| t.as_str()).filter(|t| *t != "LORA") {
        return Err(bad(dir, format!("peft_type {t} is not supported (LORA only)")));
    }
    for (key, what) in
        [("use_rslora", "rank-stabilised LoRA"), ("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")]
    {
        if field(key).and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad(dir, format!("{what} ({key}: true) is not supported")));
        }
    }
    if let Some(b) = field("bias").and_then(|b| b.as_str()).filter(|b| *b != "none") {
        return Err(bad(dir, format!("bias = {b:?} is not supported (only \"none\")")));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key).and_then(|x| x.as_object()).is_some_and(|o| !o.is_empty()) {
            return Err(bad(dir, format!("{key} (per-module ranks) is not supported")));
        }
    }
    for key in ["layers_to_transform", "modules_to_save"] {
        if field(key).is_some() {
            return Err(bad(dir, format!("{key} is not supported")));
        }
    }
    let rank =
        field("r").and_then(|r| r.as_u64()).ok_or_else(|| bad(dir, "adapter_config.json has no integer `r`"))? as usize;
    let alpha = field("lora_alpha").and_then(|a| a.as_f64()).unwrap_or(8.0);
    let target_modules = match field("target_modules") {
        Some(serde_json::Value::String(s)) if s == "all-linear" => TargetModule::ALL.to_vec(),
        Some(serde_json::Value::Array(names)) => {
            let mut out = Vec::new();
            for n in names {
                let name = n.as_str().unwrap_or_default();
                out.push(
                    TargetModule::from_name(name)
                        .ok_or_else(|| bad(dir, format!("target module {name:?} is not a projection hearth adapts")))?,
                );
            }
            out.sort_by_key(|m| TargetModule::EVERY.iter().position(|x| x == m));
            out
        }
        other => return Err(bad(dir, format!("target_modules {other:?} is not a list of projection names"))),
    };
    Ok(LoraConfig { rank, alpha, target_modules, seed: 0 })
}

/// Reads `hearth.json`, if the folder has one.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join("hearth.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| bad(dir, format!("hearth.json: {e}")))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(dir, format!("hearth.json is corrupt: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(dir, format!("hearth.json has format {:?}, expected {FORMAT:?}", m.format)));
    }
    if m.format_version > FORMAT_VERSION {
        return Err(bad(
            dir,
            format!(
                "format version {} is newer than this hearth reads ({FORMAT_VERSION}); upgrade hearth",
                m.format_version
            ),
        ));
    }
    Ok(Some(m))
}

/// The training config a checkpoint folder was made with (hearth checkpoint or PEFT adapter).
pub fn checkpoint_training_config(dir: &Path) -> Result<TrainingConfig> {
    match read_manifest(dir)? {
        Some(m) if m.kind == CheckpointKind::Merged => {
            Err(bad(dir, "a merged checkpoint is a model folder: load it as a base model"))
        }
        Some(m) if m.kind.is_gguf() => {
            Err(bad(dir, format!("a GGUF export is a model: load {GGUF_FILE} as a base model")))
        }
        Some(m) => Ok(m.training),
        None if dir.join("adapter_config.json").is_file() => Ok(TrainingConfig::Lora(read_adapter_config(dir)?)),
        None => Err(bad(dir, "neither hearth.json nor adapter_config.json: not a checkpoint")),
    }
}

impl Run {
    /// Writes a checkpoint of `kind` to `dir` (replacing one already there, atomically) and
    /// returns `dir`.
    pub fn save_state(&self, dir: &Path, kind: CheckpointKind) -> Result<PathBuf> {
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            kind,
            step: self.step(),
            training: self.training.clone(),
            base_fingerprint: self.base.fingerprint.clone(),
            base_model_type: self.base.config.family.model_type().into(),
            rng: (kind == CheckpointKind::State)
                .then(|| self.rng.lock().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())),
        };
        let params: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        publish_dir(dir, true, |tmp| {
            match (kind, &self.training) {
                (CheckpointKind::Adapter | CheckpointKind::State, TrainingConfig::Lora(l)) => {
                    write_json(
                        &tmp.join("adapter_config.json"),
                        &adapter_config(l, &self.base.source.to_string_lossy()),
                    )?;
                    save_tensors(&params, &tmp.join("adapter_model.safetensors"))?;
                }
                (CheckpointKind::Adapter, TrainingConfig::Full) => {
                    return Err(EngineError::InvalidParam {
                        field: "kind",
                        value: "adapter".into(),
                        reason: "a full fine-tuning run has no adapter; save `state` or `merged`",
                    })
                }
                (CheckpointKind::State, TrainingConfig::Full) => save_tensors(&params, &tmp.join("model.safetensors"))?,
                (CheckpointKind::Merged, _) => self.write_merged(tmp)?,
                (CheckpointKind::GgufF16, _) => self.write_gguf(&tmp.join(GGUF_FILE), GgufType::F16)?,
                (CheckpointKind::GgufQ8, _) => self.write_gguf(&tmp.join(GGUF_FILE), GgufType::Q8_0)?,
                (CheckpointKind::GgufQ4KM, _) => self.write_gguf(&tmp.join(GGUF_FILE), GgufType::Q4KM)?,
            }
            if kind == CheckpointKind::State {
                let mut moments = HashMap::new();
                for (name, Moments { m, v, master }) in &self.optim.moments {
                    moments.insert(format!("{name}.exp_avg"), m.to_device(&Device::Cpu)?);
                    moments.insert(format!("{name}.exp_avg_sq"), v.to_device(&Device::Cpu)?);
                    if let Some(master) = master {
                        moments.insert(format!("{name}.master"), master.to_device(&Device::Cpu)?);
                    }
                }
                save_tensors(&moments, &tmp.join("optimizer.safetensors"))?;
            }
            let manifest = serde_json::to_value(&manifest).map_err(|e| EngineError::Internal(e.to_string()))?;
            write_json(&tmp.join("hearth.json"), &manifest)
        })?;
        Ok(dir.to_path_buf())
    }

    /// Full weights with this run's training applied, in the base model's names and dtype.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(self.base.weights.len());
        match &self.training {
            TrainingConfig::Full => {
                for (name, var) in &self.params {
                    out.insert(name.clone(), var.as_tensor().to_dtype(self.base.dtype)?);
                }
            }
            TrainingConfig::Lora(l) => {
                let scale = l.alpha / l.rank as f64;
                let by_name: HashMap<&str, &Tensor> =
                    self.params.iter().map(|(n, v)| (n.as_str(), v.as_tensor())).collect();
                for (name, a) in &by_name {
                    let Some(prefix) =
                        name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight"))
                    else {
                        continue;
                    };
                    // the run's own parameters (loading fills them by name): every A has its B, and
                    // every base weight it adapts was there when the model was built
                    let b = by_name
                        .get(format!("base_model.model.{prefix}.lora_B.weight").as_str())
                        .ok_or_else(|| EngineError::Internal(format!("lora_B of {prefix} is missing")))?;
                    let w_name = format!("{prefix}.weight");
                    // LoRA on a tied lm_head: the merged model gets an lm_head of its own
                    let tied_head = prefix == "lm_head" && self.base.config.tie_word_embeddings;
                    let w_source = if tied_head { "model.embed_tokens.weight" } else { w_name.as_str() };
                    let w = self
                        .base
                        .weight_value(w_source)?
                        .ok_or_else(|| EngineError::Internal(format!("`{w_source}` is missing")))?;
                    let delta = (b.matmul(a)? * scale)?; // (out, r) @ (r, in) -> (out, in)
                    let merged = (w.to_dtype(delta.dtype())? + delta)?.to_dtype(self.base.dtype)?;
                    out.insert(w_name, merged);
                }
            }
        }
        for (name, t) in &self.base.weights {
            out.entry(name.clone()).or_insert_with(|| t.clone());
        }
        // a quantized base merges into its dequantized values
        for (name, q) in &self.base.quantized {
            if !out.contains_key(name) {
                out.insert(name.clone(), q.dequantize(self.base.dtype)?);
            }
        }
        Ok(out)
    }

    /// Whether the merged model unties `lm_head` (LoRA on a tied output projection).
    fn unties_head(&self) -> bool {
        self.base.config.tie_word_embeddings
            && matches!(&self.training, TrainingConfig::Lora(l) if l.target_modules.contains(&TargetModule::LmHead))
    }

    fn write_merged(&self, dir: &Path) -> Result<()> {
        let weights: HashMap<String, Tensor> = self
            .merged_weights()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        save_tensors(&weights, &dir.join("model.safetensors"))?;
        let untie = |mut config: serde_json::Value| {
            if self.unties_head() {
                config["tie_word_embeddings"] = json!(false);
            }
            config
        };
        if let Some(g) = &self.base.gguf {
            // a GGUF base: the Hugging Face files its metadata stands for
            write_json(&dir.join("config.json"), &untie(g.config_json.clone()))?;
            write_json(&dir.join("tokenizer.json"), &g.tokenizer_json)?;
            return write_json(&dir.join("tokenizer_config.json"), &g.tokenizer_config_json);
        }
        let src = &self.base.source;
        for file in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let from = src.join(file);
            if from.is_file() {
                let to = dir.join(file);
                std::fs::copy(&from, &to).map_err(EngineError::io("copying", &from))?;
                sync_file(&to)?;
            }
        }
        if !dir.join("config.json").is_file() {
            return Err(EngineError::Weights(format!(
                "{} has no config.json to copy into the merged model",
                src.display()
            )));
        }
        if self.unties_head() {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(EngineError::io("reading", &path))?;
            let config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::Weights(format!("{}: {e}", path.display())))?;
            write_json(&path, &untie(config))?;
        }
        Ok(())
    }

    /// The merged model as GGUF, with the tokenizer metadata of the base (its GGUF's, or built
    /// from its `tokenizer.json`).
    fn write_gguf(&self, path: &Path, ty: GgufType) -> Result<()> {
        let meta = self.gguf_metadata()?;
        let weights = self.merged_weights()?;
        let mut config = self.base.config.clone();
        config.tie_word_embeddings &= !self.unties_head();
        crate::gguf::export::write(path, &config, &weights, &meta, ty)
    }

    fn gguf_metadata(&self) -> Result<Vec<(String, MetaValue)>> {
        if let Some(g) = &self.base.gguf {
            return Ok(g.metadata.clone());
        }
        let refuse = |reason: String| EngineError::InvalidParam {
            field: "kind",
            value: format!("gguf ({reason})"),
            reason: "GGUF export needs a byte-level BPE tokenizer that llama.cpp knows",
        };
        let text = self
            .base
            .text
            .as_ref()
            .ok_or_else(|| refuse(format!("{} has no tokenizer.json", self.base.source.display())))?;
        let mut vocab =
            crate::gguf::tokenizer::GgufVocab::from_hf_json(&text.tokenizer_json()?, self.base.config.vocab_size)
                .map_err(refuse)?;
        let (bos, eos) = text.special_tokens();
        vocab.bos = bos.and_then(|b| text.token_to_id(b));
        vocab.eos = eos.and_then(|e| text.token_to_id(e)).or_else(|| self.base.config.eos_token_ids.first().copied());
        let mut meta = vocab.to_metadata();
        if let Some(t) = text.chat_template() {
            meta.push(("tokenizer.chat_template".into(), MetaValue::Str(t.to_string())));
        }
        let name = self.base.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        meta.push(("general.name".into(), MetaValue::Str(name)));
        Ok(meta)
    }

    /// Loads a checkpoint into this run: a hearth `state` (weights, optimizer, step, RNG —
    /// exact resume) or `adapter`, or a PEFT adapter folder (weights only; optimizer and step
    /// reset). The checkpoint must be for this base model and this run's shapes; on any error
    /// nothing changes. Accumulated gradients are dropped.
    pub fn load_state(&mut self, dir: &Path) -> Result<Loaded> {
        self.load_checkpoint(dir, true)
    }

    /// Loads a checkpoint's weights only: the optimizer starts afresh (no moments, step 0), as
    /// Tinker's `load_weights` without `optimizer` does.
    pub fn load_weights(&mut self, dir: &Path) -> Result<Loaded> {
        self.load_checkpoint(dir, false)
    }

    fn load_checkpoint(&mut self, dir: &Path, optimizer: bool) -> Result<Loaded> {
        if !dir.is_dir() {
            return Err(bad(dir, "no such checkpoint folder"));
        }
        let manifest = read_manifest(dir)?;
        let training = checkpoint_training_config(dir)?;
        if let Some(m) = &manifest {
            if m.base_fingerprint != self.base.fingerprint {
                return Err(bad(
                    dir,
                    format!(
                        "it was made for another base model (fingerprint {}, model_type {}); this run's base is {} ({})",
                        m.base_fingerprint,
                        m.base_model_type,
                        self.base.fingerprint,
                        self.base.source.display()
                    ),
                ));
            }
        }
        let same_shape = match (&training, &self.training) {
            (TrainingConfig::Lora(a), TrainingConfig::Lora(b)) => {
                let set = |l: &LoraConfig| l.target_modules.iter().copied().collect::<std::collections::BTreeSet<_>>();
                a.rank == b.rank && a.alpha == b.alpha && set(a) == set(b)
            }
            (TrainingConfig::Full, TrainingConfig::Full) => true,
            _ => false,
        };
        if !same_shape {
            return Err(bad(
                dir,
                format!(
                    "it holds {training:?}, this run is {:?}; create a run from the checkpoint instead",
                    self.training
                ),
            ));
        }
        let file = match training {
            TrainingConfig::Lora(_) => "adapter_model.safetensors",
            TrainingConfig::Full => "model.safetensors",
        };
        let tensors = load_tensors(dir, file)?;
        let expected: BTreeMap<&str, &[usize]> = self.params.iter().map(|(n, v)| (n.as_str(), v.dims())).collect();
        for name in tensors.keys() {
            if !expected.contains_key(name.as_str()) {
                return Err(bad(dir, format!("{file} has `{name}`, which this run does not train")));
            }
        }
        let kind = manifest.as_ref().map_or(CheckpointKind::Adapter, |m| m.kind);
        let (moments, step, rng) = match (&manifest, kind) {
            (Some(m), CheckpointKind::State) if optimizer => {
                let raw = load_tensors(dir, "optimizer.safetensors")?;
                let mut moments = BTreeMap::new();
                for (name, dims) in &expected {
                    let (m_t, v_t) = (raw.get(&format!("{name}.exp_avg")), raw.get(&format!("{name}.exp_avg_sq")));
                    // the f32 master copy of a bf16/f16 weight (absent: it starts from the weight)
                    let master = raw.get(&format!("{name}.master"));
                    if master.is_some_and(|t| t.dims() != *dims) {
                        return Err(bad(
                            dir,
                            format!("optimizer.safetensors has a master copy of the wrong shape for `{name}`"),
                        ));
                    }
                    match (m_t, v_t) {
                        (Some(mt), Some(vt)) if mt.dims() == *dims && vt.dims() == *dims => {
                            let dev = &self.base.device;
                            let master = master.map(|t| t.to_dtype(DType::F32)?.to_device(dev)).transpose()?;
                            moments.insert(
                                name.to_string(),
                                Moments { m: mt.to_device(dev)?, v: vt.to_device(dev)?, master },
                            );
                        }
                        (None, None) if m.step == 0 => {}
                        _ => {
                            return Err(bad(
                                dir,
                                format!("optimizer.safetensors lacks moments of the right shape for `{name}`"),
                            ))
                        }
                    }
                }
                let masters = moments.values().filter(|m| m.master.is_some()).count();
                if raw.len() != 2 * moments.len() + masters {
                    return Err(bad(dir, "optimizer.safetensors has moments for parameters this run does not train"));
                }
                (moments, m.step, m.rng.clone())
            }
            _ => (BTreeMap::new(), 0, None),
        };
        self.set_parameters(&tensors).map_err(|e| bad(dir, e.to_string()))?;
        // Nothing below can fail: the run is now the checkpoint's.
        self.optim.moments = moments;
        self.optim.step = step;
        if let Some(rng) = rng {
            if let Ok(mut r) = self.rng.lock() {
                *r = rng;
            }
        }
        self.grads.clear();
        // a weights-only load is an adapter's, whatever the folder held
        let kind = if optimizer { kind } else { CheckpointKind::Adapter };
        Ok(Loaded { kind, step, peft: manifest.is_none() })
    }

    /// A new run made from a checkpoint folder, with the checkpoint's training config.
    pub fn from_checkpoint(base: std::sync::Arc<crate::weights::BaseModel>, dir: &Path) -> Result<Self> {
        let training = checkpoint_training_config(dir)?;
        let mut s = Run::new(base, training)?;
        s.load_state(dir)?;
        Ok(s)
    }

    /// A new run made from a checkpoint folder's weights, with a fresh optimizer.
    pub fn from_checkpoint_weights(base: std::sync::Arc<crate::weights::BaseModel>, dir: &Path) -> Result<Self> {
        let training = checkpoint_training_config(dir)?;
        let mut s = Run::new(base, training)?;
        s.load_weights(dir)?;
        Ok(s)
    }

    /// A copy of this run's current weights in a new run (fresh optimizer): a sampler's
    /// snapshot that later steps of this run do not change.
    pub fn snapshot(&self) -> Result<Self> {
        let mut s = Run::new(self.base.clone(), self.training.clone())?;
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| v.as_tensor().copy().map(|t| (n.clone(), t)))
            .collect::<std::result::Result<_, _>>()?;
        s.set_parameters(&tensors)?;
        Ok(s)
    }
}
