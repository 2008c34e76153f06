//! Kernels for BitStack linears.
//!
//! A BitStack weight is `W = Σ_b S_b ⊙ (u_b·vt_b)`: per block a packed ±1
//! sign matrix `S_b` (`m×n`, row-major, most significant bit first, bit 1 =
//! +1) and f16 factors `u_b` (`m×k`) and `vt_b` (`k×n`). The kernels
//! compute `y = x·Wᵀ` from the packed bits, never building the whole `W`.
//!
//! The modules, bottom to top (each imports only modules listed before it):
//!
//! - [`isa`](Isa): the SIMD instruction set, detected at run time, and the
//!   macro that compiles a kernel body once per instruction set.
//! - [`layout`]: packed sign bits and their one reader
//!   ([`row_major_sign`]), the re-tiled signs the CPU kernels read
//!   ([`TiledSigns`]), and the blocks of a linear, borrowed ([`BlockRef`],
//!   [`StackRef`]) and owned ([`OwnedStack`]).
//! - The CPU kernels, each `x·Wᵀ` over a [`StackRef`]:
//!   - [`reference::reference_matmul_t`], one weight at a time in f64, what
//!     every fast path is tested against;
//!   - [`tmac::shuffle_matmul_t`], up to 8 rows of `x`: int8 tables of
//!     signed sums, looked up for 32 rows of `W` at a time by a byte
//!     shuffle (AVX2);
//!   - [`decode::table_matmul_t`], the same for CPUs without AVX2: f32
//!     tables, one lookup feeding `k` sums;
//!   - [`prefill::panel_matmul_t`], many rows: `W` rebuilt a panel of
//!     columns at a time and multiplied with `gemm`.
//! - [`cuda`]: the sign layout of the CUDA kernels ([`cuda::pack`]) and,
//!   with the `cuda` feature, the blocks on the device and the kernels'
//!   launches (`CudaBlock`, `CudaStack`).
//! - [`dispatch`]: [`stack_matmul_t`], the fastest CPU kernel for this
//!   machine and row count.
//! - [`op`]: [`BitStackMatmul`], the kernels as a candle custom op for f32,
//!   f16 and bf16 activations on the CPU and (with `cuda`) on CUDA tensors,
//!   over any [`StackSource`]; [`bitstack_matmul`] applies it to a tensor.

pub mod cuda;
pub mod decode;
pub mod dispatch;
mod isa;
pub mod layout;
pub mod op;
pub mod prefill;
pub mod reference;
pub mod tmac;

pub use dispatch::{stack_matmul_t, DECODE_MAX_ROWS};
pub use isa::Isa;
pub use layout::{
    packed_sign, row_major_sign, tiled_row, BlockRef, OwnedBlock, OwnedStack, StackRef, TiledSigns,
};
pub use op::{bitstack_matmul, BitStackMatmul, StackSource};
