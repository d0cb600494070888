//! Checkpoints on the worker's side: saving a run (`save_state`, autosaves) and finding the
//! folder a `load_state` or a publication names.

use crate::error::ApiError;
use crate::registry::CheckpointRow;
use crate::users::check_run_id;
use crate::worker::{check_name, HeldRun, Shared};
use axum::http::StatusCode;
use hearth_api::{CheckpointKind, SaveStateResponse, TrainingConfig};
use std::path::{Path, PathBuf};

/// The folder of run `run`'s readable `state` checkpoint at `step` in the registry, if it has
/// one (one can be deleted after it was written: the run is then saved again on the way out).
pub(crate) fn state_at(shared: &Shared, run: &str, step: u64) -> Option<PathBuf> {
    let rows = shared.registry.checkpoints(shared.base_key(), run).unwrap_or_default();
    rows.into_iter()
        .find(|c| c.kind == "state" && c.step == step && Path::new(&c.path).join("hearth.json").is_file())
        .map(|c| PathBuf::from(c.path))
}

/// The checkpoint folder `load_state` names: a checkpoint of this run (`NAME`), of another run
/// (`RUN/NAME`, a run id that may be a user's `USER/RUN/NAME`), or the path of a checkpoint
/// folder (one with `hearth.json` or a PEFT `adapter_config.json`, e.g. an adapter trained in
/// Python). A user's source reaches here only through [`Caller::checkpoint_source`], so it names
/// their own runs. Anything else, a missing folder or a folder that is not a checkpoint, gets the
/// same answer: the message tells nothing about the server's other folders. Without `run_id`
/// (publishing) a bare `NAME` names nothing.
pub(crate) fn checkpoint_source(shared: &Shared, run_id: Option<&str>, source: &str) -> Result<PathBuf, ApiError> {
    let by_name = match (source.rsplit_once('/'), run_id) {
        (None, Some(run_id)) if check_name("source", source).is_ok() => {
            Some(shared.checkpoints_dir(run_id).join(source))
        }
        (Some((run, name)), _) if check_run_id("run", run).is_ok() && check_name("source", name).is_ok() => {
            Some(shared.checkpoints_dir(run).join(name))
        }
        _ => None,
    };
    let is_checkpoint = |p: &Path| p.join("hearth.json").is_file() || p.join("adapter_config.json").is_file();
    match by_name.filter(|p| is_checkpoint(p)) {
        Some(p) => Ok(p),
        None if Path::new(source).is_absolute() && is_checkpoint(Path::new(source)) => Ok(PathBuf::from(source)),
        None => Err(no_such_checkpoint(source)),
    }
}

/// The one answer to a checkpoint source that names nothing this caller may load.
pub fn no_such_checkpoint(source: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_checkpoint",
        format!("source {source:?}: no such checkpoint; give a checkpoint name of this run, RUN/NAME for another run's, or (the admin) the absolute path of a checkpoint folder"),
    )
}

pub(crate) fn save(
    shared: &Shared,
    run_id: &str,
    run: &mut HeldRun,
    name: &str,
    kind: CheckpointKind,
    reason: &str,
) -> Result<SaveStateResponse, ApiError> {
    let dir = shared.checkpoints_dir(run_id).join(name);
    let step = run.engine.step();
    if kind == CheckpointKind::Adapter && matches!(run.engine.training(), TrainingConfig::Full) {
        return Err(ApiError::invalid(
            "kind \"adapter\": a full fine-tuning run has no adapter; save \"state\" or \"merged\"",
        ));
    }
    run.engine.save_state(&dir, kind)?;
    let row = CheckpointRow {
        run: run_id.into(),
        name: name.into(),
        kind: kind.name().into(),
        step,
        path: dir.display().to_string(),
        reason: reason.into(),
    };
    shared.registry.add_checkpoint(shared.base_key(), &row).map_err(ApiError::registry)?;
    if kind == CheckpointKind::State {
        run.saved_step = Some(step);
    }
    Ok(SaveStateResponse { path: row.path, kind, step })
}

/// Saves `autosave-STEP` (a `state`) and deletes autosaves beyond the newest `keep_autosaves`.
pub(crate) fn autosave(
    shared: &Shared,
    run_id: &str,
    run: &mut HeldRun,
    reason: &str,
) -> Result<SaveStateResponse, ApiError> {
    let name = format!("autosave-{:08}", run.engine.step());
    let out = save(shared, run_id, run, &name, CheckpointKind::State, reason)?;
    let base = shared.base_key();
    let autos: Vec<CheckpointRow> = shared
        .registry
        .checkpoints(base, run_id)
        .map_err(ApiError::registry)?
        .into_iter()
        .filter(|c| c.name.starts_with("autosave-"))
        .collect();
    for old in autos.iter().skip(shared.keep_autosaves.max(1)) {
        // registry first: a crash in between leaves an unlisted folder, never a listed hole
        shared.registry.remove_checkpoint(base, run_id, &old.name).map_err(ApiError::registry)?;
        let _ = std::fs::remove_dir_all(&old.path);
    }
    Ok(out)
}
