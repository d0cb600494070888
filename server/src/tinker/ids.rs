//! Tinker's ids and hearth's: sessions, models (`S:train:N` ↔ run `S-train-N`), `tinker://`
//! checkpoint paths, and the run metadata Tinker keeps beside a run. Every mapping is the
//! caller's: a user's model `S:train:N` is the run `USER/S-train-N`; the admin names it
//! `USER/S:train:N`.

use super::*;

/// A session id of ours: letters and digits.
pub(super) fn is_session(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A session id the caller may use: well formed (else a clear 400), and not another user's
/// (that answers as a session that does not exist).
pub(super) fn check_session(app: &App, caller: &Caller, s: &str) -> Result<(), ApiError> {
    if !is_session(s) {
        return Err(ApiError::invalid(format!("session_id {s:?}: not a session of this server")));
    }
    match lock(&app.tinker.sessions).get(s) {
        Some(owner) if owner != caller && !caller.is_admin() => {
            Err(ApiError::not_found(format!("no session {s:?} on this server")))
        }
        _ => Ok(()),
    }
}

/// Session and number of a model id's two halves (`S` and `N` of `S:train:N` or `S-train-N`).
pub(super) fn model_parts((sess, n): (&str, &str)) -> bool {
    is_session(sess) && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
}

/// The hearth run (its id in the server) that `caller`'s Tinker model id names.
pub(super) fn run_of(caller: &Caller, model_id: &str) -> Result<String, ApiError> {
    let (user, model) = match model_id.split_once('/') {
        Some((u, m)) if caller.is_admin() => (Some(u), m),
        _ => (None, model_id),
    };
    let run = match model.split_once(":train:") {
        Some((sess, n)) if model_parts((sess, n)) => format!("{sess}-train-{n}"),
        Some(_) => return Err(ApiError::invalid(format!("model_id {model_id:?}: expected <session>:train:<n>"))),
        None => model.to_string(),
    };
    check_name("model_id", &run)?;
    match user {
        Some(u) => check_user_name(u).map(|()| format!("{u}/{run}")),
        None => Ok(caller.run_id(&run)),
    }
}

/// The Tinker model id by which `caller` knows hearth run `run`.
pub(super) fn model_of(caller: &Caller, run: &str) -> String {
    let seen = caller.view(run).unwrap_or_default();
    let (user, name) = match seen.split_once('/') {
        Some((u, n)) => (Some(u), n),
        None => (None, seen.as_str()),
    };
    let model = match name.rsplit_once("-train-") {
        Some((sess, n)) if model_parts((sess, n)) => format!("{sess}:train:{n}"),
        _ => name.to_string(),
    };
    match user {
        Some(u) => format!("{u}/{model}"),
        None => model,
    }
}

/// A checkpoint's kinds in Tinker's paths.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum CkKind {
    Weights,
    Sampler,
}

impl CkKind {
    pub(super) fn dir(self) -> &'static str {
        match self {
            CkKind::Weights => "weights",
            CkKind::Sampler => "sampler_weights",
        }
    }
    /// The hearth checkpoint name of Tinker name `name`.
    pub(super) fn hearth_name(self, name: &str) -> String {
        match self {
            CkKind::Weights => name.to_string(),
            CkKind::Sampler => format!("sampler-{name}"),
        }
    }
}

/// `caller`'s `tinker://<model>/<weights|sampler_weights>/<name>` → (run, kind, Tinker name).
pub(super) fn parse_path(caller: &Caller, path: &str) -> Result<(String, CkKind, String), ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "path {path:?}: expected tinker://<model_id>/weights/<name> or tinker://<model_id>/sampler_weights/<name>"
        ))
    };
    let rest = path.strip_prefix("tinker://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (model, kind, name) = match parts[..] {
        [model, kind, name] => (model.to_string(), kind, name),
        [user, model, kind, name] if caller.is_admin() => (format!("{user}/{model}"), kind, name),
        _ => return Err(bad()),
    };
    let kind = match kind {
        "weights" => CkKind::Weights,
        "sampler_weights" => CkKind::Sampler,
        _ => return Err(bad()),
    };
    check_name("checkpoint name", name)?;
    Ok((run_of(caller, &model)?, kind, name.to_string()))
}

