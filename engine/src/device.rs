//! What a device has: free memory (checked before loading a model) and the peak this process
//! has used (benchmarks). CPU figures come from /proc; CUDA figures from the driver (free memory)
//! and the device's default memory pool, which candle's allocations come from (its high-water
//! mark of used bytes). Without the `cuda` feature the CUDA queries answer `None`.

use candle_core::Device;

/// Bytes that can still be allocated on `device`: MemAvailable on the CPU, the driver's free
/// memory on CUDA; `None` where unknown (Metal).
pub fn available_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => proc_bytes("/proc/meminfo", "MemAvailable:"),
        Device::Cuda(_) => cuda::free_and_total(device).map(|(free, _)| free),
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
        let pool = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t, written into a local u64.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut v as *mut u64).cast())
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub fn pool_reset_peak(device: &Device) {
        let Some(pool) = pool(device) else { return };
        let mut zero: u64 = 0;
        // SAFETY: the high-water marks may only be reset to zero, passed as a cuuint64_t.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero as *mut u64).cast());
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    pub fn free_and_total(_: &Device) -> Option<(u64, u64)> {
        None
    }

    pub fn pool_peak(_: &Device) -> Option<u64> {
        None
    }

    pub fn pool_reset_peak(_: &Device) {}
}
