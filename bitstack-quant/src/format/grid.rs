//! Grid planes: the nested bit planes that end a linear's stack (format
//! version 2).
//!
//! AVD blocks shrink the error fast at one or two bits per weight, but
//! greedy sign blocks with one rank-k magnitude each stall after that:
//! each later block removes less than a uniform quantizer's next bit would.
//! Grid planes keep the sign-plane structure (so a smaller budget is still
//! a prefix of a larger one, and the kernels still add signed sums) but
//! put every row and group of input columns on its own uniform grid: a
//! center `c` and half-range `a` (f16) span the group's values, leaving
//! out its `o` largest-magnitude ones, which stay exact (f16 value and
//! column within the group). Plane `b` adds `±a·2^-(b+1)`, so the first
//! `p` planes are the uniform (midrise) grid of `2^p` levels over the
//! range, and each plane is round-to-nearest on its prefix. With the first
//! `p ≥ 1` planes resident the weight is
//!
//! ```text
//! q_p[i, c] = c[i, g] + a[i, g] · Σ_{b<p} 2^-(b+1) · s_b[i, c]      (g = c's group)
//! ```
//!
//! except at an outlier, where it is exactly the outlier's f16 value `v`,
//! at every `p`. The kernels add the plain grid's sum and then, per
//! outlier, `(v − q_p)·x[col]`, reading `q_p` from the resident planes'
//! signs at its column (`p` bit reads per outlier): nothing per outlier
//! depends on `p`, so a resize recomputes nothing and the resident grid is
//! the stored one. The center, half-ranges and outliers (the grid) are
//! resident with the first plane. Planes may follow AVD blocks, gridding
//! what they leave.
//!
//! Format version 2 stores each center and half-range as an f16; version
//! 3 ([`RangeCoding::Int8`], what compress writes now) as 8-bit codes
//! under two f16 steps per row, which cuts the grid from 0.44 to 0.31 bits
//! per weight at groups of 128 and measured no worse (SmolLM2, wiki and
//! Rust code, 3–5 planes): the ranges vary little within a row, so 8 bits
//! of the row's largest resolve them far finer than a grid step.

use half::f16;
use serde::{Deserialize, Serialize};

pub use bitstack_kernels::layout::plane_weight;

pub use bitstack_kernels::layout::GridRanges;

use crate::format::block::as_le_bytes;
use crate::format::pack;

/// Largest group the outliers' u8 column index and the kernels take.
pub const MAX_GROUP: usize = 256;

/// How a checkpoint's grid planes are laid out (`quantization_config.grid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridConfig {
    /// Planes stored per linear, after its AVD blocks.
    pub planes: usize,
    /// Target columns per group; see [`GridConfig::group_size`].
    pub group: usize,
    /// Weights per row and group kept exact.
    pub outliers: usize,
    /// How the centers and half-ranges are stored (absent: f16, format
    /// version 2).
    #[serde(default)]
    pub ranges: RangeCoding,
}

/// How a grid stores each (row, group)'s center and half-range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeCoding {
    /// An f16 each: 32 bits per (row, group) (format version 2).
    #[default]
    F16,
    /// 8-bit codes under two f16 steps per row: 16 bits per (row, group)
    /// (format version 3).
    Int8,
}

impl GridConfig {
    /// 128 columns per group, one exact weight per group, 8-bit ranges.
    pub fn new(planes: usize) -> Self {
        Self {
            planes,
            group: 128,
            outliers: 1,
            ranges: RangeCoding::Int8,
        }
    }

    /// The group size used for `n` input columns: `n` split into
    /// `max(1, ⌊n/group⌋)` groups of equal size (the last one shorter by
    /// less than a group count), so that a width like 576 gets 4 groups of
    /// 144 instead of 5 with a half-empty one. Below `2·group`.
    pub fn group_size(&self, n: usize) -> usize {
        let groups = (n / self.group).max(1);
        n.div_ceil(groups)
    }

    /// Groups per row for `n` input columns.
    pub fn groups(&self, n: usize) -> usize {
        n.div_ceil(self.group_size(n).max(1))
    }

