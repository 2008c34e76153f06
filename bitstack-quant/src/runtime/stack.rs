//! `WeightStack`: the resident blocks of one linear, in order.

use std::sync::Arc;

use bitstack_kernels::{tiled_row, GridRef, OwnedBlock, StackRef, TiledSigns};
use rayon::prelude::*;

use anyhow::{anyhow, bail, Context, Result};

use crate::format::block::{block_bytes, Block, BlockShape};
use crate::format::checkpoint::{read_grid, read_plane, CheckedBlock};
use crate::format::grid::{plane_weight, Grid, GridConfig, GridPlanes};
use crate::format::order::{LinearSlot, Part};
use crate::format::shard::LinearShard;
use crate::format::store::TensorStore;
use crate::runtime::device_copy::DeviceCopy;
use crate::runtime::residence::{Residence, Resident};
use crate::runtime::rotation::InputRotation;

#[cfg(feature = "cuda")]
type BlockUpload = bitstack_kernels::cuda::CudaBlock;
#[cfg(not(feature = "cuda"))]
type BlockUpload = ();
#[cfg(feature = "cuda")]
type PlaneUpload = bitstack_kernels::cuda::CudaPlane;
#[cfg(not(feature = "cuda"))]
type PlaneUpload = ();
#[cfg(feature = "cuda")]
type CellsUpload = bitstack_kernels::cuda::CudaGridCells;
#[cfg(not(feature = "cuda"))]
type CellsUpload = ();
#[cfg(feature = "cuda")]
type StackUpload = bitstack_kernels::cuda::CudaStack;
#[cfg(not(feature = "cuda"))]
type StackUpload = ();

/// A block as a running model holds it: the kernels' [`OwnedBlock`] (signs
/// re-tiled, factors as stored) in host memory, or its upload alone on a
/// CUDA device (see [`Residence`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StackBlock(Resident<OwnedBlock, BlockUpload>);

impl StackBlock {
    /// Re-tiles `block` of an `m×n` weight (its row-major signs are
    /// dropped), in host memory.
    pub fn new(block: Block, m: usize, n: usize) -> Self {
        Self(Resident::host(OwnedBlock::from_row_major(
            &block.signs,
            m,
            n,
            block.u,
            block.vt,
        )))
    }

    /// `block` of `shape` kept in `residence`.
    pub fn place(block: OwnedBlock, shape: BlockShape, residence: &Residence) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let block = residence.place(block, |device, b| {
            bitstack_kernels::cuda::CudaBlock::upload(
                device,
                b.block_ref(),
                shape.m,
                shape.n,
                shape.k,
            )
        })?;
        #[cfg(not(feature = "cuda"))]
        let block = {
            let (Residence::Host, _) = (residence, shape);
            Resident::host(block)
        };
        Ok(Self(block))
    }

    /// The block in host memory; none when it lives on a device only.
    pub fn host(&self) -> Option<&OwnedBlock> {
        self.0.on_host()
    }

    /// The block in the checkpoint's layout (from the host copy).
    pub fn to_block(&self) -> Option<Block> {
        self.host().map(|b| Block {
            signs: b.signs.to_row_major(),
            u: b.u.clone(),
            vt: b.vt.clone(),
        })
    }
}

/// A grid plane as a running model holds it: its signs re-tiled for the
/// kernels (or their upload), and (plane 0 only) the grid it refines.
#[derive(Clone, Debug, PartialEq)]
pub struct StackPlane {
    pub signs: Resident<TiledSigns, PlaneUpload>,
    /// The grid, resident with the first plane.
    pub grid: Option<Arc<ResidentGrid>>,
}

/// A linear's grid (everything but the planes) and its layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidentGrid {
    pub cfg: GridConfig,
    pub cells: Resident<Grid, CellsUpload>,
    /// The grid's prefix scales, on the host wherever the cells live: a
    /// resize picks the one of its new plane count.
    pub prefix_scale: Vec<f32>,
}

