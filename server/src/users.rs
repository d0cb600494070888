//! Users of one server (a class's students, a lab's members) and what each of them may reach.
//!
//! - **Who calls.** The server's own token (the session file's) is the admin's: the teacher. The
//!   admin adds users (`POST /v1/users`, or `hearth-server users add` on the command line); each
//!   gets a token, shown once, of which the registry keeps only the SHA-256. The same token is a
//!   bearer token, Tinker's `X-API-Key` (`tml-<token>`) and the OpenAI key. The auth layer
//!   ([`crate::http::auth`]) answers who calls as a [`Caller`].
//! - **What is whose, by name.** A user's run `main` is the run `alice/main` inside the server:
//!   in the registry, in the worker, on disk (`users/alice/runs/main`); the admin's runs keep bare
//!   names. Every protocol maps a name the caller gives with [`Caller::run_id`] and shows a run
//!   with [`Caller::view`]. No name bob can give maps into `alice/`, so alice's runs, their
//!   checkpoints, requests and samplers answer bob exactly as names that do not exist (a 404,
//!   never a 403 that would tell him they are there). The admin gives and sees the full ids
//!   (`alice/main`), and so reaches every run.
//! - **Scoped control.** Shutdown, settings and the users themselves are the admin's
//!   ([`Caller::require_admin`]); a cancel, an interrupt or an autosave touches the caller's own.

use crate::error::ApiError;
use crate::http::parse_body;
use crate::registry::{Registry, UserRow};
use crate::worker::check_name;
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use hearth_api::NewUser;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Who sent a request, as the auth layer found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The server's own token: every run, the server's controls, the users.
    Admin,
    /// A user added by the admin: their own runs only.
    User(String),
}

impl Caller {
    /// The user's name (`None` for the admin).
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::User(u) => Some(u),
        }
    }

    /// Whether this is the admin.
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

    /// The run id inside the server of run `name` as this caller names it: a user's names are
    /// prefixed with theirs; the admin's are taken as they are (`main`, or `alice/main`).
    pub fn run_id(&self, name: &str) -> String {
        match self {
            Caller::Admin => name.to_string(),
            Caller::User(u) => format!("{u}/{name}"),
        }
    }

    /// How this caller names run `id`, or `None` when it is not theirs to see.
    pub fn view(&self, id: &str) -> Option<String> {
        match self {
            Caller::Admin => Some(id.to_string()),
            Caller::User(u) => id.strip_prefix(u.as_str())?.strip_prefix('/').map(str::to_string),
        }
    }

    /// Whether run (or sampler) `id` is this caller's to touch.
    pub fn owns(&self, id: &str) -> bool {
        self.view(id).is_some()
    }

    /// A 403 for anyone but the admin, naming what was refused.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::User(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_only",
                format!("{what} is the admin's (the server's own token); a user's token cannot do it"),
            )),
        }
    }

    /// The checkpoint source a `load_state` (or a new run's `from`) names, as the worker reads
    /// it: a user may name a checkpoint of the run itself (`NAME`) or of another of their runs
    /// (`RUN/NAME`); a server path, or anything else, is the admin's alone, and answers a user
    /// as a checkpoint that does not exist.
    pub fn checkpoint_source(&self, source: &str) -> Result<String, ApiError> {
        // a published checkpoint is everyone's to read (the handler resolves it)
        if source.strip_prefix(PUBLISHED).is_some_and(|name| check_name("source", name).is_ok()) {
            return Ok(source.to_string());
        }
        let Caller::User(u) = self else { return Ok(source.to_string()) };
        let ok = match source.split_once('/') {
            None => check_name("source", source).is_ok(),
            Some((run, name)) => check_name("run", run).is_ok() && check_name("source", name).is_ok(),
        };
        match (ok, source.contains('/')) {
            (true, false) => Ok(source.to_string()),
            (true, true) => Ok(format!("{u}/{source}")),
            (false, _) => Err(crate::checkpoints::no_such_checkpoint(source)),
        }
    }
}

/// How a `load_state` source names a published checkpoint: `published:NAME`.
pub const PUBLISHED: &str = "published:";

/// A run id inside the server: `NAME` (the admin's) or `USER/NAME` (a user's), each part a
/// [`check_name`] name.
pub fn check_run_id(field: &str, id: &str) -> Result<(), ApiError> {
    match id.split_once('/') {
        None => check_name(field, id),
        Some((user, name)) => check_user_name(user).and_then(|()| check_name(field, name)),
    }
}

/// The user a run (or sampler) id belongs to: `alice` for `alice/main`, `""` (the admin) for
/// `main`.
pub fn owner_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(user, _)| user)
}

/// User names: 1-32 lowercase letters, digits, '-' or '_', starting with a letter.
pub fn check_user_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "user name {name:?}: use 1-32 lowercase letters, digits, '-' or '_', starting with a letter"
        )))
    }
}

