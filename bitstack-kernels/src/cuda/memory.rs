//! Device memory that BitStack blocks give back when a model shrinks.
//!
//! Candle allocates through CUDA's stream-ordered allocator, whose memory
//! pool takes memory from the driver in chunks of 32 MiB (measured on an
//! H200) and returns a chunk only when nothing in it is alive: the blocks
//! a shrink drops sit in chunks beside the blocks it keeps, so the driver
//! gets nothing back (a whole SmolLM2-sized model fits in one chunk).
//! Resident blocks, planes and grids therefore take their memory from the
//! driver directly ([`DeviceBuffer`], `cuMemAlloc`, 2 MiB pages) in the
//! order of the ladder, so that the blocks above a level share pages only
//! with each other; and a resize empties the pool of what it freed there
//! ([`trim_memory_pool`]).

use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

/// Values of `T` in device memory taken from the driver, given back to it
/// when dropped.
pub struct DeviceBuffer<T> {
    ptr: sys::CUdeviceptr,
    /// Allocated (at least one element's: the driver refuses zero bytes).
    bytes: usize,
    context: Arc<CudaContext>,
    _values: PhantomData<T>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// A copy of `host` on `device` (one element is allocated for an empty
    /// slice: the driver refuses zero bytes).
    pub fn upload(device: &CudaDevice, host: &[T]) -> Result<Self> {
        let context = device.cuda_stream().context().clone();
        context.bind_to_thread().w()?;
        let bytes = host.len().max(1) * std::mem::size_of::<T>();
        // SAFETY: a plain allocation in the current context; the buffer
        // owns it from here (and frees it if the copy fails).
        let ptr = unsafe { result::malloc_sync(bytes) }.w()?;
        let buffer = Self {
            ptr,
            bytes,
            context,
            _values: PhantomData,
        };
        if !host.is_empty() {
            // SAFETY: `ptr` holds `size_of_val(host)` bytes. The copy is
            // synchronous: the buffer is complete before any kernel can see it.
            unsafe { result::memcpy_htod_sync(ptr, host) }.w()?;
        }
        Ok(buffer)
    }
}

impl<T> DeviceBuffer<T> {
    /// The device address, for kernel arguments and pointer tables.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // Kernels queued by the last forward that held this buffer may
        // still read it: wait for them, then free it in its context (the
        // dropping thread may have none current).
        let freed = self
            .context
            .bind_to_thread()
            .and_then(|()| self.context.synchronize())
            // SAFETY: `ptr` came from `cuMemAlloc` in this context and
            // nothing uses it after the synchronization.
            .and_then(|()| unsafe { result::free_sync(self.ptr) });
        if let Err(e) = freed {
            tracing::warn!(
                "cannot free {} B of BitStack device memory: {e}",
                self.bytes
            );
        }
    }
}

/// What the memory pool that candle's allocations on a device come from
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBytes {
    /// Taken from the driver (in use or kept for reuse).
    pub reserved: u64,
    /// Handed out and not freed.
    pub used: u64,
}

/// The pool `cuMemAllocAsync` on `device` allocates from, with the
/// device's context current on this thread.
fn current_pool(device: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let context = device.cuda_stream().context().clone();
    context.bind_to_thread().w()?;
    // SAFETY: the device ordinal comes from a live context.
    unsafe { result::device::get_mem_pool(context.cu_device()) }.w()
}

/// Waits for `device`'s queued work (frees included) and returns every
/// chunk of its memory pool that holds no live buffer to the driver.
pub fn trim_memory_pool(device: &CudaDevice) -> Result<()> {
    device.cuda_stream().synchronize().w()?;
    let pool = current_pool(device)?;
    // SAFETY: `pool` is the device's current pool, valid for the context.
    unsafe { result::mem_pool::trim_to(pool, 0) }.w()
}

/// The reserved and used bytes of `device`'s memory pool, after its
/// queued work.
pub fn pool_bytes(device: &CudaDevice) -> Result<PoolBytes> {
    device.cuda_stream().synchronize().w()?;
    let pool = current_pool(device)?;
    let attribute = |a: sys::CUmemPool_attribute| -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: both attributes are u64s, written through a valid pointer.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                a,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .w()?;
        Ok(value)
    };
    Ok(PoolBytes {
        reserved: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        used: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
    })
}