impl ResidentGrid {
    /// A grid and its layout, as `cells` keeps it.
    pub fn new(
        cfg: GridConfig,
        cells: Resident<Grid, CellsUpload>,
        prefix_scale: Vec<f32>,
    ) -> Self {
        Self {
            cfg,
            cells,
            prefix_scale,
        }
    }

    /// `σ_p` with `p ≥ 1` planes resident (see [`Grid::prefix_scale`]).
    pub fn prefix_scale(&self, p: usize) -> f32 {
        match p.checked_sub(1).and_then(|i| self.prefix_scale.get(i)) {
            Some(&s) => s,
            None => 1.0,
        }
    }
}

impl StackPlane {
    /// A plane's `signs` (and, for the first plane, its linear's grid)
    /// kept in `residence`.
    pub fn place(
        signs: TiledSigns,
        grid: Option<(GridConfig, Grid)>,
        residence: &Residence,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            use bitstack_kernels::cuda::{CudaGridCells, CudaPlane};
            let (m, n) = (signs.m(), signs.n());
            let grid = match grid {
                Some((cfg, grid)) => {
                    let prefix_scale = grid.prefix_scale.clone();
                    let cells = residence.place(grid, |device, g| {
                        let gr = grid_ref(&cfg, g, n, vec![&signs], 1.0);
                        CudaGridCells::upload(device, &gr, m, n)
                    })?;
                    Some(Arc::new(ResidentGrid::new(cfg, cells, prefix_scale)))
                }
                None => None,
            };
            let signs = residence.place(signs, CudaPlane::upload)?;
            Ok(Self { signs, grid })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let Residence::Host = residence;
            Ok(Self {
                signs: Resident::host(signs),
                grid: grid.map(|(cfg, grid)| {
                    let prefix_scale = grid.prefix_scale.clone();
                    Arc::new(ResidentGrid::new(cfg, Resident::host(grid), prefix_scale))
                }),
            })
        }
    }
}

/// The kernels' view of a grid with `planes`, its half-ranges times
/// `prefix_scale`.
fn grid_ref<'a>(
    cfg: &GridConfig,
    g: &'a Grid,
    n: usize,
    planes: Vec<&'a TiledSigns>,
    prefix_scale: f32,
) -> GridRef<'a> {
    GridRef {
        group: cfg.group_size(n),
        values: g.values.as_ref(),
        outliers: cfg.outliers,
        outlier_col: &g.outlier_col,
        planes,
        prefix_scale,
    }
}

/// One stored block of a linear, resident: an AVD block or a grid plane.
#[derive(Clone, Debug)]
pub enum StackPart {
    Block(Arc<StackBlock>),
    Plane(Arc<StackPlane>),
}

impl StackPart {
    /// Block `b` of `slot` read (see [`ReadPart::read`]) and kept in
    /// `residence`: what loading a linear reads.
    pub fn read(
        store: &TensorStore,
        slot: &LinearSlot,
        b: usize,
        residence: &Residence,
        shard: Option<LinearShard>,
    ) -> Result<Self> {
        ReadPart::read(store, slot, b, shard)?
            .place(residence)
            .with_context(|| format!("uploading block {b} of `{}`", slot.name))
    }
}

/// One stored block of a linear read into host memory, not yet placed
/// where the model keeps it: the grow path of a resize reads many in
/// parallel, then places them one by one in the order of the ladder, so
/// that a device's memory is taken in that order and a shrink empties
/// whole pages (the `DeviceBuffer` of the kernels' CUDA module).
#[derive(Debug)]
pub enum ReadPart {
    Block(OwnedBlock, BlockShape),
    Plane(TiledSigns, Option<(GridConfig, Grid)>),
}

