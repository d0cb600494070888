//! The order of a model's training requests. Each carries a `seq_id` (the SDK counts them from 1
//! per training client) and they run in `seq_id` order whatever order they arrive in.
//!
//! Invariants:
//! - **Every answer consumes its id.** An admitted request holds a [`Ticket`]; dropping it (its
//!   work submitted, failed, or its turn never came) passes the turn on. A request refused before
//!   it was admitted (a body that does not parse, too large, missing a field) is consumed with
//!   [`Sequencer::consume`]. So a client's next valid request never waits for a refused one.
//! - **`next` moves only past consumed ids.** A request that waits longer than the gap wait for
//!   an earlier id fails and is consumed, but the order stays at the gap: if the missing id comes
//!   late it still runs, and the ones after it too.
//! - **An id is admitted once**, keyed by what it asked (a hash of its body): a retry with the
//!   same body gets the first payload (its future), a different body is a [`SeqError::Conflict`].
//! - **At most [`WINDOW`] ahead of `next`**: a further id is refused at once and leaves no trace,
//!   so one stray id cannot hold or move the order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How far ahead of `next` an id may be. The SDK reserves an id per request (a chunked
/// `forward_backward` one per 128 datums) and keeps many requests in flight, so ids arrive out
/// of order; 1024 covers a batch of 131 072 datums or a pipeline of a thousand requests, while
/// a stray id (50 000, 10⁹) is refused instead of waiting for ids that will never come.
pub const WINDOW: i64 = 1024;

/// Why an id is not admitted, or why its turn never came.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SeqError {
    /// The id was admitted before for a request with another body.
    #[error("model {model}: seq_id {seq} was already used by a different request (a retry must send the same body)")]
    Conflict {
        /// The model id.
        model: String,
        /// The request's id.
        seq: i64,
    },
    /// The order has passed the id.
    #[error("model {model}: seq_id {seq} was already run; the next expected is {next}")]
    Passed {
        /// The model id.
        model: String,
        /// The request's id.
        seq: i64,
        /// The id whose turn it is.
        next: i64,
    },
    /// The id was consumed by a request refused with an error.
    #[error(
        "model {model}: seq_id {seq} was already answered with an error; send the next request with the next seq_id"
    )]
    Refused {
        /// The model id.
        model: String,
        /// The request's id.
        seq: i64,
    },
    /// The id is more than [`WINDOW`] ahead of `next`.
    #[error(
        "model {model}: seq_id {seq} is too far ahead of the next expected, {next}: at most {WINDOW} ahead are taken"
    )]
    TooFar {
        /// The model id.
        model: String,
        /// The request's id.
        seq: i64,
        /// The id whose turn it is.
        next: i64,
    },
    /// An earlier id did not come within the gap wait.
    #[error("model {model}: seq_id {seq} waited {waited:?} for seq_id {missing}, which never came; requests of one model run in seq_id order (the order stays at {missing})")]
    Gap {
        /// The model id.
        model: String,
        /// The request's id.
        seq: i64,
        /// The id that did not come.
        missing: i64,
        /// How long it waited.
        waited: Duration,
    },
}

/// One model's order.
struct Queue<T> {
    model: String,
    /// The id whose turn it is; changed only with `state` locked.
    next: watch::Sender<i64>,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// Admitted ids, their body key and payload; once there are more than 2 × [`WINDOW`], those
    /// more than [`WINDOW`] behind `next` are forgotten (a retry of one is then "already run").
    seen: BTreeMap<i64, (u64, T)>,
    /// Ids ahead of `next` already answered: the turn skips them when it gets there.
    consumed: BTreeSet<i64>,
}

