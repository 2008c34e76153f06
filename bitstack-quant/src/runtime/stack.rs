//! `WeightStack`: the resident blocks of one linear, in order.

use std::sync::Arc;

use bitstack_kernels::{tiled_row, GridRef, OwnedBlock, StackRef, TiledSigns};
use rayon::prelude::*;

use anyhow::{bail, Result};

use crate::format::block::{block_bytes, Block, BlockShape};
use crate::format::checkpoint::{read_grid, read_plane, CheckedBlock};
use crate::format::grid::{plane_weight, Grid, GridConfig};
use crate::format::order::{LinearSlot, Part};
use crate::format::store::TensorStore;
use crate::runtime::device_copy::DeviceCopy;

#[cfg(feature = "cuda")]
type BlockUpload = bitstack_kernels::cuda::CudaBlock;
#[cfg(not(feature = "cuda"))]
type BlockUpload = ();
#[cfg(feature = "cuda")]
type StackUpload = bitstack_kernels::cuda::CudaStack;
#[cfg(not(feature = "cuda"))]
type StackUpload = ();

/// A block as a running model holds it: the kernels' [`OwnedBlock`] (signs
/// re-tiled, factors as stored; its fields read through this type) and its
/// upload for CUDA forwards.
#[derive(Clone, Debug, PartialEq)]
pub struct StackBlock {
    pub block: OwnedBlock,
    /// The upload for CUDA forwards, made on first use (none on the CPU).
    pub device: DeviceCopy<BlockUpload>,
}

impl std::ops::Deref for StackBlock {
    type Target = OwnedBlock;
    fn deref(&self) -> &OwnedBlock {
        &self.block
    }
}

impl StackBlock {
    /// Reads block `i` of linear `path` (see [`CheckedBlock::read`]), with
    /// the signs re-tiled for the kernels from the checked buffer: the grow
    /// path of a resize.
    pub fn read(store: &TensorStore, path: &str, i: usize, shape: BlockShape) -> Result<Self> {
        let checked = CheckedBlock::read(store, path, i, shape)?;
        Ok(Self {
            block: OwnedBlock::from_row_major(
                &checked.signs,
                shape.m,
                shape.n,
                checked.u,
                checked.vt,
            ),
            device: Default::default(),
        })
    }

    /// Re-tiles `block` of an `m×n` weight (its row-major signs are dropped).
    pub fn new(block: Block, m: usize, n: usize) -> Self {
        Self {
            block: OwnedBlock::from_row_major(&block.signs, m, n, block.u, block.vt),
            device: DeviceCopy::default(),
        }
    }

    /// The block in the checkpoint's layout.
    pub fn to_block(&self) -> Block {
        Block {
            signs: self.signs.to_row_major(),
            u: self.u.clone(),
            vt: self.vt.clone(),
        }
    }

    /// Bytes resident for this block.
    pub fn bytes(&self) -> usize {
        self.signs.bytes() + 2 * (self.u.len() + self.vt.len())
    }
}

/// A grid plane as a running model holds it: its signs re-tiled for the
/// kernels, and (plane 0 only) the grid it refines.
#[derive(Clone, Debug, PartialEq)]
pub struct StackPlane {
    pub signs: TiledSigns,
    /// The grid, resident with the first plane.
    pub grid: Option<Arc<ResidentGrid>>,
}

/// A linear's grid and its layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidentGrid {
    pub cfg: GridConfig,
    pub grid: Grid,
}

impl StackPlane {
    /// Plane `plane` of `slot` (with the grid when it is the first),
    /// checked as [`read_plane`] and [`read_grid`] check.
    pub fn read(store: &TensorStore, slot: &LinearSlot, plane: usize) -> Result<Self> {
        let signs = read_plane(store, slot, plane)?;
        let grid = if plane == 0 {
            let cfg = slot.grid.expect("a slot with planes has a grid");
            Some(Arc::new(ResidentGrid {
                cfg,
                grid: read_grid(store, slot)?,
            }))
        } else {
            None
        };
        Ok(Self {
            signs: TiledSigns::from_row_major(&signs, slot.m, slot.n),
            grid,
        })
    }
}

/// One stored block of a linear, resident: an AVD block or a grid plane.
#[derive(Clone, Debug)]
pub enum StackPart {
    Block(Arc<StackBlock>),
    Plane(Arc<StackPlane>),
}

