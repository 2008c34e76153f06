//! Prefill: `x·Wᵀ` for many rows of `x`, rebuilding `W` a tile at a time.
//!
//! With hundreds of rows the product itself dominates, so the fastest path
//! is a good GEMM. Each task rebuilds a tile of rows of `W` from every
//! resident block into a buffer that stays in cache, then multiplies `x` by
//! it into its columns of the output: the whole `W` is never held.

use rayon::prelude::*;

use crate::bits::{tiled_row, SIGN_MASKS};
use crate::tmac::TiledStackRef as StackRef;
use crate::{multiversion, Isa};

/// Bytes of one rebuilt tile: small enough to stay in L2 between the
/// rebuild and the GEMM that reads it.
const TILE_BUDGET: usize = 256 << 10;

/// Rows of `W` per tile for rows of `n` weights.
fn tile_rows(n: usize) -> usize {
    (TILE_BUDGET / (4 * n.max(1))).clamp(16, 256) / 8 * 8
}

/// The output pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only the columns of its own tile.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The output at column `i` of row 0 (a method, so that closures
    /// capture the whole `Send` wrapper rather than the raw pointer).
    fn column(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass i < m, inside the output.
        unsafe { self.0.add(i) }
    }
}

/// `out = x·Wᵀ` (`x`: `rows×n`, `out`: `rows×m`) with the rebuild compiled for `isa`.
pub fn matmul_t(isa: Isa, x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    stack.check();
    let (m, n) = (stack.m, stack.n);
    assert_eq!(x.len(), rows * n, "x is not rows×n");
    assert_eq!(out.len(), rows * m, "out is not rows×m");
    if stack.blocks.is_empty() || rows == 0 || m == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    // vt in f32 once per call: every row of every tile reads all of it.
    let vt: Vec<Vec<f32>> = stack
        .blocks
        .par_iter()
        .map(|b| b.vt.iter().map(|v| v.to_f32()).collect())
        .collect();
    let tile = tile_rows(n);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..m.div_ceil(tile)).into_par_iter().for_each_init(
        || Scratch::new(tile, n),
        |scratch, t| {
            let i0 = t * tile;
            let mt = tile.min(m - i0);
            let w = &mut scratch.tile[..mt * n];
            rebuild(
                isa,
                w,
                stack,
                &vt,
                i0,
                &mut scratch.row,
                &mut scratch.aligned,
            );
            // SAFETY: `w` is mt×n row-major, read as the n×mt matrix Wᵀ;
            // `x` is rows×n; the destination is the rows×mt block of `out`
            // at column i0, which no other task writes. Sizes were checked
            // above.
            unsafe {
                gemm::gemm(
                    rows,
                    mt,
                    n,
                    out_ptr.column(i0),
                    1,
                    m as isize,
                    false,
                    x.as_ptr(),
                    1,
                    n as isize,
                    w.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

/// Per-task buffers, allocated once per task and reused for its tiles.
struct Scratch {
    tile: Vec<f32>,
    row: Vec<f32>,
    aligned: Vec<u8>,
}

impl Scratch {
    fn new(tile: usize, n: usize) -> Self {
        Self {
            tile: vec![0.0; tile * n],
            row: vec![0.0; n],
            aligned: vec![0u8; n.div_ceil(8)],
        }
    }
}

multiversion!(fn rebuild(w: &mut [f32], stack: &StackRef, vt: &[Vec<f32>], i0: usize, row: &mut [f32], aligned: &mut [u8]) => rebuild_body);

/// Rows `i0..` of `W` into `w`: per block, `u[i]·vt` with its signs applied.
#[inline(always)]
fn rebuild_body(
    w: &mut [f32],
    stack: &StackRef,
    vt: &[Vec<f32>],
    i0: usize,
    row: &mut [f32],
    aligned: &mut [u8],
) {
    let (n, k) = (stack.n, stack.k);
    let row_bytes = n.div_ceil(8);
    let full = n / 8;
    for (ii, wi) in w.chunks_exact_mut(n).enumerate() {
        let i = i0 + ii;
        wi.fill(0.0);
        for (block, vt) in stack.blocks.iter().zip(vt) {
            row.fill(0.0);
            for (j, vtj) in vt.chunks_exact(n).enumerate() {
                let uij = block.u[i * k + j].to_f32();
                for (r, v) in row.iter_mut().zip(vtj) {
                    *r += uij * v;
                }
            }
            let bits = &mut aligned[..row_bytes];
            tiled_row(block.signs, i, 0, bits);
            for ((&byte, wq), rq) in bits[..full]
                .iter()
                .zip(wi.chunks_exact_mut(8))
                .zip(row.chunks_exact(8))
            {
                let mask = &SIGN_MASKS[byte as usize];
                for t in 0..8 {
                    wq[t] += f32::from_bits(rq[t].to_bits() ^ mask[t]);
                }
            }
            for c in full * 8..n {
                let mask = SIGN_MASKS[bits[full] as usize][c - full * 8];
                wi[c] += f32::from_bits(row[c].to_bits() ^ mask);
            }
        }
    }
}
