//! CUDA: the sign layout the kernels read ([`pack`], always compiled, so
//! that it is tested on any machine) and, with the `cuda` feature, the
//! host side that uploads blocks and grid planes and launches the kernels
//! of `bitstack.cu` on candle CUDA tensors (`CudaBlock`, `CudaPlane`, `CudaGridCells`, `CudaGrid`,
//! `CudaStack`), and hands memory freed by a shrink back to the driver
//! ([`memory`]).

#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
pub mod memory;
pub mod pack;

#[cfg(feature = "cuda")]
pub use driver::{CudaBlock, CudaGrid, CudaGridCells, CudaPlane, CudaStack, DECODE_MAX_ROWS};
