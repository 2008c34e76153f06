//! T-MAC-style decode: `x·Wᵀ` for a few rows of `x` from int8 lookup
//! tables, 32 output rows per `vpshufb`.
//!
//! As in [`crate::decode`], for block `b`, rank index `j` and row `r` of
//! `x`, `Z = vt_b[j] ⊙ x_r` and output `i` needs `Σ_c S_b[i,c]·Z[c]`. The
//! columns are taken four at a time (a *group*): the four sign bits of row
//! `i` in group `g` form a nibble `p` (bit 3 = the group's first column),
//! and the table entry `T[g][p]` is the signed sum of the group's four `Z`
//! values. Here the 16 entries of a group are quantized to int8, so one
//! group's table is one 16-byte register lane and `vpshufb` looks it up for
//! 32 rows of `W` at once.
//!
//! # Layout
//!
//! [`TiledSigns`](crate::layout::TiledSigns) regroups the packed signs so
//! that one 32-byte load gives sign byte `q` (columns `8q..8q+8`) of 32
//! consecutive rows: its high nibbles index group `2q`, its low nibbles
//! group `2q+1`.
//!
//! # Arithmetic
//!
//! The columns are cut into chunks of [`CHUNK_COLS`]. Per (block, chunk,
//! row of `x`, rank index) the tables share one step
//! `s = max_g Σ_{c∈g}|Z[c]| / 63`. An entry `T` is `v = T/s` steps, stored
//! in two parts, both int8 tables of their own: the high part
//! `h = round(v)`, in `±63`, and the low part
//! `l = round((v - h)·30)`, in `±15`, so that `T ≈ (30·h + l)·s/30` with
//! an error of at most `s/60` (with one int8 part it was `s/2`).
//!
//! The high parts are stored plus 64, in `1..=127`: the two lookups of a
//! sign byte (groups `2q`, `2q+1`) are added in u8 (at most 254), and the
//! sums of a chunk are accumulated in u16 lanes: a lane holds an even and
//! an odd row of the tile, one u16 accumulator takes the 16-bit words as
//! they are and a second the odd bytes alone (shifted down), so the even
//! rows' sums come out as the difference, exactly, modulo 2¹⁶. The low
//! parts are stored plus 15, in `0..=30`: the lookups of
//! `LO_RUN` sign bytes add up in u8 before they are accumulated the same
//! way. At the end of a chunk the exact integer sums lose their bias, are
//! combined as `30·Σh + Σl`, become f32 and are multiplied by `s/30`; after
//! the last chunk of a block they are folded with `u_b`. The low parts
//! double the lookups: they cost about 1.7× the time of high parts alone.
//!
//! Only the table entries are rounded. Each has an error of at most
//! `s/60`, and these errors are independent, so the error of an output
//! grows like the output itself, as the square root of the number of
//! terms, and its size relative to the outputs' RMS depends on neither `n`
//! nor `k`: on random data it is about 0.06% RMS and at most about 0.25%
//! (see [`RELATIVE_RMS_ERROR_BOUND`] and [`RELATIVE_MAX_ERROR_BOUND`],
//! which the tests assert), 30 times less than with the high parts alone.
//! Activations with outliers raise the step of their chunk and so the
//! error of every table in it; on a real model the decode perplexity stays
//! within about 0.1% of exact f32 tables.
//!
//! The scalar path ([`Isa::Baseline`]) builds the same tables and does the
//! same integer sums and f32 operations in the same order, so every
//! instruction set gives bit-identical results.
//!
//! # Grid planes
//!
//! A stack's grid planes (see [`GridRef`]) need `Σ_{c∈g} s_b(i,c)·x[c]` per
//! row, group and plane: the same lookups with `x` in place of `Z`, so one
//! set of tables (one scale per row of `x` and group) serves every plane,
//! and each plane's weight `2^-(b+1)` rides on the scale. When the groups
//! start on a sign byte (a multiple of 8 columns) a group's lookups are one
//! chunk of sums per plane, taken tile by tile after the blocks'; then
//! `half·sums + center·Σ_{c∈g} x[c]` and the outliers are added per row.
//! Other group sizes are left to [`crate::grid`]'s f32 tables.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::layout::{
    nibble_sign, plane_weight, BlockRef, GridRef, GridValuesRef, StackRef, TILE_ROWS,
};
use crate::{multiversion, Isa};

/// Largest number of rows of `x` [`shuffle_matmul_t`] takes in one call.
pub const MAX_ROWS: usize = 8;

/// Sign bytes (8 columns each) per chunk.
const CHUNK_BYTES: usize = 128;

/// Columns per chunk: the columns whose tables share one step and whose
/// sums are accumulated in u16 before they are widened to f32.
pub const CHUNK_COLS: usize = 8 * CHUNK_BYTES;

/// Four-column groups per chunk.
const CHUNK_GROUPS: usize = 2 * CHUNK_BYTES;

/// Bytes of the tables of one (block, chunk, row of x, rank index): per
/// sign byte, the high and the low part of its two groups' tables.
const UNIT_BYTES: usize = CHUNK_BYTES * 64;

/// Bytes of one block's tables that a task reads over again for each tile
/// (else it reads each chunk's tables for all its tiles in turn).
const TABLE_BUDGET: usize = 256 << 10;

/// Rank rows (rows of `x` times rank indices) per pass over a chunk's sign
/// bytes: four u16 accumulators and one u8 accumulator each in 16 registers.
const PASS: usize = 2;

/// Largest magnitude of the high part of a table entry: two of them add up
/// in a byte without overflow.
const QMAX: f32 = 63.0;

/// Added to every stored high part so that the stored bytes are positive.
const BIAS: i32 = 64;

/// Largest magnitude of the low part of a table entry, which is also the
/// stored low parts' bias.
const LO_MAX: i32 = 15;

/// Low-part steps per high-part step.
const LO_STEPS: i32 = 2 * LO_MAX;

/// Sign bytes whose low-part sums are added up in u8 before they are
/// widened.
const LO_RUN: usize = 4;

/// Bound on the RMS error of the outputs, relative to their RMS, on random
/// data (measured: up to 0.06%, for uniform `x`, `u` and `vt`).
pub const RELATIVE_RMS_ERROR_BOUND: f32 = 0.001;

