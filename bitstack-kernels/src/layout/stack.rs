//! The blocks of one linear: borrowed ([`BlockRef`], [`StackRef`]), as the
//! kernels take them, and owned ([`OwnedBlock`], [`OwnedStack`]), each with
//! the linear's optional grid planes ([`GridRef`], [`OwnedGrid`]).

use half::f16;

use super::grid::{GridRef, OwnedGrid};
use super::tiled::TiledSigns;

/// One block of a stack, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef<'a> {
    pub signs: &'a TiledSigns,
    /// `m×k`, row-major.
    pub u: &'a [f16],
    /// `k×n`, row-major.
    pub vt: &'a [f16],
}

/// The resident blocks of one `m×n` linear, borrowed: `W` is the sum of
/// the blocks' products and, if any, the grid planes' weights.
#[derive(Clone, Debug)]
pub struct StackRef<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub blocks: Vec<BlockRef<'a>>,
    /// Grid planes after the blocks (`None`: the blocks alone).
    pub grid: Option<GridRef<'a>>,
}

impl StackRef<'_> {
    /// Panics unless every block and the grid have the sizes `m`, `n` and
    /// `k` call for: the kernels index without bounds checks.
    pub fn check(&self) {
        let (m, n, k) = (self.m, self.n, self.k);
        for (i, b) in self.blocks.iter().enumerate() {
            assert_eq!((b.signs.m(), b.signs.n()), (m, n), "signs of block {i}");
            assert_eq!(b.u.len(), m * k, "u of block {i}");
            assert_eq!(b.vt.len(), k * n, "vt of block {i}");
        }
        if let Some(grid) = &self.grid {
            grid.check(m, n);
        }
    }

    /// Whether `W` is zero: no block and no grid.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.grid.is_none()
    }
}

/// One block, owned: its signs re-tiled, its factors as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedBlock {
    pub signs: TiledSigns,
    /// `m×k`, row-major.
    pub u: Vec<f16>,
    /// `k×n`, row-major.
    pub vt: Vec<f16>,
}

impl OwnedBlock {
    /// A block of an `m×n` weight from its row-major packed signs (see
    /// [`TiledSigns::from_row_major`]) and its factors.
    pub fn from_row_major(signs: &[u8], m: usize, n: usize, u: Vec<f16>, vt: Vec<f16>) -> Self {
        Self {
            signs: TiledSigns::from_row_major(signs, m, n),
            u,
            vt,
        }
    }

    /// The block, borrowed.
    pub fn block_ref(&self) -> BlockRef<'_> {
        BlockRef {
            signs: &self.signs,
            u: &self.u,
            vt: &self.vt,
        }
    }
}

/// The blocks of one `m×n` rank-`k` linear, and its grid planes, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedStack {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub blocks: Vec<OwnedBlock>,
    pub grid: Option<OwnedGrid>,
}

impl OwnedStack {
    /// A stack of `blocks`; panics unless each has the sizes `m`, `n` and
    /// `k` call for.
    pub fn new(m: usize, n: usize, k: usize, blocks: Vec<OwnedBlock>) -> Self {
        Self::with_grid(m, n, k, blocks, None)
    }

    /// A stack of `blocks` followed by `grid`; panics unless all have the
    /// sizes `m`, `n` and `k` call for (see [`GridRef::check`]).
    pub fn with_grid(
        m: usize,
        n: usize,
        k: usize,
        blocks: Vec<OwnedBlock>,
        grid: Option<OwnedGrid>,
    ) -> Self {
        let stack = Self {
            m,
            n,
            k,
            blocks,
            grid,
        };
        stack.stack_ref().check();
        stack
    }

    /// A stack from blocks given as (row-major packed signs, `u`, `vt`).
    /// The blocks are taken one at a time, so an iterator that draws random
    /// values for each block as it is asked for one keeps its own order of
    /// draws.
    pub fn from_row_major<S: AsRef<[u8]>>(
        m: usize,
        n: usize,
        k: usize,
        blocks: impl IntoIterator<Item = (S, Vec<f16>, Vec<f16>)>,
    ) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|(signs, u, vt)| OwnedBlock::from_row_major(signs.as_ref(), m, n, u, vt))
            .collect();
        Self::new(m, n, k, blocks)
    }

    /// The stack, borrowed, as the kernels take it.
    pub fn stack_ref(&self) -> StackRef<'_> {
        StackRef {
            m: self.m,
            n: self.n,
            k: self.k,
            blocks: self.blocks.iter().map(OwnedBlock::block_ref).collect(),
            grid: self.grid.as_ref().map(OwnedGrid::grid_ref),
        }
    }

    /// Memory held by the blocks and the grid.
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.signs.bytes() + 2 * (b.u.len() + b.vt.len()))
            .sum::<usize>()
            + self.grid.as_ref().map_or(0, OwnedGrid::bytes)
    }
}
