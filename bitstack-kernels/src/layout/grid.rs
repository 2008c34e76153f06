//! The grid planes of one linear, borrowed ([`GridRef`]) and owned
//! ([`OwnedGrid`]): nested bit planes of the residual the AVD blocks leave,
//! on a per-(row, group) uniform grid, with a few weights per (row, group)
//! kept exact (their stored value, whatever the plane count).

use half::f16;

use super::tiled::TiledSigns;

/// Largest columns per group: an outlier's column within its group is a `u8`.
pub const MAX_GROUP: usize = 256;

/// The grid planes of one `m×n` linear, borrowed: with `G = ⌈n/group⌉`
/// groups per row (the last may be shorter), `o` outliers per (row, group)
/// and `p` planes, its weights are
///
/// ```text
/// Wgrid[i, c] = value[i,g,t]                                      if c = g·group + col[i,g,t]
///             = center[i,g] + σ_p·half[i,g]·Σ_{b<p} s_b(i,c)·2^-(b+1)   otherwise,   g = c / group
/// ```
///
/// with `σ_p` the linear's [`GridRef::prefix_scale`] for `p` planes (1
/// for checkpoints before format version 5).
/// with `s_b(i,c) = ±1` the signs of plane `b`, packed as the blocks' are.
/// Every slot is an outlier (`o` is the exact count per group), and the
/// `o` slots of one (row, group) have distinct columns, so an outlier's
/// weight is its stored value at every plane count: nothing here
/// depends on `p` but the planes. The kernels add, per outlier, the
/// difference `(v − q_p)·x[col]` to the plain grid's sum, with `q_p` the
/// grid point at the outlier read from the `p` planes' signs there.
#[derive(Clone, Debug)]
pub struct GridRef<'a> {
    /// Columns per group (the last group of a row may be shorter).
    pub group: usize,
    /// Each (row, group)'s center and half-width, and each outlier's value.
    pub values: GridValuesRef<'a>,
    /// Outliers per (row, group).
    pub outliers: usize,
    /// `m×G×o`: column within the group, distinct within a (row, group).
    pub outlier_col: &'a [u8],
    /// `p ≥ 1` planes, most significant first, each `m×n`.
    pub planes: Vec<&'a TiledSigns>,
    /// `σ_p`: the factor on every half-range with these `p` planes (1: the
    /// stored grid as is). A short prefix of round-to-nearest planes has
    /// its outer levels too far out for bell-shaped weights; the checkpoint
    /// stores the factor that fits each prefix best.
    pub prefix_scale: f32,
}

impl GridRef<'_> {
    /// Groups per row of an `n`-column weight.
    pub fn groups(&self, n: usize) -> usize {
        n.div_ceil(self.group)
    }

    /// Columns of group `g` of an `n`-column weight.
    pub fn group_len(&self, n: usize, g: usize) -> usize {
        self.group.min(n - g * self.group)
    }

    /// Panics unless the grid has the sizes of an `m×n` linear, every
    /// outlier column lies inside its group and no two outliers of one
    /// (row, group) share a column (each replaces a distinct weight): the
    /// kernels index without bounds checks.
    pub fn check(&self, m: usize, n: usize) {
        assert!(
            (1..=MAX_GROUP).contains(&self.group),
            "grid group {} is not in 1..={MAX_GROUP}",
            self.group
        );
        assert!(!self.planes.is_empty(), "a grid has at least one plane");
        assert!(
            self.prefix_scale.is_finite() && self.prefix_scale >= 0.0,
            "grid prefix scale {} is not a finite number ≥ 0",
            self.prefix_scale
        );
        let groups = self.groups(n);
        self.values.check(m, groups, self.outliers);
        let slots = m * groups * self.outliers;
        assert_eq!(self.outlier_col.len(), slots, "grid outlier_col");
        for (b, p) in self.planes.iter().enumerate() {
            assert_eq!((p.m(), p.n()), (m, n), "grid plane {b}");
        }
        // Every group but the last has `group` columns: one vectorized max.
        let max = self.outlier_col.iter().copied().max().unwrap_or(0) as usize;
        assert!(
            max < self.group,
            "grid outlier column {max} ≥ {}",
            self.group
        );
        let last = if groups == 0 {
            self.group
        } else {
            self.group_len(n, groups - 1)
        };
        if last < self.group && self.outliers > 0 {
            for row in self.outlier_col.chunks_exact(groups * self.outliers) {
                for &c in &row[(groups - 1) * self.outliers..] {
                    assert!(
                        (c as usize) < last,
                        "grid outlier column {c} ≥ the last group's {last}"
                    );
                }
            }
        }
        // Distinct columns per (row, group): a branchless pass (the kernels
        // call this per call), then the first repeat named.
        let o = self.outliers;
        if o > 1 {
            let repeats = |cols: &[u8]| {
                (1..o).fold(false, |r, t| {
                    cols[..t].iter().fold(r, |r, &c| r | (c == cols[t]))
                })
            };
            let any = self
                .outlier_col
                .chunks_exact(o)
                .fold(false, |r, cols| r | repeats(cols));
            if any {
                let cell = self
                    .outlier_col
                    .chunks_exact(o)
                    .position(repeats)
                    .unwrap_or(0);
                panic!(
                    "grid outlier columns {:?} of row {}, group {} repeat",
                    &self.outlier_col[cell * o..(cell + 1) * o],
                    cell / groups,
                    cell % groups
                );
            }
        }
    }

    /// The grid point `q_p[i, c] = center + half·Σ_{b<p} s_b(i,c)·2^-(b+1)`
    /// (`g = c / group`, `groups` per row) from the `p` planes' signs at
    /// (i, c): what an outlier at (i, c) replaces. The same f32 arithmetic
    /// in every kernel.
    #[inline(always)]
    pub fn point(&self, groups: usize, i: usize, c: usize) -> f32 {
        let cell = i * groups + c / self.group;
        // Σ_b ±2^-(b+1): sums of distinct powers of two, exact.
        let mut level = 0f32;
        for (b, plane) in self.planes.iter().enumerate() {
            let w = plane_weight(b);
            level += if plane.sign(i, c) { w } else { -w };
        }
        let (center, half) = self.range(groups, cell);
        center + half * level
    }

    /// `(center, σ_p·half)` of cell `cell = i·groups + g`, in f32: the
    /// grid the kernels add, with the prefix scale applied.
    #[inline(always)]
    pub fn range(&self, groups: usize, cell: usize) -> (f32, f32) {
        let (center, half) = self.values.range(groups, cell);
        (center, half * self.prefix_scale)
    }
}

