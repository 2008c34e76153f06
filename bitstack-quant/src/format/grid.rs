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
//! except at an outlier, where it is exactly the outlier's stored value `v`,
//! at every `p`. The kernels add the plain grid's sum and then, per
//! outlier, `(v − q_p)·x[col]`, reading `q_p` from the resident planes'
//! signs at its column (`p` bit reads per outlier): nothing per outlier
//! depends on `p`, so a resize recomputes nothing and the resident grid is
//! the stored one. The center, half-ranges and outliers (the grid) are
//! resident with the first plane. Planes may follow AVD blocks, gridding
//! what they leave.
//!
//! Format version 2 stores each center, half-range and outlier value as
//! an f16; version 3 ([`GridCoding::Int8`]) as
//! 8-bit codes under three f16 steps per row (one each for the centers,
//! the half-ranges and the outliers). That cuts the grid from `56/group`
//! to `32/group + 48/n` bits per weight (SmolLM2: 0.40 → 0.30) and
//! measured no worse (SmolLM2, wiki and Rust code, 3–5 planes): the
//! numbers vary little within a row, so 8 bits of the row's largest
//! resolve them far finer than a grid step.
//!
//! Version 5 ([`GridCoding::Int8Scaled`], compress's default) adds one f32 per linear
//! and plane count, the prefix scale `σ_p`: with `p` planes resident every
//! half-range counts `σ_p` times. Round to nearest on a range that spans
//! the group puts a short prefix's outer levels too far out for
//! bell-shaped weights (2 planes: levels at ±¼ and ±¾ of the range, where
//! a Gaussian's best 4 levels sit nearer the middle), so compress fits
//! each `σ_p` by least squares, signs fixed: to the linear's outputs on
//! the calibration inputs ([`crate::method::prefix_scale`]), or, without
//! them, to the weights ([`fit_prefix_scales`], which lowers the weights'
//! error of 1 and 2 planes by about 30% and 7% and leaves long prefixes
//! at about 1). The planes and the ladder are unchanged. Fitted to the
//! weights it helped SmolLM2 and cost Qwen2.5-Coder at 2 and 3 planes;
//! fitted to the outputs it helps both at every budget measured, and it
//! is what compress writes by default.

use half::f16;
use serde::{Deserialize, Serialize};

pub use bitstack_kernels::layout::plane_weight;

pub use bitstack_kernels::layout::GridValues;

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
    /// How the centers, half-ranges and outlier values are stored
    /// (absent: f16, format version 2).
    #[serde(default)]
    pub coding: GridCoding,
}

/// How a grid stores each (row, group)'s center and half-range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GridCoding {
    /// An f16 each: 32 bits per (row, group) (format version 2).
    #[default]
    F16,
    /// 8-bit codes under two f16 steps per row: 16 bits per (row, group)
    /// (format version 3).
    Int8,
    /// [`GridCoding::Int8`] and a prefix scale per plane count (format
    /// version 5; see the module docs).
    #[serde(rename = "int8-scaled")]
    Int8Scaled,
}

impl GridCoding {
    /// Whether the centers, half-ranges and outliers are 8-bit codes.
    pub fn is_int8(self) -> bool {
        matches!(self, GridCoding::Int8 | GridCoding::Int8Scaled)
    }
}

impl GridConfig {
    /// 128 columns per group, one exact weight per group, 8-bit codes.
    pub fn new(planes: usize) -> Self {
        Self {
            planes,
            group: 128,
            outliers: 1,
            coding: GridCoding::Int8,
        }
    }

