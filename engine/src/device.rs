//! Opening a device, and what it has: free memory (checked before loading a model and before
//! each step) and the peak this process has used (benchmarks). CPU figures come from /proc;
//! CUDA figures from the driver and the device's default memory pool, which candle's
//! allocations come from. Without the `cuda` feature the CUDA queries answer `None` and
//! opening a CUDA device is an error.
//!
//! # One stream for the whole device
//!
//! [`open`] gives a CUDA device one real stream that every thread submits to, so every kernel,
//! copy and free is ordered after the work before it whichever thread issued it: a model loaded
//! on one thread and trained on another, a gradient dropped by the caller while the step that
//! read it is still queued. (candle's `Device::new_cuda` uses the per-thread default stream,
//! which orders nothing across threads.) Work is ordered by the stream alone, so cudarc's
//! per-operand event tracking is turned off, and the engine runs CUDA work on the calling
//! thread (see `crate::kernels::in_pool_for`). A thread binds the context before it drops device
//! memory ([`bind`]): cudarc frees without binding it.
//!
//! # The memory pool keeps what it has
//!
//! candle allocates from the device's default memory pool. Its release threshold is raised to
//! the whole device, so memory freed at the end of a step is reused by the next instead of
//! being unmapped at every synchronisation and mapped again; the pool is trimmed when the
//! process goes idle ([`give_back_freed_memory`]). Memory the pool holds but does not use counts
//! as free in [`available_memory`].

use crate::error::{EngineError, Result};
use candle_core::Device;

/// Opens the device `spec` names: `cpu`, `cuda` (GPU 0), `cuda:N` or `metal`; CUDA with one
/// stream shared by every thread and a memory pool that keeps freed memory (module docs).
pub fn open(spec: &str) -> Result<Device> {
    let bad = |reason: String| EngineError::Device { spec: spec.to_string(), reason };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| bad(e.to_string())),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| bad("expected cuda:N with N a GPU index".into()))?,
            };
            cuda::open(n).map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad("expected cpu, cuda, cuda:N or metal".into())),
    }
}

/// Makes `device`'s context current on the calling thread (CUDA; nothing elsewhere), so device
/// memory dropped here is freed in the right context.
pub fn bind(device: &Device) {
    if let Device::Cuda(_) = device {
        cuda::bind(device);
    }
}

/// Gives memory the device's pool holds but no tensor uses back to the driver (CUDA; nothing
/// elsewhere). Called when the process goes idle, like [`crate::alloc::give_back_freed_memory`].
pub fn give_back_freed_memory(device: &Device) {
    if let Device::Cuda(_) = device {
        cuda::trim(device);
    }
}

/// Bytes that can still be allocated on `device`: MemAvailable on the CPU; on CUDA the driver's
/// free memory plus what the memory pool holds unused (it is handed out again before the pool
/// asks the driver for more); `None` where unknown (Metal).
pub fn available_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => proc_bytes("/proc/meminfo", "MemAvailable:"),
        Device::Cuda(_) => cuda::free_and_total(device).map(|(free, _)| free + cuda::pool_unused(device).unwrap_or(0)),
        Device::Metal(_) => None,
    }
}

/// Peak bytes in use: the process's peak resident set (VmHWM) on the CPU; on CUDA the default
/// memory pool's high-water mark since the last [`reset_peak`].
pub fn peak_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => proc_bytes("/proc/self/status", "VmHWM:"),
        Device::Cuda(_) => cuda::pool_peak(device),
        Device::Metal(_) => None,
    }
}

/// Starts a new peak measurement (CUDA; the CPU's VmHWM cannot be reset, so it stays).
pub fn reset_peak(device: &Device) {
    if let Device::Cuda(_) = device {
        cuda::pool_reset_peak(device);
    }
}

/// A `Key:   N kB` line of a /proc file, in bytes.
fn proc_bytes(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    pub fn open(ordinal: usize) -> candle_core::Result<Device> {
        let device = Device::new_cuda_with_stream(ordinal)?;
        if let Device::Cuda(d) = &device {
            let ctx = d.cuda_stream().context().clone();
            // SAFETY: every operation of this device runs on its one stream (module docs), so
            // the stream orders every use of every buffer; events per operand would order
            // nothing more.
            unsafe { ctx.disable_event_tracking() };
        }
        set_pool_attribute(&device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX);
        Ok(device)
    }

    pub fn bind(device: &Device) {
        if let Device::Cuda(d) = device {
            let _ = d.cuda_stream().context().bind_to_thread();
        }
    }

    pub fn trim(device: &Device) {
        if let Device::Cuda(d) = device {
            // freed memory is returned by the stream's order: wait for it first
            let _ = d.cuda_stream().synchronize();
        }
        if let Some(pool) = pool(device) {
            // SAFETY: trimming only returns unused pool memory to the driver.
            unsafe {
                sys::cuMemPoolTrimTo(pool, 0);
            }
        }
    }

    fn pool_attribute(device: &Device, attribute: sys::CUmemPool_attribute) -> Option<u64> {
        let pool = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t, written into a local u64.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attribute, (&mut v as *mut u64).cast()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// Sets a cuuint64_t attribute of the device's default memory pool (nothing without one).
    fn set_pool_attribute(device: &Device, attribute: sys::CUmemPool_attribute, mut value: u64) {
        let Some(pool) = pool(device) else { return };
        // SAFETY: the attribute is a cuuint64_t, read from a local u64.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, attribute, (&mut value as *mut u64).cast());
        }
    }

    pub fn pool_unused(device: &Device) -> Option<u64> {
        let reserved = pool_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = pool_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Some(reserved.saturating_sub(used))
    }

    pub fn free_and_total(device: &Device) -> Option<(u64, u64)> {
        let Device::Cuda(d) = device else { return None };
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        Some((free as u64, total as u64))
    }

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else { return None };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle of a live context and an out-pointer to a local.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    pub fn pool_peak(device: &Device) -> Option<u64> {
        pool_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    pub fn pool_reset_peak(device: &Device) {
        // the high-water marks may only be reset to zero
        set_pool_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    pub fn open(_: usize) -> candle_core::Result<Device> {
        Err(candle_core::Error::Msg(
            "this build has no CUDA support: build with the `cuda` feature (scripts/build-cuda.sh)".into(),
        ))
    }

    pub fn bind(_: &Device) {}

    pub fn trim(_: &Device) {}

    pub fn pool_unused(_: &Device) -> Option<u64> {
        None
    }

    pub fn free_and_total(_: &Device) -> Option<(u64, u64)> {
        None
    }

    pub fn pool_peak(_: &Device) -> Option<u64> {
        None
    }

    pub fn pool_reset_peak(_: &Device) {}
}