/// The hex SHA-256 of a token: what the registry keeps and looks a token up by. Tokens are 256
/// random bits, so a lookup by hash tells a guesser nothing about how close a guess came.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds user `name` with a fresh token, returned once (the registry keeps its hash); a 409 when
/// the name is taken, also by a revoked user, whose runs keep it.
pub fn add_user(registry: &Registry, name: &str) -> Result<NewUser, ApiError> {
    check_user_name(name)?;
    let token = crate::lifecycle::fresh_token().map_err(|e| ApiError::internal(e.to_string()))?;
    let added = registry.add_user(name, &token_hash(&token)).map_err(ApiError::registry)?;
    if !added {
        return Err(ApiError::new(StatusCode::CONFLICT, "exists", format!("user {name:?} exists already")));
    }
    Ok(NewUser { name: name.to_string(), token })
}

/// The user routes under `/v1/users`, the admin's alone, and the published checkpoints (the
/// admin publishes, everyone reads).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/users", post(create).get(list))
        .route("/v1/users/{name}", delete(remove))
        .route("/v1/published", post(publish).get(published))
}

/// Where published checkpoint `name` lives: a copy under the home, so that nothing the admin's
/// run does later (an autosave pruned, a checkpoint overwritten) changes what was published.
pub fn published_dir(app: &App, name: &str) -> std::path::PathBuf {
    app.shared.home.join("published").join(name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    /// The name users load it by (`published:NAME`).
    name: String,
    /// A checkpoint of the admin's: `RUN/NAME` (or `USER/RUN/NAME`), or a checkpoint folder.
    source: String,
}

/// `POST /v1/published`: the admin publishes a checkpoint read-only to every user (a starting
/// adapter for an exercise); users load it with `load_state {"source": "published:NAME"}`.
async fn publish(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<serde_json::Value, ApiError> {
        caller.require_admin("publishing a checkpoint")?;
        let req: Publish = parse_body(body)?;
        check_name("name", &req.name)?;
        let src = crate::checkpoints::checkpoint_source(&app.shared, None, &req.source)?;
        let dest = published_dir(&app, &req.name);
        if dest.exists() {
            return Err(ApiError::new(StatusCode::CONFLICT, "exists", format!("{:?} is published already", req.name)));
        }
        copy_folder(&src, &dest).map_err(|e| ApiError::internal(format!("publishing {:?}: {e}", req.name)))?;
        log::info!("published {} as {}{}", src.display(), PUBLISHED, req.name);
        Ok(serde_json::json!({"name": req.name, "source": format!("{PUBLISHED}{}", req.name)}))
    };
    match run() {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Copies a checkpoint folder (files and subfolders) beside `dest`, then renames it into place:
/// a reader never sees half a copy.
fn copy_folder(src: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    fn copy(src: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dest)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            let to = dest.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                copy(&entry.path(), &to)?;
            } else {
                std::fs::copy(entry.path(), &to)?;
            }
        }
        Ok(())
    }
    let parent = dest.parent().unwrap_or(dest);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy(src, &tmp)?;
    std::fs::rename(&tmp, dest)
}