impl StackPart {
    /// Block `b` of `slot`, read and checked.
    pub fn read(store: &TensorStore, slot: &LinearSlot, b: usize) -> Result<Self> {
        Ok(match slot.part(b) {
            Part::Avd(i) => Self::Block(Arc::new(StackBlock::read(
                store,
                &slot.name,
                i,
                slot.shape(),
            )?)),
            Part::Plane(p) => Self::Plane(Arc::new(StackPlane::read(store, slot, p)?)),
        })
    }
}

/// What [`WeightStack::new`] takes as a block: a checkpoint block (re-tiled
/// on the way in) or a resident one (shared).
pub trait IntoStackBlock {
    fn into_stack_block(self, m: usize, n: usize) -> Arc<StackBlock>;
}

impl IntoStackBlock for Block {
    fn into_stack_block(self, m: usize, n: usize) -> Arc<StackBlock> {
        Arc::new(StackBlock::new(self, m, n))
    }
}

impl IntoStackBlock for Arc<StackBlock> {
    fn into_stack_block(self, _: usize, _: usize) -> Arc<StackBlock> {
        self
    }
}

/// The blocks of one `m×n` linear that are resident, best first.
///
/// Blocks are shared: a resized stack reuses the blocks it keeps, so growing
/// or shrinking by one block copies pointers, not weights, and a block's
/// memory is released when the last stack holding it is dropped.
#[derive(Clone, Debug)]
pub struct WeightStack {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The AVD blocks.
    pub blocks: Vec<Arc<StackBlock>>,
    /// The grid planes after them (the first one carries the grid).
    pub planes: Vec<Arc<StackPlane>>,
    /// The blocks' uploads and their pointer table, for CUDA forwards.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: DeviceCopy<StackUpload>,
}