impl ReadPart {
    /// Block `b` of `slot`, read and checked (see [`CheckedBlock::read`],
    /// [`read_plane`] and [`read_grid`]), cut to this rank's `shard` under
    /// tensor parallelism, its signs re-tiled for the kernels.
    pub fn read(
        store: &TensorStore,
        slot: &LinearSlot,
        b: usize,
        shard: Option<LinearShard>,
    ) -> Result<Self> {
        let (m, n, k) = (slot.m, slot.n, slot.k);
        let (lm, ln) = shard.map_or((m, n), |s| s.local(m, n));
        Ok(match slot.part(b) {
            Part::Avd(i) => {
                let c = CheckedBlock::read(store, &slot.name, i, slot.shape())?;
                let (signs, u, vt) = match shard {
                    None => (c.signs, c.u, c.vt),
                    Some(s) => (s.signs(&c.signs, m, n), s.u(c.u, m, k), s.vt(c.vt, k, n)),
                };
                let block = OwnedBlock::from_row_major(&signs, lm, ln, u, vt);
                Self::Block(block, BlockShape::new(lm, ln, k))
            }
            Part::Plane(p) => {
                let signs = read_plane(store, slot, p)?;
                let signs = match shard {
                    None => signs,
                    Some(s) => s.signs(&signs, m, n),
                };
                let grid = match p {
                    0 => {
                        let cfg = slot.grid.expect("a slot with planes has a grid");
                        let grid = read_grid(store, slot)?;
                        Some(match shard {
                            None => (cfg, grid),
                            Some(s) => s.grid(grid, cfg, m, n),
                        })
                    }
                    _ => None,
                };
                Self::Plane(TiledSigns::from_row_major(&signs, lm, ln), grid)
            }
        })
    }

    /// The part kept in `residence` (uploaded to a device, the host copy
    /// dropped).
    pub fn place(self, residence: &Residence) -> Result<StackPart> {
        Ok(match self {
            Self::Block(block, shape) => {
                StackPart::Block(Arc::new(StackBlock::place(block, shape, residence)?))
            }
            Self::Plane(signs, grid) => {
                StackPart::Plane(Arc::new(StackPlane::place(signs, grid, residence)?))
            }
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
    /// With format version 4, the blocks and planes stand for `W·R` and
    /// the input is rotated first: see [`crate::format::rotation`].
    pub rotation: Option<Arc<InputRotation>>,
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
            rotation: None,
            device: DeviceCopy::default(),
        }
    }

    /// This stack with its blocks standing for `W·R`, `R` the rotation
    /// (of this stack's `n` columns).
    pub fn with_rotation(mut self, rotation: Option<Arc<InputRotation>>) -> Result<Self> {
        if let Some(r) = &rotation {
            if r.n() != self.n {
                bail!(
                    "a rotation of {} columns does not fit a {}×{} linear",
                    r.n(),
                    self.m,
                    self.n
                );
            }
        }
        self.rotation = rotation;
        Ok(self)
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

    /// The grid planes `gp` of an `m×n` weight, as host-resident parts in
    /// stored order (the first carries the grid).
    pub fn grid_parts(gp: &GridPlanes, cfg: GridConfig, m: usize, n: usize) -> Vec<StackPart> {
        gp.planes
            .iter()
            .enumerate()
            .map(|(b, signs)| {
                StackPart::Plane(Arc::new(StackPlane {
                    signs: Resident::host(TiledSigns::from_row_major(signs, m, n)),
                    grid: (b == 0).then(|| {
                        Arc::new(ResidentGrid::new(
                            cfg,
                            Resident::host(gp.grid.clone()),
                            gp.grid.prefix_scale.clone(),
                        ))
                    }),
                }))
            })
            .collect()
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
        Self {
            rotation: self.rotation.clone(),
            ..Self::from_parts(self.m, self.n, self.k, self.parts().take(b))
                .expect("a prefix of a valid stack is valid")
        }
    }

    /// This stack followed by `more` blocks; errs when they do not follow
    /// (see [`WeightStack::from_parts`]).
    pub fn extended(&self, more: impl IntoIterator<Item = StackPart>) -> Result<Self> {
        Ok(Self {
            rotation: self.rotation.clone(),
            ..Self::from_parts(self.m, self.n, self.k, self.parts().chain(more))?
        })
    }

    /// `x·Wᵀ` for `x` of shape `[.., n]` by the kernels (on the CPU, or on
    /// CUDA in a build with the `cuda` feature), the input rotated first
    /// when the stack is.
    pub fn matmul(
        self: &Arc<Self>,
        x: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        match &self.rotation {
            None => bitstack_kernels::op::bitstack_matmul(x, self.clone()),
            Some(r) => bitstack_kernels::op::bitstack_matmul(&r.rotate_input(x)?, self.clone()),
        }
    }

    /// Bytes of all resident blocks, planes and grid where they live: as
    /// the checkpoint's layout counts them in host memory, as allocated on
    /// a CUDA device for device-resident ones (the same for shapes whose
    /// rows are a multiple of 16 and columns of 64).
    pub fn resident_bytes(&self) -> usize {
        let (m, n, k) = (self.m, self.n, self.k);
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.0.bytes(|_| block_bytes(m, n, k)))
            .sum();
        let planes: usize = self
            .planes
            .iter()
            .map(|p| p.signs.bytes(|_| TiledSigns::bytes_for(m, n)))
            .sum();
        let grid = self
            .planes
            .first()
            .and_then(|p| p.grid.as_deref())
            .map_or(0, |g| g.cells.bytes(|_| g.cfg.grid_resident_bytes(m, n)));
        blocks + planes + grid
    }

    /// Whether every resident part is in host memory (none lives on a
    /// device only).
    pub fn is_on_host(&self) -> bool {
        self.host_stack().is_some()
    }

    /// The kernels' view of the stack, when every part is in host memory.
    fn host_stack(&self) -> Option<StackRef<'_>> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.host().map(OwnedBlock::block_ref))
            .collect::<Option<Vec<_>>>()?;
        let grid = match self.grid() {
            None => None,
            Some(g) => {
                let planes = self
                    .planes
                    .iter()
                    .map(|p| p.signs.on_host())
                    .collect::<Option<Vec<_>>>()?;
                let scale = g.prefix_scale(planes.len());
                Some(grid_ref(&g.cfg, g.cells.on_host()?, self.n, planes, scale))
            }
        };
        Some(StackRef {
            m: self.m,
            n: self.n,
            k: self.k,
            blocks,
            grid,
        })
    }