    /// Checks the layout before any work: a typo fails here, not midway.
    pub fn check(&self) -> Result<(), String> {
        if self.planes == 0 {
            return Err("a grid needs at least one plane".into());
        }
        if !(8..=MAX_GROUP / 2).contains(&self.group) {
            return Err(format!(
                "grid group {} is out of range: it must be 8…{}",
                self.group,
                MAX_GROUP / 2
            ));
        }
        if self.outliers > self.group / 2 {
            return Err(format!(
                "{} outliers per group of {} is more than half the group",
                self.outliers, self.group
            ));
        }
        Ok(())
    }

    /// Bytes of the grid of an `m×n` linear as stored: center and
    /// half-range per row and group (two f16, or two 8-bit codes and two
    /// f16 steps per row), a u8 column and an f16 value per outlier.
    pub fn grid_stored_bytes(&self, m: usize, n: usize) -> usize {
        let cells = m * self.groups(n);
        let ranges = match self.ranges {
            RangeCoding::F16 => 4 * cells,
            RangeCoding::Int8 => 2 * cells + 4 * m,
        };
        ranges + 3 * self.outliers * cells
    }

    /// Bytes of the grid when resident: as stored (the kernels take the
    /// outliers' values and compute their corrections themselves).
    pub fn grid_resident_bytes(&self, m: usize, n: usize) -> usize {
        self.grid_stored_bytes(m, n)
    }
}

/// The grid of one `m×n` linear (everything but the planes' signs).
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// The center and half-range of each row and group.
    pub ranges: GridRanges,
    /// `m×G×o`: column of each outlier within its group.
    pub outlier_col: Vec<u8>,
    /// `m×G×o`: each outlier's value.
    pub outlier_value: Vec<f16>,
}

/// A grid and its planes' row-major packed signs, most significant first.
#[derive(Clone, Debug, PartialEq)]
pub struct GridPlanes {
    pub grid: Grid,
    pub planes: Vec<Vec<u8>>,
}

/// Errors of [`grid_planes`].
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("weight holds a non-finite value at row {row}, column {col}")]
    NonFinite { row: usize, col: usize },
    #[error("row {row}, group {group}: the values do not fit f16")]
    Range { row: usize, group: usize },
    #[error("a group of {len} columns cannot hold {outliers} distinct outliers")]
    ShortGroup { len: usize, outliers: usize },
}

