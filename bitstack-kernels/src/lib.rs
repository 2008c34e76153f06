//! CPU kernels for BitStack linears.
//!
//! A BitStack weight is `W = Σ_b S_b ⊙ (u_b·vt_b)`: per block a packed ±1
//! sign matrix `S_b` (`m×n`, row-major, most significant bit first, bit 1 =
//! +1) and f16 factors `u_b` (`m×k`) and `vt_b` (`k×n`). These kernels
//! compute `y = x·Wᵀ` from the packed bits, never building the whole `W`.
//! A resident block holds its signs re-tiled ([`TiledSigns`]: 32 rows side
//! by side), made once when it is loaded.
//!
//! - [`tmac`] (up to 32 rows of `x`, with AVX2): with `Z_bj = vt_b[j] ⊙ x`,
//!   each output is `Σ_b Σ_j u_b[i,j]·(S_b[i] · Z_bj)`; four sign bits pick
//!   one of 16 signed sums of `Z_bj` held in int8 tables, and a byte shuffle
//!   looks up 32 rows at once.
//! - [`decode`] (the same without AVX2): f32 tables, one entry holding the
//!   signed sums for all `k` vectors, so one lookup feeds `k` accumulators.
//! - [`prefill`] (many rows): the weight is rebuilt a panel of columns at a
//!   time and multiplied with the `gemm` crate.
//! - [`reference`](mod@reference): the straightforward kernel every fast path is tested
//!   against.
//!
//! [`BitStackMatmul`] wraps them as a candle custom op for f32, f16 and bf16
//! activations; with the `cuda` feature the same op runs the kernels of
//! `cuda` on candle CUDA tensors.

mod bits;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
mod isa;
pub mod mma;
pub mod op;
pub mod prefill;
pub mod reference;
pub mod tmac;

pub use bits::tiled_row;
pub use isa::Isa;
pub use op::{BitStackMatmul, StackSource};
pub use tmac::TiledSigns;

use half::f16;

/// One block of a stack, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef<'a> {
    pub signs: &'a TiledSigns,
    /// `m×k`, row-major.
    pub u: &'a [f16],
    /// `k×n`, row-major.
    pub vt: &'a [f16],
}

/// The resident blocks of one `m×n` linear, borrowed.
#[derive(Clone, Debug)]
pub struct StackRef<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub blocks: Vec<BlockRef<'a>>,
}

impl StackRef<'_> {
    /// Panics unless every block has the sizes `m`, `n` and `k` call for:
    /// the kernels index without bounds checks.
    pub fn check(&self) {
        let (m, n, k) = (self.m, self.n, self.k);
        for (i, b) in self.blocks.iter().enumerate() {
            assert_eq!((b.signs.m(), b.signs.n()), (m, n), "signs of block {i}");
            assert_eq!(b.u.len(), m * k, "u of block {i}");
            assert_eq!(b.vt.len(), k * n, "vt of block {i}");
        }
    }
}

/// Rows of `x` up to which [`matmul_t`] takes the decode kernel (8 rows at
/// a time); above it, rebuilding tiles of `W` for a GEMM is faster. Measured
/// with `bitstack bench --rows 1,2,4,8,…`: on 2 AVX2 cores the shuffle
/// kernel costs about 0.8 ms per row at 4096×4096 (4 blocks, k = 4) against
/// 37 ms of rebuilding plus 0.4 ms per row for the GEMM.
pub const DECODE_MAX_ROWS: usize = 32;

/// `out = x·Wᵀ` for `x` of `rows×n` and `out` of `rows×m`, both row-major,
/// on the fastest kernel for this machine and row count.
pub fn matmul_t(x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    assert_eq!(x.len(), rows * stack.n, "x is not rows×n");
    assert_eq!(out.len(), rows * stack.m, "out is not rows×m");
    let isa = Isa::detect();
    if rows <= DECODE_MAX_ROWS {
        let (n, m) = (stack.n, stack.m);
        let step = tmac::MAX_ROWS.min(decode::MAX_ROWS);
        for r0 in (0..rows).step_by(step) {
            let rows = step.min(rows - r0);
            let x = &x[r0 * n..][..rows * n];
            let out = &mut out[r0 * m..][..rows * m];
            match isa {
                // The shuffle kernel needs a byte shuffle to be fast;
                // without AVX2 its scalar emulation loses to the f32 tables.
                Isa::Avx2 | Isa::Avx512 => tmac::matmul_t(isa, x, rows, stack, out),
                Isa::Baseline => decode::matmul_t(isa, x, rows, stack, out),
            }
        }
    } else {
        prefill::matmul_t(isa, x, rows, stack, out)
    }
}
