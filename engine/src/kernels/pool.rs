//! The parallel scheduler the kernels share: where a primitive's work runs ([`in_pool`],
//! [`in_pool_for`]), how many threads a product is split over ([`threads_for`], [`as_task`]),
//! guided column slices ([`claim_columns`]) and a product one task computes for all
//! ([`OneJob`]).

use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Output elements × depth below which a matmul runs on one thread: below it, splitting costs
/// more than it saves; above it, even LoRA's rank-wide products gain from the split, where left
/// on the calling thread they would keep the other cores waiting (figures in bench/RESULTS.md).
const PAR_MIN_WORK: usize = 1 << 19;

thread_local! {
    /// Set while this thread runs one of a kernel's parallel tasks ([`as_task`]): the products
    /// it calls then run on it alone.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one of a kernel's parallel tasks: [`super::matmul::mm`] inside it does not split
/// again. (A check for "on a pool thread" cannot tell these apart from the step itself, which runs
/// on a pool thread too.)
pub(super) fn as_task<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_TASK.replace(true);
    let r = f();
    IN_TASK.set(outer);
    r
}

/// Runs `f` on a thread of rayon's pool (unless already on one), so that the parallel kernels it
/// calls share work with the pool's other threads directly: called from outside, each of the
/// step's thousands of short parallel regions would wake the pool, put the calling thread to sleep
/// and wake it again at the end.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Runs one primitive's work on `device`: on the CPU through [`in_pool`]; on a GPU on the calling
/// thread, bound to the device's context, so the buffers the work leaves behind are dropped by a
/// thread that can free them (see [`crate::device`]).
pub fn in_pool_for<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        in_pool(f)
    } else {
        crate::device::bind(device);
        f()
    }
}

/// The threads a product of `work` = output elements × depth is split over: rayon's, or 1 inside
/// one of a kernel's own tasks (the attention kernel's heads: the caller already runs in
/// parallel) and below [`PAR_MIN_WORK`].
pub(super) fn threads_for(work: usize) -> usize {
    if !IN_TASK.get() && work >= PAR_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// A product that one task of a parallel region computes for all of them (LoRA's xa and dxa,
/// dB): claimed by whichever task gets to it first; a task that needs it finished waits for the
/// one computing it (a running thread, which waits on nothing).
pub(super) struct OneJob(AtomicU8);

impl OneJob {
    const TODO: u8 = 0;
    const BUSY: u8 = 1;
    const DONE: u8 = 2;

    pub(super) fn new() -> Self {
        OneJob(AtomicU8::new(Self::TODO))
    }

    /// Runs `f` unless a task has claimed it already; true when this call ran it.
    pub(super) fn try_run(&self, f: impl FnOnce()) -> bool {
        let claimed = self.0.compare_exchange(Self::TODO, Self::BUSY, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if claimed {
            f();
            self.0.store(Self::DONE, Ordering::Release);
        }
        claimed
    }

    /// Returns once `f` has run (here, or on the task that claimed it).
    pub(super) fn run_or_wait(&self, f: impl FnOnce()) {
        if !self.try_run(f) {
            while self.0.load(Ordering::Acquire) != Self::DONE {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `f(c0, nc)` over slices c0..c0+nc that together cover 0..n once, on `threads` of
/// rayon's threads that claim slices as they go (guided scheduling): a claim takes a share of
/// what is left, rem / (2 · threads) rounded up to 16 and at least `min` (or n / (2 · threads)
/// when that is less, so every thread gets two slices of a narrow output), so the slices shrink
/// toward the end and the threads finish together whatever slows one of them: a static split
/// in halves left one thread idle at the end of most regions, and the more so when another
/// process took time from one core. One thread runs all of 0..n as one slice.
pub(super) fn claim_columns(threads: usize, n: usize, min: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let min = min.min(n / (2 * threads).max(1)).max(16).next_multiple_of(16);
    if threads <= 1 || n <= min {
        if n > 0 {
            f(0, n);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    let claim = || {
        let mut c0 = next.load(Ordering::Relaxed);
        loop {
            let rem = n.checked_sub(c0).filter(|&r| r > 0)?;
            let nc = (rem / (2 * threads)).next_multiple_of(16).max(min).min(rem);
            match next.compare_exchange_weak(c0, c0 + nc, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some((c0, nc)),
                Err(now) => c0 = now,
            }
        }
    };
    (0..threads).into_par_iter().for_each(|_| {
        while let Some((c0, nc)) = claim() {
            f(c0, nc)
        }
    });
}

/// Runs `f(task)` for every task: on rayon's pool when more than one, else on the calling thread.
pub(super) fn run_tasks(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    if tasks <= 1 {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}