/// Puts the row-major `m×n` residual `r` on the grid `cfg` describes and
/// returns its `cfg.planes` planes.
///
/// Per row and group, the grid spans the values that are not outliers:
/// the center is the middle of their range, and plane `b` moves by
/// `2^-(b+1)` of half the range, so that every prefix of `p`
/// planes is the uniform grid of `2^p` levels (midrise) over the range,
/// and each plane takes the side of the value on the current point: round
/// to nearest on every prefix. (A grid scaled to each group's RMS, with
/// magnitudes fitted to all prefixes, measured far worse on SmolLM2 at
/// every plane count: the range keeps the large weights, which matter.)
pub fn grid_planes(
    r: &[f32],
    m: usize,
    n: usize,
    cfg: GridConfig,
) -> Result<GridPlanes, GridError> {
    use rayon::prelude::*;
    assert_eq!(r.len(), m * n, "residual is not m×n");
    if let Some(i) = r.iter().position(|x| !x.is_finite()) {
        return Err(GridError::NonFinite {
            row: i / n,
            col: i % n,
        });
    }
    let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
    // Each of a group's `o` outliers replaces a distinct weight: the top `o`
    // by magnitude of distinct columns, so every group needs `o` columns.
    // `GridConfig::check` (o ≤ group/2) and `group_size` (≥ group when
    // n ≥ group) give that for all but a short last group or a narrow n.
    let shortest = if groups == 0 {
        gs
    } else {
        gs.min(n - (groups - 1) * gs)
    };
    if m > 0 && n > 0 && shortest < o {
        return Err(GridError::ShortGroup {
            len: shortest,
            outliers: o,
        });
    }
    // Per row: outliers, center and half-range of each group.
    type RowGrid = (RowRanges, Vec<u8>, Vec<f16>);
    let rows: Vec<RowGrid> = (0..m)
        .into_par_iter()
        .map(|i| {
            let (mut center, mut scale) = (vec![0f32; groups], vec![0f32; groups]);
            let (mut cols, mut values) = (vec![0u8; groups * o], vec![f16::ZERO; groups * o]);
            let mut exact = vec![false; gs];
            let mut by_size: Vec<usize> = Vec::with_capacity(gs);
            for g in 0..groups {
                let c0 = g * gs;
                let vals = &r[i * n + c0..i * n + n.min(c0 + gs)];
                let exact = &mut exact[..vals.len()];
                exact.fill(false);
                by_size.clear();
                by_size.extend(0..vals.len());
                by_size.sort_by(|&a, &b| vals[b].abs().total_cmp(&vals[a].abs()));
                for (t, &j) in by_size.iter().take(o).enumerate() {
                    exact[j] = true;
                    cols[g * o + t] = j as u8;
                    values[g * o + t] = f16::from_f32(vals[j]);
                    if !values[g * o + t].is_finite() {
                        return Err(GridError::Range { row: i, group: g });
                    }
                }
                let (lo, hi) = vals
                    .iter()
                    .zip(exact.iter())
                    .filter(|(_, &e)| !e)
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), (&x, _)| {
                        (lo.min(x), hi.max(x))
                    });
                if lo <= hi {
                    (center[g], scale[g]) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
                }
            }
            let ranges = RowRanges::code(&center, &scale, cfg.ranges)
                .map_err(|group| GridError::Range { row: i, group })?;
            Ok((ranges, cols, values))
        })
        .collect::<Result<_, _>>()?;
    let mut outlier_col = Vec::with_capacity(m * groups * o);
    let mut outlier_value = Vec::with_capacity(m * groups * o);
    let mut ranges = match cfg.ranges {
        RangeCoding::F16 => GridRanges::F16 {
            center: Vec::with_capacity(m * groups),
            half: Vec::with_capacity(m * groups),
        },
        RangeCoding::Int8 => GridRanges::Int8 {
            center_code: Vec::with_capacity(m * groups),
            half_code: Vec::with_capacity(m * groups),
            center_step: Vec::with_capacity(m),
            half_step: Vec::with_capacity(m),
        },
    };
    for (row, cols, values) in rows {
        row.append_to(&mut ranges);
        outlier_col.extend(cols);
        outlier_value.extend(values);
    }
    let grid = Grid {
        ranges,
        outlier_col,
        outlier_value,
    };
    let signs = choose_signs(r, m, n, &grid, &cfg);
    Ok(GridPlanes {
        grid,
        planes: signs,
    })
}

/// One row's ranges, coded.
enum RowRanges {
    F16 {
        center: Vec<f16>,
        half: Vec<f16>,
    },
    Int8 {
        center_code: Vec<i8>,
        half_code: Vec<u8>,
        center_step: f16,
        half_step: f16,
    },
}

