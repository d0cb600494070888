//! Model loading: sharded folders, the memory check, and the hub path (cache layout, download)
//! against a stand-in hub server on loopback serving a generated preset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use candle_core::{DType, Device, Tensor};
use hearth_engine::hub::{resolve, HubOptions};
use hearth_engine::weights::estimate_bytes;
use hearth_engine::{BaseModel, EngineError};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hub-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny preset re-written with its weights split over two shards and an index.
fn sharded_copy(dir: &Path) -> PathBuf {
    let src = common::tiny().source.clone();
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn sharded_folder_loads_the_same_weights() {
    let dir = sharded_copy(&scratch("sharded").join("tiny"));
    let sharded = BaseModel::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sharded.fingerprint, common::tiny().fingerprint);
    assert_eq!(sharded.weights.len(), common::tiny().weights.len());
}

#[test]
fn memory_is_estimated_before_loading_and_too_little_is_refused() {
    let tiny = common::tiny();
    let actual: u64 = tiny.weights.values().map(|t| (t.elem_count() * 4) as u64).sum();
    assert_eq!(estimate_bytes(&tiny.source, DType::F32).unwrap(), actual);
    assert_eq!(estimate_bytes(&tiny.source, DType::BF16).unwrap(), actual / 2);
    let err = BaseModel::load_within(&tiny.source, &Device::Cpu, DType::F32, Some(actual)).unwrap_err();
    assert!(matches!(err, EngineError::OutOfMemory(_)), "{err}");
    assert!(err.to_string().contains("is available"), "{err}");
    BaseModel::load_within(&tiny.source, &Device::Cpu, DType::F32, Some(actual * 2 + (128 << 20))).unwrap();
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A minimal stand-in for the hub: `GET /api/models/OWNER/NAME/revision/REV` (file list) and
/// `GET /OWNER/NAME/resolve/REV/FILE` (with `Range`, `ETag`, `X-Repo-Commit`), serving
/// `repos[OWNER/NAME]` folders. Counts requests.
struct StandIn {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StandIn {
    fn start(repos: HashMap<String, PathBuf>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let repos = repos.clone();
                std::thread::spawn(move || serve(conn, &repos));
            }
        });
        Self { url, requests, stop }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn serve(mut conn: TcpStream, repos: &HashMap<String, PathBuf>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<(usize, Option<usize>)> = None; // bytes=START-[END]
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let (a, b) = r.trim().split_once('-').unwrap_or((r.trim(), ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    let respond = |conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += "\r\n";
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if parts.len() == 6 && parts[0] == "api" && parts[1] == "models" && parts[4] == "revision" {
        if let Some(dir) = repos.get(&format!("{}/{}", parts[2], parts[3])) {
            let siblings: Vec<serde_json::Value> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| serde_json::json!({"rfilename": e.unwrap().file_name().to_string_lossy()}))
                .collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            return respond(
                &mut conn,
                "200 OK",
                &[("Content-Type".into(), "application/json".into())],
                body.as_bytes(),
            );
        }
    } else if parts.len() == 5 && parts[2] == "resolve" {
        if let Some(dir) = repos.get(&format!("{}/{}", parts[0], parts[1])) {
            if let Ok(mut f) = std::fs::File::open(dir.join(parts[4])) {
                let mut data = Vec::new();
                f.read_to_end(&mut data).unwrap();
                let etag = format!(
                    "\"{:016x}{:08x}\"",
                    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)),
                    data.len()
                );
                let mut headers = vec![("ETag".to_string(), etag), ("X-Repo-Commit".to_string(), COMMIT.to_string())];
                return match range {
                    Some((start, end)) => {
                        let start = start.min(data.len());
                        let end = end.map_or(data.len(), |e| (e + 1).min(data.len())).max(start);
                        let body = &data[start..end];
                        headers.push((
                            "Content-Range".into(),
                            format!("bytes {start}-{}/{}", (start + body.len()).saturating_sub(1), data.len()),
                        ));
                        respond(&mut conn, "206 Partial Content", &headers, body)
                    }
                    None => respond(&mut conn, "200 OK", &headers, &data),
                };
            }
        }
    }
    respond(&mut conn, "404 Not Found", &[("X-Error-Code".into(), "RepoNotFound".into())], b"Repository not found")
}

