//! Futures: every operation answers a `request_id` at once, runs as worker jobs (in `seq_id` order
//! for training), and `retrieve_future` long-polls for the result.

use super::*;

/// What an operation's worker jobs turn into once they end.
pub(super) type Convert = Box<dyn FnOnce(Vec<Outcome>) -> Result<Fut, ApiError> + Send>;

/// Submits worker jobs now; their results are converted when they end.
pub(super) struct Jobs {
    rxs: Vec<watch::Receiver<JobState>>,
    convert: Convert,
}

/// Submits the jobs of a request whose room in its user's line was checked when it was
/// accepted ([`crate::worker::Shared::check_room`]).
pub(super) fn submit_jobs(app: &App, ops: Vec<(String, Op)>, convert: Convert) -> Result<Jobs, ApiError> {
    let mut rxs = Vec::new();
    for (run, op) in ops {
        if op.uses_device() {
            app.check_budget()?;
        }
        rxs.push(app.shared.submit_accepted(run, op)?.1);
    }
    Ok(Jobs { rxs, convert })
}

pub(super) async fn finish_jobs(jobs: Result<Jobs, ApiError>, tx: watch::Sender<Fut>) {
    let jobs = match jobs {
        Ok(j) => j,
        Err(e) => {
            tx.send_replace(Fut::failed(&e));
            return;
        }
    };
    let mut results = Vec::new();
    for mut rx in jobs.rxs {
        match crate::job::outcome(&mut rx).await {
            Ok(outcome) => results.push(outcome),
            Err(e) => {
                tx.send_replace(Fut::failed(&e));
                return;
            }
        }
    }
    let out = (jobs.convert)(results).unwrap_or_else(|e| Fut::failed(&e));
    tx.send_replace(out);
}

/// Runs `make` (which submits the worker jobs) at this request's turn in the `seq_id` order of
/// the model (run `run`); answers the future's id, `caller`'s, at once. A retry (same `seq_id`,
/// same body `key`) gets its first future.
pub(super) fn ordered(
    app: &Arc<App>,
    caller: &Caller,
    run: &str,
    seq_id: i64,
    key: u64,
    make: impl FnOnce(&App) -> Result<Jobs, ApiError> + Send + 'static,
) -> Result<String, ApiError> {
    // a full line refuses before the order counts the request: the SDK's retry comes back with
    // the same seq_id
    app.shared.check_room(run)?;
    let mut tx = None;
    let admitted = app.tinker.order.admit(run, seq_id, key, || {
        let (id, t) = app.tinker.new_future(caller);
        tx = Some(t);
        id
    });
    let (id, ticket) = match admitted.map_err(seq_error)? {
        Admitted::Again(id) => return Ok(id),
        Admitted::First(id, ticket) => (id, ticket),
    };
    let Some(tx) = tx else { return Ok(id) };
    let app = app.clone();
    tokio::spawn(async move {
        let jobs = match ticket.turn().await {
            Ok(()) => make(&app),
            Err(e) => Err(seq_error(e)),
        };
        // the turn passes on once the jobs are submitted (the worker runs jobs in submission
        // order), or at once if it never came
        drop(ticket);
        finish_jobs(jobs, tx).await;
    });
    Ok(id)
}

/// An order's refusal as an answer.
pub(super) fn seq_error(e: SeqError) -> ApiError {
    let message = e.to_string();
    match e {
        SeqError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "seq_id_conflict", message),
        SeqError::Passed { .. } | SeqError::Refused { .. } => {
            ApiError::new(StatusCode::CONFLICT, "out_of_order", message)
        }
        SeqError::TooFar { .. } | SeqError::Gap { .. } => ApiError::invalid(message),
    }
}

/// A training request's answer. An error uses up its `seq_id` (of a model of the caller's that
/// exists), so that the model's next request does not wait for it; an error of the order
/// itself, and a full line (429: the SDK retries with the same `seq_id`), leave the order as it
/// is.
pub(super) fn answer(app: &App, caller: &Caller, place: Option<&Place>, r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => err(e),
        Err(e) => {
            if let Some((p, run)) = place.and_then(|p| Some((p, known_run(app, caller, &p.model_id).ok()?))) {
                app.tinker.order.consume(&run, p.seq_id);
            }
            err(e)
        }
    }
}

/// A future of `caller`'s that is not ordered (creation, sampling).
pub(super) fn unordered(app: &Arc<App>, caller: &Caller, jobs: Result<Jobs, ApiError>) -> String {
    let (id, tx) = app.tinker.new_future(caller);
    tokio::spawn(finish_jobs(jobs, tx));
    id
}

#[derive(Deserialize)]
pub(super) struct RetrieveFuture {
    request_id: String,
}

pub(super) async fn retrieve_future(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req: RetrieveFuture = match body(b) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let future = lock(&app.tinker.futures).get(&req.request_id).cloned();
    let Some(mut rx) = future.filter(|(owner, _)| *owner == caller || caller.is_admin()).map(|(_, rx)| rx) else {
        return err(ApiError::not_found(format!("no future {:?}", req.request_id)));
    };
    let state = match tokio::time::timeout(POLL_HOLD, rx.wait_for(|f| !matches!(f, Fut::Pending))).await {
        Ok(Ok(s)) => s.clone(),
        _ => Fut::Pending,
    };
    match state {
        Fut::Pending => (
            StatusCode::REQUEST_TIMEOUT,
            Json(json!({"type": "try_again", "request_id": req.request_id, "queue_state": "active"})),
        )
            .into_response(),
        Fut::Json(v) => Json(v).into_response(),
        Fut::Proto(bytes) => ([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response(),
        Fut::Failed { error, category } => Json(json!({"error": error, "category": category})).into_response(),
    }
}
