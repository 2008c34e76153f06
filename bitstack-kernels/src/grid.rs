//! Decode of the grid planes (see [`GridRef`]) from f32 lookup tables, for
//! any group size: the portable path, and the shuffle kernel's for groups
//! that do not start on a sign byte.
//!
//! Per row `i`, group `g` and plane `b`, `Σ_{c∈g} s_b(i,c)·x[c] = 2·P_b − X_g`
//! with `P_b` the sum of `x` over the set bits and `X_g = Σ_{c∈g} x[c]`. The
//! tables hold, per four columns, the sums of `x` over every subset (16
//! entries), so `P_b` costs one lookup per four columns; the tables depend
//! on `x` alone and serve every plane. A sign byte that straddles a group
//! boundary is masked to the group's bits, which the 0/1 subset sums allow
//! (signed sums would not). Then
//!
//! ```text
//! y_i += Σ_g center·X_g + half·(2·Σ_b 2^-(b+1)·P_b − (1 − 2^-p)·X_g) + Σ_t (v − q_p)·x[col]
//! ```
//!
//! where the last sum swaps each outlier's grid point `q_p` (read from the
//! planes' signs at its column, [`GridRef::point`]) for its value `v`.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::layout::{nibble_sign, plane_weight, GridRef, MAX_GROUP, TILE_ROWS};
use crate::{multiversion, Isa};

/// Largest number of rows of `x` one call takes.
pub const MAX_ROWS: usize = 8;

/// Output rows per parallel task at least.
const MIN_TASK_ROWS: usize = 32;