    fn device_only(&self) -> anyhow::Error {
        anyhow!(
            "the blocks of this {}×{} linear live on a CUDA device only (no host copy); \
             rebuild its weight there ({})",
            self.m,
            self.n,
            "WeightStack::dense_tensor"
        )
    }

    /// The part of [`WeightStack::dense`] that stored block `level` adds
    /// to the first `level` ones: an AVD block alone, or for a plane the
    /// difference of the two prefixes.
    pub fn level_dense(&self, level: usize) -> Result<Vec<f32>> {
        if level < self.blocks.len() {
            let block = Self::new(self.m, self.n, self.k, vec![self.blocks[level].clone()]);
            return Self {
                rotation: self.rotation.clone(),
                ..block
            }
            .dense();
        }
        let long = self.prefix(level + 1).dense()?;
        let short = self.prefix(level).dense()?;
        Ok(long.iter().zip(&short).map(|(l, s)| l - s).collect())
    }

    /// `Σᵢ Sᵢ ⊙ (uᵢ·vtᵢ)` as a row-major `m×n` matrix, rows in parallel,
    /// from the host copies (an error for a device-resident stack). A
    /// rotated stack's rows are turned back: this is `W`, not `W·R`.
    ///
    /// Used for prefill-sized inputs, where rebuilding the weight once per
    /// call is cheap next to the matrix product.
    pub fn dense(&self) -> Result<Vec<f32>> {
        let stack = self.host_stack().ok_or_else(|| self.device_only())?;
        let (m, n, k) = (self.m, self.n, self.k);
        let vts: Vec<Vec<f32>> = stack
            .blocks
            .iter()
            .map(|b| b.vt.iter().map(|x| x.to_f32()).collect())
            .collect();
        let mut w = vec![0f32; m * n];
        w.par_chunks_mut(n).enumerate().for_each(|(i, out)| {
            let mut row = vec![0f32; n];
            let mut signs = vec![0u8; n.div_ceil(8)];
            if let Some(g) = &stack.grid {
                add_grid_row(g, n, i, &mut row, &mut signs, out);
            }
            for (b, vt) in stack.blocks.iter().zip(&vts) {
                row.fill(0.0);
                for j in 0..k {
                    let uij = b.u[i * k + j].to_f32();
                    for (r, v) in row.iter_mut().zip(&vt[j * n..(j + 1) * n]) {
                        *r += uij * v;
                    }
                }
                tiled_row(b.signs, i, 0, &mut signs);
                add_signed(&signs, &row, out);
            }
            if let Some(r) = &self.rotation {
                r.unrotate_row(out);
            }
        });
        Ok(w)
    }

