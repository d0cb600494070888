//! The worker's queue: one line per user, served in turn by device time, so that a user who
//! pipelines five hundred samples and a user with one `forward_backward` alternate instead of
//! waiting in one line.
//!
//! - **Control first.** A save of every run or the stop is taken before any job.
//! - **Per-user lines, in order.** Each user's jobs (the admin counts as one user) wait in their
//!   own FIFO, so a run's operations, all of one user's, keep the order they were submitted in.
//! - **Deficit round robin by device time.** The users with jobs take turns; a turn begins by
//!   crediting the user [`QUANTUM`] of device time and lasts while their credit is positive;
//!   every job's measured time is charged to its user ([`Queue::charge`]). A user whose job took
//!   ten quanta sits out the next turns until the credit is back, so over time each user with
//!   work gets an equal share of the device whatever the size of their jobs. A user who comes
//!   back to the line brings their debt, not their credit; when nobody waits at all, every debt
//!   is forgiven (the device was theirs to use).
//! - **Bounded.** A user's line holds at most their limit of queued jobs; past it a submission is
//!   refused ([`Full`]), which the protocols answer with 429 and `Retry-After`.

use crate::job::Op;
use crate::worker::Msg;
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The device time a user's turn is credited with.
pub const QUANTUM: Duration = Duration::from_millis(10);

/// A submitted operation on a run (or a sampler).
pub struct Job {
    /// Request id.
    pub id: u64,
    /// Run (or sampler) id inside the server.
    pub run: String,
    /// The operation.
    pub op: Op,
}

/// What the worker takes next.
pub enum Next {
    /// A control message.
    Control(Msg),
    /// A job, with the user whose line it came from.
    Job(String, Job),
}

/// A user's line is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Jobs the user has queued.
    pub queued: usize,
}

#[derive(Default)]
struct Line {
    jobs: VecDeque<Job>,
    /// Device time the user may still take this turn (negative: owed from a long job).
    credit_ns: i64,
}

#[derive(Default)]
struct Inner {
    control: VecDeque<Msg>,
    lines: HashMap<String, Line>,
    /// Users with queued jobs, in turn order; the front one's turn is on when `turn_on`.
    ring: VecDeque<String>,
    turn_on: bool,
    closed: bool,
}

/// The queue shared by the HTTP side (pushing) and the worker (popping).
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a control message; `false` once the worker has stopped taking any.
    pub fn push_control(&self, msg: Msg) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        q.control.push_back(msg);
        self.ready.notify_one();
        true
    }

    /// Queues `job` at the end of `user`'s line, unless the line already holds `limit` jobs.
    /// `Ok(false)` once the worker has stopped taking any.
    pub fn push_job(&self, user: &str, job: Job, limit: usize) -> Result<bool, Full> {
        let mut q = self.lock();
        if q.closed {
            return Ok(false);
        }
        let q = &mut *q;
        let line = q.lines.entry(user.to_string()).or_default();
        if line.jobs.len() >= limit {
            return Err(Full { queued: line.jobs.len() });
        }
        if line.jobs.is_empty() && !q.ring.iter().any(|u| u == user) {
            line.credit_ns = line.credit_ns.min(0);
            q.ring.push_back(user.to_string());
        }
        line.jobs.push_back(job);
        self.ready.notify_one();
        Ok(true)
    }

    /// Jobs queued in `user`'s line.
    pub fn queued(&self, user: &str) -> usize {
        self.lock().lines.get(user).map_or(0, |l| l.jobs.len())
    }

    /// Users with jobs waiting.
    pub fn users_waiting(&self) -> usize {
        self.lock().lines.values().filter(|l| !l.jobs.is_empty()).count()
    }

    /// Every user's queued jobs.
    pub fn queued_by_user(&self) -> Vec<(String, usize)> {
        let q = self.lock();
        let mut out: Vec<(String, usize)> =
            q.lines.iter().filter(|(_, l)| !l.jobs.is_empty()).map(|(u, l)| (u.clone(), l.jobs.len())).collect();
        out.sort();
        out
    }

    /// The next control message or job, waiting at most `timeout` for one.
    pub fn pop(&self, timeout: Duration) -> Option<Next> {
        self.pop_where(timeout, |_| true)
    }

    /// [`Queue::pop`] of a job that `may_run` allows now: a user whose next job may not run yet
    /// (its run is being sampled) keeps it at the front of their line and their credit, and the
    /// turn passes to the next user.
    pub fn pop_where(&self, timeout: Duration, may_run: impl Fn(&Job) -> bool) -> Option<Next> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            if let Some(msg) = q.control.pop_front() {
                return Some(Next::Control(msg));
            }
            if let Some((user, job)) = q.next_job(&may_run) {
                return Some(Next::Job(user, job));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            q = self.ready.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Charges `user` the device time their last job took.
    pub fn charge(&self, user: &str, took: Duration) {
        if let Some(line) = self.lock().lines.get_mut(user) {
            line.credit_ns = line.credit_ns.saturating_sub(took.as_nanos().min(i64::MAX as u128) as i64);
        }
    }

    /// Stops taking anything; what is queued stays for [`Queue::drain`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Takes every queued job (at shutdown, to answer them).
    pub fn drain(&self) -> Vec<Job> {
        let mut q = self.lock();
        q.ring.clear();
        q.lines.values_mut().flat_map(|l| l.jobs.drain(..)).collect()
    }
}