impl WeightStack {
    pub fn new<B: IntoStackBlock>(
        m: usize,
        n: usize,
        k: usize,
        blocks: impl IntoIterator<Item = B>,
    ) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|b| b.into_stack_block(m, n))
            .collect();
        Self {
            m,
            n,
            k,
            blocks,
            planes: Vec::new(),
            device: DeviceCopy::default(),
        }
    }

    /// A stack of AVD blocks followed by grid planes, in stored order.
    /// Errs when a block follows a plane or the first plane has no grid.
    pub fn from_parts(
        m: usize,
        n: usize,
        k: usize,
        parts: impl IntoIterator<Item = StackPart>,
    ) -> Result<Self> {
        let mut stack = Self::new(m, n, k, Vec::<Arc<StackBlock>>::new());
        for part in parts {
            match part {
                StackPart::Block(b) if stack.planes.is_empty() => stack.blocks.push(b),
                StackPart::Block(_) => bail!("an AVD block cannot follow a grid plane"),
                StackPart::Plane(p) => {
                    if stack.planes.is_empty() != p.grid.is_some() {
                        bail!("only the first grid plane carries the grid");
                    }
                    stack.planes.push(p)
                }
            }
        }
        Ok(stack)
    }

    /// The stored blocks resident, in order.
    pub fn parts(&self) -> impl Iterator<Item = StackPart> + '_ {
        let blocks = self.blocks.iter().cloned().map(StackPart::Block);
        blocks.chain(self.planes.iter().cloned().map(StackPart::Plane))
    }

    /// Stored blocks resident: AVD blocks and grid planes.
    pub fn len(&self) -> usize {
        self.blocks.len() + self.planes.len()
    }

    /// No block is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The grid, when a plane is resident.
    pub fn grid(&self) -> Option<&ResidentGrid> {
        self.planes.first().and_then(|p| p.grid.as_deref())
    }

    /// The stack of the first `b` stored blocks (all of them when there are fewer).
    pub fn prefix(&self, b: usize) -> Self {
        Self::from_parts(self.m, self.n, self.k, self.parts().take(b))
            .expect("a prefix of a valid stack is valid")
    }

    /// This stack followed by `more` blocks; errs when they do not follow
    /// (see [`WeightStack::from_parts`]).
    pub fn extended(&self, more: impl IntoIterator<Item = StackPart>) -> Result<Self> {
        Self::from_parts(self.m, self.n, self.k, self.parts().chain(more))
    }

    /// Bytes of all resident blocks, planes and grid.
    pub fn resident_bytes(&self) -> usize {
        let planes = self.planes.len() * TiledSigns::bytes_for(self.m, self.n);
        let grid = self
            .grid()
            .map_or(0, |g| g.cfg.grid_resident_bytes(self.m, self.n));
        self.blocks.len() * block_bytes(self.m, self.n, self.k) + planes + grid
    }

    /// The part of [`WeightStack::dense`] that stored block `level` adds
    /// to the first `level` ones: an AVD block alone, or for a plane the
    /// difference of the two prefixes.
    pub fn level_dense(&self, level: usize) -> Vec<f32> {
        if level < self.blocks.len() {
            return Self::new(self.m, self.n, self.k, vec![self.blocks[level].clone()]).dense();
        }
        let long = self.prefix(level + 1).dense();
        let short = self.prefix(level).dense();
        long.iter().zip(&short).map(|(l, s)| l - s).collect()
    }

    /// `Σᵢ Sᵢ ⊙ (uᵢ·vtᵢ)` as a row-major `m×n` matrix, rows in parallel.
    ///
    /// Used for prefill-sized inputs, where rebuilding the weight once per
    /// call is cheap next to the matrix product.
    pub fn dense(&self) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        let vts: Vec<Vec<f32>> = self
            .blocks
            .iter()
            .map(|b| b.vt.iter().map(|x| x.to_f32()).collect())
            .collect();
        let mut w = vec![0f32; m * n];
        let grid = self.grid();
        w.par_chunks_mut(n).enumerate().for_each(|(i, out)| {
            let mut row = vec![0f32; n];
            let mut signs = vec![0u8; n.div_ceil(8)];
            if let Some(g) = grid {
                self.add_grid_row(g, i, &mut row, &mut signs, out);
            }
            for (b, vt) in self.blocks.iter().zip(&vts) {
                row.fill(0.0);
                for j in 0..k {
                    let uij = b.u[i * k + j].to_f32();
                    for (r, v) in row.iter_mut().zip(&vt[j * n..(j + 1) * n]) {
                        *r += uij * v;
                    }
                }
                tiled_row(&b.signs, i, 0, &mut signs);
                add_signed(&signs, &row, out);
            }
        });
        w
    }

    /// Adds row `i` of the grid part to `out` (`row` and `signs` are
    /// scratch): the grid point, or at an outlier its value `v` exactly.
    fn add_grid_row(
        &self,
        g: &ResidentGrid,
        i: usize,
        row: &mut [f32],
        signs: &mut [u8],
        out: &mut [f32],
    ) {
        let n = self.n;
        let (gs, groups, o) = (g.cfg.group_size(n), g.cfg.groups(n), g.cfg.outliers);
        let cells = i * groups..(i + 1) * groups;
        let column = |slot: usize| (slot / o) % groups * gs + g.grid.outlier_col[slot] as usize;
        // What `out` holds at the outliers before the grid: each ends as that
        // plus its value.
        let before: Vec<f32> = (cells.start * o..cells.end * o)
            .map(|slot| out[column(slot)])
            .collect();
        let scale: Vec<f32> = g.grid.scale[cells.clone()]
            .iter()
            .map(|h| h.to_f32())
            .collect();
        for (c, o) in out.iter_mut().enumerate() {
            *o += g.grid.center[i * groups + c / gs].to_f32();
        }
        for (b, plane) in self.planes.iter().enumerate() {
            let t = plane_weight(b);
            for (c, r) in row.iter_mut().enumerate() {
                *r = scale[c / gs] * t;
            }
            tiled_row(&plane.signs, i, 0, signs);
            add_signed(signs, row, out);
        }
        for (slot, before) in (cells.start * o..cells.end * o).zip(before) {
            out[column(slot)] = before + g.grid.outlier_value[slot].to_f32();
        }
    }
}

