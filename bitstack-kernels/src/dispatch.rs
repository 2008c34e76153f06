//! Which CPU kernel multiplies: by instruction set and by rows of `x`.

use crate::layout::StackRef;
use crate::{decode, prefill, tmac, Isa};

/// Rows of `x` up to which [`stack_matmul_t`] takes the decode kernels (8
/// rows at a time); above it, rebuilding tiles of `W` for a GEMM is faster.
/// Measured with `bitstack bench --rows 1,2,4,8,…`: on 2 AVX2 cores the
/// shuffle kernel costs about 0.8 ms per row at 4096×4096 (4 blocks, k = 4)
/// against 37 ms of rebuilding plus 0.4 ms per row for the GEMM.
pub const DECODE_MAX_ROWS: usize = 32;

/// `out = x·Wᵀ` for `x` of `rows×n` and `out` of `rows×m`, both row-major,
/// on the fastest kernel for this machine and row count.
pub fn stack_matmul_t(x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
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
                Isa::Avx2 | Isa::Avx512 => tmac::shuffle_matmul_t(isa, x, rows, stack, out),
                Isa::Baseline => decode::table_matmul_t(isa, x, rows, stack, out),
            }
        }
    } else {
        prefill::panel_matmul_t(isa, x, rows, stack, out)
    }
}