thread_local! {
    /// Tables reused across calls: a fresh buffer per token costs page faults.
    static TABLES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out += x·Wgridᵀ` (`x`: `rows×n`, `out`: `rows×m`) for the grid planes
/// of an `m×n` linear, with the scan compiled for `isa`.
pub fn grid_matmul_t_add(
    isa: Isa,
    x: &[f32],
    rows: usize,
    m: usize,
    n: usize,
    grid: &GridRef,
    out: &mut [f32],
) {
    grid.check(m, n);
    assert_eq!(x.len(), rows * n, "x is not rows×n");
    assert_eq!(out.len(), rows * m, "out is not rows×m");
    assert!(
        rows <= MAX_ROWS,
        "the grid decode takes at most {MAX_ROWS} rows"
    );
    if rows == 0 || m == 0 || n == 0 {
        return;
    }
    let nibbles = 2 * n.div_ceil(8);
    let sums = group_sums(x, rows, n, grid.group);
    TABLES.with(|cell| {
        // A call from a rayon task while this thread waits inside another
        // call finds the buffer taken: it gets its own.
        let mut own = Vec::new();
        let mut shared = cell.try_borrow_mut();
        let tables = match &mut shared {
            Ok(t) => &mut **t,
            Err(_) => &mut own,
        };
        let len = rows * nibbles * 16;
        if tables.len() < len {
            tables.resize(len, 0.0);
        }
        let tables = &mut tables[..len];
        tables
            .par_chunks_mut(nibbles * 16)
            .enumerate()
            .for_each(|(r, t)| subset_tables(t, &x[r * n..][..n]));
        let tables = &*tables;
        // y as m×rows, so that each task owns a contiguous slice.
        let mut y = vec![0f32; m * rows];
        let task_rows = m
            .div_ceil(4 * rayon::current_num_threads())
            .max(MIN_TASK_ROWS);
        let plan = Plan {
            rows,
            n,
            nibbles,
            tables,
            sums: &sums,
            x,
        };
        y.par_chunks_mut(task_rows * rows)
            .enumerate()
            .for_each(|(task, y)| scan_rows(isa, plan, grid, task * task_rows, y));
        for (i, yi) in y.chunks_exact(rows).enumerate() {
            for (r, v) in yi.iter().enumerate() {
                out[r * m + i] += *v;
            }
        }
    });
}

/// `X[r][g] = Σ_{c∈g} x[r, c]`, `rows×G`.
pub(crate) fn group_sums(x: &[f32], rows: usize, n: usize, group: usize) -> Vec<f32> {
    let groups = n.div_ceil(group);
    let mut sums = vec![0f32; rows * groups];
    for (xr, s) in x.chunks_exact(n).zip(sums.chunks_exact_mut(groups)) {
        for (xg, s) in xr.chunks(group).zip(s) {
            *s = xg.iter().sum();
        }
    }
    sums
}

/// `Σ_{g,t} delta[g,t]·x[g·step + cols[g,t]]` over the `o` outlier slots
/// per group of one row (`cols`, `delta`: `G×o`; `delta = v − q_p`, see
/// [`outlier_deltas`]).
#[inline(always)]
pub(crate) fn outlier_sum(o: usize, cols: &[u8], delta: &[f32], x: &[f32], step: usize) -> f32 {
    match o {
        0 => 0.0,
        1 => outlier_sum_o::<1>(cols, delta, x, step),
        2 => outlier_sum_o::<2>(cols, delta, x, step),
        3 => outlier_sum_o::<3>(cols, delta, x, step),
        4 => outlier_sum_o::<4>(cols, delta, x, step),
        _ => cols
            .iter()
            .zip(delta)
            .enumerate()
            .map(|(s, (&c, &d))| d * x[(s / o) * step + c as usize])
            .sum(),
    }
}

/// `v − q_p` (f32) of the outliers of rows `i0..` into `delta` (`G×o` per
/// row): the correction each adds to the plain grid's weight there.
#[inline(always)]
pub(crate) fn outlier_deltas(grid: &GridRef, n: usize, i0: usize, delta: &mut [f32]) {
    let (groups, o) = (grid.groups(n), grid.outliers);
    if o == 0 {
        return;
    }
    let slot0 = i0 * groups * o;
    let cols = &grid.outlier_col[slot0..][..delta.len()];
    for (s, (d, &col)) in delta.iter_mut().zip(cols).enumerate() {
        let cell = i0 * groups + s / o;
        let (i, g) = (cell / groups, cell % groups);
        let v = grid.values.outlier(groups * o, slot0 + s);
        *d = v - grid.point(groups, i, g * grid.group + col as usize);
    }
}

/// [`outlier_sum`] for `O` slots per group: four running sums, four groups
/// apart (one would wait on every add).
#[inline(always)]
fn outlier_sum_o<const O: usize>(cols: &[u8], delta: &[f32], x: &[f32], step: usize) -> f32 {
    let (c4, c_tail) = cols.as_chunks::<O>().0.as_chunks::<4>();
    let (d4, d_tail) = delta.as_chunks::<O>().0.as_chunks::<4>();
    let mut acc = [0f32; 4];
    let mut base = 0;
    for (c, d) in c4.iter().zip(d4) {
        for a in 0..4 {
            for t in 0..O {
                acc[a] += d[a][t] * x[base + a * step + c[a][t] as usize];
            }
        }
        base += 4 * step;
    }
    for (c, d) in c_tail.iter().zip(d_tail) {
        for t in 0..O {
            acc[0] += d[t] * x[base + c[t] as usize];
        }
        base += step;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `Σ_b 2^-(b+1)` over `p` planes: `1 − 2^-p`.
pub(crate) fn level_sum(planes: usize) -> f32 {
    (0..planes).map(plane_weight).sum()
}

/// Per four columns of `x` (zero past its end), the sums of `x` over each
/// subset of them: entry `p` sums the columns whose bit is set in nibble `p`.
fn subset_tables(t: &mut [f32], x: &[f32]) {
    for (g4, entries) in t.chunks_exact_mut(16).enumerate() {
        let v = |q: usize| x.get(4 * g4 + q).copied().unwrap_or(0.0);
        let x4 = [v(0), v(1), v(2), v(3)];
        for (p, e) in entries.iter_mut().enumerate() {
            *e = (0..4).filter(|&q| nibble_sign(p, q)).map(|q| x4[q]).sum();
        }
    }
}

/// Sizes and inputs of one call.
#[derive(Clone, Copy, Debug)]
struct Plan<'a> {
    rows: usize,
    n: usize,
    /// Four-column groups per row of `W`, rounded up to whole bytes.
    nibbles: usize,
    /// Per row of `x`, 16 subset sums per four columns.
    tables: &'a [f32],
    /// `X[r][g]`, `rows×G`.
    sums: &'a [f32],
    x: &'a [f32],
}

multiversion!(fn scan_rows(plan: Plan, grid: &GridRef, i0: usize, y: &mut [f32]) => scan_rows_body);

/// Adds the grid's part of outputs `i0..` into `y` (`rows` values per output).
#[inline(always)]
fn scan_rows_body(plan: Plan, grid: &GridRef, i0: usize, y: &mut [f32]) {
    let (rows, n, tables, sums, x) = (plan.rows, plan.n, plan.tables, plan.sums, plan.x);
    let groups = grid.groups(n);
    let row_bytes = n.div_ceil(8);
    let levels = level_sum(grid.planes.len());
    let o = grid.outliers;
    // The sign bytes of one (row, plane, group), masked to the group.
    let mut bits = [0u8; MAX_GROUP / 8 + 1];
    // Row by row, all groups: the first row of a tile streams the tile's
    // sign bytes in order, its other 31 rows find them in cache.
    for (ii, y) in y.chunks_exact_mut(rows).enumerate() {
        let i = i0 + ii;
        let base = (i / TILE_ROWS) * row_bytes * TILE_ROWS + i % TILE_ROWS;
        for g in 0..groups {
            let (c0, c1) = (g * grid.group, (g * grid.group + grid.group).min(n));
            let (q0, q1) = (c0 / 8, c1.div_ceil(8));
            let bits = &mut bits[..q1 - q0];
            // Bits of the first and last byte inside the group.
            let first = 0xffu8 >> (c0 % 8);
            let last = if c1.is_multiple_of(8) {
                0xff
            } else {
                0xffu8 << (8 - c1 % 8)
            };
            let mut acc = [0f32; MAX_ROWS];
            for (b, plane) in grid.planes.iter().enumerate() {
                let data = &plane.as_bytes()[base + q0 * TILE_ROWS..];
                for (q, bit) in bits.iter_mut().enumerate() {
                    *bit = data[q * TILE_ROWS];
                }
                bits[0] &= first;
                bits[q1 - q0 - 1] &= last;
                let w = plane_weight(b);
                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                    let t = &tables[r * plan.nibbles * 16 + q0 * 32..];
                    *acc += w * subset_sum(t, bits);
                }
            }
            let cell = i * groups + g;
            let (center, half) = grid.range(groups, cell);
            for (r, y) in y.iter_mut().enumerate() {
                let xg = sums[r * groups + g];
                *y += center * xg + half * (2.0 * acc[r] - levels * xg);
            }
            for slot in cell * o..(cell + 1) * o {
                let col = grid.outlier_col[slot] as usize;
                let q = grid.point(groups, i, c0 + col);
                let delta = grid.values.outlier(groups * o, slot) - q;
                for (r, y) in y.iter_mut().enumerate() {
                    *y += delta * x[r * n + c0 + col];
                }
            }
        }
    }
}

/// `Σ_q T[2q][hi(bits[q])] + T[2q+1][lo(bits[q])]`, `t` holding 32 entries
/// per sign byte; four running sums, unrolled so that they stay in
/// registers (one would wait on every add).
#[inline(always)]
fn subset_sum(t: &[f32], bits: &[u8]) -> f32 {
    let t = &t[..bits.len() * 32];
    let (b4, b_tail) = bits.as_chunks::<4>();
    let (t4, t_tail) = t.as_chunks::<128>();
    let mut acc = [0f32; 4];
    for (b, t) in b4.iter().zip(t4) {
        for a in 0..4 {
            let (hi, lo) = ((b[a] >> 4) as usize, (b[a] & 15) as usize);
            acc[a] += t[a * 32 + hi] + t[a * 32 + 16 + lo];
        }
    }
    for (b, t) in b_tail.iter().zip(t_tail.as_chunks::<32>().0) {
        acc[0] += t[(b >> 4) as usize] + t[16 + (b & 15) as usize];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}
