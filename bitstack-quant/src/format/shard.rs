//! Tensor parallelism: the part of every linear one rank holds.
//!
//! Under Megatron-style tensor parallelism (as mistral.rs's distributed
//! engine runs a Llama), q, k, v, gate and up are column-parallel: rank `r`
//! of `w` holds output rows `r·m/w … (r+1)·m/w` and computes those outputs.
//! o and down are row-parallel: rank `r` holds input columns
//! `r·n/w … (r+1)·n/w` and the engine sums the ranks' partial outputs.
//!
//! A BitStack weight splits the same way, block by block: with
//! `W = Σ Sᵢ ⊙ (uᵢ·vtᵢ)`, its rows are `Σ Sᵢ[rows] ⊙ (uᵢ[rows]·vtᵢ)` (the
//! rows of the signs and of `u`, `vt` whole) and its columns
//! `Σ Sᵢ[:, cols] ⊙ (uᵢ·vtᵢ[:, cols])` (the columns of the signs and of
//! `vt`, `u` whole). Grid planes split like signs and the grid's cells by
//! row or by group. So each rank's stack is an ordinary stack of the
//! smaller shape, in the same global order: every rank at the same level
//! holds its slice of the very model one process would run at that level.
//!
//! The slices are cut from the checked (checksummed) stored tensors, so a
//! rank reads whole blocks and keeps its part.

use std::ops::Range;

use anyhow::{bail, Result};
use half::f16;

use crate::format::architecture::{linear_shape, LinearKind};
use crate::format::config::ModelConfig;
use crate::format::grid::{Grid, GridConfig, GridValues};
use crate::format::order::{Geometry, LinearSlot};

/// One rank of a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorParallel {
    rank: usize,
    world: usize,
}

/// Which dimension of a linear's `m×n` weight the ranks split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Output rows (a column-parallel layer: q, k, v, gate, up).
    Rows,
    /// Input columns (a row-parallel layer: o, down).
    Columns,
}

impl Split {
    /// The split of `kind` in a Llama-family decoder layer.
    pub fn of(kind: LinearKind) -> Self {
        match kind {
            LinearKind::O | LinearKind::Down => Split::Columns,
            LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Gate | LinearKind::Up => {
                Split::Rows
            }
        }
    }
}

