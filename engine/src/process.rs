//! Process-wide tuning for programs that host the engine: [`tune`] once at start, before any
//! other thread exists.

/// Everything below, in one call.
pub fn tune() {
    keep_freed_memory();
    one_thread_for_candle_elementwise_ops();
}

/// Keeps freed memory in the process for reuse (Linux with glibc; a no-op elsewhere).
///
/// glibc's malloc serves large tensors (over 32 MiB by default, or less after its dynamic
/// threshold adapts) with `mmap` and returns them with `munmap`, so every training step faults
/// and zeroes its activation memory again: a third of a CPU step on the SmolLM2-135M shape went to
/// `clear_page`. Measured on the training benchmark: 85 → 130 tokens/s, peak memory 2.64 → 2.69 GB.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // the largest value glibc accepts
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 1 << 30);
            // One arena: other threads' arenas live in 64 MiB mmap'd heaps that glibc unmaps
            // when they empty, whatever the thresholds above say, so a model run from a worker
            // thread (the server's engine thread) faulted its memory in again every step.
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Runs candle's own element-wise CPU ops (adds, scalings, casts over 64k elements) on the
/// calling thread, unless `CANDLE_NUM_THREADS` is set.
///
/// candle splits them over a pool of its own (`candle-bp-*`), beside rayon's, whose threads spin
/// for 25 000 iterations after every op before they sleep: on a core that rayon's workers need
/// for the matrix products. These ops are memory-bound and a small part of a step; the fused
/// kernels and the products split over rayon. Measured on the training benchmark at 2 threads
/// (`bench_train`, T=256): 95–102 → 111–127 tokens/s (the pool's spinning thread took 9% of
/// the samples in `perf`).
pub fn one_thread_for_candle_elementwise_ops() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle reads it once, when its pool first starts (the first large element-wise op)
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
