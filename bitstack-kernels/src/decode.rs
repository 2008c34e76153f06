//! Decode: `x·Wᵀ` for a few rows of `x` from lookup tables over sign bits.
//!
//! For block `b` and rank index `j`, `Z_bj = vt_b[j] ⊙ x` is a length-`n`
//! vector, and output `i` needs `t_bj[i] = Σ_c S_b[i,c]·Z_bj[c]`. Columns
//! are taken four at a time: the four sign bits of row `i` form a nibble
//! `p`, and a table entry `T[g][p][j] = Σ_q ±Z_bj[4g+q]` (the signs spelled
//! by `p`) holds the signed sum for all `k` vectors. A row of `W` then costs
//! one table lookup of `k` contiguous floats per nibble instead of `4·k`
//! multiply-adds, and the `k` sums are folded with `u_b[i]` at the end.
//!
//! The tables of one block and one column chunk are sized to stay in the
//! L2 cache while every output row scans them; because the result is linear
//! in the partial sums, each chunk's sums are folded into `y` right away and
//! nothing per row outlives a chunk.
//!
//! A stack's grid planes are added after the blocks by [`crate::grid`].

use std::cell::RefCell;

use rayon::prelude::*;

use crate::layout::{nibble_sign, tiled_row, StackRef};
use crate::{grid, multiversion, Isa};

/// Bytes of tables (one block, one column chunk, all rows of `x`) that the
/// row scan keeps hot.
const TABLE_BUDGET: usize = 64 << 10;

/// Output rows per parallel task at least: each task reads every table once.
const MIN_TASK_ROWS: usize = 32;