impl TensorParallel {
    /// Rank `rank` of `world` ranks.
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("tensor-parallel rank {rank} of a world of {world}: the rank must be below the world size, which must be at least 1");
        }
        Ok(Self { rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Errs, naming what does not split, unless `world` ranks can split
    /// the model of `cfg`: attention and key/value heads, every linear's
    /// split dimension and, for grid planes split by column, whole groups.
    /// Checked before anything is loaded.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let w = self.world;
        if w == 1 {
            return Ok(());
        }
        let too_many = |what: &str, count: usize| {
            anyhow::anyhow!(
                "a world of {w} ranks cannot split this model: its {count} {what} are not a multiple of {w}"
            )
        };
        if !cfg.num_attention_heads.is_multiple_of(w) {
            return Err(too_many("attention heads", cfg.num_attention_heads));
        }
        if !cfg.kv_heads().is_multiple_of(w) {
            return Err(too_many(
                "key/value heads (replicating them over ranks is not supported)",
                cfg.kv_heads(),
            ));
        }
        let grid = cfg.quantization_config.as_ref().and_then(|q| q.grid);
        let rotation = cfg.quantization_config.as_ref().and_then(|q| q.rotation);
        for kind in LinearKind::ALL {
            let (m, n) = linear_shape(cfg, kind);
            let shard = self.shard(kind);
            let (len, what) = match shard.split {
                Split::Rows => (m, "output rows"),
                Split::Columns => (n, "input columns"),
            };
            if !len.is_multiple_of(w) {
                return Err(too_many(&format!("{} {what}", kind.short_name()), len));
            }
            if let (Some(r), Split::Columns) = (rotation, shard.split) {
                if !(n / w).is_multiple_of(r.block) {
                    bail!(
                        "a world of {w} ranks cannot split this checkpoint: {}'s {n} input columns are rotated in blocks of {}, and {} columns per rank would cut one",
                        kind.short_name(),
                        r.block,
                        n / w
                    );
                }
            }
            if let (Some(g), Split::Columns) = (grid, shard.split) {
                let group = g.group_size(n);
                if !(n / w).is_multiple_of(group) {
                    bail!(
                        "a world of {w} ranks cannot split this checkpoint: {}'s {n} input columns hold grid groups of {group}, and {} columns per rank would cut one",
                        kind.short_name(),
                        n / w
                    );
                }
            }
        }
        Ok(())
    }

    /// The geometry of this rank's part of a checkpoint of `geometry`:
    /// each linear's local shape (and grid layout); the dense parts
    /// (embeddings, norms, biases) are held whole by every rank. Linears
    /// are layer-major, kinds in [`LinearKind::ALL`] order, as
    /// [`Geometry::from_config`] makes them.
    pub fn geometry(&self, geometry: &Geometry) -> Geometry {
        let kinds = LinearKind::ALL.len();
        let linears: Vec<LinearSlot> = geometry
            .linears
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let shard = self.shard(LinearKind::ALL[i % kinds]);
                let (m, n) = shard.local(slot.m, slot.n);
                let grid = slot.grid.map(|g| match shard.split {
                    Split::Rows => g,
                    Split::Columns => GridConfig {
                        group: g.group_size(slot.n),
                        ..g
                    },
                });
                LinearSlot {
                    m,
                    n,
                    grid,
                    ..slot.clone()
                }
            })
            .collect();
        Geometry {
            linear_weights: linears.iter().map(|s| s.m * s.n).sum(),
            linears,
            ..geometry.clone()
        }
    }

    /// What this rank holds of a linear of `kind`.
    pub fn shard(&self, kind: LinearKind) -> LinearShard {
        LinearShard {
            split: Split::of(kind),
            rank: self.rank,
            world: self.world,
        }
    }
}

/// This rank's part of one linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShard {
    pub split: Split,
    rank: usize,
    world: usize,
}

impl LinearShard {
    /// The rank's `m×n` (checked divisible by [`TensorParallel::check`]).
    pub fn local(&self, m: usize, n: usize) -> (usize, usize) {
        match self.split {
            Split::Rows => (m / self.world, n),
            Split::Columns => (m, n / self.world),
        }
    }

    /// The input columns of an `n`-column linear this rank holds.
    pub fn input_columns(&self, n: usize) -> Range<usize> {
        match self.split {
            Split::Rows => 0..n,
            Split::Columns => self.range(n),
        }
    }

    fn range(&self, len: usize) -> Range<usize> {
        let part = len / self.world;
        self.rank * part..(self.rank + 1) * part
    }

    /// The rank's part of row-major packed signs of an `m×n` matrix
    /// (first sign in the most significant bit, padding 0).
    pub fn signs(&self, signs: &[u8], m: usize, n: usize) -> Vec<u8> {
        let (lm, ln) = self.local(m, n);
        let mut out = vec![0u8; (lm * ln).div_ceil(8)];
        match self.split {
            Split::Rows => {
                let rows = self.range(m);
                copy_bits(signs, rows.start * n, &mut out, 0, lm * n);
            }
            Split::Columns => {
                let cols = self.range(n);
                for i in 0..m {
                    copy_bits(signs, i * n + cols.start, &mut out, i * ln, ln);
                }
            }
        }
        out
    }

    /// The rank's part of an `m×k` left factor `u`.
    pub fn u(&self, u: Vec<f16>, m: usize, k: usize) -> Vec<f16> {
        match self.split {
            Split::Rows => {
                let rows = self.range(m);
                u[rows.start * k..rows.end * k].to_vec()
            }
            Split::Columns => u,
        }
    }

    /// The rank's part of a `k×n` right factor `vt`.
    pub fn vt(&self, vt: Vec<f16>, k: usize, n: usize) -> Vec<f16> {
        match self.split {
            Split::Rows => vt,
            Split::Columns => self.columns(&vt, k, n),
        }
    }