/// Bound on the error of any single output, relative to the outputs' RMS,
/// on random data (measured: up to 0.23%).
pub const RELATIVE_MAX_ERROR_BOUND: f32 = 0.004;

// Chunk sums of one lane must fit 16 bits: each sign byte adds at most
// 2·(QMAX + BIAS) to the high and 4·LO_MAX to the low sums; a run of low
// sums must fit 8 bits; the combined sums of a chunk must be exact in f32.
const _: () = assert!(CHUNK_BYTES * 2 * (QMAX as usize + BIAS as usize) < 1 << 16);
const _: () = assert!(LO_RUN * 4 * LO_MAX as usize <= 255);
const _: () = assert!(CHUNK_BYTES * 2 * (QMAX as usize) * (LO_STEPS as usize + 1) < 1 << 24);

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Plan {
    m: usize,
    k: usize,
    rows: usize,
    row_bytes: usize,
    chunks: usize,
    /// Tables per (block, chunk): `rows·k`, row of `x` major.
    rk: usize,
}

impl Plan {
    /// Index of the tables (and scale) of (block, chunk, rank row `jj`).
    fn unit(&self, b: usize, c: usize, jj: usize) -> usize {
        (b * self.chunks + c) * self.rk + jj
    }

    /// Sign bytes of chunk `c`.
    fn chunk_bytes(&self, c: usize) -> usize {
        CHUNK_BYTES.min(self.row_bytes - c * CHUNK_BYTES)
    }
}

/// Buffers reused across calls on the calling thread: fresh multi-MiB
/// buffers per token would cost page faults.
#[derive(Default)]
struct CallBuffers {
    tables: Vec<u8>,
    scales: Vec<f32>,
    y: Vec<f32>,
    grid_tables: Vec<u8>,
    grid_scales: Vec<f32>,
}

/// Per-task buffers, reused across calls on each worker thread.
#[derive(Default)]
struct TaskBuffers {
    /// Chunk sums times scale, per (tile, rank row, position in tile).
    f: Vec<f32>,
    /// `u` of one tile in f32, row-major, then transposed by position.
    u_rows: Vec<f32>,
    u_t: Vec<f32>,
    /// The grid's sums of one tile: per (group, row of `x`, position).
    grid_f: Vec<f32>,
    /// One tile's centers, halves and outliers' `v − q_p` in f32.
    grid_row: Vec<f32>,
    /// One tile's centers and halves by group in position order.
    grid_t: Vec<f32>,
}

thread_local! {
    static CALL: RefCell<CallBuffers> = RefCell::new(CallBuffers::default());
    static TASK: RefCell<TaskBuffers> = RefCell::new(TaskBuffers::default());
}

/// Where the sums of a tile's row `l` land among the 32 positions of the
/// chunk accumulators (the order the AVX2 widening produces; see
/// [`row_of_position`]).
static POSITION_OF_ROW: [usize; TILE_ROWS] = position_of_row();

/// The row of a tile whose sums are at position `p`: positions come in four
/// runs of 8 (one f32 vector each): even rows 0–6, 16–22; even rows 8–14,
/// 24–30; odd rows 1–7, 17–23; odd rows 9–15, 25–31.
const fn row_of_position(p: usize) -> usize {
    let (v, l) = (p / 8, p % 8);
    (l / 4) * 16 + (v & 1) * 8 + 2 * (l % 4) + (v >> 1)
}

const fn position_of_row() -> [usize; TILE_ROWS] {
    let mut table = [0; TILE_ROWS];
    let mut p = 0;
    while p < TILE_ROWS {
        table[row_of_position(p)] = p;
        p += 1;
    }
    table
}

