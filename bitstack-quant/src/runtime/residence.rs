//! Where a running model keeps its BitStack blocks: in host memory, or on
//! the CUDA device that runs it.
//!
//! A model on the CPU reads blocks into host memory. A model on a CUDA
//! device uploads each block as it is read and drops the host copy, so the
//! weights take device memory only and a shrink frees device memory; a grow
//! reads the blocks it adds from the checkpoint again. Host-resident blocks
//! used by a CUDA forward still work: they are uploaded on first use and
//! keep both copies (see [`DeviceCopy`]).

#[cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::Device;

use crate::runtime::device_copy::DeviceCopy;

/// Where blocks read from a checkpoint go.
#[derive(Clone, Default)]
pub enum Residence {
    /// Host memory (the CPU kernels read them there).
    #[default]
    Host,
    /// This CUDA device only.
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::CudaDevice),
}

impl std::fmt::Debug for Residence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host => f.write_str("Host"),
            #[cfg(feature = "cuda")]
            Self::Cuda(d) => write!(f, "Cuda({:?})", d.id()),
        }
    }
}

impl Residence {
    /// Where a model running on `device` keeps its blocks: on the device
    /// for CUDA, in host memory otherwise.
    pub fn of(device: &Device) -> Self {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Self::Cuda(d.clone()),
            _ => Self::Host,
        }
    }

    /// `value` where this residence keeps it: as is on the host, or
    /// uploaded by `upload` with the host copy dropped.
    #[cfg(feature = "cuda")]
    pub fn place<H, D>(
        &self,
        value: H,
        upload: impl FnOnce(&candle_core::cuda_backend::CudaDevice, &H) -> candle_core::Result<D>,
    ) -> candle_core::Result<Resident<H, D>> {
        Ok(match self {
            Self::Host => Resident::host(value),
            Self::Cuda(device) => Resident::Device(device.id(), Arc::new(upload(device, &value)?)),
        })
    }
}

/// A block, plane or grid as a running model holds it (`H` on the host,
/// `D` its upload).
pub enum Resident<H, D> {
    /// In host memory, with its upload made on the first CUDA forward.
    Host(H, DeviceCopy<D>),
    /// On this CUDA device only.
    #[cfg(feature = "cuda")]
    Device(candle_core::cuda_backend::DeviceId, Arc<D>),
}

impl<H, D> Resident<H, D> {
    pub fn host(value: H) -> Self {
        Self::Host(value, DeviceCopy::default())
    }

    /// The host copy; none when the value lives on a device only.
    pub fn on_host(&self) -> Option<&H> {
        match self {
            Self::Host(h, _) => Some(h),
            #[cfg(feature = "cuda")]
            Self::Device(..) => None,
        }
    }

    /// Bytes held: `host` of the host copy, or the upload's device bytes.
    pub fn bytes(&self, host: impl FnOnce(&H) -> usize) -> usize
    where
        D: DeviceBytes,
    {
        match self {
            Self::Host(h, _) => host(h),
            #[cfg(feature = "cuda")]
            Self::Device(_, d) => d.device_bytes(),
        }
    }

    /// The upload on `device`: the one made when it was placed there, or
    /// (host-resident) made by `upload` on first use and kept.
    #[cfg(feature = "cuda")]
    pub fn on_device(
        &self,
        device: &candle_core::cuda_backend::CudaDevice,
        upload: impl FnOnce(&H) -> candle_core::Result<D>,
    ) -> candle_core::Result<Arc<D>> {
        match self {
            Self::Host(h, copy) => copy.get_or_try_make(device, || upload(h)),
            Self::Device(id, d) if *id == device.id() => Ok(d.clone()),
            Self::Device(id, _) => candle_core::bail!(
                "a BitStack block resident on CUDA device {id:?} was used on device {:?}",
                device.id()
            ),
        }
    }
}

impl<H: Clone, D> Clone for Resident<H, D> {
    fn clone(&self) -> Self {
        match self {
            Self::Host(h, copy) => Self::Host(h.clone(), copy.clone()),
            #[cfg(feature = "cuda")]
            Self::Device(id, d) => Self::Device(*id, d.clone()),
        }
    }
}

impl<H: std::fmt::Debug, D> std::fmt::Debug for Resident<H, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host(h, _) => f.debug_tuple("Host").field(h).finish(),
            #[cfg(feature = "cuda")]
            Self::Device(id, _) => write!(f, "Device({id:?})"),
        }
    }
}

/// Host values compare by value; device ones are equal when they are the
/// same upload.
impl<H: PartialEq, D> PartialEq for Resident<H, D> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Host(a, _), Self::Host(b, _)) => a == b,
            #[cfg(feature = "cuda")]
            (Self::Device(_, a), Self::Device(_, b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }
}

/// Device memory an upload holds.
pub trait DeviceBytes {
    fn device_bytes(&self) -> usize;
}

/// Without CUDA there are no uploads.
impl DeviceBytes for () {
    fn device_bytes(&self) -> usize {
        0
    }
}

#[cfg(feature = "cuda")]
mod cuda_bytes {
    use bitstack_kernels::cuda::{CudaBlock, CudaGridCells, CudaPlane};

    impl super::DeviceBytes for CudaBlock {
        fn device_bytes(&self) -> usize {
            self.bytes()
        }
    }

    impl super::DeviceBytes for CudaPlane {
        fn device_bytes(&self) -> usize {
            self.bytes()
        }
    }

    impl super::DeviceBytes for CudaGridCells {
        fn device_bytes(&self) -> usize {
            self.bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_model_keeps_its_blocks_in_host_memory() {
        assert!(matches!(Residence::of(&Device::Cpu), Residence::Host));
        let r: Resident<Vec<u8>, ()> = Resident::host(vec![1, 2, 3]);
        assert_eq!(r.on_host(), Some(&vec![1, 2, 3]));
        assert_eq!(r.bytes(|v| 10 * v.len()), 30);
        assert_eq!(r.clone(), r);
        assert_ne!(r, Resident::host(vec![1, 2]));
    }
}
