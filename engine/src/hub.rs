//! Finding a model: a local folder or `.gguf` file, a hub repo (`owner/name`) or one GGUF file
//! of a hub repo (`owner/name:file.gguf`), through the Hugging Face hub cache shared with Python
//! (`~/.cache/huggingface/hub`, `HF_HUB_CACHE`, `HF_HOME`), or a download through `hf-hub` from
//! an endpoint that can be overridden (`HF_ENDPOINT`; tests serve a generated preset from a
//! stand-in server on loopback).
//!
//! A repo id is resolved cache first: when its snapshot already holds `config.json` and every
//! weight file, nothing touches the network. Otherwise the repo's file list is fetched and the
//! files a model folder needs (config, safetensors weights, tokenizer files) are downloaded into
//! the cache layout Python uses (`models--OWNER--NAME/{blobs,snapshots/COMMIT,refs/REVISION}`).

use crate::error::{EngineError, Result};
use crate::weights::safetensors_files;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Where and how to reach the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Base URL, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// The hub cache folder (Python's layout).
    pub cache_dir: PathBuf,
    /// Access token for gated or private repos.
    pub token: Option<String>,
    /// Branch, tag or commit.
    pub revision: String,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// From the environment, as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_HUB_CACHE`, then
    /// `HF_HOME/hub`, then `~/.cache/huggingface/hub`; `HF_TOKEN` or `HF_HOME/token`;
    /// `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let user = var("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| user.join(".cache")).join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(home.join("token")).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            cache_dir,
            token,
            revision: "main".into(),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }
}

/// Files a model folder may have besides its weights.
const OPTIONAL: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// True when `dir` holds `config.json` and every weight file it names.
fn complete(dir: &Path) -> bool {
    dir.join("config.json").is_file() && safetensors_files(dir).is_ok_and(|files| files.iter().all(|f| f.is_file()))
}

/// The path of a model spec: an existing local folder or file (a `.gguf`) as is, a hub repo id
/// (`owner/name`: its folder), or a GGUF file of a hub repo (`owner/name:file.gguf`: that file),
/// from the cache, downloading what is missing.
pub fn resolve(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() || local.is_file() {
        return Ok(local.to_path_buf());
    }
    if let Some((repo_id, file)) = spec.split_once(':').filter(|(r, f)| looks_like_repo_id(r) && f.ends_with(".gguf")) {
        return resolve_file(repo_id, file, opts);
    }
    if !looks_like_repo_id(spec) {
        return Err(EngineError::Config {
            path: spec.into(),
            reason: "no such folder or file, and not a hub repo id (owner/name, or owner/name:file.gguf)".into(),
        });
    }
    let repo = Repo::with_revision(spec.to_string(), RepoType::Model, opts.revision.clone());
    if let Some(snapshot) = cached_snapshot(&repo, opts) {
        return Ok(snapshot);
    }
    if opts.offline {
        return Err(EngineError::Config {
            path: spec.into(),
            reason: format!("not in the hub cache {} and HF_HUB_OFFLINE is set", opts.cache_dir.display()),
        });
    }
    download(spec, &repo, opts)
}

/// One file of a hub repo (a GGUF model), from the cache or downloaded into it.
fn resolve_file(repo_id: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, opts.revision.clone());
    if let Some(path) = Cache::new(opts.cache_dir.clone()).repo(repo.clone()).get(file) {
        return Ok(path);
    }
    let spec = format!("{repo_id}:{file}");
    if opts.offline {
        return Err(EngineError::Config {
            path: spec,
            reason: format!("not in the hub cache {} and HF_HUB_OFFLINE is set", opts.cache_dir.display()),
        });
    }
    let api = api(&spec, opts)?.repo(repo);
    api.get(file).map_err(|e| fail(&spec, file, opts, e))
}

fn api(spec: &str, opts: &HubOptions) -> Result<hf_hub::api::sync::Api> {
    ApiBuilder::new()
        .with_endpoint(opts.endpoint.clone())
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| EngineError::Download(format!("{spec}: {e}")))
}

/// A download error: not found (401/403/404) is the caller's mistake, the rest a download failure.
fn fail(spec: &str, file: &str, opts: &HubOptions, e: hf_hub::api::sync::ApiError) -> EngineError {
    let status = match &e {
        hf_hub::api::sync::ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            _ => None,
        },
        _ => None,
    };
    match status {
        Some(401 | 403 | 404) => EngineError::Config {
            path: spec.into(),
            reason: format!(
                "{file}: not found on {} (HTTP {}); check the repo id and revision, or set HF_TOKEN for a gated repo",
                opts.endpoint,
                status.unwrap_or(0)
            ),
        },
        _ => EngineError::Download(format!("{spec}/{file} from {}: {e}", opts.endpoint)),
    }
}

/// The cached snapshot of `repo` if it is complete.
fn cached_snapshot(repo: &Repo, opts: &HubOptions) -> Option<PathBuf> {
    let config = Cache::new(opts.cache_dir.clone()).repo(repo.clone()).get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    complete(&dir).then_some(dir)
}

fn download(spec: &str, repo: &Repo, opts: &HubOptions) -> Result<PathBuf> {
    let api = api(spec, opts)?.repo(repo.clone());
    let fail = |file: &str, e: hf_hub::api::sync::ApiError| fail(spec, file, opts, e);
    let info = api.info().map_err(|e| fail("repo info", e))?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let config = api.get("config.json").map_err(|e| fail("config.json", e))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| EngineError::Download(format!("{spec}: odd cache path")))?;
    if names.contains(&"model.safetensors") {
        api.get("model.safetensors").map_err(|e| fail("model.safetensors", e))?;
    } else if names.contains(&"model.safetensors.index.json") {
        api.get("model.safetensors.index.json").map_err(|e| fail("model.safetensors.index.json", e))?;
        for shard in safetensors_files(&dir)? {
            let name = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            api.get(&name).map_err(|e| fail(&name, e))?;
        }
    } else {
        return Err(EngineError::Config {
            path: spec.into(),
            reason: "the repo has no safetensors weights (model.safetensors or an index); pytorch_model.bin is not supported".into(),
        });
    }
    for file in OPTIONAL.iter().filter(|f| names.contains(f)) {
        api.get(file).map_err(|e| fail(file, e))?;
    }
    Ok(dir)
}