impl bitstack_kernels::StackSource for WeightStack {
    fn stack(&self) -> StackRef<'_> {
        StackRef {
            m: self.m,
            n: self.n,
            k: self.k,
            blocks: self.blocks.iter().map(|b| b.block_ref()).collect(),
            grid: self.grid().map(|g| GridRef {
                group: g.cfg.group_size(self.n),
                center: &g.grid.center,
                half: &g.grid.scale,
                outliers: g.cfg.outliers,
                outlier_col: &g.grid.outlier_col,
                outlier_value: &g.grid.outlier_value,
                planes: self.planes.iter().map(|p| &p.signs).collect(),
            }),
        }
    }

    /// Uploads each block the first time a CUDA forward needs it; the
    /// blocks a resize keeps keep their uploads.
    #[cfg(feature = "cuda")]
    fn cuda_stack(
        &self,
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> candle_core::Result<Arc<bitstack_kernels::cuda::CudaStack>> {
        use bitstack_kernels::cuda::{CudaBlock, CudaGrid, CudaStack};
        use bitstack_kernels::StackSource;
        // The grid's upload holds the resident planes, so it is made per
        // stack (per resize of this linear), not shared like the blocks'.
        self.device.get_or_try_make(device, || {
            let blocks = self
                .blocks
                .iter()
                .map(|b| {
                    b.device.get_or_try_make(device, || {
                        CudaBlock::upload(device, b.block_ref(), self.m, self.n, self.k)
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let grid = match &self.stack().grid {
                Some(g) => Some(Arc::new(CudaGrid::upload(device, g, self.m, self.n)?)),
                None => None,
            };
            CudaStack::new(device, self.m, self.n, self.k, blocks)?.with_grid(grid)
        })
    }
}

/// `out[c] += sign(bit c) · row[c]`, flipping the float's sign bit.
fn add_signed(signs: &[u8], row: &[f32], out: &mut [f32]) {
    for (c, (o, r)) in out.iter_mut().zip(row).enumerate() {
        let negative = !bitstack_kernels::packed_sign(signs, c) as u32;
        *o += f32::from_bits(r.to_bits() ^ (negative << 31));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::block::reconstruct;
    use crate::format::pack::pack_signs;
    use half::f16;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_block(m: usize, n: usize, k: usize, rng: &mut StdRng) -> Block {
        let s: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
        Block {
            signs: pack_signs(&s),
            u: (0..m * k)
                .map(|_| f16::from_f32(rng.random::<f32>() - 0.5))
                .collect(),
            vt: (0..k * n)
                .map(|_| f16::from_f32(rng.random::<f32>() - 0.5))
                .collect(),
        }
    }

    #[test]
    fn fast_dense_matches_reference_on_awkward_shapes() {
        let mut rng = StdRng::seed_from_u64(11);
        for (m, n, k, nb) in [(1, 13, 1, 1), (7, 9, 3, 2), (33, 65, 4, 5), (19, 8, 16, 16)] {
            let k = k.min(m.min(n));
            let blocks: Vec<Block> = (0..nb).map(|_| random_block(m, n, k, &mut rng)).collect();
            let stack = WeightStack::new(m, n, k, blocks.clone());
            let fast = stack.dense();
            let slow = reconstruct(&blocks, m, n, k);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{m}×{n}: {a} vs {b}"
                );
            }
            assert_eq!(
                stack.resident_bytes(),
                stack.blocks.iter().map(|b| b.bytes()).sum::<usize>()
            );
            for (b, original) in stack.blocks.iter().zip(&blocks) {
                assert_eq!(&b.to_block(), original);
            }
            let more = stack.blocks[1..].iter().cloned().map(StackPart::Block);
            let grown = stack.prefix(1).extended(more).unwrap();
            assert_eq!(grown.dense(), fast);
        }
    }

    #[test]
    fn a_longer_prefix_is_the_shorter_one_plus_its_next_block() {
        // Exact sorting builds W of b+1 blocks as W of b blocks plus block b
        // alone: that must be the very f32 sum `dense` computes.
        let mut rng = StdRng::seed_from_u64(5);
        let (m, n, k) = (23, 37, 4);
        let blocks: Vec<Block> = (0..4).map(|_| random_block(m, n, k, &mut rng)).collect();
        for b in 1..blocks.len() {
            let short = WeightStack::new(m, n, k, blocks[..b].to_vec()).dense();
            let long = WeightStack::new(m, n, k, blocks[..=b].to_vec()).dense();
            let single = WeightStack::new(m, n, k, vec![blocks[b].clone()]).dense();
            for ((l, s), o) in long.iter().zip(&short).zip(&single) {
                assert_eq!(*l, s + o);
            }
        }
    }

    /// AVD blocks then grid planes of an `m×n` linear, from random
    /// residuals, as the checkpoint stores them.
    fn random_grid_stack(
        m: usize,
        n: usize,
        k: usize,
        avd: usize,
        cfg: GridConfig,
        rng: &mut StdRng,
    ) -> (Vec<Block>, crate::format::grid::GridPlanes) {
        let blocks: Vec<Block> = (0..avd).map(|_| random_block(m, n, k, rng)).collect();
        let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
        (
            blocks,
            crate::format::grid::grid_planes(&r, m, n, cfg).unwrap(),
        )
    }

    fn parts_of(
        blocks: &[Block],
        gp: &crate::format::grid::GridPlanes,
        cfg: GridConfig,
        m: usize,
        n: usize,
    ) -> Vec<StackPart> {
        let mut parts: Vec<StackPart> = blocks
            .iter()
            .map(|b| StackPart::Block(b.clone().into_stack_block(m, n)))
            .collect();
        for (b, signs) in gp.planes.iter().enumerate() {
            parts.push(StackPart::Plane(Arc::new(StackPlane {
                signs: TiledSigns::from_row_major(signs, m, n),
                grid: (b == 0).then(|| {
                    Arc::new(ResidentGrid {
                        cfg,
                        grid: gp.grid.clone(),
                    })
                }),
            })));
        }
        parts
    }

    #[test]
    fn grid_stacks_rebuild_as_the_reference_at_every_prefix() {
        let mut rng = StdRng::seed_from_u64(21);
        for (m, n, k, avd, group, outliers) in [
            (1, 13, 1, 0, 8, 1),
            (9, 37, 2, 1, 8, 2),
            (33, 200, 4, 2, 128, 1),
            (5, 9, 1, 1, 8, 0),
        ] {
            let cfg = GridConfig {
                planes: 4,
                group,
                outliers,
            };
            let (blocks, gp) = random_grid_stack(m, n, k, avd, cfg, &mut rng);
            let full = WeightStack::from_parts(m, n, k, parts_of(&blocks, &gp, cfg, m, n)).unwrap();
            assert_eq!(full.len(), avd + 4);
            let mut summed = vec![0f32; m * n];
            for level in 0..full.len() {
                let stack = full.prefix(level + 1);
                // The reference: blocks, then the grid's first planes.
                let mut want = reconstruct(&blocks[..avd.min(level + 1)], m, n, k);
                if level >= avd {
                    let planes: Vec<&[u8]> = gp.planes[..level + 1 - avd]
                        .iter()
                        .map(Vec::as_slice)
                        .collect();
                    gp.grid.add_to(&planes, m, n, &cfg, &mut want);
                }
                let got = stack.dense();
                if avd == 0 {
                    // Without blocks, outliers are exactly their value
                    // (with blocks, the blocks' part is summed in another
                    // order than the reference's).
                    let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
                    for (slot, &col) in gp.grid.outlier_col.iter().enumerate() {
                        let cell = slot / outliers;
                        let c = (cell / groups) * n + (cell % groups) * gs + col as usize;
                        assert_eq!(got[c], want[c], "{m}×{n} level {level}: outlier {slot}");
                    }
                }
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{m}×{n} level {level}: {a} vs {b}"
                    );
                }
                // Levels add up to the prefix.
                summed
                    .iter_mut()
                    .zip(full.level_dense(level))
                    .for_each(|(s, d)| *s += d);
                for (a, b) in summed.iter().zip(&got) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "level sums {a} vs {b}"
                    );
                }
                // The kernels agree with the rebuilt weight.
                let x: Vec<f32> = (0..3 * n).map(|_| rng.random::<f32>() - 0.5).collect();
                let mut y = vec![0f32; 3 * m];
                use bitstack_kernels::StackSource;
                bitstack_kernels::stack_matmul_t(&x, 3, &stack.stack(), &mut y);
                let want: Vec<f32> = (0..3 * m)
                    .map(|j| {
                        (0..n)
                            .map(|c| got[(j % m) * n + c] * x[(j / m) * n + c])
                            .sum()
                    })
                    .collect();
                // The decode kernels' int8 tables: within 2% of the output's RMS.
                let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
                for (g, w) in y.iter().zip(&want) {
                    assert!((g - w).abs() <= 2e-2 * rms + 1e-6, "kernel {g} vs {w}");
                }
                // Resident bytes are what the checkpoint's geometry says.
                let slot = LinearSlot {
                    name: "x".into(),
                    m,
                    n,
                    k,
                    stored: avd + 4,
                    grid: Some(cfg),
                };
                assert_eq!(stack.resident_bytes(), slot.prefix_bytes(level + 1));
            }
            // Shrinking then growing back gives the same weights.
            let regrown = full
                .prefix(avd + 1)
                .extended(full.parts().skip(avd + 1))
                .unwrap();
            assert_eq!(regrown.dense(), full.dense());
        }
    }

    #[test]
    fn misordered_parts_are_refused() {
        let mut rng = StdRng::seed_from_u64(4);
        let cfg = GridConfig::new(2);
        let (blocks, gp) = random_grid_stack(4, 16, 1, 1, cfg, &mut rng);
        let parts = parts_of(&blocks, &gp, cfg, 4, 16);
        let e =
            WeightStack::from_parts(4, 16, 1, [parts[1].clone(), parts[0].clone()]).unwrap_err();
        assert!(e.to_string().contains("cannot follow a grid plane"), "{e}");
        let e =
            WeightStack::from_parts(4, 16, 1, [parts[0].clone(), parts[2].clone()]).unwrap_err();
        assert!(e.to_string().contains("carries the grid"), "{e}");
    }
}