impl Inner {
    fn next_job(&mut self, may_run: &dyn Fn(&Job) -> bool) -> Option<(String, Job)> {
        // users passed over in a row because their next job may not run: all of them, nobody can
        let mut passed = 0;
        loop {
            let Some(user) = self.ring.front().cloned() else {
                self.lines.values_mut().for_each(|l| l.credit_ns = 0);
                self.lines.retain(|_, l| !l.jobs.is_empty());
                return None;
            };
            let line = self.lines.entry(user.clone()).or_default();
            if line.jobs.is_empty() {
                // out of the ring; its debt (if any) stays, its unused credit does not
                line.credit_ns = line.credit_ns.min(0);
                self.ring.pop_front();
                self.turn_on = false;
                continue;
            }
            if line.jobs.front().is_some_and(|j| !may_run(j)) {
                passed += 1;
                if passed >= self.ring.len() {
                    return None;
                }
                self.ring.rotate_left(1);
                self.turn_on = false;
                continue;
            }
            passed = 0;
            if !self.turn_on {
                line.credit_ns = line.credit_ns.saturating_add(QUANTUM.as_nanos() as i64);
                self.turn_on = true;
            }
            if line.credit_ns > 0 {
                return line.jobs.pop_front().map(|j| (user, j));
            }
            // the turn is over: the next user's begins
            self.ring.rotate_left(1);
            self.turn_on = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::AdamParams;

    fn job(id: u64, run: &str) -> Job {
        Job { id, run: run.into(), op: Op::OptimStep(AdamParams::default()) }
    }

    /// Pops `n` jobs, charging each `cost(user)`; the users in the order they were served.
    fn serve(q: &Queue, n: usize, cost: impl Fn(&str) -> Duration) -> Vec<String> {
        (0..n)
            .map(|_| match q.pop(Duration::ZERO) {
                Some(Next::Job(user, _)) => {
                    q.charge(&user, cost(&user));
                    user
                }
                _ => panic!("nothing queued"),
            })
            .collect()
    }

    #[test]
    fn a_user_with_many_jobs_and_one_with_few_alternate() {
        let q = Queue::default();
        for i in 0..500 {
            assert_eq!(q.push_job("sampler", job(i, "sampler/main"), 1000), Ok(true));
        }
        assert_eq!(q.push_job("trainer", job(1000, "trainer/main"), 1000), Ok(true));
        assert_eq!(q.push_job("trainer", job(1001, "trainer/main"), 1000), Ok(true));
        // equal costs: one each in turn
        let served = serve(&q, 4, |_| QUANTUM);
        assert_eq!(served, ["sampler", "trainer", "sampler", "trainer"]);
        assert_eq!(q.queued("trainer"), 0);
        assert_eq!(q.queued("sampler"), 498);
    }

    #[test]
    fn turns_are_shares_of_device_time_not_of_jobs() {
        let q = Queue::default();
        for i in 0..2000 {
            q.push_job("short", job(i, "short/r"), 5000).unwrap();
            q.push_job("long", job(10_000 + i, "long/r"), 5000).unwrap();
        }
        // `long`'s jobs take four quanta, `short`'s a tenth of one; both lines stay full
        let cost = |u: &str| if u == "long" { QUANTUM * 4 } else { QUANTUM / 10 };
        let served = serve(&q, 600, cost);
        let time = |who: &str| served.iter().filter(|u| *u == who).map(|u| cost(u)).sum::<Duration>();
        let (long, short) = (time("long").as_secs_f64(), time("short").as_secs_f64());
        assert!((long / short - 1.0).abs() < 0.25, "device time long {long} s, short {short} s");
    }

    #[test]
    fn each_users_jobs_keep_their_order_and_control_goes_first() {
        let q = Queue::default();
        for i in 0..5 {
            q.push_job("a", job(i, "a/r"), 10).unwrap();
            q.push_job("b", job(10 + i, "b/r"), 10).unwrap();
        }
        let (reply, _rx) = std::sync::mpsc::channel();
        assert!(q.push_control(Msg::SaveAll { reason: "x".into(), caller: crate::users::Caller::Admin, reply }));
        assert!(matches!(q.pop(Duration::ZERO), Some(Next::Control(_))));
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        while let Some(Next::Job(user, j)) = q.pop(Duration::ZERO) {
            q.charge(&user, QUANTUM / 3);
            seen.entry(user).or_default().push(j.id);
        }
        assert_eq!(seen["a"], [0, 1, 2, 3, 4]);
        assert_eq!(seen["b"], [10, 11, 12, 13, 14]);
    }

    #[test]
    fn an_empty_queue_waits_for_the_timeout_and_a_push_wakes_it() {
        let q = std::sync::Arc::new(Queue::default());
        let t0 = std::time::Instant::now();
        assert!(q.pop(Duration::from_millis(100)).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(100));
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q2.push_job("a", job(1, "a/r"), 10).unwrap();
        });
        assert!(matches!(q.pop(Duration::from_secs(600)), Some(Next::Job(..))));
        pusher.join().unwrap();
        // the line that just emptied is no job: the next pop waits again
        let t0 = std::time::Instant::now();
        assert!(q.pop(Duration::from_millis(100)).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_job_that_may_not_run_yet_keeps_its_place_and_others_go_first() {
        let q = Queue::default();
        q.push_job("a", job(1, "a/busy"), 10).unwrap();
        q.push_job("a", job(2, "a/other"), 10).unwrap();
        q.push_job("b", job(3, "b/r"), 10).unwrap();
        q.push_job("b", job(4, "b/r"), 10).unwrap();
        let not_busy = |j: &Job| j.run != "a/busy";
        let mut got = Vec::new();
        while let Some(Next::Job(user, j)) = q.pop_where(Duration::ZERO, not_busy) {
            q.charge(&user, QUANTUM);
            got.push(j.id);
        }
        // a's line waits behind its first job (order kept); b is served
        assert_eq!(got, [3, 4]);
        assert_eq!(q.queued("a"), 2);
        let mut rest = Vec::new();
        while let Some(Next::Job(_, j)) = q.pop(Duration::ZERO) {
            rest.push(j.id);
        }
        assert_eq!(rest, [1, 2]);
    }

    #[test]
    fn a_full_line_refuses_and_others_are_not_affected() {
        let q = Queue::default();
        for i in 0..3 {
            q.push_job("a", job(i, "a/r"), 3).unwrap();
        }
        assert_eq!(q.push_job("a", job(9, "a/r"), 3), Err(Full { queued: 3 }));
        assert_eq!(q.push_job("b", job(10, "b/r"), 3), Ok(true));
        assert_eq!(q.queued_by_user(), [("a".to_string(), 3), ("b".to_string(), 1)]);
        q.close();
        assert_eq!(q.push_job("b", job(11, "b/r"), 3), Ok(false));
        assert_eq!(q.drain().len(), 4);
    }

    #[test]
    fn a_user_who_comes_back_brings_their_debt_and_an_empty_line_forgives_it() {
        let q = Queue::default();
        for i in 0..5 {
            q.push_job("b", job(10 + i, "b/r"), 10).unwrap();
        }
        q.push_job("a", job(0, "a/r"), 10).unwrap();
        // b's first job, then a's one job, which took ten quanta while b waited
        assert_eq!(serve(&q, 2, |u| if u == "a" { QUANTUM * 10 } else { QUANTUM }), ["b", "a"]);
        // a comes back at once (a client that sends its next request as the answer comes)
        q.push_job("a", job(1, "a/r"), 10).unwrap();
        let served = serve(&q, 5, |_| QUANTUM);
        assert_eq!(served, ["b", "b", "b", "b", "a"], "b is served until a's debt is paid");
        // nobody waits: debts are forgiven, and the two alternate again
        assert!(q.pop(Duration::ZERO).is_none());
        q.push_job("a", job(2, "a/r"), 10).unwrap();
        q.push_job("b", job(20, "b/r"), 10).unwrap();
        q.push_job("a", job(3, "a/r"), 10).unwrap();
        q.push_job("b", job(21, "b/r"), 10).unwrap();
        assert_eq!(serve(&q, 4, |_| QUANTUM), ["a", "b", "a", "b"]);
    }
}