/// The weight of plane `b` (0 = most significant): `2^-(b+1)`, made from
/// its exponent bits (`powi` is a library call), 0 past f32's normal range.
#[inline(always)]
pub fn plane_weight(b: usize) -> f32 {
    if b < 126 {
        f32::from_bits((126 - b as u32) << 23)
    } else {
        0.0
    }
}

/// The grid planes of one linear, owned. Build it field by field and hand
/// it to [`OwnedStack::with_grid`](super::OwnedStack::with_grid), which
/// checks it.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedGrid {
    pub group: usize,
    pub values: GridValues,
    pub outliers: usize,
    /// `m×G×o`: column within the group, distinct within a (row, group).
    pub outlier_col: Vec<u8>,
    /// Most significant first.
    pub planes: Vec<TiledSigns>,
    /// See [`GridRef::prefix_scale`].
    pub prefix_scale: f32,
}

impl OwnedGrid {
    /// The grid, borrowed.
    pub fn grid_ref(&self) -> GridRef<'_> {
        GridRef {
            group: self.group,
            values: self.values.as_ref(),
            outliers: self.outliers,
            outlier_col: &self.outlier_col,
            planes: self.planes.iter().collect(),
            prefix_scale: self.prefix_scale,
        }
    }

    /// Memory held.
    pub fn bytes(&self) -> usize {
        self.planes.iter().map(TiledSigns::bytes).sum::<usize>()
            + self.values.bytes()
            + self.outlier_col.len()
    }
}

/// The numbers of a grid, owned, as a checkpoint stores them: each (row,
/// group)'s center and half-width, and each outlier's value.
#[derive(Clone, Debug, PartialEq)]
pub enum GridValues {
    /// An f16 each (format version 2): 32 bits per (row, group) and 16 per
    /// outlier.
    F16 {
        /// `m×G`, row-major.
        center: Vec<f16>,
        /// `m×G`, row-major, ≥ 0.
        half: Vec<f16>,
        /// `m×G×o`: the outliers' weights.
        outlier: Vec<f16>,
    },
    /// 8-bit codes under three f16 steps per row (format version 3): 16
    /// bits per (row, group), 8 per outlier, 48 per row. `center[i,g] =
    /// center_step[i]·center_code[i,g]`, likewise `half` (u8 codes) and
    /// `outlier` (i8). An f16 times an 8-bit integer needs at most 19
    /// significant bits, so every kernel's f32 product is exact.
    Int8 {
        /// `m×G`, row-major.
        center_code: Vec<i8>,
        /// `m×G`, row-major.
        half_code: Vec<u8>,
        /// `m×G×o`.
        outlier_code: Vec<i8>,
        /// `m`: one per row.
        center_step: Vec<f16>,
        /// `m`: one per row, ≥ 0.
        half_step: Vec<f16>,
        /// `m`: one per row.
        outlier_step: Vec<f16>,
    },
}