    /// `W` as an `m×n` tensor of `dtype` on `device`: rebuilt on the host
    /// from host copies, or on the device by the CUDA kernels for a
    /// device-resident stack.
    pub fn dense_tensor(
        &self,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> candle_core::Result<candle_core::Tensor> {
        #[cfg(feature = "cuda")]
        if let (false, candle_core::Device::Cuda(_)) = (self.is_on_host(), device) {
            let like = candle_core::Tensor::zeros(1, dtype, device)?;
            let w = bitstack_kernels::op::bitstack_dense(&like, Arc::new(self.clone()))?;
            return match &self.rotation {
                None => Ok(w),
                Some(r) => r.unrotate_weight(&w),
            };
        }
        let w = self.dense().map_err(candle_core::Error::wrap)?;
        candle_core::Tensor::from_vec(w, (self.m, self.n), device)?.to_dtype(dtype)
    }
}

/// Adds row `i` of the grid part of an `n`-column weight to `out` (`row`
/// and `signs` are scratch): the grid point, or at an outlier its value
/// `v` exactly.
fn add_grid_row(
    g: &GridRef,
    n: usize,
    i: usize,
    row: &mut [f32],
    signs: &mut [u8],
    out: &mut [f32],
) {
    let (gs, groups, o) = (g.group, g.groups(n), g.outliers);
    let cells = i * groups..(i + 1) * groups;
    let column = |slot: usize| (slot / o) % groups * gs + g.outlier_col[slot] as usize;
    // What `out` holds at the outliers before the grid: each ends as that
    // plus its value.
    let before: Vec<f32> = (cells.start * o..cells.end * o)
        .map(|slot| out[column(slot)])
        .collect();
    let (center, scale): (Vec<f32>, Vec<f32>) =
        cells.clone().map(|cell| g.range(groups, cell)).unzip();
    for (c, o) in out.iter_mut().enumerate() {
        *o += center[c / gs];
    }
    for (b, plane) in g.planes.iter().enumerate() {
        let t = plane_weight(b);
        for (c, r) in row.iter_mut().enumerate() {
            *r = scale[c / gs] * t;
        }
        tiled_row(plane, i, 0, signs);
        add_signed(signs, row, out);
    }
    for (slot, before) in (cells.start * o..cells.end * o).zip(before) {
        out[column(slot)] = before + g.values.outlier(groups * o, slot);
    }
}

impl bitstack_kernels::StackSource for WeightStack {
    fn stack(&self) -> candle_core::Result<StackRef<'_>> {
        self.host_stack()
            .ok_or_else(|| candle_core::Error::wrap(self.device_only()))
    }