fn lock<S>(m: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Clone> Queue<T> {
    fn new(model: &str, first: i64) -> Self {
        Queue {
            model: model.to_string(),
            next: watch::channel(first).0,
            state: Mutex::new(State { seen: BTreeMap::new(), consumed: BTreeSet::new() }),
        }
    }

    /// Whether `seq` may take a place: not seen, not passed, not consumed, within the window.
    fn check(&self, st: &State<T>, seq: i64) -> Result<(), SeqError> {
        let next = *self.next.borrow();
        let model = self.model.clone();
        if seq < next {
            Err(SeqError::Passed { model, seq, next })
        } else if st.consumed.contains(&seq) {
            Err(SeqError::Refused { model, seq })
        } else if seq.saturating_sub(next) > WINDOW {
            Err(SeqError::TooFar { model, seq, next })
        } else {
            Ok(())
        }
    }

    /// `seq` is answered: at its turn the turn moves on (past every id already answered),
    /// before it the turn will skip it.
    fn finish(&self, st: &mut State<T>, seq: i64) {
        let next = *self.next.borrow();
        if seq == next {
            let mut n = seq + 1;
            while st.consumed.remove(&n) {
                n += 1;
            }
            if st.seen.len() > 2 * WINDOW as usize {
                st.seen = st.seen.split_off(&(n - WINDOW));
            }
            self.next.send_replace(n);
        } else if seq > next {
            st.consumed.insert(seq);
        }
    }
}

/// What [`Sequencer::admit`] gives.
pub enum Admitted<T: Clone> {
    /// A new id: its payload, and the ticket that waits for its turn.
    First(T, Ticket<T>),
    /// A retry of an admitted id with the same body: the first request's payload.
    Again(T),
}

/// An admitted id's place in the order. Dropping it passes the turn on (or, before the turn,
/// marks the id answered so the turn skips it).
pub struct Ticket<T: Clone> {
    queue: Arc<Queue<T>>,
    seq: i64,
    gap_wait: Duration,
}

impl<T: Clone> Ticket<T> {
    /// Waits until it is this id's turn, at most the gap wait. The turn is held until the
    /// ticket is dropped.
    pub async fn turn(&self) -> Result<(), SeqError> {
        let mut rx = self.queue.next.subscribe();
        let reached = tokio::time::timeout(self.gap_wait, rx.wait_for(|&n| n >= self.seq)).await.map(|r| r.map(|n| *n));
        match reached {
            Ok(Ok(n)) if n == self.seq => Ok(()),
            // `next` moves past an id only once it is answered, and this one is not yet
            Ok(Ok(next)) => Err(SeqError::Passed { model: self.queue.model.clone(), seq: self.seq, next }),
            Ok(Err(_)) | Err(_) => Err(SeqError::Gap {
                model: self.queue.model.clone(),
                seq: self.seq,
                missing: *self.queue.next.borrow(),
                waited: self.gap_wait,
            }),
        }
    }
}

impl<T: Clone> Drop for Ticket<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.queue.state);
        self.queue.finish(&mut st, self.seq);
    }
}

/// Every model's order.
pub struct Sequencer<T> {
    models: Mutex<HashMap<String, Arc<Queue<T>>>>,
    gap_wait: Duration,
}

impl<T: Clone> Sequencer<T> {
    /// Orders in which a request waits at most `gap_wait` for an earlier id.
    pub fn new(gap_wait: Duration) -> Self {
        Sequencer { models: Mutex::new(HashMap::new()), gap_wait }
    }

    /// `model`'s order, starting at `first` if it has none yet.
    fn queue(&self, model: &str, first: i64) -> Arc<Queue<T>> {
        lock(&self.models).entry(model.to_string()).or_insert_with(|| Arc::new(Queue::new(model, first))).clone()
    }

    /// Gives `model` an order starting at `first` unless it has one.
    pub fn open(&self, model: &str, first: i64) {
        self.queue(model, first);
    }

    /// Gives `model` a fresh order starting at `first` (a new client of an existing model).
    /// Requests still waiting in the old order time out there.
    pub fn restart(&self, model: &str, first: i64) {
        lock(&self.models).insert(model.to_string(), Arc::new(Queue::new(model, first)));
    }

    /// Admits request `seq` of `model`, whose body hashes to `key`; `payload` makes a new
    /// request's payload (called only then). A model without an order starts at `seq` (a client
    /// that goes on after a restart of the server).
    pub fn admit(&self, model: &str, seq: i64, key: u64, payload: impl FnOnce() -> T) -> Result<Admitted<T>, SeqError> {
        let queue = self.queue(model, seq);
        let mut st = lock(&queue.state);
        if let Some((k, p)) = st.seen.get(&seq) {
            return if *k == key {
                Ok(Admitted::Again(p.clone()))
            } else {
                Err(SeqError::Conflict { model: model.to_string(), seq })
            };
        }
        queue.check(&st, seq)?;
        let p = payload();
        st.seen.insert(seq, (key, p.clone()));
        drop(st);
        Ok(Admitted::First(p, Ticket { queue, seq, gap_wait: self.gap_wait }))
    }

