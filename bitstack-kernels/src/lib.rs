//! Kernels for BitStack linears.
//!
//! A BitStack weight is `W = Σ_b S_b ⊙ (u_b·vt_b) + W_grid`: per AVD block a
//! packed ±1 sign matrix `S_b` (`m×n`, row-major, most significant bit
//! first, bit 1 = +1) and f16 factors `u_b` (`m×k`) and `vt_b` (`k×n`);
//! then, optionally, grid planes: nested sign planes of the residual on a
//! per-(row, group) uniform grid, `W_grid[i,c] = center + half·Σ_b
//! s_b(i,c)·2^-(b+1)` plus a few exact outliers per group (see
//! [`GridRef`]). The kernels compute `y = x·Wᵀ` from the packed bits, never
//! building the whole `W`.
//!
//! The modules, bottom to top (each imports only modules listed before it):
//!
//! - [`isa`](Isa): the SIMD instruction set, detected at run time, and the
//!   macro that compiles a kernel body once per instruction set.
//! - [`layout`]: packed sign bits and their one reader
//!   ([`row_major_sign`]), the re-tiled signs the CPU kernels read
//!   ([`TiledSigns`]), and the blocks of a linear, borrowed ([`BlockRef`],
//!   [`StackRef`]) and owned ([`OwnedStack`]), with their grid planes
//!   ([`GridRef`], [`OwnedGrid`]).
//! - The CPU kernels, each `x·Wᵀ` over a [`StackRef`], blocks and grid:
//!   - [`reference::reference_matmul_t`], one weight at a time in f64, what
//!     every fast path is tested against;
//!   - [`grid::grid_matmul_t_add`], the grid planes of a few rows of `x`
//!     from f32 tables of subset sums shared by every plane, any group
//!     size (the decode kernels call it);
//!   - [`tmac::shuffle_matmul_t`], up to 8 rows of `x`: int8 tables of
//!     signed sums, looked up for 32 rows of `W` at a time by a byte
//!     shuffle (AVX2); grid planes whose groups start on a sign byte take
//!     tables of `x` itself, one set for every plane;
//!   - [`decode::table_matmul_t`], the same for CPUs without AVX2: f32
//!     tables, one lookup feeding `k` sums;
//!   - [`prefill::panel_matmul_t`], many rows: `W` (grid included) rebuilt
//!     a panel of columns at a time and multiplied with `gemm`.
//! - [`cuda`]: the sign layout of the CUDA kernels ([`cuda::pack`]) and,
//!   with the `cuda` feature, the blocks and grid planes on the device and
//!   the kernels' launches (`CudaBlock`, `CudaGrid`, `CudaStack`).
//! - [`dispatch`]: [`stack_matmul_t`], the fastest CPU kernel for this
//!   machine and row count.
//! - [`op`]: [`BitStackMatmul`], the kernels as a candle custom op for f32,
//!   f16 and bf16 activations on the CPU and (with `cuda`) on CUDA tensors,
//!   over any [`StackSource`]; [`bitstack_matmul`] applies it to a tensor.

pub mod cuda;
pub mod decode;
pub mod dispatch;
pub mod grid;
mod isa;
pub mod layout;
pub mod op;
pub mod prefill;
pub mod reference;
pub mod tmac;

pub use dispatch::{stack_matmul_t, DECODE_MAX_ROWS};
pub use isa::Isa;
pub use layout::{
    packed_sign, plane_weight, row_major_sign, tiled_row, BlockRef, GridRef, OwnedBlock, OwnedGrid,
    OwnedStack, StackRef, TiledSigns,
};
pub use op::{bitstack_matmul, BitStackMatmul, StackSource};