thread_local! {
    /// Table memory reused across calls: a fresh multi-MiB buffer per call
    /// would cost page faults on every token.
    static TABLES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How the tables of one call are laid out.
#[derive(Clone, Copy, Debug)]
struct Layout {
    n: usize,
    k: usize,
    rows: usize,
    /// Four-column groups per chunk (even, so chunks start on a byte).
    chunk_groups: usize,
    chunks: usize,
}

impl Layout {
    fn new(n: usize, k: usize, rows: usize) -> Self {
        let groups = n.div_ceil(8) * 2;
        let fit = TABLE_BUDGET / (rows * 16 * k * 4);
        let chunk_groups = (fit & !1).clamp(2, groups);
        Self {
            n,
            k,
            rows,
            chunk_groups,
            chunks: groups.div_ceil(chunk_groups),
        }
    }

    /// Floats of the tables of one (block, chunk, row of x).
    fn unit(&self) -> usize {
        self.chunk_groups * 16 * self.k
    }

    /// Offset of the tables of (block, chunk, row of x).
    fn offset(&self, block: usize, chunk: usize, row: usize) -> usize {
        ((block * self.chunks + chunk) * self.rows + row) * self.unit()
    }
}

/// `out = x·Wᵀ` (`x`: `rows×n`, `out`: `rows×m`) with the code compiled for `isa`.
pub fn table_matmul_t(isa: Isa, x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    stack.check();
    let (m, n, k) = (stack.m, stack.n, stack.k);
    assert_eq!(x.len(), rows * n, "x is not rows×n");
    assert_eq!(out.len(), rows * m, "out is not rows×m");
    assert!(
        rows <= MAX_ROWS,
        "the decode kernel takes at most {MAX_ROWS} rows"
    );
    if stack.blocks.is_empty() || k == 0 || rows == 0 || m == 0 || n == 0 {
        out.fill(0.0);
    } else {
        blocks_matmul_t(isa, x, rows, stack, out);
    }
    if let Some(grid) = &stack.grid {
        grid::grid_matmul_t_add(isa, x, rows, m, n, grid, out);
    }
}

/// `out = x·Wᵀ` for the blocks of `stack` alone (at least one, `k ≥ 1`).
fn blocks_matmul_t(isa: Isa, x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    let (m, n, k) = (stack.m, stack.n, stack.k);
    let layout = Layout::new(n, k, rows);
    TABLES.with(|cell| {
        // A call from a rayon task while this thread waits inside another
        // call (nested parallelism) finds the buffer taken: it gets its own.
        let mut own = Vec::new();
        let mut shared = cell.try_borrow_mut();
        let tables = match &mut shared {
            Ok(t) => &mut **t,
            Err(_) => &mut own,
        };
        let len = stack.blocks.len() * layout.chunks * rows * layout.unit();
        if tables.len() < len {
            tables.resize(len, 0.0);
        }
        let tables = &mut tables[..len];
        tables
            .par_chunks_mut(layout.unit())
            .enumerate()
            .for_each(|(unit, t)| {
                let row = unit % rows;
                let chunk = (unit / rows) % layout.chunks;
                let block = unit / (rows * layout.chunks);
                let col0 = chunk * layout.chunk_groups * 4;
                build_tables(
                    isa,
                    t,
                    stack.blocks[block].vt,
                    &x[row * n..][..n],
                    col0,
                    layout,
                );
            });

        // y as m×rows, so that each task owns a contiguous slice.
        let mut y = vec![0f32; m * rows];
        let tables = &*tables;
        // A few tasks per thread: enough to balance, few enough that the
        // tables are not re-read from far caches for every handful of rows.
        let task_rows = m
            .div_ceil(4 * rayon::current_num_threads())
            .max(MIN_TASK_ROWS);
        y.par_chunks_mut(task_rows * rows)
            .enumerate()
            .for_each(|(task, y)| {
                scan_rows(isa, tables, stack, layout, task * task_rows, y);
            });
        for (i, yi) in y.chunks_exact(rows).enumerate() {
            for (r, v) in yi.iter().enumerate() {
                out[r * m + i] = *v;
            }
        }
    });
}

multiversion!(fn build_tables(t: &mut [f32], vt: &[half::f16], x: &[f32], col0: usize, layout: Layout) => build_tables_body);

/// The tables of one chunk of columns starting at `col0`, for one block and one row of x.
#[inline(always)]
fn build_tables_body(t: &mut [f32], vt: &[half::f16], x: &[f32], col0: usize, layout: Layout) {
    let (n, k) = (layout.n, layout.k);
    let mut z = [0f32; 4 * 64];
    for (g, entries) in t.chunks_exact_mut(16 * k).enumerate() {
        let c0 = col0 + 4 * g;
        for j0 in (0..k).step_by(64) {
            let kk = (k - j0).min(64);
            // z[q][j] = vt[j, c0+q] · x[c0+q]; zero past the last column.
            for q in 0..4 {
                let c = c0 + q;
                for jj in 0..kk {
                    z[q * 64 + jj] = if c < n {
                        vt[(j0 + jj) * n + c].to_f32() * x[c]
                    } else {
                        0.0
                    };
                }
            }
            for (p, entry) in entries.chunks_exact_mut(k).enumerate() {
                // Bit 3 of the nibble is the group's first column.
                let s = |q: usize| {
                    if nibble_sign(p, q) {
                        1.0f32
                    } else {
                        -1.0
                    }
                };
                let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                for jj in 0..kk {
                    entry[j0 + jj] =
                        s0 * z[jj] + s1 * z[64 + jj] + s2 * z[128 + jj] + s3 * z[192 + jj];
                }
            }
        }
    }
}

multiversion!(fn scan_rows(tables: &[f32], stack: &StackRef, layout: Layout, i0: usize, y: &mut [f32]) => scan_rows_body);

/// Adds every block's contribution to outputs `i0..` (`y` is `rows` values per output).
#[inline(always)]
fn scan_rows_body(tables: &[f32], stack: &StackRef, layout: Layout, i0: usize, y: &mut [f32]) {
    match layout.k {
        1 => scan_rows_k::<1>(tables, stack, layout, i0, y),
        2 => scan_rows_k::<2>(tables, stack, layout, i0, y),
        4 => scan_rows_k::<4>(tables, stack, layout, i0, y),
        8 => scan_rows_k::<8>(tables, stack, layout, i0, y),
        16 => scan_rows_k::<16>(tables, stack, layout, i0, y),
        32 => scan_rows_k::<32>(tables, stack, layout, i0, y),
        _ => scan_rows_any(tables, stack, layout, i0, y),
    }
}

/// Largest number of rows of `x` the decode kernel takes in one pass.
pub const MAX_ROWS: usize = 8;

#[inline(always)]
fn scan_rows_k<const K: usize>(
    tables: &[f32],
    stack: &StackRef,
    layout: Layout,
    i0: usize,
    y: &mut [f32],
) {
    let (n, rows) = (layout.n, layout.rows);
    let row_bytes = n.div_ceil(8);
    let chunk_bytes = layout.chunk_groups / 2;
    let outputs = y.len() / rows;
    let mut row = vec![0u8; layout.chunk_groups / 2];
    for (b, block) in stack.blocks.iter().enumerate() {
        for chunk in 0..layout.chunks {
            let byte0 = chunk * chunk_bytes;
            let nbytes = chunk_bytes.min(row_bytes - byte0);
            for o in 0..outputs {
                let i = i0 + o;
                let bits = &mut row[..nbytes];
                tiled_row(block.signs, i, byte0, bits);
                let mut acc = [[0f32; K]; MAX_ROWS];
                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                    let t = &tables[layout.offset(b, chunk, r)..][..layout.unit()];
                    *acc = lookup_sum::<K>(t.as_chunks::<K>().0, bits);
                }
                let u = &block.u[i * K..][..K];
                let mut uf = [0f32; K];
                for j in 0..K {
                    uf[j] = u[j].to_f32();
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let mut s = 0f32;
                    for j in 0..K {
                        s += uf[j] * acc[j];
                    }
                    y[o * rows + r] += s;
                }
            }
        }
    }
}