    /// Consumes `seq` of `model` for a request answered with an error before it was admitted,
    /// so the order does not wait for it. Nothing happens if the id was seen, passed or is out
    /// of the window (that request's own answer stands). Says whether it was consumed.
    pub fn consume(&self, model: &str, seq: i64) -> bool {
        let queue = self.queue(model, seq);
        let mut st = lock(&queue.state);
        if st.seen.contains_key(&seq) || queue.check(&st, seq).is_err() {
            return false;
        }
        queue.finish(&mut st, seq);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const GAP: Duration = Duration::from_millis(300);

    fn ticket(s: &Sequencer<u32>, seq: i64, key: u64) -> Ticket<u32> {
        match s.admit("m", seq, key, || seq as u32) {
            Ok(Admitted::First(_, t)) => t,
            Ok(Admitted::Again(_)) => panic!("seq_id {seq} admitted twice"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `t` in a task that records `seq` at its turn.
    fn run(t: Ticket<u32>, seq: i64, log: &Arc<Mutex<Vec<Result<i64, SeqError>>>>) -> tokio::task::JoinHandle<()> {
        let log = log.clone();
        tokio::spawn(async move {
            let r = t.turn().await.map(|()| seq);
            lock(&log).push(r);
        })
    }

    #[tokio::test]
    async fn out_of_order_arrivals_run_in_order() {
        let s = Sequencer::new(GAP);
        s.open("m", 1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = [3, 1, 4, 2].into_iter().map(|seq| run(ticket(&s, seq, 0), seq, &log)).collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*lock(&log), vec![Ok(1), Ok(2), Ok(3), Ok(4)]);
    }

    #[test]
    fn a_retry_with_the_same_body_gets_the_same_payload_and_another_body_is_a_conflict() {
        let s = Sequencer::new(GAP);
        s.open("m", 1);
        let first = s.admit("m", 1, 7, || 10).unwrap();
        let Admitted::First(10, _t) = first else { panic!("a first admission") };
        assert!(matches!(s.admit("m", 1, 7, || 11), Ok(Admitted::Again(10))));
        assert_eq!(s.admit("m", 1, 8, || 12).err(), Some(SeqError::Conflict { model: "m".into(), seq: 1 }));
        assert!(s
            .admit("m", 1, 8, || 12)
            .err()
            .unwrap()
            .to_string()
            .contains("seq_id 1 was already used by a different request"));
    }

    #[test]
    fn an_id_already_passed_is_a_conflict() {
        let s = Sequencer::new(GAP);
        s.open("m", 5);
        assert_eq!(s.admit("m", 4, 0, || 0).err(), Some(SeqError::Passed { model: "m".into(), seq: 4, next: 5 }));
        drop(ticket(&s, 5, 0));
        // 5 was answered: a retry with its body still gets its payload, none else
        assert!(matches!(s.admit("m", 5, 0, || 9), Ok(Admitted::Again(5))));
        assert!(matches!(s.admit("m", 5, 1, || 9), Err(SeqError::Conflict { .. })));
    }

    #[tokio::test]
    async fn a_far_ahead_id_is_refused_and_leaves_no_trace() {
        let s = Sequencer::new(GAP);
        s.open("m", 1);
        let err = s.admit("m", 50_000, 0, || 0).err().unwrap();
        assert_eq!(err, SeqError::TooFar { model: "m".into(), seq: 50_000, next: 1 });
        assert!(err.to_string().contains("at most 1024 ahead"));
        assert!(!s.consume("m", 50_000), "a far-ahead id is not consumed either");
        assert!(s.admit("m", i64::MAX, 0, || 0).is_err());
        tokio::time::sleep(GAP * 2).await;
        // the edge of the window is taken; the order is where it was
        drop(ticket(&s, 1 + WINDOW, 0));
        let t = ticket(&s, 1, 0);
        t.turn().await.unwrap();
    }

    #[tokio::test]
    async fn a_gap_timeout_fails_the_waiter_and_keeps_the_order_at_the_gap() {
        let s = Sequencer::new(GAP);
        s.open("m", 1);
        let t3 = ticket(&s, 3, 0);
        let t0 = Instant::now();
        let e = t3.turn().await.unwrap_err();
        assert!(t0.elapsed() >= GAP);
        assert_eq!(e, SeqError::Gap { model: "m".into(), seq: 3, missing: 1, waited: GAP });
        assert!(e.to_string().contains("seq_id 3 waited 300ms for seq_id 1, which never came"), "{e}");
        drop(t3);
        // the real client's requests still run, and the order skips the failed 3
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = [4, 1, 2].into_iter().map(|seq| run(ticket(&s, seq, 0), seq, &log)).collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*lock(&log), vec![Ok(1), Ok(2), Ok(4)]);
        // the failed 3 keeps its payload for a retry
        assert!(matches!(s.admit("m", 3, 0, || 0), Ok(Admitted::Again(3))));
    }

    #[tokio::test]
    async fn an_id_consumed_by_an_error_advances_the_order() {
        let s = Sequencer::new(GAP);
        s.open("m", 1);
        // 2 is refused before 1 comes, 3 right at its turn
        assert!(s.consume("m", 2));
        let log = Arc::new(Mutex::new(Vec::new()));
        let t4 = run(ticket(&s, 4, 0), 4, &log);
        drop(ticket(&s, 1, 0));
        assert!(s.consume("m", 3));
        t4.await.unwrap();
        assert_eq!(*lock(&log), vec![Ok(4)]);
        assert!(matches!(s.admit("m", 2, 0, || 0), Err(SeqError::Passed { .. })));
        // consumed ahead of the turn: refused for any later body
        assert!(s.consume("m", 7));
        assert_eq!(s.admit("m", 7, 0, || 0).err(), Some(SeqError::Refused { model: "m".into(), seq: 7 }));
        // an id already seen or passed is not consumed again
        let _t5 = ticket(&s, 5, 0);
        assert!(!s.consume("m", 5));
        assert!(!s.consume("m", 1));
    }

    #[tokio::test]
    async fn a_model_without_an_order_starts_at_its_first_id_and_a_restart_starts_afresh() {
        let s = Sequencer::new(GAP);
        let t = ticket(&s, 57, 0);
        t.turn().await.unwrap();
        drop(t);
        s.restart("m", 1);
        let t = ticket(&s, 1, 0);
        t.turn().await.unwrap();
    }
}
