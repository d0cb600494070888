//! Allocator tuning for processes that host the engine.
//!
//! glibc's malloc serves large tensors (over 32 MiB by default, or less after its dynamic
//! threshold adapts) with `mmap` and returns them with `munmap`, so every training step would
//! fault and zero its activation memory again. Binaries that host a warm model call
//! [`keep_freed_memory`] once at start (the figures are in bench/RESULTS.md).

/// Keeps freed memory in the process for reuse (Linux with glibc; a no-op elsewhere).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            // The largest threshold glibc accepts; blocks above it (the (B, T, V) logits and
            // their gradient) would still be mmap'd and faulted in again every step, so no
            // block at all comes from mmap (glibc still falls back to it if the heap cannot grow).
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 1 << 30);
            // One arena: other threads' arenas live in 64 MiB mmap'd heaps that glibc unmaps
            // when they empty, whatever the thresholds above say, so a model run from a worker
            // thread (the server's engine thread) would fault its memory in again every step.
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Gives freed memory back to the system (Linux with glibc; a no-op elsewhere). With
/// [`keep_freed_memory`] nothing is returned by itself, so a process that hosts the engine calls
/// this when it goes idle: a spike (a huge request, a one-off batch) does not stay resident for
/// the life of the process, while back-to-back training steps keep their memory warm.
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages of the heap to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