    /// The stack on `device`: each block and plane uploaded the first time
    /// a CUDA forward needs it (or when it was read, for a device-resident
    /// stack), and kept; a resized stack re-uses the uploads of the parts
    /// it keeps and makes only its pointer tables.
    #[cfg(feature = "cuda")]
    fn cuda_stack(
        &self,
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> candle_core::Result<Arc<bitstack_kernels::cuda::CudaStack>> {
        use bitstack_kernels::cuda::{CudaBlock, CudaGrid, CudaGridCells, CudaPlane, CudaStack};
        let (m, n, k) = (self.m, self.n, self.k);
        self.device.get_or_try_make(device, || {
            let blocks = self
                .blocks
                .iter()
                .map(|b| {
                    b.0.on_device(device, |h| {
                        CudaBlock::upload(device, h.block_ref(), m, n, k)
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let grid = match self.grid() {
                None => None,
                Some(g) => {
                    let planes = self
                        .planes
                        .iter()
                        .map(|p| p.signs.on_device(device, |s| CudaPlane::upload(device, s)))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    let first = self.planes[0].signs.on_host();
                    let cells = g.cells.on_device(device, |cells| {
                        let first = first.ok_or_else(|| {
                            candle_core::Error::Msg(
                                "bitstack: a host grid's first plane is on a device only".into(),
                            )
                        })?;
                        let grid = grid_ref(&g.cfg, cells, n, vec![first], 1.0);
                        CudaGridCells::upload(device, &grid, m, n)
                    })?;
                    let scale = g.prefix_scale(planes.len());
                    Some(Arc::new(CudaGrid::new(device, cells, planes, scale)?))
                }
            };
            CudaStack::new(device, m, n, k, blocks)?.with_grid(grid)
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
    use crate::format::grid::GridCoding;
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
            let fast = stack.dense().unwrap();
            let slow = reconstruct(&blocks, m, n, k);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{m}×{n}: {a} vs {b}"
                );
            }
            assert_eq!(stack.resident_bytes(), nb * block_bytes(m, n, k));
            assert!(stack.is_on_host());
            for (b, original) in stack.blocks.iter().zip(&blocks) {
                assert_eq!(b.to_block().as_ref(), Some(original));
            }
            let more = stack.blocks[1..].iter().cloned().map(StackPart::Block);
            let grown = stack.prefix(1).extended(more).unwrap();
            assert_eq!(grown.dense().unwrap(), fast);
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
            let dense =
                |blocks: &[Block]| WeightStack::new(m, n, k, blocks.to_vec()).dense().unwrap();
            let (short, long, single) = (
                dense(&blocks[..b]),
                dense(&blocks[..=b]),
                dense(&blocks[b..=b]),
            );
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
        parts.extend(WeightStack::grid_parts(gp, cfg, m, n));
        parts
    }

    #[test]
    fn grid_stacks_rebuild_as_the_reference_at_every_prefix() {
        let mut rng = StdRng::seed_from_u64(21);
        // Every coding of the grid's numbers (prefix scales included).
        for (m, n, k, avd, group, outliers, coding) in [
            (1, 13, 1, 0, 8, 1, GridCoding::Int8),
            (9, 37, 2, 1, 8, 2, GridCoding::F16),
            (33, 200, 4, 2, 128, 1, GridCoding::Int8Scaled),
            (5, 9, 1, 1, 8, 0, GridCoding::F16),
            (17, 70, 1, 0, 16, 1, GridCoding::Int8Scaled),
        ] {
            let cfg = GridConfig {
                planes: 4,
                group,
                outliers,
                coding,
            };
            let (blocks, mut gp) = random_grid_stack(m, n, k, avd, cfg, &mut rng);
            if coding == GridCoding::Int8Scaled {
                // Uniform weights fit scales near 1: far from it, a scale
                // missed or applied at the wrong plane count shows.
                gp.grid.prefix_scale = vec![0.6, 0.8, 1.3, 0.9];
            }
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
                let got = stack.dense().unwrap();
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
                    .zip(full.level_dense(level).unwrap())
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
                bitstack_kernels::stack_matmul_t(&x, 3, &stack.stack().unwrap(), &mut y);
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
            assert_eq!(regrown.dense().unwrap(), full.dense().unwrap());
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