impl RowRanges {
    /// Codes a row's centers and half-ranges; `Err(group)` names a group
    /// whose values f16 cannot hold. 8-bit codes: each step is the
    /// smallest f16 at or above the row's largest |center| / 127 or half
    /// / 255; centers round to the nearest step, half-ranges up to the
    /// next (so the grid still spans the group).
    fn code(center: &[f32], half: &[f32], coding: RangeCoding) -> Result<Self, usize> {
        let finite = |v: &[f16]| v.iter().position(|x| !x.is_finite());
        match coding {
            RangeCoding::F16 => {
                let center: Vec<f16> = center.iter().map(|&c| f16::from_f32(c)).collect();
                let half: Vec<f16> = half.iter().map(|&h| f16::from_f32(h)).collect();
                if let Some(g) = finite(&center).or(finite(&half)) {
                    return Err(g);
                }
                Ok(RowRanges::F16 { center, half })
            }
            RangeCoding::Int8 => {
                let largest = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs()));
                let step_of = |max: f32, codes: f32| {
                    let s = max / codes;
                    let h = f16::from_f32(s);
                    if h.to_f32() < s {
                        f16::from_bits(h.to_bits() + 1)
                    } else {
                        h
                    }
                };
                let (cmax, hmax) = (largest(center), largest(half));
                let (center_step, half_step) = (step_of(cmax, 127.0), step_of(hmax, 255.0));
                if !center_step.is_finite() || !half_step.is_finite() {
                    let big = |v: &[f32], max: f32| v.iter().position(|x| x.abs() == max);
                    let g = if !center_step.is_finite() {
                        big(center, cmax)
                    } else {
                        big(half, hmax)
                    };
                    return Err(g.unwrap_or(0));
                }
                let code = |x: f32, step: f16, round: fn(f32) -> f32, lim: f32| {
                    let s = step.to_f32();
                    if s > 0.0 {
                        round(x / s).clamp(-lim, lim)
                    } else {
                        0.0
                    }
                };
                Ok(RowRanges::Int8 {
                    center_code: center
                        .iter()
                        .map(|&c| code(c, center_step, f32::round, 127.0) as i8)
                        .collect(),
                    half_code: half
                        .iter()
                        .map(|&h| code(h, half_step, f32::ceil, 255.0) as u8)
                        .collect(),
                    center_step,
                    half_step,
                })
            }
        }
    }

    fn append_to(self, ranges: &mut GridRanges) {
        match (self, ranges) {
            (RowRanges::F16 { center, half }, GridRanges::F16 { center: c, half: h }) => {
                c.extend(center);
                h.extend(half);
            }
            (
                RowRanges::Int8 {
                    center_code,
                    half_code,
                    center_step,
                    half_step,
                },
                GridRanges::Int8 {
                    center_code: c,
                    half_code: h,
                    center_step: cs,
                    half_step: hs,
                },
            ) => {
                c.extend(center_code);
                h.extend(half_code);
                cs.push(center_step);
                hs.push(half_step);
            }
            _ => unreachable!("a row is coded as its grid"),
        }
    }
}

/// Greedy signs, packed per plane: plane `b` takes the side of `r` on the
/// point of planes `< b`.
fn choose_signs(r: &[f32], m: usize, n: usize, grid: &Grid, cfg: &GridConfig) -> Vec<Vec<u8>> {
    use rayon::prelude::*;
    let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
    let ranges = grid.ranges.as_ref();
    let rows: Vec<Vec<f32>> = (0..m)
        .into_par_iter()
        .map(|i| {
            let mut out = vec![0f32; cfg.planes * n];
            for c in 0..n {
                let cell = i * groups + c / gs;
                let (mut q, a) = ranges.at(groups, cell);
                let x = r[i * n + c];
                for b in 0..cfg.planes {
                    let up = x >= q;
                    out[b * n + c] = if up { 1.0 } else { -1.0 };
                    let step = a * plane_weight(b);
                    q += if up { step } else { -step };
                }
            }
            out
        })
        .collect();
    (0..cfg.planes)
        .map(|b| {
            let plane: Vec<f32> = rows
                .iter()
                .flat_map(|row| row[b * n..(b + 1) * n].iter().copied())
                .collect();
            pack::pack_signs(&plane)
        })
        .collect()
}

impl Grid {
    /// Checks the sizes and values a grid of an `m×n` linear must have:
    /// the kernels index without bounds checks.
    pub fn check(&self, m: usize, n: usize, cfg: &GridConfig) -> Result<(), String> {
        let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
        let cells = m * groups;
        match (&self.ranges, cfg.ranges) {
            (GridRanges::F16 { center, half }, RangeCoding::F16) => {
                if center.len() != cells || half.len() != cells {
                    return Err(format!(
                        "center and half-range must hold {m}×{groups} values"
                    ));
                }
                if let Some(i) = half.iter().position(|h| h.is_nan() || h.to_f32() < 0.0) {
                    return Err(format!("half-range {i} is {} (must be ≥ 0)", half[i]));
                }
            }
            (
                GridRanges::Int8 {
                    center_code,
                    half_code,
                    center_step,
                    half_step,
                },
                RangeCoding::Int8,
            ) => {
                if center_code.len() != cells || half_code.len() != cells {
                    return Err(format!(
                        "center and half-range codes must hold {m}×{groups} values"
                    ));
                }
                if center_step.len() != m || half_step.len() != m {
                    return Err(format!("the steps must hold one value per row ({m})"));
                }
                let bad = |s: &f16| !s.is_finite() || s.to_f32() < 0.0;
                if let Some(i) = center_step.iter().position(bad) {
                    return Err(format!(
                        "row {i}: center step {} (must be ≥ 0)",
                        center_step[i]
                    ));
                }
                if let Some(i) = half_step.iter().position(bad) {
                    return Err(format!(
                        "row {i}: half-range step {} (must be ≥ 0)",
                        half_step[i]
                    ));
                }
            }
            (_, coding) => {
                return Err(format!(
                    "the ranges are not coded as the config's {coding:?}"
                ));
            }
        }
        if self.outlier_col.len() != cells * o || self.outlier_value.len() != cells * o {
            return Err(format!("outliers must hold {m}×{groups}×{o} values"));
        }
        for (slot, &col) in self.outlier_col.iter().enumerate() {
            let g = (slot / o) % groups;
            let len = gs.min(n - g * gs);
            if col as usize >= len {
                return Err(format!(
                    "outlier {slot} is at column {col} of a group of {len}"
                ));
            }
            // Each outlier replaces a distinct weight of its (row, group).
            let first = slot - slot % o;
            if self.outlier_col[first..slot].contains(&col) {
                return Err(format!("outlier {slot} repeats column {col} of its group"));
            }
        }
        Ok(())
    }