/// `out = x·Wᵀ` for `x` of `rows×n` (`rows ≤` [`MAX_ROWS`]) and `out` of
/// `rows×m`, both row-major, where `W = Σ_b S_b ⊙ (u_b·vt_b)` over the
/// blocks of `stack` plus its grid planes, with the lookups compiled for
/// `isa`.
///
/// Results are the same on every instruction set; they differ from the
/// exact product by the int8 rounding of the tables (see the module docs).
///
/// Multithreaded over tiles of rows; the tables and other buffers are
/// thread-local and reused from call to call.
pub fn shuffle_matmul_t(isa: Isa, x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    stack.check();
    let (m, n, k) = (stack.m, stack.n, stack.k);
    // Blocks of rank 0 add nothing.
    let blocks = if k == 0 { &[][..] } else { &stack.blocks[..] };
    assert!(isa.is_supported(), "this CPU cannot run {isa:?} code");
    assert!(rows <= MAX_ROWS, "at most {MAX_ROWS} rows of x");
    assert_eq!(x.len(), rows * n, "x is not rows×n");
    assert_eq!(out.len(), rows * m, "out is not rows×m");
    if (blocks.is_empty() && stack.grid.is_none()) || rows == 0 || m == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    // A grid whose groups start on a sign byte is looked up with the
    // blocks, tile by tile; any other is added after them from f32 tables.
    let (grid, other_grid) = match &stack.grid {
        Some(g) if g.group.is_multiple_of(8) => (Some(g), None),
        g => (None, g.as_ref()),
    };
    let row_bytes = n.div_ceil(8);
    let plan = Plan {
        m,
        k,
        rows,
        row_bytes,
        chunks: row_bytes.div_ceil(CHUNK_BYTES),
        rk: rows * k,
    };
    let units = blocks.len() * plan.chunks * plan.rk;
    let tiles = m.div_ceil(TILE_ROWS);
    CALL.with(|cell| {
        // A call made from a rayon task while this thread waits inside
        // another call finds the buffers taken: it gets its own.
        let mut own = CallBuffers::default();
        let mut shared = cell.try_borrow_mut();
        let call = match &mut shared {
            Ok(shared) => &mut **shared,
            Err(_) => &mut own,
        };
        grow(&mut call.tables, units * UNIT_BYTES);
        grow(&mut call.scales, units);
        grow(&mut call.y, tiles * rows * TILE_ROWS);
        let grid = grid.map(|grid| {
            let groups = grid.groups(n);
            grow(&mut call.grid_tables, rows * row_bytes * 64);
            grow(&mut call.grid_scales, rows * groups);
            GridPlan::new(
                isa,
                grid,
                x,
                n,
                rows,
                &mut call.grid_tables[..rows * row_bytes * 64],
                &mut call.grid_scales[..rows * groups],
            )
        });
        let tables = &mut call.tables[..units * UNIT_BYTES];
        let scales = &mut call.scales[..units];
        tables
            .par_chunks_mut(UNIT_BYTES)
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each(|(unit, (t, s))| {
                let jj = unit % plan.rk;
                let c = (unit / plan.rk) % plan.chunks;
                let b = unit / (plan.rk * plan.chunks);
                let (r, j) = (jj / k, jj % k);
                build_tables(
                    isa,
                    t,
                    s,
                    Some(&blocks[b].vt[j * n..][..n]),
                    &x[r * n..][..n],
                    c * CHUNK_COLS,
                    2 * plan.chunk_bytes(c),
                );
            });
        let (tables, scales) = (&*tables, &*scales);

        // A few tasks per thread, each a run of tiles that reuses every
        // table it loads for all its tiles.
        let task_tiles = tiles.div_ceil(4 * rayon::current_num_threads()).clamp(1, 8);
        let y = &mut call.y[..tiles * rows * TILE_ROWS];
        y.par_chunks_mut(task_tiles * rows * TILE_ROWS)
            .enumerate()
            .for_each(|(task, y)| {
                TASK.with(|cell| {
                    // Nothing in a task waits on rayon, so no other task
                    // runs on this thread while it holds the buffers.
                    let mut buffers = cell.borrow_mut();
                    run_task(
                        isa,
                        plan,
                        blocks,
                        tables,
                        scales,
                        grid.as_ref(),
                        task * task_tiles,
                        y,
                        &mut buffers,
                    );
                })
            });
        for (t, y) in y.chunks_exact(rows * TILE_ROWS).enumerate() {
            for (r, y) in y.chunks_exact(TILE_ROWS).enumerate() {
                for (p, &v) in y.iter().enumerate() {
                    let i = t * TILE_ROWS + row_of_position(p);
                    if i < m {
                        out[r * m + i] = v;
                    }
                }
            }
        }
    });
    if let Some(grid) = other_grid {
        crate::grid::grid_matmul_t_add(isa, x, rows, m, n, grid, out);
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// The int8 tables of `groups` groups from column `col0` for one rank
/// index of one block (`vt` is its row; `None` for the grid planes, whose
/// tables are of `x` itself) and one row of `x`, and their scale: the value
/// of one low-part step.
fn build_tables(
    isa: Isa,
    t: &mut [u8],
    scale: &mut f32,
    vt: Option<&[f16]>,
    x: &[f32],
    col0: usize,
    groups: usize,
) {
    assert!(groups <= CHUNK_GROUPS && t.len() >= 64 * groups.div_ceil(2));
    let cols = (x.len() - col0).min(4 * groups);
    // Zero past the last column, up to a whole number of 8-group runs.
    let mut z = [0f32; CHUNK_COLS];
    match vt {
        Some(vt) => {
            to_f32(isa, &vt[col0..col0 + cols], &mut z[..cols]);
            times(isa, &mut z[..cols], &x[col0..col0 + cols]);
        }
        None => z[..cols].copy_from_slice(&x[col0..col0 + cols]),
    }
    let max = match isa {
        // SAFETY: shuffle_matmul_t checked that the CPU runs `isa`; z holds whole runs.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::group_max(&z[..32 * groups.div_ceil(8)]) },
        _ => group_max_scalar(&z[..4 * groups]),
    };
    let inv = if max > 0.0 { QMAX / max } else { 0.0 };
    *scale = max / (QMAX * LO_STEPS as f32);
    let z = &z[..4 * groups];
    match isa {
        // SAFETY: as above; t holds 64 bytes per pair of groups.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::entries(z, inv, t) },
        _ => entries_scalar(z, inv, t),
    }
}

/// `dst = src` in f32.
fn to_f32(isa: Isa, src: &[f16], dst: &mut [f32]) {
    match isa {
        // SAFETY: shuffle_matmul_t checked that the CPU runs `isa`, which includes F16C.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::to_f32(src, dst) },
        _ => src.convert_to_f32_slice(dst),
    }
}

multiversion!(fn times(z: &mut [f32], x: &[f32]) => times_body);

#[inline(always)]
fn times_body(z: &mut [f32], x: &[f32]) {
    for (z, x) in z.iter_mut().zip(x) {
        *z *= x;
    }
}

/// `max_g (|z₀|+|z₁|) + (|z₂|+|z₃|)` over the groups of `z`: no table
/// entry of a group is larger.
fn group_max_scalar(z: &[f32]) -> f32 {
    z.as_chunks::<4>()
        .0
        .iter()
        .map(|g| (g[0].abs() + g[1].abs()) + (g[2].abs() + g[3].abs()))
        .fold(0f32, f32::max)
}

/// Signs of the four columns of a group (first column first) in the
/// entries of a table, first entries 0–3 and 8–11, then 4–7 and 12–15: the
/// order in which the AVX2 path computes them.
const ENTRY_SIGNS: [[[f32; 8]; 4]; 2] = entry_signs();

const fn entry_signs() -> [[[f32; 8]; 4]; 2] {
    let mut signs = [[[0f32; 8]; 4]; 2];
    let mut half = 0;
    while half < 2 {
        let mut l = 0;
        while l < 8 {
            let entry = (l / 4) * 8 + half * 4 + l % 4;
            let mut q = 0;
            while q < 4 {
                signs[half][q][l] = if nibble_sign(entry, q) { 1.0 } else { -1.0 };
                q += 1;
            }
            l += 1;
        }
        half += 1;
    }
    signs
}

/// The table entry of signs `s` (`±1` per column) for group `z` in units
/// of `1/inv`, `v`: its high part `h`, `v` rounded and clamped to `±QMAX`,
/// and its low part, `(v - h)·LO_STEPS` rounded and clamped to `±LO_MAX`,
/// both biased.
#[inline(always)]
fn quantized_entry(z: &[f32; 4], s: [f32; 4], inv: f32) -> (u8, u8) {
    // As cvtps2dq and max_ps: NaN becomes the most negative value.
    let clamp = |v: f32, max: f32| if v >= -max { v.min(max) } else { -max };
    let rest = (s[1] * z[1] + s[2] * z[2]) + s[3] * z[3];
    let v = (rest + s[0] * z[0]) * inv;
    let h = clamp(v.round_ties_even(), QMAX);
    let l = clamp(((v - h) * LO_STEPS as f32).round_ties_even(), LO_MAX as f32);
    ((h as i32 + BIAS) as u8, (l as i32 + LO_MAX) as u8)
}

/// Tables of the groups of `z` into `t`, 64 bytes per pair of groups: the
/// high parts of the first and of the second group, then their low parts.
fn entries_scalar(z: &[f32], inv: f32, t: &mut [u8]) {
    for (g, z) in z.as_chunks::<4>().0.iter().enumerate() {
        let at = 64 * (g / 2) + 16 * (g % 2);
        for (half, signs) in ENTRY_SIGNS.iter().enumerate() {
            for (l, ((&s0, &s1), (&s2, &s3))) in signs[0]
                .iter()
                .zip(&signs[1])
                .zip(signs[2].iter().zip(&signs[3]))
                .enumerate()
            {
                let entry = (l / 4) * 8 + half * 4 + l % 4;
                let (h, l) = quantized_entry(z, [s0, s1, s2, s3], inv);
                t[at + entry] = h;
                t[at + 32 + entry] = l;
            }
        }
    }
}

/// Adds the products of tiles `tile0..` (as many as `y` holds) into `y`:
/// `rows` runs of 32 outputs per tile, in position order.
#[allow(clippy::too_many_arguments)]
fn run_task(
    isa: Isa,
    plan: Plan,
    blocks: &[BlockRef],
    tables: &[u8],
    scales: &[f32],
    grid: Option<&GridPlan>,
    tile0: usize,
    y: &mut [f32],
    buffers: &mut TaskBuffers,
) {
    let (m, k, rk) = (plan.m, plan.k, plan.rk);
    let tiles = y.len() / (plan.rows * TILE_ROWS);
    grow(&mut buffers.f, tiles * rk * TILE_ROWS);
    grow(&mut buffers.u_rows, TILE_ROWS * k);
    grow(&mut buffers.u_t, TILE_ROWS * k);
    let f = &mut buffers.f[..tiles * rk * TILE_ROWS];
    let u_rows = &mut buffers.u_rows[..TILE_ROWS * k];
    let u_t = &mut buffers.u_t[..TILE_ROWS * k];
    y.fill(0.0);
    for (b, block) in blocks.iter().enumerate() {
        f.fill(0.0);
        let tables = &tables[plan.unit(b, 0, 0) * UNIT_BYTES..][..plan.chunks * rk * UNIT_BYTES];
        let scales = &scales[plan.unit(b, 0, 0)..][..plan.chunks * rk];
        // The lookups of tile t, chunk c, rank rows jj0..jj0 + jn.
        let lookups = |t: usize, c: usize, jj0: usize, jn: usize, f: &mut [f32]| {
            let at = block.signs.offset(tile0 + t, c * CHUNK_BYTES);
            let signs = &block.signs.as_bytes()[at..][..plan.chunk_bytes(c) * TILE_ROWS];
            let unit = c * rk + jj0;
            let tables = &tables[unit * UNIT_BYTES..][..jn * UNIT_BYTES];
            let f = &mut f[jj0 * TILE_ROWS..][..jn * TILE_ROWS];
            chunk_sums(isa, signs, tables, UNIT_BYTES, &scales[unit..][..jn], f);
        };
        if plan.chunks * rk * UNIT_BYTES <= TABLE_BUDGET {
            // The block's tables stay in L2: read each tile's signs in one
            // sweep, which the prefetchers follow from memory, each chunk
            // of them from L1 for every pass.
            for (t, f) in f.chunks_exact_mut(rk * TILE_ROWS).enumerate() {
                for c in 0..plan.chunks {
                    lookups(t, c, 0, rk, f);
                }
            }
        } else {
            // The tables of one pass (PASS·4 KiB) stay in L1 while every
            // tile of the task reads them.
            for c in 0..plan.chunks {
                for jj0 in (0..rk).step_by(PASS) {
                    for (t, f) in f.chunks_exact_mut(rk * TILE_ROWS).enumerate() {
                        lookups(t, c, jj0, PASS.min(rk - jj0), f);
                    }
                }
            }
        }
        for (t, (f, y)) in f
            .chunks_exact(rk * TILE_ROWS)
            .zip(y.chunks_exact_mut(plan.rows * TILE_ROWS))
            .enumerate()
        {
            let i0 = (tile0 + t) * TILE_ROWS;
            let live = TILE_ROWS.min(m - i0);
            to_f32(isa, &block.u[i0 * k..][..live * k], &mut u_rows[..live * k]);
            if live < TILE_ROWS {
                u_t.fill(0.0);
            }
            for (l, u) in u_rows[..live * k].chunks_exact(k).enumerate() {
                let p = POSITION_OF_ROW[l] % TILE_ROWS;
                for (u_t, &u) in u_t.chunks_exact_mut(TILE_ROWS).zip(u) {
                    u_t[p] = u;
                }
            }
            fold(isa, u_t, f, y);
        }
    }
    if let Some(grid) = grid {
        for (t, y) in y.chunks_exact_mut(plan.rows * TILE_ROWS).enumerate() {
            grid.add_tile(isa, plan, tile0 + t, y, buffers);
        }
    }
}

/// The grid planes of one call, when their groups start on a sign byte:
/// int8 tables of `x` itself, the same for every plane, with one scale per
/// (row of `x`, group), so that a group's lookups are one [`chunk_sums`]
/// call per plane.
struct GridPlan<'a> {
    grid: &'a GridRef<'a>,
    x: &'a [f32],
    n: usize,
    groups: usize,
    /// Sign bytes per group.
    group_bytes: usize,
    /// Tables per row of `x`, `64·⌈n/8⌉` bytes each.
    tables: &'a [u8],
    /// `rows×G`: the scales of the tables.
    scales: &'a [f32],
    /// `rows×G`: `Σ_{c∈g} x[r, c]`, which the centers multiply.
    sums: Vec<f32>,
}

impl<'a> GridPlan<'a> {
    /// Builds the tables of every (row of `x`, group) into `tables` and
    /// `scales`.
    fn new(
        isa: Isa,
        grid: &'a GridRef<'a>,
        x: &'a [f32],
        n: usize,
        rows: usize,
        tables: &'a mut [u8],
        scales: &'a mut [f32],
    ) -> Self {
        let groups = grid.groups(n);
        let group_bytes = grid.group / 8;
        let stride = n.div_ceil(8) * 64;
        tables
            .par_chunks_mut(stride)
            .zip(scales.par_chunks_mut(groups))
            .enumerate()
            .for_each(|(r, (t, s))| {
                let x = &x[r * n..][..n];
                for (g, (t, s)) in t.chunks_mut(group_bytes * 64).zip(s).enumerate() {
                    build_tables(isa, t, s, None, x, g * grid.group, t.len() / 32);
                }
            });
        Self {
            grid,
            x,
            n,
            groups,
            group_bytes,
            tables,
            scales,
            sums: crate::grid::group_sums(x, rows, n, grid.group),
        }
    }

    /// Adds the grid's part of the outputs of `tile` to `y` (`rows` runs of
    /// 32 outputs in position order).
    fn add_tile(&self, isa: Isa, plan: Plan, tile: usize, y: &mut [f32], buf: &mut TaskBuffers) {
        let (grid, groups, rows, o) = (self.grid, self.groups, plan.rows, self.grid.outliers);
        let i0 = tile * TILE_ROWS;
        let stride = plan.row_bytes * 64;
        // f[g][r][p] = Σ_b 2^-(b+1)·Σ_{c∈g} s_b·x[r, c]: the plane's weight
        // rides on the scale.
        grow(&mut buf.grid_f, groups * rows * TILE_ROWS);
        let f = &mut buf.grid_f[..groups * rows * TILE_ROWS];
        f.fill(0.0);
        let mut scales = [0f32; MAX_ROWS];
        for (g, f) in f.chunks_exact_mut(rows * TILE_ROWS).enumerate() {
            let q0 = g * self.group_bytes;
            let bytes = self.group_bytes.min(plan.row_bytes - q0);
            let tables = &self.tables[q0 * 64..];
            for (b, plane) in grid.planes.iter().enumerate() {
                let at = plane.offset(tile, q0);
                let signs = &plane.as_bytes()[at..][..bytes * TILE_ROWS];
                for (r, s) in scales.iter_mut().enumerate().take(rows) {
                    *s = self.scales[r * groups + g] * plane_weight(b);
                }
                chunk_sums(isa, signs, tables, stride, &scales[..rows], f);
            }
        }
        // The tile's centers, halves and outliers' `v − q_p` in f32 (its
        // rows are consecutive, so each is one run), the first two then by
        // group in position order.
        let live = TILE_ROWS.min(plan.m - i0);
        let cells = live * groups;
        grow(&mut buf.grid_row, cells * (2 + o));
        grow(&mut buf.grid_t, 2 * groups * TILE_ROWS);
        let (center, rest) = buf.grid_row[..cells * (2 + o)].split_at_mut(cells);
        let (half, delta) = rest.split_at_mut(cells);
        match grid.values {
            GridValuesRef::F16 {
                center: c16,
                half: h16,
                ..
            } => {
                to_f32(isa, &c16[i0 * groups..][..cells], center);
                to_f32(isa, &h16[i0 * groups..][..cells], half);
            }
            values => values.ranges_f32(groups, i0 * groups..i0 * groups + cells, center, half),
        }
        if grid.prefix_scale != 1.0 {
            half.iter_mut().for_each(|h| *h *= grid.prefix_scale);
        }
        crate::grid::outlier_deltas(grid, self.n, i0, delta);
        let (center_t, half_t) =
            buf.grid_t[..2 * groups * TILE_ROWS].split_at_mut(groups * TILE_ROWS);
        if live < TILE_ROWS {
            center_t.fill(0.0);
            half_t.fill(0.0);
        }
        for (l, (c, h)) in center
            .chunks_exact(groups)
            .zip(half.chunks_exact(groups))
            .enumerate()
        {
            let p = POSITION_OF_ROW[l];
            for (g, (&c, &h)) in c.iter().zip(h).enumerate() {
                center_t[g * TILE_ROWS + p] = c;
                half_t[g * TILE_ROWS + p] = h;
            }
        }
        // y[r][p] += Σ_g half·f + center·X, 32 positions at a time.
        for (g, (c, h)) in center_t
            .as_chunks::<TILE_ROWS>()
            .0
            .iter()
            .zip(half_t.as_chunks::<TILE_ROWS>().0)
            .enumerate()
        {
            let f = &f[g * rows * TILE_ROWS..][..rows * TILE_ROWS];
            for (r, (y, f)) in y
                .as_chunks_mut::<TILE_ROWS>()
                .0
                .iter_mut()
                .zip(f.as_chunks::<TILE_ROWS>().0)
                .enumerate()
            {
                let xg = self.sums[r * groups + g];
                for p in 0..TILE_ROWS {
                    y[p] += h[p] * f[p] + c[p] * xg;
                }
            }
        }
        if o == 0 {
            return;
        }
        let cols = &grid.outlier_col[i0 * groups * o..][..cells * o];
        for (l, (cols, delta)) in cols
            .chunks_exact(groups * o)
            .zip(delta.chunks_exact(groups * o))
            .enumerate()
        {
            let p = POSITION_OF_ROW[l];
            for (r, y) in y.chunks_exact_mut(TILE_ROWS).enumerate() {
                let x = &self.x[r * self.n..][..self.n];
                y[p] += crate::grid::outlier_sum(o, cols, delta, x, grid.group);
            }
        }
    }
}

multiversion!(fn fold(u_t: &[f32], f: &[f32], y: &mut [f32]) => fold_body);

/// `y[r][p] += Σ_j u_t[j][p]·f[r·k + j][p]`, one fused multiply-add at a
/// time in order of `j`.
#[inline(always)]
fn fold_body(u_t: &[f32], f: &[f32], y: &mut [f32]) {
    let k = u_t.len() / TILE_ROWS;
    for (y, f) in y
        .as_chunks_mut::<TILE_ROWS>()
        .0
        .iter_mut()
        .zip(f.chunks_exact(k * TILE_ROWS))
    {
        for (u, f) in u_t
            .as_chunks::<TILE_ROWS>()
            .0
            .iter()
            .zip(f.as_chunks::<TILE_ROWS>().0)
        {
            for p in 0..TILE_ROWS {
                y[p] = u[p].mul_add(f[p], y[p]);
            }
        }
    }
}

/// For one tile and one chunk: `f[jj][p] += scale[jj] · Σ` (the table
/// lookups of the chunk's sign bytes `signs` in tables `jj`, high parts
/// times [`LO_STEPS`] plus low parts), for every rank row `jj`. The tables
/// of rank row `jj` start at byte `jj·stride` of `tables`.
fn chunk_sums(isa: Isa, signs: &[u8], tables: &[u8], stride: usize, scales: &[f32], f: &mut [f32]) {
    let rk = scales.len();
    let bytes = signs.len() / TILE_ROWS;
    assert!(rk == 0 || tables.len() >= (rk - 1) * stride + bytes * 64);
    assert!(f.len() >= rk * TILE_ROWS);
    assert!(signs.len() <= CHUNK_BYTES * TILE_ROWS && signs.len().is_multiple_of(TILE_ROWS));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: shuffle_matmul_t checked that the CPU runs `isa`, which
            // includes AVX2 and FMA; the sizes are checked above.
            unsafe { avx2::chunk_sums(signs, tables, stride, scales, f) }
        }
        _ => chunk_sums_scalar(signs, tables, stride, scales, f),
    }
}