#[test]
fn hub_download_fills_the_python_cache_layout_and_then_works_offline() {
    let root = scratch("download");
    let remote_sharded = sharded_copy(&root.join("remote").join("tiny-sharded"));
    let repos = HashMap::from([
        ("hearth/tiny".to_string(), common::tiny().source.clone()),
        ("hearth/tiny-sharded".to_string(), remote_sharded),
    ]);
    let server = StandIn::start(repos);
    let opts = HubOptions {
        endpoint: server.url.clone(),
        cache_dir: root.join("hf-cache"),
        token: None,
        revision: "main".into(),
        offline: false,
    };

    for repo in ["hearth/tiny", "hearth/tiny-sharded"] {
        let dir = resolve(repo, &opts).unwrap();
        let folder = format!("models--{}", repo.replace('/', "--"));
        assert_eq!(dir, opts.cache_dir.join(&folder).join("snapshots").join(COMMIT), "{repo}");
        assert_eq!(std::fs::read_to_string(opts.cache_dir.join(&folder).join("refs/main")).unwrap(), COMMIT);
        assert!(std::fs::read_dir(opts.cache_dir.join(&folder).join("blobs")).unwrap().count() >= 4);
        let base = BaseModel::load(&dir, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(base.fingerprint, common::tiny().fingerprint, "{repo}: downloaded weights differ");
        assert!(base.text.is_some(), "{repo}: tokenizer files come along");
    }

    // Cached now: no request reaches the server, even with the network allowed.
    let before = server.requests.load(Ordering::SeqCst);
    resolve("hearth/tiny", &opts).unwrap();
    assert_eq!(server.requests.load(Ordering::SeqCst), before, "a cached model must not touch the network");

    // Offline, an uncached repo is a clear error; so is an unknown repo online.
    let offline = HubOptions { offline: true, ..opts.clone() };
    let err = resolve("hearth/other", &offline).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    let err = resolve("nobody/nothing", &opts).unwrap_err();
    assert!(err.to_string().contains("not found on") && err.is_user_error(), "{err}");
    let err = resolve("not a repo id or folder", &opts).unwrap_err();
    assert!(err.to_string().contains("no such folder"), "{err}");
    // A local folder is used as it is.
    assert_eq!(resolve(common::tiny().source.to_str().unwrap(), &opts).unwrap(), common::tiny().source);
}

/// `owner/name:file.gguf` downloads that one file into the cache (and nothing else), loads as a
/// model, and is then served from the cache without the network.
#[test]
fn a_gguf_file_of_a_hub_repo_is_downloaded_once_and_loads() {
    let root = scratch("gguf");
    let remote = root.join("remote");
    let session = hearth_engine::Run::new(common::tiny(), hearth_api::TrainingConfig::default()).unwrap();
    let export = session.save_state(&root.join("export"), hearth_api::CheckpointKind::GgufF16).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::copy(export.join("model.gguf"), remote.join("tiny-f16.gguf")).unwrap();
    std::fs::write(remote.join("README.md"), "not downloaded").unwrap();
    let server = StandIn::start(HashMap::from([("hearth/tiny-gguf".to_string(), remote)]));
    let opts = HubOptions {
        endpoint: server.url.clone(),
        cache_dir: root.join("hf-cache"),
        token: None,
        revision: "main".into(),
        offline: false,
    };

    let path = resolve("hearth/tiny-gguf:tiny-f16.gguf", &opts).unwrap();
    assert_eq!(path, opts.cache_dir.join("models--hearth--tiny-gguf/snapshots").join(COMMIT).join("tiny-f16.gguf"));
    assert!(!path.with_file_name("README.md").exists(), "only the named file is fetched");
    let base = BaseModel::load(&path, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(base.config.hidden_size, common::tiny().config.hidden_size);
    assert!(base.gguf.is_some());

    let before = server.requests.load(Ordering::SeqCst);
    let offline = HubOptions { offline: true, ..opts.clone() };
    assert_eq!(resolve("hearth/tiny-gguf:tiny-f16.gguf", &offline).unwrap(), path);
    assert_eq!(server.requests.load(Ordering::SeqCst), before, "a cached file must not touch the network");
    let err = resolve("hearth/tiny-gguf:other.gguf", &offline).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    let err = resolve("hearth/tiny-gguf:missing.gguf", &opts).unwrap_err();
    assert!(err.to_string().contains("missing.gguf: not found on") && err.is_user_error(), "{err}");
}