    /// `q_p` at (`i`, `c`) for the first `p` planes, whose signs `sign(b,
    /// i, c)` gives: the grid point before outliers.
    pub fn point(
        &self,
        groups: usize,
        gs: usize,
        i: usize,
        c: usize,
        p: usize,
        sign: impl Fn(usize) -> bool,
    ) -> f32 {
        let cell = i * groups + c / gs;
        let (mut q, a) = self.ranges.as_ref().at(groups, cell);
        for b in 0..p {
            let step = a * plane_weight(b);
            q += if sign(b) { step } else { -step };
        }
        q
    }

    /// Adds the first `planes.len()` planes (row-major packed signs) of
    /// this grid to the row-major `m×n` matrix `w`: the grid point at
    /// every weight but the outliers, which get exactly their f16 value
    /// (with at least one plane).
    ///
    /// The straightforward reference; the kernels are tested against it.
    pub fn add_to(&self, planes: &[&[u8]], m: usize, n: usize, cfg: &GridConfig, w: &mut [f32]) {
        let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
        let p = planes.len();
        let sign = |b: usize, i: usize, c: usize| pack::sign_at(planes[b], i * n + c) > 0.0;
        // Each outlier's position in `w` and what `w` holds there before the
        // grid: with planes, it ends as that plus exactly the value.
        let at = |slot: usize| {
            let cell = slot / o;
            (cell / groups) * n + (cell % groups) * gs + self.outlier_col[slot] as usize
        };
        let before: Vec<f32> = (0..self.outlier_col.len()).map(|s| w[at(s)]).collect();
        for i in 0..m {
            for c in 0..n {
                w[i * n + c] += self.point(groups, gs, i, c, p, |b| sign(b, i, c));
            }
        }
        if p == 0 {
            return;
        }
        for (slot, (before, v)) in before.iter().zip(&self.outlier_value).enumerate() {
            w[at(slot)] = before + v.to_f32();
        }
    }

    /// CRC-32 of the grid as stored: the ranges (f16 centers and
    /// half-ranges, or their codes and then their steps), outlier columns,
    /// outlier values (little-endian).
    pub fn checksum(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        match &self.ranges {
            GridRanges::F16 { center, half } => {
                h.update(&as_le_bytes(center));
                h.update(&as_le_bytes(half));
            }
            GridRanges::Int8 {
                center_code,
                half_code,
                center_step,
                half_step,
            } => {
                h.update(&center_code.iter().map(|&c| c as u8).collect::<Vec<u8>>());
                h.update(half_code);
                h.update(&as_le_bytes(center_step));
                h.update(&as_le_bytes(half_step));
            }
        }
        h.update(&self.outlier_col);
        h.update(&as_le_bytes(&self.outlier_value));
        h.finalize()
    }
}

/// CRC-32 of a plane's packed signs as stored.
pub fn plane_checksum(signs: &[u8]) -> u32 {
    crc32fast::hash(signs)
}