/// [`chunk_sums`] one row at a time, with the same integer sums and the
/// same f32 operations as the AVX2 path.
fn chunk_sums_scalar(signs: &[u8], tables: &[u8], stride: usize, scales: &[f32], f: &mut [f32]) {
    let bytes = signs.len() / TILE_ROWS;
    let (bias, lo_bias) = (2 * BIAS * bytes as i32, 2 * LO_MAX * bytes as i32);
    for (jj, &scale) in scales.iter().enumerate() {
        let t = &tables[jj * stride..][..bytes * 64];
        let f = &mut f[jj * TILE_ROWS..][..TILE_ROWS];
        for l in 0..TILE_ROWS {
            let (mut high, mut low) = (0i32, 0i32);
            for q in 0..bytes {
                let byte = signs[q * TILE_ROWS + l];
                let t = &t[q * 64..][..64];
                let (a, b) = ((byte >> 4) as usize, (byte & 15) as usize);
                high += (t[a] + t[16 + b]) as i32;
                low += (t[32 + a] + t[48 + b]) as i32;
            }
            let sum = LO_STEPS * (high - bias) + (low - lo_bias);
            let p = POSITION_OF_ROW[l];
            f[p] = scale.mul_add(sum as f32, f[p]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{BIAS, ENTRY_SIGNS, LO_MAX, LO_RUN, LO_STEPS, PASS, QMAX, TILE_ROWS};

    /// `dst = src` in f32, eight at a time.
    ///
    /// # Safety
    /// The CPU must support F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn to_f32(src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let (src8, tail) = src.as_chunks::<8>();
        for (s, d) in src8.iter().zip(dst.as_chunks_mut::<8>().0) {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
        for (s, d) in tail.iter().zip(&mut dst[src8.len() * 8..]) {
            *d = s.to_f32();
        }
    }

    /// [`super::group_max_scalar`] eight groups at a time (`z` holds whole
    /// runs of 32 columns).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group_max(z: &[f32]) -> f32 {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut max = _mm256_setzero_ps();
        for run in z.as_chunks::<32>().0 {
            let v = |o: usize| _mm256_and_ps(abs, _mm256_loadu_ps(run.as_ptr().add(o)));
            let pairs01 = _mm256_hadd_ps(v(0), v(8));
            let pairs23 = _mm256_hadd_ps(v(16), v(24));
            max = _mm256_max_ps(max, _mm256_hadd_ps(pairs01, pairs23));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        lanes.into_iter().fold(0f32, f32::max)
    }

    /// [`super::entries_scalar`]: one group per pass, its 16 entries in two
    /// vectors of 8 f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `t` must hold 64 bytes per pair
    /// of groups.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn entries(z: &[f32], inv: f32, t: &mut [u8]) {
        let z = z.as_chunks::<4>().0;
        assert!(t.len() >= 64 * z.len().div_ceil(2));
        let signs = |h: usize, q: usize| _mm256_loadu_ps(ENTRY_SIGNS[h][q].as_ptr());
        let sa = [signs(0, 0), signs(0, 1), signs(0, 2), signs(0, 3)];
        let sb = [signs(1, 0), signs(1, 1), signs(1, 2), signs(1, 3)];
        let inv = _mm256_set1_ps(inv);
        let (qmin, qmax) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
        let steps = _mm256_set1_ps(LO_STEPS as f32);
        let (lo, hi) = (
            _mm256_set1_epi16(-LO_MAX as i16),
            _mm256_set1_epi16(LO_MAX as i16),
        );
        let bias = _mm256_set1_epi16(BIAS as i16);
        let lo_bias = _mm256_set1_epi16(LO_MAX as i16);
        // Eight 16-bit words packed to bytes: the low 16 bytes.
        let bytes = |w: __m256i| {
            let b = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi16(w, w));
            _mm256_castsi256_si128(b)
        };
        for (g, z) in z.iter().enumerate() {
            let zq = [
                _mm256_set1_ps(z[0]),
                _mm256_set1_ps(z[1]),
                _mm256_set1_ps(z[2]),
                _mm256_set1_ps(z[3]),
            ];
            // Products with ±1 are exact, so each fused step rounds as the
            // scalar sum does.
            // The high part is clamped in f32 (max_ps gives its second
            // operand for NaN, as the scalar clamp does).
            let quantize = |s: &[__m256; 4]| {
                let rest = _mm256_fmadd_ps(s[1], zq[1], _mm256_mul_ps(s[2], zq[2]));
                let rest = _mm256_fmadd_ps(s[3], zq[3], rest);
                let v = _mm256_mul_ps(_mm256_fmadd_ps(s[0], zq[0], rest), inv);
                let h = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let h = _mm256_min_ps(_mm256_max_ps(h, qmin), qmax);
                let l = _mm256_mul_ps(_mm256_sub_ps(v, h), steps);
                (_mm256_cvtps_epi32(h), _mm256_cvtps_epi32(l))
            };
            let ((ha, la), (hb, lb)) = (quantize(&sa), quantize(&sb));
            // Words: entries 0–7 in the low lane, 8–15 in the high one.
            let h = _mm256_add_epi16(_mm256_packs_epi32(ha, hb), bias);
            let l = _mm256_packs_epi32(la, lb);
            let l = _mm256_add_epi16(_mm256_min_epi16(_mm256_max_epi16(l, lo), hi), lo_bias);
            let at = t.as_mut_ptr().add(64 * (g / 2) + 16 * (g % 2));
            _mm_storeu_si128(at as *mut __m128i, bytes(h));
            _mm_storeu_si128(at.add(32) as *mut __m128i, bytes(l));
        }
    }

    /// [`super::chunk_sums`], [`PASS`] rank rows per pass over the sign
    /// bytes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `tables` must hold the tables
    /// of `scales.len()` rank rows `stride` bytes apart, 64 bytes per sign
    /// byte, and `f` `scales.len()` runs of 32; `signs` at most 256 bytes
    /// per row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_sums(
        signs: &[u8],
        tables: &[u8],
        stride: usize,
        scales: &[f32],
        f: &mut [f32],
    ) {
        let rk = scales.len();
        let mut jj = 0;
        while jj + PASS <= rk {
            pass::<PASS>(signs, tables, stride, scales, f, jj);
            jj += PASS;
        }
        match rk - jj {
            3 => pass::<3>(signs, tables, stride, scales, f, jj),
            2 => pass::<2>(signs, tables, stride, scales, f, jj),
            1 => pass::<1>(signs, tables, stride, scales, f, jj),
            _ => {}
        }
    }

    /// Rank rows `jj0..jj0 + J`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn pass<const J: usize>(
        signs: &[u8],
        tables: &[u8],
        stride: usize,
        scales: &[f32],
        f: &mut [f32],
        jj0: usize,
    ) {
        let bytes = signs.len() / TILE_ROWS;
        let nibble = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        // Per rank row: the high sums as 16-bit words and their odd bytes,
        // the same for the low sums.
        let mut words = [zero; J];
        let mut odd = [zero; J];
        let mut lo_words = [zero; J];
        let mut lo_odd = [zero; J];
        let s = signs.as_ptr();
        let t = tables.as_ptr().add(jj0 * stride);
        let table =
            |at: *const u8| _mm256_broadcastsi128_si256(_mm_loadu_si128(at as *const __m128i));
        let mut q0 = 0;
        while q0 < bytes {
            let mut run = [zero; J];
            for q in q0..(q0 + LO_RUN).min(bytes) {
                let v = _mm256_loadu_si256(s.add(q * TILE_ROWS) as *const __m256i);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                let lo = _mm256_and_si256(v, nibble);
                for j in 0..J {
                    let tq = t.add(j * stride + q * 64);
                    let look = |o: usize, idx: __m256i| _mm256_shuffle_epi8(table(tq.add(o)), idx);
                    let sum = _mm256_add_epi8(look(0, hi), look(16, lo));
                    words[j] = _mm256_add_epi16(words[j], sum);
                    odd[j] = _mm256_add_epi16(odd[j], _mm256_srli_epi16::<8>(sum));
                    run[j] = _mm256_add_epi8(run[j], _mm256_add_epi8(look(32, hi), look(48, lo)));
                }
            }
            for j in 0..J {
                lo_words[j] = _mm256_add_epi16(lo_words[j], run[j]);
                lo_odd[j] = _mm256_add_epi16(lo_odd[j], _mm256_srli_epi16::<8>(run[j]));
            }
            q0 += LO_RUN;
        }
        let bias = _mm256_set1_epi32(2 * BIAS * bytes as i32);
        let lo_bias = _mm256_set1_epi32(2 * LO_MAX * bytes as i32);
        let steps = _mm256_set1_epi32(LO_STEPS);
        // Sums of positions 0–7, 8–15, 16–23, 24–31 (even rows, then odd).
        let parts = |words: __m256i, odd: __m256i| {
            let even = _mm256_sub_epi16(words, _mm256_slli_epi16::<8>(odd));
            [
                _mm256_unpacklo_epi16(even, zero),
                _mm256_unpackhi_epi16(even, zero),
                _mm256_unpacklo_epi16(odd, zero),
                _mm256_unpackhi_epi16(odd, zero),
            ]
        };
        for j in 0..J {
            let scale = _mm256_set1_ps(scales[jj0 + j]);
            let high = parts(words[j], odd[j]);
            let low = parts(lo_words[j], lo_odd[j]);
            for (v, (high, low)) in high.into_iter().zip(low).enumerate() {
                let high = _mm256_mullo_epi32(_mm256_sub_epi32(high, bias), steps);
                let sums = _mm256_add_epi32(high, _mm256_sub_epi32(low, lo_bias));
                let sums = _mm256_cvtepi32_ps(sums);
                let at = f.as_mut_ptr().add((jj0 + j) * TILE_ROWS + v * 8);
                _mm256_storeu_ps(at, _mm256_fmadd_ps(scale, sums, _mm256_loadu_ps(at)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::OwnedStack;
    use crate::reference::reference_matmul_t;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_signs(m: usize, n: usize, rng: &mut StdRng) -> Vec<u8> {
        (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect()
    }

    #[test]
    fn positions_are_a_permutation() {
        let mut seen = [false; TILE_ROWS];
        for p in 0..TILE_ROWS {
            assert_eq!(POSITION_OF_ROW[row_of_position(p)], p);
            seen[row_of_position(p)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// A random stack: every block's signs, then every block's `u`, then
    /// every block's `vt`, from one generator.
    fn random_stack(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> OwnedStack {
        let mut rng = StdRng::seed_from_u64(seed);
        let f = |len: usize, scale: f32, rng: &mut StdRng| -> Vec<f16> {
            (0..len)
                .map(|_| f16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * scale))
                .collect()
        };
        let signs: Vec<Vec<u8>> = (0..blocks).map(|_| random_signs(m, n, &mut rng)).collect();
        let u: Vec<Vec<f16>> = (0..blocks)
            .map(|b| f(m * k, 1.0 / (b + 1) as f32, &mut rng))
            .collect();
        let vt: Vec<Vec<f16>> = (0..blocks).map(|_| f(k * n, 0.5, &mut rng)).collect();
        OwnedStack::from_row_major(
            m,
            n,
            k,
            signs
                .into_iter()
                .zip(u)
                .zip(vt)
                .map(|((s, u), vt)| (s, u, vt)),
        )
    }

    fn run(stack: &OwnedStack, isa: Isa, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * stack.m];
        shuffle_matmul_t(isa, x, rows, &stack.stack_ref(), &mut out);
        out
    }

    fn random_x(rows: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows * n)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    /// (m, n, k, blocks): m not a multiple of 32, n not a multiple of 8, of
    /// 32 or of a chunk, k = 1, 4, 16 and odd, 1 and 16 blocks.
    const SHAPES: &[(usize, usize, usize, usize)] = &[
        (1, 13, 1, 1),
        (33, 9, 3, 2),
        (70, 200, 16, 4),
        (19, 8, 16, 16),
        (5, 1030, 4, 1),
        (129, 77, 1, 16),
        (40, 96, 5, 3),
        (64, 2100, 4, 2),
        (96, 256, 7, 1),
    ];

    #[test]
    fn every_isa_gives_the_same_bits() {
        for (s, &(m, n, k, nb)) in SHAPES.iter().enumerate() {
            let case = random_stack(m, n, k, nb, s as u64);
            for rows in 1..=MAX_ROWS {
                let x = random_x(rows, n, 100 + s as u64);
                let want = run(&case, Isa::Baseline, &x, rows);
                assert!(want.iter().all(|v| v.is_finite()));
                for isa in Isa::available() {
                    let got = run(&case, isa, &x, rows);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{isa:?} {m}×{n} k{k} ×{nb} rows {rows}: element {i} is {g}, scalar {w}"
                        );
                    }
                }
            }
        }
    }

    /// (RMS error, largest error), both relative to the output's RMS.
    fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
        let rms = |v: &mut dyn Iterator<Item = f32>| {
            let (s, c) = v.fold((0f64, 0usize), |(s, c), e| (s + (e as f64).powi(2), c + 1));
            (s / c as f64).sqrt() as f32
        };
        let scale = rms(&mut want.iter().copied());
        let err = rms(&mut got.iter().zip(want).map(|(g, w)| g - w));
        let max = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        (err / scale, max / scale)
    }

    #[test]
    fn close_to_the_reference() {
        let (mut worst_rms, mut worst_max) = (0f32, 0f32);
        for (s, &(m, n, k, nb)) in SHAPES.iter().enumerate() {
            let case = random_stack(m, n, k, nb, 50 + s as u64);
            for rows in 1..=MAX_ROWS {
                let x = random_x(rows, n, 200 + s as u64);
                let got = run(&case, Isa::detect(), &x, rows);
                let mut want = vec![0f32; rows * m];
                reference_matmul_t(&x, rows, &case.stack_ref(), &mut want);
                let (e_rms, e_max) = errors(&got, &want);
                // Tiny outputs (few rows and columns) have noisy RMS; the
                // bounds are for outputs of at least 64 values.
                if got.len() >= 64 {
                    worst_rms = worst_rms.max(e_rms);
                    worst_max = worst_max.max(e_max);
                    assert!(
                        e_rms <= RELATIVE_RMS_ERROR_BOUND && e_max <= RELATIVE_MAX_ERROR_BOUND,
                        "{m}×{n} k{k} ×{nb} rows {rows}: rms error {e_rms}, max {e_max}"
                    );
                } else {
                    assert!(
                        e_max <= 4.0 * RELATIVE_MAX_ERROR_BOUND,
                        "{m}×{n} rows {rows}: {e_max}"
                    );
                }
            }
        }
        eprintln!("worst relative error: rms {worst_rms}, max {worst_max}");
    }

    #[test]
    fn large_shape_error() {
        let (m, n, k, nb) = (512, 4096, 16, 4);
        let case = random_stack(m, n, k, nb, 9);
        let x = random_x(1, n, 10);
        let got = run(&case, Isa::detect(), &x, 1);
        let mut want = vec![0f32; m];
        reference_matmul_t(&x, 1, &case.stack_ref(), &mut want);
        let (e_rms, e_max) = errors(&got, &want);
        eprintln!("{m}×{n} k{k} ×{nb}: rms error {e_rms}, max {e_max}");
        assert!(e_rms <= RELATIVE_RMS_ERROR_BOUND && e_max <= RELATIVE_MAX_ERROR_BOUND);
    }

    #[test]
    fn calls_from_rayon_tasks_agree() {
        let case = random_stack(100, 300, 4, 2, 11);
        let x = random_x(2, 300, 12);
        let want = run(&case, Isa::detect(), &x, 2);
        (0..16).into_par_iter().for_each(|_| {
            assert_eq!(run(&case, Isa::detect(), &x, 2), want);
        });
    }

    #[test]
    fn empty_inputs_give_zeros() {
        let case = random_stack(40, 20, 2, 1, 3);
        let mut out = vec![f32::NAN; 40];
        let empty = StackRef {
            blocks: vec![],
            ..case.stack_ref()
        };
        shuffle_matmul_t(Isa::detect(), &random_x(1, 20, 1), 1, &empty, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        let mut out = vec![];
        shuffle_matmul_t(Isa::detect(), &[], 0, &case.stack_ref(), &mut out);
    }
}