/// `GET /v1/published`: every published checkpoint's name, for everyone.
async fn published(State(app): State<Arc<App>>) -> Response {
    let mut names: Vec<String> = std::fs::read_dir(app.shared.home.join("published"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let list: Vec<serde_json::Value> =
        names.iter().map(|n| serde_json::json!({"name": n, "source": format!("{PUBLISHED}{n}")})).collect();
    Json(list).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    name: String,
}

async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let made = caller
        .require_admin("adding users")
        .and_then(|()| parse_body::<CreateUser>(body))
        .and_then(|req| add_user(&app.shared.registry, &req.name));
    match made {
        Ok(user) => {
            log::info!("user {} added", user.name);
            (StatusCode::CREATED, Json(user)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn list(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Response {
    let rows =
        caller.require_admin("listing users").and_then(|()| app.shared.registry.users().map_err(ApiError::registry));
    match rows {
        Ok(rows) => Json::<Vec<UserRow>>(rows).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn remove(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let revoked = caller
        .require_admin("removing users")
        .and_then(|()| app.shared.registry.revoke_user(&name).map_err(ApiError::registry));
    match revoked {
        Ok(true) => {
            log::info!("user {name} removed: their token no longer works; their runs stay");
            Json(serde_json::json!({"name": name, "revoked": true})).into_response()
        }
        Ok(false) => ApiError::not_found(format!("no user {name:?}")).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `hearth-server users ...`: adds, lists and removes users in the home's registry, whether or
/// not a server runs (a running server sees the change on its next request).
pub fn cli(args: &[std::ffi::OsString]) -> i32 {
    use clap::Parser;
    let cmd = match UsersCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let home = cmd.home.clone().unwrap_or_else(hearth_api::home_dir);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let fail = |e: String| {
        let _ = writeln!(std::io::stderr(), "hearth-server users: {e}");
        1
    };
    if let Err(e) = std::fs::create_dir_all(&home) {
        return fail(format!("creating {}: {e}", home.display()));
    }
    let registry = match Registry::open(&home.join("registry.sqlite")) {
        Ok(r) => r,
        Err(e) => return fail(format!("opening the registry: {e}")),
    };
    match cmd.action {
        Action::Add { names, count, prefix } => {
            let mut names = names;
            names.extend((1..=count).map(|i| format!("{prefix}{i:0width$}", width = count.to_string().len())));
            if names.is_empty() {
                return fail("name the users to add, or give --count N (and --prefix)".into());
            }
            // every name checked before any is added: a bad list adds nobody
            if let Some(e) = names.iter().find_map(|n| check_user_name(n).err()) {
                return fail(e.message);
            }
            for name in &names {
                match add_user(&registry, name) {
                    Ok(u) => {
                        let _ = writeln!(out, "{},{}", u.name, u.token);
                    }
                    Err(e) => return fail(e.message),
                }
            }
            0
        }
        Action::List => match registry.users() {
            Ok(rows) => {
                for r in rows {
                    let _ = writeln!(out, "{}{}", r.name, if r.revoked_at.is_some() { " (removed)" } else { "" });
                }
                0
            }
            Err(e) => fail(format!("registry: {e}")),
        },
        Action::Remove { names } => {
            for name in &names {
                match registry.revoke_user(name) {
                    Ok(true) => {
                        let _ = writeln!(out, "{name}: removed (their token no longer works; their runs stay)");
                    }
                    Ok(false) => return fail(format!("no user {name:?}")),
                    Err(e) => return fail(format!("registry: {e}")),
                }
            }
            0
        }
    }
}

/// `hearth-server users`: the class list of the hearth home.
#[derive(clap::Parser, Debug)]
#[command(name = "hearth-server users")]
struct UsersCli {
    /// The hearth home (default: `HEARTH_HOME`, else `~/.hearth`).
    #[arg(long, global = true)]
    home: Option<std::path::PathBuf>,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Adds users and prints `name,token` lines (each token is shown only this once).
    Add {
        /// Names of the users to add.
        names: Vec<String>,
        /// Also add this many users named PREFIX1, PREFIX2, ... (numbers padded to one width).
        #[arg(long, default_value_t = 0)]
        count: usize,
        /// The prefix of `--count`'s names.
        #[arg(long, default_value = "student")]
        prefix: String,
    },
    /// Lists the users.
    List,
    /// Removes users: their tokens stop working at once; their runs and checkpoints stay.
    Remove {
        /// Names of the users to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_names_map_into_their_own_space_and_no_other() {
        let alice = Caller::User("alice".into());
        assert_eq!(alice.run_id("main"), "alice/main");
        assert_eq!(alice.view("alice/main").as_deref(), Some("main"));
        assert_eq!(alice.view("main"), None);
        assert_eq!(alice.view("alicex/main"), None);
        assert_eq!(alice.view("bob/main"), None);
        assert_eq!(Caller::Admin.run_id("alice/main"), "alice/main");
        assert_eq!(Caller::Admin.view("bob/main").as_deref(), Some("bob/main"));
        assert!(check_run_id("run", "alice/main").is_ok());
        assert!(check_run_id("run", "alice/main/x").is_err());
        assert!(check_run_id("run", "Alice/main").is_err());
    }

    #[test]
    fn a_user_names_only_their_own_checkpoints() {
        let alice = Caller::User("alice".into());
        assert_eq!(alice.checkpoint_source("ck1").unwrap(), "ck1");
        assert_eq!(alice.checkpoint_source("other/ck1").unwrap(), "alice/other/ck1");
        for bad in ["/tmp/ck", "bob/main/ck1", "../x", ""] {
            let e = alice.checkpoint_source(bad).unwrap_err();
            assert_eq!(e.kind, "bad_checkpoint", "{bad}");
        }
        assert_eq!(Caller::Admin.checkpoint_source("/tmp/ck").unwrap(), "/tmp/ck");
    }

    #[test]
    fn user_names_are_plain() {
        for good in ["alice", "student07", "a-b_c"] {
            assert!(check_user_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Alice", "7up", "a/b", "a.b", &"x".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_registry_keeps_a_hash_and_revocation_is_immediate() {
        let dir = std::env::temp_dir().join(format!("hearth-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reg = Registry::open(&dir.join("registry.sqlite")).unwrap();
        let u = add_user(&reg, "alice").unwrap();
        assert_eq!(u.token.len(), 64);
        assert_eq!(reg.user_by_token(&token_hash(&u.token)).unwrap().as_deref(), Some("alice"));
        assert_eq!(reg.user_by_token(&token_hash(&u.token.to_uppercase())).unwrap(), None);
        assert_eq!(add_user(&reg, "alice").unwrap_err().status, StatusCode::CONFLICT);
        let db = std::fs::read(dir.join("registry.sqlite")).unwrap();
        let wal = std::fs::read(dir.join("registry.sqlite-wal")).unwrap_or_default();
        let has = |hay: &[u8]| hay.windows(u.token.len()).any(|w| w == u.token.as_bytes());
        assert!(!has(&db) && !has(&wal), "the token itself is never stored");
        assert!(reg.revoke_user("alice").unwrap());
        assert_eq!(reg.user_by_token(&token_hash(&u.token)).unwrap(), None);
        assert!(!reg.revoke_user("alice").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