/// The tensor names of a linear's grid and planes: `P.grid_center`,
/// `P.grid_scale` (f16 `[m, G]`: half the range; format 2) or
/// `P.grid_center_code` (i8 `[m, G]`), `P.grid_half_code` (u8 `[m, G]`),
/// `P.grid_center_step` and `P.grid_half_step` (f16 `[m]`; format 3),
/// `P.grid_outlier_col` (u8 `[m, G, o]`),
/// `P.grid_outlier_value` (f16 `[m, G, o]`) and `P.plane_{b}` (u8
/// `[⌈m·n/8⌉]`); CRC-32s in the file metadata as `P.crc32_grid` and
/// `P.crc32_plane_{b}`.
pub mod names {
    pub fn center(linear: &str) -> String {
        format!("{linear}.grid_center")
    }
    pub fn scale(linear: &str) -> String {
        format!("{linear}.grid_scale")
    }
    pub fn center_code(linear: &str) -> String {
        format!("{linear}.grid_center_code")
    }
    pub fn half_code(linear: &str) -> String {
        format!("{linear}.grid_half_code")
    }
    pub fn center_step(linear: &str) -> String {
        format!("{linear}.grid_center_step")
    }
    pub fn half_step(linear: &str) -> String {
        format!("{linear}.grid_half_step")
    }
    pub fn outlier_col(linear: &str) -> String {
        format!("{linear}.grid_outlier_col")
    }
    pub fn outlier_value(linear: &str) -> String {
        format!("{linear}.grid_outlier_value")
    }
    pub fn plane(linear: &str, b: usize) -> String {
        format!("{linear}.plane_{b}")
    }
    pub fn grid_checksum(linear: &str) -> String {
        format!("{linear}.crc32_grid")
    }
    pub fn plane_checksum(linear: &str, b: usize) -> String {
        format!("{linear}.crc32_plane_{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    fn rebuild(gp: &GridPlanes, p: usize, m: usize, n: usize, cfg: &GridConfig) -> Vec<f32> {
        let planes: Vec<&[u8]> = gp.planes[..p].iter().map(|s| s.as_slice()).collect();
        let mut w = vec![0f32; m * n];
        gp.grid.add_to(&planes, m, n, cfg, &mut w);
        w
    }

    #[test]
    fn group_sizes_split_widths_evenly() {
        let cfg = GridConfig::new(1);
        assert_eq!((cfg.group_size(576), cfg.groups(576)), (144, 4));
        assert_eq!((cfg.group_size(1536), cfg.groups(1536)), (128, 12));
        assert_eq!((cfg.group_size(4864), cfg.groups(4864)), (128, 38));
        assert_eq!((cfg.group_size(200), cfg.groups(200)), (200, 1));
        assert_eq!((cfg.group_size(9), cfg.groups(9)), (9, 1));
        for n in 1..2000 {
            assert!(cfg.group_size(n) < 2 * cfg.group.max(n.min(cfg.group)) + 1);
            assert!(cfg.group_size(n) <= MAX_GROUP, "{n}");
        }
    }

    #[test]
    fn every_longer_prefix_is_closer_and_outliers_stay_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        for (m, n, group, outliers, ranges) in [
            (7, 37, 8, 1, RangeCoding::F16),
            (5, 200, 128, 2, RangeCoding::F16),
            (1, 9, 8, 0, RangeCoding::F16),
            (7, 37, 8, 1, RangeCoding::Int8),
            (5, 200, 128, 2, RangeCoding::Int8),
            (1, 9, 8, 0, RangeCoding::Int8),
        ] {
            let cfg = GridConfig {
                planes: 5,
                group,
                outliers,
                ranges,
            };
            let r = random(m * n, &mut rng);
            let gp = grid_planes(&r, m, n, cfg).unwrap();
            gp.grid.check(m, n, &cfg).unwrap();
            let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
            let sq = |w: &[f32]| -> f64 {
                w.iter()
                    .zip(&r)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum()
            };
            let mut last = sq(&vec![0f32; m * n]);
            for p in 1..=cfg.planes {
                let w = rebuild(&gp, p, m, n, &cfg);
                for (slot, &col) in gp.grid.outlier_col.iter().enumerate() {
                    let cell = slot / outliers.max(1);
                    let c = (cell / groups) * n + (cell % groups) * gs + col as usize;
                    // Exactly the stored f16 value, at every prefix.
                    assert_eq!(
                        w[c],
                        gp.grid.outlier_value[slot].to_f32(),
                        "p={p}: outlier {slot}"
                    );
                    assert!((w[c] - r[c]).abs() <= 2e-3 * r[c].abs());
                }
                let e = sq(&w);
                assert!(
                    e < last,
                    "{m}×{n}: prefix {p} ({e}) is no closer than {}",
                    p - 1
                );
                last = e;
            }
            // Uniform values in ±0.5: 5 planes are within a few % of the
            // RMS error of a 5-bit uniform quantizer (1/32/√12 per unit range).
            let rms = (last / (m * n) as f64).sqrt();
            assert!(rms < 2.0 / 32.0 / 12f64.sqrt(), "{m}×{n}: RMS {rms}");
        }
    }