    /// The rank's part of a dense row-major `m×n` matrix.
    pub fn dense<T: Copy>(&self, w: &[T], m: usize, n: usize) -> Vec<T> {
        match self.split {
            Split::Rows => {
                let rows = self.range(m);
                w[rows.start * n..rows.end * n].to_vec()
            }
            Split::Columns => self.columns(w, m, n),
        }
    }

    /// The rank's part of a bias of `m` outputs: its rows for a row split;
    /// whole for a column split (added once, after the ranks' sum).
    pub fn bias<T: Copy>(&self, b: &[T]) -> Vec<T> {
        match self.split {
            Split::Rows => b[self.range(b.len())].to_vec(),
            Split::Columns => b.to_vec(),
        }
    }

    /// Columns of a row-major `rows×n` matrix.
    fn columns<T: Copy>(&self, w: &[T], rows: usize, n: usize) -> Vec<T> {
        let cols = self.range(n);
        (0..rows)
            .flat_map(|i| &w[i * n + cols.start..i * n + cols.end])
            .copied()
            .collect()
    }

    /// The rank's grid of an `m×n` linear laid out by `cfg`, and the
    /// layout that gives the rank's `n` the same groups. A column split
    /// keeps whole groups ([`TensorParallel::check`] refused the rest).
    pub fn grid(&self, grid: Grid, cfg: GridConfig, m: usize, n: usize) -> (GridConfig, Grid) {
        let (groups, o) = (cfg.groups(n), cfg.outliers);
        match self.split {
            Split::Rows => {
                let rows = self.range(m);
                let cells = rows.start * groups..rows.end * groups;
                let slots = Part::Run(cells.start * o..cells.end * o);
                let grid = Grid {
                    values: pick_values(&grid.values, &Part::Run(cells), &slots, &Part::Run(rows)),
                    outlier_col: slots.pick(&grid.outlier_col),
                    prefix_scale: grid.prefix_scale,
                };
                (cfg, grid)
            }
            Split::Columns => {
                let group = cfg.group_size(n);
                let local = GridConfig { group, ..cfg };
                let part = self.range(groups);
                let groups_of = |per| Part::Groups {
                    m,
                    groups,
                    part: part.clone(),
                    per,
                };
                let slots = groups_of(o);
                // The steps are per row: every rank keeps them whole.
                // The prefix scales are per linear: every rank keeps them.
                let grid = Grid {
                    values: pick_values(&grid.values, &groups_of(1), &slots, &Part::Whole),
                    outlier_col: slots.pick(&grid.outlier_col),
                    prefix_scale: grid.prefix_scale,
                };
                debug_assert_eq!(local.group_size(n / self.world), group);
                (local, grid)
            }
        }
    }
}

/// The part of one array of a grid a rank holds.
enum Part {
    /// One run of the array.
    Run(Range<usize>),
    /// Groups `part` of each row of an `m×groups×per` array.
    Groups {
        m: usize,
        groups: usize,
        part: Range<usize>,
        per: usize,
    },
    /// All of it.
    Whole,
}

impl Part {
    fn pick<T: Copy>(&self, v: &[T]) -> Vec<T> {
        match self {
            Part::Run(r) => v[r.clone()].to_vec(),
            Part::Groups {
                m,
                groups,
                part,
                per,
            } => group_columns(v, *m, *groups, part.clone(), *per),
            Part::Whole => v.to_vec(),
        }
    }
}

/// A grid's numbers, each array cut to its part: `cells` for those per
/// (row, group), `slots` per outlier, `rows` per row (the steps).
fn pick_values(v: &GridValues, cells: &Part, slots: &Part, rows: &Part) -> GridValues {
    match v {
        GridValues::F16 {
            center,
            half,
            outlier,
        } => GridValues::F16 {
            center: cells.pick(center),
            half: cells.pick(half),
            outlier: slots.pick(outlier),
        },
        GridValues::Int8 {
            center_code,
            half_code,
            outlier_code,
            center_step,
            half_step,
            outlier_step,
        } => GridValues::Int8 {
            center_code: cells.pick(center_code),
            half_code: cells.pick(half_code),
            outlier_code: slots.pick(outlier_code),
            center_step: rows.pick(center_step),
            half_step: rows.pick(half_step),
            outlier_step: rows.pick(outlier_step),
        },
    }
}