impl GridValues {
    /// Borrowed.
    pub fn as_ref(&self) -> GridValuesRef<'_> {
        match self {
            GridValues::F16 {
                center,
                half,
                outlier,
            } => GridValuesRef::F16 {
                center,
                half,
                outlier,
            },
            GridValues::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => GridValuesRef::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            },
        }
    }

    /// Memory held.
    pub fn bytes(&self) -> usize {
        self.as_ref().bytes()
    }
}

/// The numbers of a grid, borrowed (see [`GridValues`]).
#[derive(Clone, Copy, Debug)]
pub enum GridValuesRef<'a> {
    F16 {
        center: &'a [f16],
        half: &'a [f16],
        outlier: &'a [f16],
    },
    Int8 {
        center_code: &'a [i8],
        half_code: &'a [u8],
        outlier_code: &'a [i8],
        center_step: &'a [f16],
        half_step: &'a [f16],
        outlier_step: &'a [f16],
    },
}

impl GridValuesRef<'_> {
    /// Memory held.
    pub fn bytes(&self) -> usize {
        match self {
            GridValuesRef::F16 {
                center,
                half,
                outlier,
            } => 2 * (center.len() + half.len() + outlier.len()),
            GridValuesRef::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => {
                center_code.len()
                    + half_code.len()
                    + outlier_code.len()
                    + 2 * (center_step.len() + half_step.len() + outlier_step.len())
            }
        }
    }

    /// What is missing for an `m×groups` grid with `o` outliers per
    /// group: the first array whose length is wrong, or `None` when every
    /// cell has a range, every outlier a value (and every row its steps).
    pub fn misfit(&self, m: usize, groups: usize, o: usize) -> Option<String> {
        let (cells, slots) = (m * groups, m * groups * o);
        let wrong = |what: &str, len: usize, want: usize| {
            (len != want).then(|| format!("{what} ({len}, not {want})"))
        };
        match self {
            GridValuesRef::F16 {
                center,
                half,
                outlier,
            } => wrong("grid center is not m×G", center.len(), cells)
                .or_else(|| wrong("grid half is not m×G", half.len(), cells))
                .or_else(|| wrong("grid outlier values are not m×G×o", outlier.len(), slots)),
            GridValuesRef::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => wrong("grid center codes are not m×G", center_code.len(), cells)
                .or_else(|| wrong("grid half codes are not m×G", half_code.len(), cells))
                .or_else(|| {
                    wrong(
                        "grid outlier codes are not m×G×o",
                        outlier_code.len(),
                        slots,
                    )
                })
                .or_else(|| {
                    [center_step, half_step, outlier_step]
                        .iter()
                        .find_map(|s| wrong("grid steps are not one per row", s.len(), m))
                }),
        }
    }

    /// Panics unless [`GridValuesRef::misfit`] finds nothing: the kernels
    /// index without bounds checks.
    pub fn check(&self, m: usize, groups: usize, o: usize) {
        if let Some(e) = self.misfit(m, groups, o) {
            panic!("{e}");
        }
    }

    /// `(center, half)` of cell `cell = i·groups + g`, in f32 (exact).
    #[inline(always)]
    pub fn range(&self, groups: usize, cell: usize) -> (f32, f32) {
        match self {
            GridValuesRef::F16 { center, half, .. } => (center[cell].to_f32(), half[cell].to_f32()),
            GridValuesRef::Int8 {
                center_code,
                half_code,
                center_step,
                half_step,
                ..
            } => {
                let i = cell / groups;
                (
                    center_step[i].to_f32() * center_code[cell] as f32,
                    half_step[i].to_f32() * half_code[cell] as f32,
                )
            }
        }
    }

    /// The value of outlier `slot` (of `per_row = groups·o` per row), in
    /// f32 (exact).
    #[inline(always)]
    pub fn outlier(&self, per_row: usize, slot: usize) -> f32 {
        match self {
            GridValuesRef::F16 { outlier, .. } => outlier[slot].to_f32(),
            GridValuesRef::Int8 {
                outlier_code,
                outlier_step,
                ..
            } => outlier_step[slot / per_row].to_f32() * outlier_code[slot] as f32,
        }
    }

    /// The centers and halves of the consecutive cells `cells`, in f32.
    pub fn ranges_f32(
        &self,
        groups: usize,
        cells: std::ops::Range<usize>,
        center: &mut [f32],
        half: &mut [f32],
    ) {
        for ((cell, c), h) in cells.zip(center.iter_mut()).zip(half.iter_mut()) {
            (*c, *h) = self.range(groups, cell);
        }
    }
}