    #[test]
    fn a_hand_checked_grid() {
        // One row, one group of 4: the outlier 10 is exactly its f16 value
        // 10 at every plane count; the rest span [−1, 1], so one plane puts
        // them at ±0.5, two at ±0.25 and ±0.75 (all exact in f32).
        let r = [1.0, -1.0, 10.0, 0.3];
        for ranges in [RangeCoding::F16, RangeCoding::Int8] {
            let cfg = GridConfig {
                planes: 2,
                group: 8,
                outliers: 1,
                ranges,
            };
            let gp = grid_planes(&r, 1, 4, cfg).unwrap();
            assert_eq!(gp.grid.outlier_col, vec![2]);
            let (center, half) = gp.grid.ranges.as_ref().at(1, 0);
            // f16 holds 0 and 1 exactly; 8-bit codes round the half-range
            // up to the next multiple of its step (1/255, rounded up to f16).
            let slack = match ranges {
                RangeCoding::F16 => 0.0,
                RangeCoding::Int8 => 1.0 / 255.0,
            };
            assert_eq!(center, 0.0);
            assert!((1.0..=1.0 + slack).contains(&half), "{ranges:?}: {half}");
            let one = rebuild(&gp, 1, 1, 4, &cfg);
            let two = rebuild(&gp, 2, 1, 4, &cfg);
            for (w, want) in [
                (one, [0.5, -0.5, 10.0, 0.5]),
                (two, [0.75, -0.75, 10.0, 0.25]),
            ] {
                for (w, want) in w.iter().zip(want) {
                    assert!((w - want).abs() <= slack, "{ranges:?}: {w} vs {want}");
                }
            }
        }
    }

    #[test]
    fn bad_values_are_named() {
        let mut r = vec![0.5f32; 2 * 9];
        r[13] = f32::NAN;
        let e = grid_planes(&r, 2, 9, GridConfig::new(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "weight holds a non-finite value at row 1, column 4"
        );
        let r = [1e5f32, -1e5, 0.0, 1.0, 2.0];
        let e = grid_planes(&r, 1, 5, GridConfig::new(2)).unwrap_err();
        assert!(e.to_string().contains("do not fit f16"), "{e}");
        // Three columns cannot hold four distinct outliers.
        let cfg = GridConfig {
            outliers: 4,
            ..GridConfig::new(2)
        };
        let e = grid_planes(&[1.0, 2.0, 3.0], 1, 3, cfg).unwrap_err();
        assert!(e.to_string().contains("4 distinct outliers"), "{e}");
        // Two outliers of one group on one column are refused.
        let cfg = GridConfig {
            planes: 1,
            group: 8,
            outliers: 2,
            ranges: RangeCoding::Int8,
        };
        let r: Vec<f32> = (0..8).map(|c| c as f32).collect();
        let mut gp = grid_planes(&r, 1, 8, cfg).unwrap();
        gp.grid.check(1, 8, &cfg).unwrap();
        gp.grid.outlier_col[1] = gp.grid.outlier_col[0];
        let e = gp.grid.check(1, 8, &cfg).unwrap_err();
        assert!(e.contains("repeats column"), "{e}");
        assert!(GridConfig {
            planes: 0,
            ..GridConfig::new(1)
        }
        .check()
        .is_err());
        assert!(GridConfig {
            group: 300,
            ..GridConfig::new(1)
        }
        .check()
        .is_err());
    }
}