/// Groups `part` of each row of an `m×groups×per` row-major array.
fn group_columns<T: Copy>(
    v: &[T],
    m: usize,
    groups: usize,
    part: Range<usize>,
    per: usize,
) -> Vec<T> {
    (0..m)
        .flat_map(|i| &v[(i * groups + part.start) * per..(i * groups + part.end) * per])
        .copied()
        .collect()
}

/// Copies `len` bits from bit `from` of `src` to bit `to` of `dst` (first
/// bit in the most significant bit of each byte), whole bytes at a time
/// when both are byte-aligned.
fn copy_bits(src: &[u8], from: usize, dst: &mut [u8], to: usize, len: usize) {
    let mut done = 0;
    if from.is_multiple_of(8) && to.is_multiple_of(8) {
        let bytes = len / 8;
        dst[to / 8..to / 8 + bytes].copy_from_slice(&src[from / 8..from / 8 + bytes]);
        done = bytes * 8;
    }
    for b in done..len {
        let (s, d) = (from + b, to + b);
        let bit = (src[s / 8] >> (7 - s % 8)) & 1;
        dst[d / 8] |= bit << (7 - d % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::grid::GridCoding;
    use crate::format::pack::{pack_signs, sign_at};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn both_splits(rank: usize, world: usize) -> [LinearShard; 2] {
        let tp = TensorParallel::new(rank, world).unwrap();
        [tp.shard(LinearKind::Q), tp.shard(LinearKind::Down)]
    }

    #[test]
    fn sliced_signs_are_the_slice_of_the_matrix() {
        let mut rng = StdRng::seed_from_u64(4);
        // Rows and columns not multiples of 8, one row, and aligned ones.
        for (m, n, world) in [(6, 10, 2), (4, 12, 4), (1, 26, 2), (16, 64, 2), (9, 15, 3)] {
            let v: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let packed = pack_signs(&v);
            for rank in 0..world {
                for shard in both_splits(rank, world) {
                    let (lm, ln) = shard.local(m, n);
                    let got = shard.signs(&packed, m, n);
                    let want = pack_signs(&shard.dense(&v, m, n));
                    assert_eq!(got, want, "{m}×{n} {shard:?}");
                    for i in 0..lm * ln {
                        assert_eq!(sign_at(&got, i), sign_at(&want, i));
                    }
                }
            }
        }
    }

    #[test]
    fn the_ranks_slices_rebuild_the_weight() {
        // Rows stack, columns sum: the shards of u·vt are the shards of W.
        let mut rng = StdRng::seed_from_u64(9);
        let (m, n, k, world) = (6, 8, 3, 2);
        let u: Vec<f16> = (0..m * k).map(|_| f16::from_f32(rng.random())).collect();
        let vt: Vec<f16> = (0..k * n).map(|_| f16::from_f32(rng.random())).collect();
        let w = |u: &[f16], vt: &[f16], m: usize, n: usize| -> Vec<f32> {
            (0..m * n)
                .map(|e| {
                    (0..k)
                        .map(|j| u[(e / n) * k + j].to_f32() * vt[j * n + e % n].to_f32())
                        .sum()
                })
                .collect()
        };
        let full = w(&u, &vt, m, n);
        for rank in 0..world {
            for shard in both_splits(rank, world) {
                let (lm, ln) = shard.local(m, n);
                let part = w(
                    &shard.u(u.clone(), m, k),
                    &shard.vt(vt.clone(), k, n),
                    lm,
                    ln,
                );
                assert_eq!(part, shard.dense(&full, m, n), "{shard:?}");
            }
        }
    }

    #[test]
    fn a_grid_splits_by_row_or_by_whole_group() {
        let (m, n, world) = (4, 256, 2);
        for coding in [GridCoding::F16, GridCoding::Int8, GridCoding::Int8Scaled] {
            let cfg = GridConfig {
                planes: 2,
                group: 64,
                outliers: 2,
                coding,
            };
            let groups = cfg.groups(n);
            let cells = m * groups;
            // Cell c's center is c, row i's steps are i (Int8).
            let h = |x: usize| f16::from_f32(x as f32);
            let coded = match coding {
                GridCoding::F16 => GridValues::F16 {
                    center: (0..cells).map(h).collect(),
                    half: (0..cells).map(h).collect(),
                    outlier: (0..cells * 2).map(h).collect(),
                },
                GridCoding::Int8 | GridCoding::Int8Scaled => GridValues::Int8 {
                    center_code: (0..cells).map(|c| c as i8).collect(),
                    half_code: (0..cells).map(|c| c as u8).collect(),
                    outlier_code: (0..cells * 2).map(|s| s as i8).collect(),
                    center_step: (0..m).map(h).collect(),
                    half_step: (0..m).map(h).collect(),
                    outlier_step: (0..m).map(h).collect(),
                },
            };
            let centers = |g: &Grid| -> Vec<f32> {
                match &g.values {
                    GridValues::F16 { center, .. } => center.iter().map(|x| x.to_f32()).collect(),
                    GridValues::Int8 { center_code, .. } => {
                        center_code.iter().map(|&x| x as f32).collect()
                    }
                }
            };
            let steps = |g: &Grid| -> Vec<f32> {
                match &g.values {
                    GridValues::F16 { .. } => Vec::new(),
                    GridValues::Int8 { center_step, .. } => {
                        center_step.iter().map(|x| x.to_f32()).collect()
                    }
                }
            };
            let prefix_scale = match coding {
                GridCoding::Int8Scaled => vec![0.7, 0.95],
                _ => Vec::new(),
            };
            let grid = Grid {
                values: coded,
                outlier_col: (0..cells * 2).map(|s| s as u8).collect(),
                prefix_scale: prefix_scale.clone(),
            };
            let [rows, cols] = both_splits(1, world);
            let (rcfg, r) = rows.grid(grid.clone(), cfg, m, n);
            assert_eq!(rcfg, cfg);
            // Rows 2 and 3: cells 8…15.
            assert_eq!(centers(&r)[0], 8.0);
            assert_eq!(r.outlier_col, (16..32).collect::<Vec<u8>>());
            assert_eq!(r.prefix_scale, prefix_scale);
            if coding.is_int8() {
                assert_eq!(steps(&r), [2.0, 3.0]);
            }
            let (ccfg, c) = cols.grid(grid, cfg, m, n);
            assert_eq!(ccfg.groups(n / world), groups / world);
            // Row 0's groups 2 and 3, then row 1's 6 and 7, …
            assert_eq!(centers(&c), [2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]);
            assert_eq!(&c.outlier_col[..4], &[4, 5, 6, 7]);
            assert_eq!(c.prefix_scale, prefix_scale);
            if coding.is_int8() {
                // Per-row steps stay whole on every rank.
                assert_eq!(steps(&c), [0.0, 1.0, 2.0, 3.0]);
            }
        }
    }

    #[test]
    fn worlds_that_do_not_divide_the_model_are_refused_by_name() {
        assert!(TensorParallel::new(2, 2).is_err());
        assert!(TensorParallel::new(0, 0).is_err());
        let cfg: ModelConfig = serde_json::from_value(
            crate::format::synthetic::SyntheticSpec {
                hidden: 48,
                intermediate: 104,
                heads: 4,
                kv_heads: 2,
                ..Default::default()
            }
            .config_json(),
        )
        .unwrap();
        TensorParallel::new(1, 2).unwrap().check(&cfg).unwrap();
        let e = TensorParallel::new(0, 4).unwrap().check(&cfg).unwrap_err();
        assert!(e.to_string().contains("2 key/value heads"), "{e}");
        let mut odd = cfg.clone();
        odd.intermediate_size = 105;
        let e = TensorParallel::new(0, 2).unwrap().check(&odd).unwrap_err();
        assert!(e.to_string().contains("105 gate_proj output rows"), "{e}");
        let e = TensorParallel::new(0, 3).unwrap().check(&cfg).unwrap_err();
        assert!(e.to_string().contains("4 attention heads"), "{e}");
    }
}