/// `Σ_q T[2q][hi(bits[q])] + T[2q+1][lo(bits[q])]` over the bytes of one
/// row's chunk, where `t` holds 16 entries of `K` floats per group.
///
/// Four independent accumulators: one running sum would wait on the
/// latency of every add.
#[inline(always)]
fn lookup_sum<const K: usize>(t: &[[f32; K]], bits: &[u8]) -> [f32; K] {
    assert!(t.len() >= bits.len() * 32, "tables shorter than the row");
    let mut acc = [[0f32; K]; 4];
    let entry = |q: usize, byte: u8| -> (&[f32; K], &[f32; K]) {
        // SAFETY: q < bits.len(), so both indices are below bits.len()·32 ≤ t.len().
        unsafe {
            (
                t.get_unchecked(q * 32 + (byte >> 4) as usize),
                t.get_unchecked(q * 32 + 16 + (byte & 15) as usize),
            )
        }
    };
    let quads = bits.len() / 4;
    for q4 in 0..quads {
        for (s, acc) in acc.iter_mut().enumerate() {
            let q = q4 * 4 + s;
            // SAFETY: q < quads·4 ≤ bits.len().
            let (hi, lo) = entry(q, unsafe { *bits.get_unchecked(q) });
            for j in 0..K {
                acc[j] += hi[j] + lo[j];
            }
        }
    }
    for (q, &byte) in bits.iter().enumerate().skip(quads * 4) {
        let (hi, lo) = entry(q, byte);
        for j in 0..K {
            acc[0][j] += hi[j] + lo[j];
        }
    }
    let mut sum = [0f32; K];
    for j in 0..K {
        sum[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    }
    sum
}

/// As [`scan_rows_k`] for a rank with no specialized kernel.
#[inline(always)]
fn scan_rows_any(tables: &[f32], stack: &StackRef, layout: Layout, i0: usize, y: &mut [f32]) {
    let (n, k, rows) = (layout.n, layout.k, layout.rows);
    let row_bytes = n.div_ceil(8);
    let chunk_bytes = layout.chunk_groups / 2;
    let outputs = y.len() / rows;
    let mut row = vec![0u8; layout.chunk_groups / 2];
    let mut acc = vec![0f32; k];
    for (b, block) in stack.blocks.iter().enumerate() {
        for chunk in 0..layout.chunks {
            let byte0 = chunk * chunk_bytes;
            let nbytes = chunk_bytes.min(row_bytes - byte0);
            for o in 0..outputs {
                let i = i0 + o;
                let bits = &mut row[..nbytes];
                tiled_row(block.signs, i, byte0, bits);
                for r in 0..rows {
                    acc.fill(0.0);
                    let t = &tables[layout.offset(b, chunk, r)..][..layout.unit()];
                    for (&byte, t) in bits.iter().zip(t.chunks_exact(32 * k)) {
                        let hi = &t[(byte >> 4) as usize * k..][..k];
                        let lo = &t[(16 + (byte & 15) as usize) * k..][..k];
                        for j in 0..k {
                            acc[j] += hi[j] + lo[j];
                        }
                    }
                    let s: f32 = (0..k).map(|j| block.u[i * k + j].to_f32() * acc[j]).sum();
                    y[o * rows + r] += s;
                }
            }
        }
    }
}