    /// The group size used for `n` input columns: `n` split into
    /// `max(1, ⌊n/group⌋)` groups of equal size (the last one shorter by
    /// less than a group count), so that a width like 576 gets 4 groups of
    /// 144 instead of 5 with a half-empty one; below `2·group`, and more
    /// groups where that would pass [`MAX_GROUP`].
    pub fn group_size(&self, n: usize) -> usize {
        let groups = (n / self.group).max(1).max(n.div_ceil(MAX_GROUP));
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
        if !(8..=MAX_GROUP).contains(&self.group) {
            return Err(format!(
                "grid group {} is out of range: it must be 8…{MAX_GROUP}",
                self.group,
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

    /// Bytes of the grid of an `m×n` linear as stored: a center and a
    /// half-range per row and group, a u8 column and a value per outlier;
    /// the numbers in f16, or as 8-bit codes under three f16 steps per row
    /// (and an f32 prefix scale per plane).
    pub fn grid_stored_bytes(&self, m: usize, n: usize) -> usize {
        let cells = m * self.groups(n);
        let slots = cells * self.outliers;
        match self.coding {
            GridCoding::F16 => 4 * cells + 3 * slots,
            GridCoding::Int8 => 2 * cells + 2 * slots + 6 * m,
            GridCoding::Int8Scaled => 2 * cells + 2 * slots + 6 * m + 4 * self.planes,
        }
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
    /// The center and half-range of each row and group, and each
    /// outlier's value.
    pub values: GridValues,
    /// `m×G×o`: column of each outlier within its group.
    pub outlier_col: Vec<u8>,
    /// `σ_p` for `p = 1…planes` ([`GridCoding::Int8Scaled`]); empty before
    /// format version 5, where every `σ_p` is 1.
    pub prefix_scale: Vec<f32>,
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
    let grid = fit_grid(r, m, n, cfg)?;
    let planes = choose_signs(r, m, n, &grid, &cfg);
    let mut gp = GridPlanes { grid, planes };
    if cfg.coding == GridCoding::Int8Scaled {
        gp.grid.prefix_scale = fit_prefix_scales(r, m, n, &gp, &cfg);
    }
    Ok(gp)
}

/// The least-squares `σ_p` of every prefix of `gp`'s planes for the
/// row-major `m×n` weight `r`, signs and grid fixed: per prefix, the
/// factor on `Σ_{b<p} ±half·2^-(b+1)` that brings `center + σ·that`
/// closest to `r` over all weights but the outliers. Kept in [1/4, 2]
/// (1 where nothing constrains it), so that a degenerate linear cannot
/// store a wild number.
pub fn fit_prefix_scales(
    r: &[f32],
    m: usize,
    n: usize,
    gp: &GridPlanes,
    cfg: &GridConfig,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
    let values = gp.grid.values.as_ref();
    let planes = gp.planes.len();
    // Per prefix, Σ (r − c)·d and Σ d², d = half·level.
    let sums = (0..m)
        .into_par_iter()
        .map(|i| {
            let mut acc = vec![(0f64, 0f64); planes];
            let mut exact = vec![false; n];
            for slot in i * groups * o..(i + 1) * groups * o {
                let g = (slot / o.max(1)) % groups;
                exact[g * gs + gp.grid.outlier_col[slot] as usize] = true;
            }
            for c in (0..n).filter(|&c| !exact[c]) {
                let (center, half) = values.range(groups, i * groups + c / gs);
                let target = (r[i * n + c] - center) as f64;
                let mut level = 0f64;
                for (b, acc) in acc.iter_mut().enumerate() {
                    let w = plane_weight(b) as f64;
                    level += if pack::sign_at(&gp.planes[b], i * n + c) > 0.0 {
                        w
                    } else {
                        -w
                    };
                    let d = half as f64 * level;
                    acc.0 += target * d;
                    acc.1 += d * d;
                }
            }
            acc
        })
        .reduce(
            || vec![(0f64, 0f64); planes],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    a.0 += b.0;
                    a.1 += b.1;
                }
                a
            },
        );
    sums.iter()
        .map(|&(td, dd)| prefix_scale_from_sums(td, dd))
        .collect()
}

/// The least-squares `σ = Σ t·d / Σ d²` of one prefix from its two sums,
/// kept in [1/4, 2] (1 where nothing constrains it), so that a degenerate
/// linear cannot store a wild number.
pub fn prefix_scale_from_sums(td: f64, dd: f64) -> f32 {
    if dd > 0.0 && td.is_finite() {
        ((td / dd) as f32).clamp(0.25, 2.0)
    } else {
        1.0
    }
}

/// The grid of [`grid_planes`] alone: per row and group, the outliers and
/// the range of the other values (checked: finite, and f16 or the coding
/// holds them).
pub fn fit_grid(r: &[f32], m: usize, n: usize, cfg: GridConfig) -> Result<Grid, GridError> {
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
    let rows: Vec<(GridValues, Vec<u8>)> = (0..m)
        .into_par_iter()
        .map(|i| {
            let (mut center, mut scale) = (vec![0f32; groups], vec![0f32; groups]);
            let (mut cols, mut values) = (vec![0u8; groups * o], vec![0f32; groups * o]);
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
                    values[g * o + t] = vals[j];
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
            let row = code_row(&center, &scale, &values, o, cfg.coding)
                .map_err(|group| GridError::Range { row: i, group })?;
            Ok((row, cols))
        })
        .collect::<Result<_, _>>()?;
    let mut outlier_col = Vec::with_capacity(m * groups * o);
    let mut values = match cfg.coding {
        GridCoding::F16 => GridValues::F16 {
            center: Vec::with_capacity(m * groups),
            half: Vec::with_capacity(m * groups),
            outlier: Vec::with_capacity(m * groups * o),
        },
        GridCoding::Int8 | GridCoding::Int8Scaled => GridValues::Int8 {
            center_code: Vec::with_capacity(m * groups),
            half_code: Vec::with_capacity(m * groups),
            outlier_code: Vec::with_capacity(m * groups * o),
            center_step: Vec::with_capacity(m),
            half_step: Vec::with_capacity(m),
            outlier_step: Vec::with_capacity(m),
        },
    };
    for (row, cols) in rows {
        append(&mut values, row);
        outlier_col.extend(cols);
    }
    // Fitted with the planes ([`fit_prefix_scales`]); 1 until then.
    let prefix_scale = match cfg.coding {
        GridCoding::Int8Scaled => vec![1.0; cfg.planes],
        GridCoding::F16 | GridCoding::Int8 => Vec::new(),
    };
    Ok(Grid {
        values,
        outlier_col,
        prefix_scale,
    })
}

/// One row's centers, half-ranges and outlier values (`o` per group),
/// coded; `Err(group)` names a group whose numbers the coding cannot hold.
/// 8-bit codes: each step is the smallest f16 at or above the row's
/// largest |center| / 127, half / 255 or |outlier| / 127; centers and
/// outliers round to the nearest step, half-ranges up to the next (so the
/// grid still spans the group).
fn code_row(
    center: &[f32],
    half: &[f32],
    outlier: &[f32],
    o: usize,
    coding: GridCoding,
) -> Result<GridValues, usize> {
    let cells = center.len();
    match coding {
        GridCoding::F16 => {
            let to_f16 = |v: &[f32], per: usize| -> Result<Vec<f16>, usize> {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                match h.iter().position(|x| !x.is_finite()) {
                    Some(e) => Err(e / per.max(1)),
                    None => Ok(h),
                }
            };
            Ok(GridValues::F16 {
                center: to_f16(center, 1)?,
                half: to_f16(half, 1)?,
                outlier: to_f16(outlier, o)?,
            })
        }
        GridCoding::Int8 | GridCoding::Int8Scaled => {
            // The step for `max` over `codes` levels, and its group if f16
            // cannot hold it.
            let step_of = |v: &[f32], codes: f32, per: usize| -> Result<f16, usize> {
                let max = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                let s = max / codes;
                let mut h = f16::from_f32(s);
                if h.to_f32() < s {
                    h = f16::from_bits(h.to_bits() + 1);
                }
                if h.is_finite() {
                    Ok(h)
                } else {
                    let e = v.iter().position(|x| x.abs() == max).unwrap_or(0);
                    Err(e / per.max(1))
                }
            };
            let code = |x: f32, step: f16, round: fn(f32) -> f32, lim: f32| {
                let s = step.to_f32();
                if s > 0.0 {
                    round(x / s).clamp(-lim, lim)
                } else {
                    0.0
                }
            };
            let center_step = step_of(center, 127.0, 1)?;
            let half_step = step_of(half, 255.0, 1)?;
            let outlier_step = step_of(outlier, 127.0, o)?;
            debug_assert_eq!(half.len(), cells);
            Ok(GridValues::Int8 {
                center_code: center
                    .iter()
                    .map(|&c| code(c, center_step, f32::round, 127.0) as i8)
                    .collect(),
                half_code: half
                    .iter()
                    .map(|&h| code(h, half_step, f32::ceil, 255.0) as u8)
                    .collect(),
                outlier_code: outlier
                    .iter()
                    .map(|&v| code(v, outlier_step, f32::round, 127.0) as i8)
                    .collect(),
                center_step: vec![center_step],
                half_step: vec![half_step],
                outlier_step: vec![outlier_step],
            })
        }
    }
}

/// Appends `row`'s numbers to `all`, coded alike.
fn append(all: &mut GridValues, row: GridValues) {
    match (all, row) {
        (
            GridValues::F16 {
                center,
                half,
                outlier,
            },
            GridValues::F16 {
                center: c,
                half: h,
                outlier: v,
            },
        ) => {
            center.extend(c);
            half.extend(h);
            outlier.extend(v);
        }
        (
            GridValues::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            },
            GridValues::Int8 {
                center_code: c,
                half_code: h,
                outlier_code: v,
                center_step: cs,
                half_step: hs,
                outlier_step: vs,
            },
        ) => {
            center_code.extend(c);
            half_code.extend(h);
            outlier_code.extend(v);
            center_step.extend(cs);
            half_step.extend(hs);
            outlier_step.extend(vs);
        }
        _ => unreachable!("a row is coded as its grid"),
    }
}

/// Greedy signs, packed per plane: plane `b` takes the side of `r` on the
/// point of planes `< b`.
fn choose_signs(r: &[f32], m: usize, n: usize, grid: &Grid, cfg: &GridConfig) -> Vec<Vec<u8>> {
    use rayon::prelude::*;
    let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
    let values = grid.values.as_ref();
    let rows: Vec<Vec<f32>> = (0..m)
        .into_par_iter()
        .map(|i| {
            let mut out = vec![0f32; cfg.planes * n];
            for c in 0..n {
                let cell = i * groups + c / gs;
                let (mut q, a) = values.range(groups, cell);
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
        if let Some(e) = self.values.as_ref().misfit(m, groups, o) {
            return Err(e);
        }
        let bad = |s: &f16| s.is_nan() || s.to_f32() < 0.0;
        match (&self.values, cfg.coding) {
            (GridValues::F16 { half, .. }, GridCoding::F16) => {
                if let Some(i) = half.iter().position(bad) {
                    return Err(format!("half-range {i} is {} (must be ≥ 0)", half[i]));
                }
            }
            (
                GridValues::Int8 {
                    center_step,
                    half_step,
                    outlier_step,
                    ..
                },
                GridCoding::Int8 | GridCoding::Int8Scaled,
            ) => {
                for (what, steps) in [
                    ("center", center_step),
                    ("half-range", half_step),
                    ("outlier", outlier_step),
                ] {
                    if let Some(i) = steps.iter().position(|s| !s.is_finite() || bad(s)) {
                        return Err(format!("row {i}: {what} step {} (must be ≥ 0)", steps[i]));
                    }
                }
            }
            (_, coding) => {
                return Err(format!(
                    "the grid's numbers are not coded as the config's {coding:?}"
                ));
            }
        }
        let scales = match cfg.coding {
            GridCoding::Int8Scaled => cfg.planes,
            GridCoding::F16 | GridCoding::Int8 => 0,
        };
        if self.prefix_scale.len() != scales {
            return Err(format!(
                "{} prefix scales for {scales} (one per plane with {:?} coding)",
                self.prefix_scale.len(),
                cfg.coding
            ));
        }
        if let Some(p) = self
            .prefix_scale
            .iter()
            .position(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(format!(
                "the prefix scale of {} planes is {} (must be a finite number > 0)",
                p + 1,
                self.prefix_scale[p]
            ));
        }
        if self.outlier_col.len() != m * groups * o {
            return Err(format!(
                "the outlier columns hold {} values, not {}",
                self.outlier_col.len(),
                m * groups * o
            ));
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

    /// Where outlier `slot` sits in the row-major `m×n` weight.
    pub fn outlier_position(&self, slot: usize, n: usize, cfg: &GridConfig) -> usize {
        let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
        let cell = slot / cfg.outliers;
        (cell / groups) * n + (cell % groups) * gs + self.outlier_col[slot] as usize
    }

    /// The value of outlier `slot` of a linear with `groups·o` per row.
    pub fn outlier(&self, per_row: usize, slot: usize) -> f32 {
        self.values.as_ref().outlier(per_row, slot)
    }

    /// `σ_p`, the factor on every half-range with `p ≥ 1` planes resident
    /// (1 before format version 5).
    pub fn prefix_scale(&self, p: usize) -> f32 {
        match p.checked_sub(1).and_then(|i| self.prefix_scale.get(i)) {
            Some(&s) => s,
            None => 1.0,
        }
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
        let (mut q, a) = self.values.as_ref().range(groups, cell);
        let a = a * self.prefix_scale(p);
        for b in 0..p {
            let step = a * plane_weight(b);
            q += if sign(b) { step } else { -step };
        }
        q
    }

    /// Adds the first `planes.len()` planes (row-major packed signs) of
    /// this grid to the row-major `m×n` matrix `w`: the grid point at
    /// every weight but the outliers, which get exactly their stored value
    /// (with at least one plane).
    ///
    /// The straightforward reference; the kernels are tested against it.
    pub fn add_to(&self, planes: &[&[u8]], m: usize, n: usize, cfg: &GridConfig, w: &mut [f32]) {
        let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
        let p = planes.len();
        let sign = |b: usize, i: usize, c: usize| pack::sign_at(planes[b], i * n + c) > 0.0;
        // Each outlier's position in `w` and what `w` holds there before the
        // grid: with planes, it ends as that plus exactly the value.
        let at = |slot: usize| self.outlier_position(slot, n, cfg);
        let before: Vec<f32> = (0..self.outlier_col.len()).map(|s| w[at(s)]).collect();
        for i in 0..m {
            for c in 0..n {
                w[i * n + c] += self.point(groups, gs, i, c, p, |b| sign(b, i, c));
            }
        }
        if p == 0 {
            return;
        }
        for (slot, before) in before.iter().enumerate() {
            w[at(slot)] = before + self.outlier(groups * o, slot);
        }
    }

    /// CRC-32 of the grid as stored (little-endian). Format 2: centers,
    /// half-ranges, outlier columns, outlier values. Format 3: center codes,
    /// half-range codes, their steps, outlier columns, outlier codes, their
    /// steps.
    pub fn checksum(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        match &self.values {
            GridValues::F16 {
                center,
                half,
                outlier,
            } => {
                h.update(&as_le_bytes(center));
                h.update(&as_le_bytes(half));
                h.update(&self.outlier_col);
                h.update(&as_le_bytes(outlier));
            }
            GridValues::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => {
                let bytes = |v: &[i8]| v.iter().map(|&c| c as u8).collect::<Vec<u8>>();
                h.update(&bytes(center_code));
                h.update(half_code);
                h.update(&as_le_bytes(center_step));
                h.update(&as_le_bytes(half_step));
                h.update(&self.outlier_col);
                h.update(&bytes(outlier_code));
                h.update(&as_le_bytes(outlier_step));
            }
        }
        // Format 5: the prefix scales last (empty before).
        for s in &self.prefix_scale {
            h.update(&s.to_le_bytes());
        }
        h.finalize()
    }
}

/// CRC-32 of a plane's packed signs as stored.
pub fn plane_checksum(signs: &[u8]) -> u32 {
    crc32fast::hash(signs)
}

/// The tensor names of a linear's grid and planes. Format 2:
/// `P.grid_center`, `P.grid_scale` (f16 `[m, G]`: half the range),
/// `P.grid_outlier_value` (f16 `[m, G, o]`). Format 3: `P.grid_center_code`
/// (i8 `[m, G]`), `P.grid_half_code` (u8 `[m, G]`), `P.grid_outlier_code`
/// (i8 `[m, G, o]`) and their steps `P.grid_center_step`,
/// `P.grid_half_step`, `P.grid_outlier_step` (f16 `[m]`). Both:
/// `P.grid_outlier_col` (u8 `[m, G, o]`) and `P.plane_{b}` (u8
/// `[⌈m·n/8⌉]`); CRC-32s in the file metadata as `P.crc32_grid` and
/// `P.crc32_plane_{b}`. Format 5 adds `P.grid_prefix_scale` (f32
/// `[planes]`), in the grid's CRC after the format 3 numbers.
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
    pub fn outlier_code(linear: &str) -> String {
        format!("{linear}.grid_outlier_code")
    }
    pub fn outlier_step(linear: &str) -> String {
        format!("{linear}.grid_outlier_step")
    }
    pub fn plane(linear: &str, b: usize) -> String {
        format!("{linear}.plane_{b}")
    }
    pub fn prefix_scale(linear: &str) -> String {
        format!("{linear}.grid_prefix_scale")
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
        // Wide groups split further rather than pass what the kernels take.
        let wide = GridConfig {
            group: 256,
            ..GridConfig::new(1)
        };
        assert_eq!((wide.group_size(576), wide.groups(576)), (192, 3));
        assert_eq!((wide.group_size(896), wide.groups(896)), (224, 4));
        assert_eq!((wide.group_size(4864), wide.groups(4864)), (256, 19));
        for group in [129, 200, 256] {
            let cfg = GridConfig {
                group,
                ..GridConfig::new(1)
            };
            for n in 1..5000 {
                let gs = cfg.group_size(n);
                assert!(
                    gs <= MAX_GROUP && gs >= n.min(group) / 2,
                    "{group} {n}: {gs}"
                );
                assert_eq!(cfg.groups(n), n.div_ceil(gs), "{group} {n}");
            }
        }
    }

    #[test]
    fn every_longer_prefix_is_closer_and_outliers_stay_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        for (m, n, group, outliers, coding) in [
            (7, 37, 8, 1, GridCoding::F16),
            (5, 200, 128, 2, GridCoding::F16),
            (1, 9, 8, 0, GridCoding::F16),
            (7, 37, 8, 1, GridCoding::Int8),
            (5, 200, 128, 2, GridCoding::Int8),
            (1, 9, 8, 0, GridCoding::Int8),
            (7, 37, 8, 1, GridCoding::Int8Scaled),
            (5, 200, 128, 2, GridCoding::Int8Scaled),
        ] {
            let cfg = GridConfig {
                planes: 5,
                group,
                outliers,
                coding,
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
                    // Exactly the stored value, at every prefix: the f16 of
                    // the weight, or its 8-bit code under the row's step
                    // (half a step from it at most).
                    let stored = gp.grid.outlier(groups * outliers, slot);
                    assert_eq!(w[c], stored, "p={p}: outlier {slot}");
                    let row = &r[(cell / groups) * n..][..n];
                    let tol = match coding {
                        GridCoding::F16 => 2e-3 * r[c].abs(),
                        GridCoding::Int8 | GridCoding::Int8Scaled => {
                            row.iter().fold(0f32, |a, x| a.max(x.abs())) / 254.0 * 1.01
                        }
                    };
                    assert!(
                        (w[c] - r[c]).abs() <= tol,
                        "{coding:?}: {} vs {}",
                        w[c],
                        r[c]
                    );
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
        // One row, one group of 4: the outlier 10 is exactly its stored
        // value at every plane count (10 in f16; 127 steps of 10/127 rounded
        // up to f16 in 8 bits); the rest span [−1, 1], so one plane puts
        // them at ±0.5, two at ±0.25 and ±0.75 (all exact in f32).
        // With prefix scales, least squares on the three others: one plane
        // (levels ±½) fits σ·half = 2.3/1.5, two planes (¾, −¾, ¼) fit
        // σ·half = 1.575/1.1875, whatever the half-range's rounding.
        let r = [1.0, -1.0, 10.0, 0.3];
        for coding in [GridCoding::F16, GridCoding::Int8, GridCoding::Int8Scaled] {
            let cfg = GridConfig {
                planes: 2,
                group: 8,
                outliers: 1,
                coding,
            };
            let gp = grid_planes(&r, 1, 4, cfg).unwrap();
            assert_eq!(gp.grid.outlier_col, vec![2]);
            let (center, half) = gp.grid.values.as_ref().range(1, 0);
            // f16 holds 0 and 1 exactly; 8-bit codes round the half-range
            // up to the next multiple of its step (1/255, rounded up to f16).
            let slack = match coding {
                GridCoding::F16 => 0.0,
                GridCoding::Int8 | GridCoding::Int8Scaled => 1.0 / 255.0,
            };
            assert_eq!(center, 0.0);
            assert!((1.0..=1.0 + slack).contains(&half), "{coding:?}: {half}");
            let v = gp.grid.outlier(1, 0);
            assert!((v - 10.0).abs() <= 10.0 / 254.0, "{coding:?}: {v}");
            let one = rebuild(&gp, 1, 1, 4, &cfg);
            let two = rebuild(&gp, 2, 1, 4, &cfg);
            assert_eq!((one[2], two[2]), (v, v));
            let (k1, k2, slack) = match coding {
                GridCoding::Int8Scaled => (2.3 / 1.5, 1.575 / 1.1875, 1e-5),
                _ => (1.0, 1.0, slack),
            };
            let wants = [
                (one, [0.5 * k1, -0.5 * k1, v, 0.5 * k1]),
                (two, [0.75 * k2, -0.75 * k2, v, 0.25 * k2]),
            ];
            for (w, want) in wants {
                for (w, want) in w.iter().zip(want) {
                    assert!((w - want).abs() <= slack, "{coding:?}: {w} vs {want}");
                }
            }
        }
    }

    /// On bell-shaped weights the fitted prefix scales pull short prefixes
    /// in (σ₁ near the Gaussian's 0.67) and lower every prefix's error,
    /// with the same grid and signs as without them.
    #[test]
    fn prefix_scales_lower_every_prefix_error_on_gaussian_weights() {
        let (m, n) = (40, 300);
        let mut rng = StdRng::seed_from_u64(9);
        let r: Vec<f32> = (0..m * n)
            .map(|_| {
                // Box–Muller.
                let (u, v) = (rng.random::<f32>().max(1e-7), rng.random::<f32>());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let plain_cfg = GridConfig::new(5);
        let cfg = GridConfig {
            coding: GridCoding::Int8Scaled,
            ..plain_cfg
        };
        let plain = grid_planes(&r, m, n, plain_cfg).unwrap();
        let scaled = grid_planes(&r, m, n, cfg).unwrap();
        scaled.grid.check(m, n, &cfg).unwrap();
        assert_eq!(scaled.planes, plain.planes);
        assert_eq!(scaled.grid.values, plain.grid.values);
        let s = &scaled.grid.prefix_scale;
        assert_eq!(s.len(), 5);
        assert!((0.55..0.8).contains(&s[0]), "{s:?}");
        assert!((0.85..0.97).contains(&s[1]), "{s:?}");
        assert!((0.97..1.02).contains(&s[4]), "{s:?}");
        let sq = |w: &[f32]| -> f64 {
            w.iter()
                .zip(&r)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        for p in 1..=5 {
            let (e0, e1) = (
                sq(&rebuild(&plain, p, m, n, &plain_cfg)),
                sq(&rebuild(&scaled, p, m, n, &cfg)),
            );
            assert!(e1 <= e0, "p={p}: {e1} > {e0}");
            if p == 1 {
                assert!(e1 < 0.8 * e0, "p=1: {e1} vs {e0}");
            }
        }
        // The stored bytes count the scales.
        assert_eq!(
            cfg.grid_stored_bytes(m, n),
            plain_cfg.grid_stored_bytes(m, n) + 4 * 5
        );
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
        // f16 numbers stop at 65504; 8-bit codes at 127 (255) f16 steps.
        let f16_coded = GridConfig {
            coding: GridCoding::F16,
            ..GridConfig::new(2)
        };
        for (big, cfg) in [(1e5f32, f16_coded), (1e10, GridConfig::new(2))] {
            let r = [big, -big, 0.0, 1.0, 2.0];
            let e = grid_planes(&r, 1, 5, cfg).unwrap_err();
            assert!(e.to_string().contains("do not fit f16"), "{e}");
        }
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
            coding: GridCoding::Int8,
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