/// The folder of `caller`'s Tinker checkpoint path, which must exist.
pub(super) fn checkpoint_dir(app: &App, caller: &Caller, path: &str) -> Result<std::path::PathBuf, ApiError> {
    let (run, kind, name) = parse_path(caller, path)?;
    let dir = app.shared.checkpoints_dir(&run).join(kind.hearth_name(&name));
    if !dir.is_dir() {
        return Err(ApiError::not_found(format!("no checkpoint {path}")));
    }
    Ok(dir)
}

pub(super) fn model_name(app: &App) -> String {
    app.model_spec.clone()
}

/// A folder `AutoTokenizer.from_pretrained` reads offline: the model's own, or for a `.gguf` base
/// the Hugging Face files its metadata stands for, written once under the home.
pub(super) fn tokenizer_dir(app: &App) -> Result<String, ApiError> {
    let base = &app.shared.base;
    let Some(g) = &base.gguf else { return Ok(base.source.display().to_string()) };
    let dir = app.shared.home.join("tokenizers").join(&base.fingerprint);
    if !dir.join("tokenizer.json").is_file() {
        let io = |e: std::io::Error| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("writing the tokenizer folder: {e}"))
        };
        // written beside, then renamed into place: a reader never sees half a folder
        let tmp = app.shared.home.join("tokenizers").join(format!(".{}.tmp-{}", base.fingerprint, std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(io)?;
        for (file, value) in [
            ("config.json", &g.config_json),
            ("tokenizer.json", &g.tokenizer_json),
            ("tokenizer_config.json", &g.tokenizer_config_json),
        ] {
            std::fs::write(tmp.join(file), value.to_string()).map_err(io)?;
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp); // another request got there first
        }
    }
    Ok(dir.display().to_string())
}

/// Where a run's Tinker `user_metadata` is kept (the cookbook stores its renderer there).
pub(super) fn metadata_path(app: &App, run: &str) -> std::path::PathBuf {
    app.shared.run_dir(run).join("tinker-user-metadata.json")
}

pub(super) fn save_metadata(app: &App, run: &str, meta: &HashMap<String, String>) {
    let path = metadata_path(app, run);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, json!(meta).to_string()));
    if let Err(e) = written {
        log::warn!("run {run}: user_metadata not saved ({e})");
    }
}

pub(super) fn run_info(app: &App, run: &str) -> Option<RunInfo> {
    lock(&app.shared.runs).iter().find(|r| r.id == run).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_both_ways() {
        let admin = Caller::Admin;
        assert_eq!(run_of(&admin, "s1a2b:train:3").unwrap(), "s1a2b-train-3");
        assert_eq!(model_of(&admin, "s1a2b-train-3"), "s1a2b:train:3");
        assert_eq!(run_of(&admin, "main").unwrap(), "main");
        assert_eq!(model_of(&admin, "main"), "main");
        assert!(run_of(&admin, "s1:train:x").is_err());
        assert!(run_of(&admin, "../etc").is_err());
        let (run, kind, name) = parse_path(&admin, "tinker://s1:train:0/sampler_weights/s1").unwrap();
        assert_eq!((run.as_str(), kind.hearth_name(&name).as_str()), ("s1-train-0", "sampler-s1"));
        assert!(parse_path(&admin, "tinker://s1:train:0/weights/../x").is_err());
        assert!(parse_path(&admin, "tinker://s1:train:0/other/x").is_err());
    }

    #[test]
    fn a_users_ids_are_theirs_and_the_admin_names_them_in_full() {
        let (alice, admin) = (Caller::User("alice".into()), Caller::Admin);
        assert_eq!(run_of(&alice, "s1:train:3").unwrap(), "alice/s1-train-3");
        assert_eq!(model_of(&alice, "alice/s1-train-3"), "s1:train:3");
        assert_eq!(model_of(&admin, "alice/s1-train-3"), "alice/s1:train:3");
        assert_eq!(run_of(&admin, "alice/s1:train:3").unwrap(), "alice/s1-train-3");
        // a user cannot step into another's space, whatever the id says
        assert!(run_of(&alice, "bob/s1:train:3").is_err());
        assert!(parse_path(&alice, "tinker://bob/s1:train:0/weights/x").is_err());
        let (run, _, _) = parse_path(&alice, "tinker://s1:train:0/weights/x").unwrap();
        assert_eq!(run, "alice/s1-train-0");
        let (run, _, _) = parse_path(&admin, "tinker://alice/s1:train:0/weights/x").unwrap();
        assert_eq!(run, "alice/s1-train-0");
    }
}
