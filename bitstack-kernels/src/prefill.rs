//! Prefill: `x·Wᵀ` for many rows of `x`, rebuilding `W` a panel at a time.
//!
//! With hundreds of rows the product itself dominates, so the fastest path
//! is a good GEMM. `W` is rebuilt one panel of [`PANEL_COLS`] columns at a
//! time (all rows, every resident block), and each panel is multiplied with
//! the matching columns of `x` into the output, accumulating: the whole `W`
//! is never held, the `k×PANEL_COLS` slice of each `vt` the rebuild reads
//! stays in L1, and the GEMM packs each operand once. A stack's grid
//! planes are dequantized into the same panel.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::layout::{plane_weight, tiled_row, GridRef, StackRef, SIGN_MASKS};
use crate::{multiversion, Isa};

/// Columns of `W` per panel: a multiple of 8, so panels start on a sign byte.
pub const PANEL_COLS: usize = 256;

/// Rows of a panel per rebuild task.
const TASK_ROWS: usize = 64;

thread_local! {
    /// The panel buffer, reused across calls to spare the page faults of a
    /// fresh multi-MiB allocation per call.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out = x·Wᵀ` (`x`: `rows×n`, `out`: `rows×m`) with the rebuild compiled for `isa`.
pub fn panel_matmul_t(isa: Isa, x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    stack.check();
    let (m, n) = (stack.m, stack.n);
    assert_eq!(x.len(), rows * n, "x is not rows×n");
    assert_eq!(out.len(), rows * m, "out is not rows×m");
    if stack.is_empty() || rows == 0 || m == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    // Blocks of rank 0 add nothing (and would make empty chunks below).
    let rank_zero;
    let stack = if stack.k == 0 && !stack.blocks.is_empty() {
        rank_zero = StackRef {
            blocks: Vec::new(),
            ..stack.clone()
        };
        &rank_zero
    } else {
        stack
    };
    // vt in f32 once per call, eight columns at a time: `[n/8][k][8]`, so
    // that the rebuild of eight columns reads one contiguous run.
    let k = stack.k;
    let vt: Vec<Vec<f32>> = stack
        .blocks
        .par_iter()
        .map(|b| {
            let mut t = vec![0f32; n.div_ceil(8) * 8 * k];
            for j in 0..k {
                for (c, v) in b.vt[j * n..(j + 1) * n].iter().enumerate() {
                    t[((c / 8) * k + j) * 8 + c % 8] = v.to_f32();
                }
            }
            t
        })
        .collect();
    let threads = rayon::current_num_threads();
    PANEL.with(|cell| {
        // A call from inside a rayon task that already holds the buffer
        // gets its own.
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let panel = match &mut borrowed {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        if panel.len() < m * PANEL_COLS {
            panel.resize(m * PANEL_COLS, 0.0);
        }
        for (p, c0) in (0..n).step_by(PANEL_COLS).enumerate() {
            let cols = PANEL_COLS.min(n - c0);
            let w = &mut panel[..m * cols];
            w.par_chunks_mut(TASK_ROWS * cols)
                .enumerate()
                .for_each(|(t, w)| rebuild(isa, w, stack, &vt, t * TASK_ROWS, c0, cols));
            // SAFETY: `w` is m×cols row-major, read as the cols×m matrix
            // Wᵀ[c0.., ..]; `x` is rows×n, read from column c0; `out` is
            // rows×m. All sizes were checked above.
            unsafe {
                gemm::gemm(
                    rows,
                    m,
                    cols,
                    out.as_mut_ptr(),
                    1,
                    m as isize,
                    p > 0,
                    x.as_ptr().add(c0),
                    1,
                    n as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        }
    });
}

multiversion!(fn rebuild(w: &mut [f32], stack: &StackRef, vt: &[Vec<f32>], i0: usize, c0: usize, cols: usize) => rebuild_body);

/// Columns `c0..c0 + cols` of rows `i0..` of `W` into `w` (`cols` per row):
/// per block, `u[i]·vt` with its signs applied, then the grid's weights.
#[inline(always)]
fn rebuild_body(
    w: &mut [f32],
    stack: &StackRef,
    vt: &[Vec<f32>],
    i0: usize,
    c0: usize,
    cols: usize,
) {
    let k = stack.k;
    let full = cols / 8;
    let mut signs = [0u8; PANEL_COLS / 8];
    let signs = &mut signs[..cols.div_ceil(8)];
    let mut u = vec![0f32; k];
    for (ii, wi) in w.chunks_exact_mut(cols).enumerate() {
        let i = i0 + ii;
        wi.fill(0.0);
        for (block, vt) in stack.blocks.iter().zip(vt) {
            for (uj, h) in u.iter_mut().zip(&block.u[i * k..][..k]) {
                *uj = h.to_f32();
            }
            tiled_row(block.signs, i, c0 / 8, signs);
            // Eight columns at a time, the sum over ranks held in registers.
            let vt = &vt[c0 * k..];
            for ((&byte, wq), vq) in signs[..full]
                .iter()
                .zip(wi.chunks_exact_mut(8))
                .zip(vt.chunks_exact(8 * k))
            {
                let mut acc = [0f32; 8];
                for (uj, v) in u.iter().zip(vq.chunks_exact(8)) {
                    for t in 0..8 {
                        acc[t] += uj * v[t];
                    }
                }
                let mask = &SIGN_MASKS[byte as usize];
                for t in 0..8 {
                    wq[t] += f32::from_bits(acc[t].to_bits() ^ mask[t]);
                }
            }
            for cc in full * 8..cols {
                let base = (cc / 8) * k * 8 + cc % 8;
                let r: f32 = u
                    .iter()
                    .enumerate()
                    .map(|(j, uj)| uj * vt[base + j * 8])
                    .sum();
                let mask = SIGN_MASKS[signs[full] as usize][cc - full * 8];
                wi[cc] += f32::from_bits(r.to_bits() ^ mask);
            }
        }
        if let Some(grid) = &stack.grid {
            add_grid_row(grid, stack.n, i, c0, signs, wi);
        }
    }
}

/// Adds columns `c0..c0 + wi.len()` of row `i` of the grid's weights to
/// `wi` (`signs` holds a sign byte per 8 of those columns, as scratch).
#[inline(always)]
fn add_grid_row(grid: &GridRef, n: usize, i: usize, c0: usize, signs: &mut [u8], wi: &mut [f32]) {
    let cols = wi.len();
    // Σ_b ±2^-(b+1) per column: sums of distinct powers of two, exact.
    let mut levels = [0f32; PANEL_COLS];
    let levels = &mut levels[..cols.div_ceil(8) * 8];
    for (b, plane) in grid.planes.iter().enumerate() {
        let w = plane_weight(b).to_bits();
        tiled_row(plane, i, c0 / 8, signs);
        for (&byte, lq) in signs.iter().zip(levels.chunks_exact_mut(8)) {
            let mask = &SIGN_MASKS[byte as usize];
            for t in 0..8 {
                lq[t] += f32::from_bits(w ^ mask[t]);
            }
        }
    }
    let groups = grid.groups(n);
    let (g0, g1) = (c0 / grid.group, (c0 + cols).div_ceil(grid.group));
    for g in g0..g1 {
        let cell = i * groups + g;
        let (center, half) = grid.range(groups, cell);
        let lo = (g * grid.group).max(c0) - c0;
        let hi = ((g + 1) * grid.group).min(c0 + cols) - c0;
        // The grid's weights, in place of the levels, then each outlier's
        // value in place of its grid point.
        for l in &mut levels[lo..hi] {
            *l = center + half * *l;
        }
        let o = grid.outliers;
        for slot in cell * o..(cell + 1) * o {
            let c = g * grid.group + grid.outlier_col[slot] as usize;
            if (c0..c0 + cols).contains(&c) {
                levels[c - c0] = grid.values.outlier(groups * o, slot);
            }
        }
    }
    for (w, l) in wi.iter_mut().zip(levels.iter()) {
        *w += l;
    }
}
