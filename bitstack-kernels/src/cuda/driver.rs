//! The CUDA kernels' host side (feature `cuda`), for candle CUDA tensors.
//!
//! - **Decode** (up to [`DECODE_MAX_ROWS`] rows of `x`): one launch over all
//!   resident blocks. With `Z_b[(r,j), c] = vt_b[j,c]·x[r,c]`, the ±1 matrix
//!   times the `rows·k` columns of `Z_b` runs on the tensor cores
//!   (`mma.m16n8k16`, f16 or bf16 operands, f32 sums): each lane reads its
//!   packed signs ([`super::pack`]) once, coalesced, and expands them to ±1
//!   halves in registers. Columns are split over thread blocks so that even
//!   one row of `x` fills the GPU; a second launch adds the splits up.
//! - **Prefill** (more rows): the weight is rebuilt from all resident
//!   blocks into a scratch matrix in the activations' dtype, then cuBLAS
//!   multiplies (candle's matmul). The scratch (`m·n` elements) lives for
//!   the call.
//!
//! - **Grid planes** ([`CudaGrid`], optional): decode adds them in a kernel
//!   of their own, writing one more slot of the split sums that the second
//!   launch adds up; prefill dequantizes them into the rebuilt weight.
//!
//! Blocks are uploaded once ([`CudaBlock::upload`]) and a stack of them
//! ([`CudaStack`]) holds a device table of their pointers, so a call
//! uploads nothing.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::memory::DeviceBuffer;
use super::pack::{self, mma_sign_words};
use crate::layout::{rows_of, BlockRef, GridRef, GridValuesRef, Rows, StackRef, TiledSigns};

const PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/bitstack_sm80.ptx"));
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/bitstack_sm90.ptx"));

/// Rows of `x` up to which a call takes the decode kernel; the kernel's
/// accumulators are sized for it.
pub const DECODE_MAX_ROWS: usize = 32;
/// Output rows per decode thread block (8 warps of 16).
const DECODE_ROWS: usize = 128;
/// Columns of `x` a decode thread block stages at a time.
const STAGE_COLS: usize = 256;
/// Threads per decode and per reconstruction thread block.
const THREADS: u32 = 256;

/// One block on the device: signs in the decode kernel's layout, f16 factors.
pub struct CudaBlock {
    m: usize,
    n: usize,
    k: usize,
    signs: DeviceBuffer<u32>,
    u: DeviceBuffer<f16>,
    vt: DeviceBuffer<f16>,
}

impl CudaBlock {
    /// Packs `block`'s signs for the kernels and copies it to `device`.
    pub fn upload(
        device: &CudaDevice,
        block: BlockRef,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Self> {
        if (block.signs.m(), block.signs.n()) != (m, n)
            || block.u.len() != m * k
            || block.vt.len() != k * n
        {
            candle_core::bail!(
                "bitstack cuda: block does not have the sizes of a {m}×{n} rank-{k} stack"
            );
        }
        let words = mma_sign_words(block.signs);
        Ok(Self {
            m,
            n,
            k,
            signs: DeviceBuffer::upload(device, &words)?,
            u: DeviceBuffer::upload(device, block.u)?,
            vt: DeviceBuffer::upload(device, block.vt)?,
        })
    }

    /// Device memory held.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.m, self.n, self.k)
    }

    /// What [`CudaBlock::bytes`] is for an `m×n` rank-`k` block.
    pub fn bytes_for(m: usize, n: usize, k: usize) -> usize {
        4 * pack::words_for(m, n) + 2 * k * (m + n)
    }
}

/// A stack's table (addresses, a grid's description) in candle's memory
/// pool: tables are small and made again at every resize, unlike the
/// blocks they point to ([`DeviceBuffer`]).
fn upload<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    device: &CudaDevice,
    host: &[T],
) -> Result<CudaSlice<T>> {
    // A zero-length device allocation is an error: keep one element.
    let mut dev = unsafe { device.alloc::<T>(host.len().max(1))? };
    if !host.is_empty() {
        device.memcpy_htod(host, &mut dev.slice_mut(..host.len()))?;
    }
    Ok(dev)
}

/// One grid plane on the device: its signs in the decode kernel's layout.
///
/// Planes are uploaded one by one and shared, like blocks: a stack that
/// gains or loses a plane re-uses the uploads of the planes it keeps.
pub struct CudaPlane {
    m: usize,
    n: usize,
    words: DeviceBuffer<u32>,
}

impl CudaPlane {
    /// Packs `signs` for the kernels and copies them to `device`.
    pub fn upload(device: &CudaDevice, signs: &TiledSigns) -> Result<Self> {
        Ok(Self {
            m: signs.m(),
            n: signs.n(),
            words: DeviceBuffer::upload(device, &mma_sign_words(signs))?,
        })
    }

    /// Device memory held.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.m, self.n)
    }

    /// What [`CudaPlane::bytes`] is for an `m×n` plane.
    pub fn bytes_for(m: usize, n: usize) -> usize {
        4 * pack::words_for(m, n)
    }
}

/// The grid of one linear on the device, everything but the planes: the
/// centers, half-widths and outliers, as stored.
pub struct CudaGridCells {
    m: usize,
    n: usize,
    group: usize,
    groups: usize,
    outliers: usize,
    values: CudaValues,
    outlier_col: DeviceBuffer<u8>,
}

/// A grid's numbers on the device, as stored (see
/// [`GridValues`](crate::layout::GridValues)).
enum CudaValues {
    F16 {
        center: DeviceBuffer<f16>,
        half: DeviceBuffer<f16>,
        outlier: DeviceBuffer<f16>,
    },
    Int8 {
        center_code: DeviceBuffer<i8>,
        half_code: DeviceBuffer<u8>,
        outlier_code: DeviceBuffer<i8>,
        center_step: DeviceBuffer<f16>,
        half_step: DeviceBuffer<f16>,
        outlier_step: DeviceBuffer<f16>,
    },
}

impl CudaValues {
    fn upload(device: &CudaDevice, values: &GridValuesRef) -> Result<Self> {
        Ok(match *values {
            GridValuesRef::F16 {
                center,
                half,
                outlier,
            } => CudaValues::F16 {
                center: DeviceBuffer::upload(device, center)?,
                half: DeviceBuffer::upload(device, half)?,
                outlier: DeviceBuffer::upload(device, outlier)?,
            },
            GridValuesRef::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => CudaValues::Int8 {
                center_code: DeviceBuffer::upload(device, center_code)?,
                half_code: DeviceBuffer::upload(device, half_code)?,
                outlier_code: DeviceBuffer::upload(device, outlier_code)?,
                center_step: DeviceBuffer::upload(device, center_step)?,
                half_step: DeviceBuffer::upload(device, half_step)?,
                outlier_step: DeviceBuffer::upload(device, outlier_step)?,
            },
        })
    }

    /// `GridDesc`'s `center, half, ovalue` and `ccode, hcode, cstep,
    /// hstep, ocode, ostep` addresses (null for the other coding).
    fn addresses(&self) -> ([u64; 3], [u64; 6]) {
        match self {
            CudaValues::F16 {
                center,
                half,
                outlier,
            } => ([center.ptr(), half.ptr(), outlier.ptr()], [0; 6]),
            CudaValues::Int8 {
                center_code,
                half_code,
                outlier_code,
                center_step,
                half_step,
                outlier_step,
            } => (
                [0; 3],
                [
                    center_code.ptr(),
                    half_code.ptr(),
                    center_step.ptr(),
                    half_step.ptr(),
                    outlier_code.ptr(),
                    outlier_step.ptr(),
                ],
            ),
        }
    }
}

impl CudaGridCells {
    /// Copies `grid`'s cells (not its planes) to `device`, after the checks
    /// the CPU kernels make (which panic as theirs do).
    pub fn upload(device: &CudaDevice, grid: &GridRef, m: usize, n: usize) -> Result<Self> {
        let groups = grid.groups(n);
        if grid.planes.iter().any(|p| (p.m(), p.n()) != (m, n)) {
            candle_core::bail!("bitstack cuda: grid does not have the sizes of a {m}×{n} linear");
        }
        if let Some(e) = grid.values.misfit(m, groups, grid.outliers) {
            candle_core::bail!("bitstack cuda: {e} for a {m}×{n} linear");
        }
        grid.check(m, n);
        Ok(Self {
            m,
            n,
            group: grid.group,
            groups,
            outliers: grid.outliers,
            values: CudaValues::upload(device, &grid.values)?,
            outlier_col: DeviceBuffer::upload(device, grid.outlier_col)?,
        })
    }

    /// Device memory held.
    pub fn bytes(&self) -> usize {
        let cells = self.m * self.groups;
        let slots = cells * self.outliers;
        let values = match self.values {
            CudaValues::F16 { .. } => 4 * cells + 2 * slots,
            CudaValues::Int8 { .. } => 2 * cells + slots + 6 * self.m,
        };
        values + slots
    }
}

/// The grid part of one stack on the device: its cells, its resident
/// planes, and the kernels' `GridDesc` (their addresses and sizes).
pub struct CudaGrid {
    m: usize,
    n: usize,
    cells: Arc<CudaGridCells>,
    planes: Vec<Arc<CudaPlane>>,
    /// The planes' addresses, most significant first.
    _plane_table: CudaSlice<u64>,
    /// `GridDesc`: eleven device addresses, then `nplanes`, `group`,
    /// `outliers` and `groups` as i32 and the prefix scale as f32 (with a
    /// zero pad), two to a word (little-endian).
    desc: CudaSlice<u64>,
}

impl CudaGrid {
    /// A grid over cells and planes already on `device`, its half-ranges
    /// times `prefix_scale` (see [`GridRef::prefix_scale`]).
    pub fn new(
        device: &CudaDevice,
        cells: Arc<CudaGridCells>,
        planes: Vec<Arc<CudaPlane>>,
        prefix_scale: f32,
    ) -> Result<Self> {
        let (m, n) = (cells.m, cells.n);
        if planes.is_empty() {
            candle_core::bail!("bitstack cuda: a grid has at least one plane");
        }
        if !(prefix_scale.is_finite() && prefix_scale >= 0.0) {
            candle_core::bail!(
                "bitstack cuda: grid prefix scale {prefix_scale} is not a finite number ≥ 0"
            );
        }
        if let Some((b, p)) = planes
            .iter()
            .enumerate()
            .find(|(_, p)| (p.m, p.n) != (m, n))
        {
            candle_core::bail!(
                "bitstack cuda: grid plane {b} is {}×{}, the grid {m}×{n}",
                p.m,
                p.n
            );
        }
        let stream = device.cuda_stream();
        let addresses: Vec<u64> = planes.iter().map(|p| p.words.ptr()).collect();
        let plane_table = upload(device, &addresses)?;
        let pair = |a: usize, b: usize| (a as u32 as u64) | ((b as u32 as u64) << 32);
        let ([center, half, ovalue], [ccode, hcode, cstep, hstep, ocode, ostep]) =
            cells.values.addresses();
        let desc = [
            plane_table.device_ptr(&stream).0,
            center,
            half,
            cells.outlier_col.ptr(),
            ovalue,
            ccode,
            hcode,
            cstep,
            hstep,
            ocode,
            ostep,
            pair(planes.len(), cells.group),
            pair(cells.outliers, cells.groups),
            prefix_scale.to_bits() as u64,
        ];
        Ok(Self {
            m,
            n,
            desc: upload(device, &desc)?,
            cells,
            planes,
            _plane_table: plane_table,
        })
    }

    /// Packs `grid`'s cells and planes for the kernels and copies them to `device`.
    pub fn upload(device: &CudaDevice, grid: &GridRef, m: usize, n: usize) -> Result<Self> {
        let cells = Arc::new(CudaGridCells::upload(device, grid, m, n)?);
        let planes = grid
            .planes
            .iter()
            .map(|p| CudaPlane::upload(device, p).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Self::new(device, cells, planes, grid.prefix_scale)
    }

    /// Device memory of the cells and planes (the tables aside).
    pub fn bytes(&self) -> usize {
        self.cells.bytes() + self.planes.iter().map(|p| p.bytes()).sum::<usize>()
    }
}

/// The resident blocks of one `m×n` linear on one device.
pub struct CudaStack {
    m: usize,
    n: usize,
    k: usize,
    device: CudaDevice,
    blocks: Vec<Arc<CudaBlock>>,
    /// Grid planes after the blocks.
    grid: Option<Arc<CudaGrid>>,
    /// Per block, the device addresses of its signs, `u` and `vt`.
    table: CudaSlice<u64>,
    /// Streaming multiprocessors of the device (sizes the column split).
    sms: usize,
    /// The PTX module for the device's architecture: (name, source).
    module: (&'static str, &'static str),
}

impl CudaStack {
    /// A stack over blocks already on `device`.
    pub fn new(
        device: &CudaDevice,
        m: usize,
        n: usize,
        k: usize,
        blocks: Vec<Arc<CudaBlock>>,
    ) -> Result<Self> {
        let stream = device.cuda_stream();
        let mut table = Vec::with_capacity(3 * blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            if (b.m, b.n, b.k) != (m, n, k) {
                candle_core::bail!(
                    "bitstack cuda: block {i} is {}×{} rank {}, the stack {m}×{n} rank {k}",
                    b.m,
                    b.n,
                    b.k
                );
            }
            table.push(b.signs.ptr());
            table.push(b.u.ptr());
            table.push(b.vt.ptr());
        }
        let table = upload(device, &table)?;
        let ctx = stream.context();
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()? as usize;
        let module = match ctx.compute_capability().w()?.0 {
            major @ ..=7 => candle_core::bail!(
                "bitstack cuda: the kernels need compute capability 8.0 or newer, the device has {major}.x"
            ),
            8 => ("bitstack_sm80", PTX_SM80),
            _ => ("bitstack_sm90", PTX_SM90),
        };
        Ok(Self {
            m,
            n,
            k,
            device: device.clone(),
            blocks,
            grid: None,
            table,
            sms,
            module,
        })
    }

    /// This stack with grid planes after its blocks (already on its device).
    pub fn with_grid(mut self, grid: Option<Arc<CudaGrid>>) -> Result<Self> {
        if let Some(g) = &grid {
            if (g.m, g.n) != (self.m, self.n) {
                candle_core::bail!(
                    "bitstack cuda: the grid is {}×{}, the stack {}×{}",
                    g.m,
                    g.n,
                    self.m,
                    self.n
                );
            }
        }
        self.grid = grid;
        Ok(self)
    }

    /// Uploads every block of `stack`, and its grid.
    pub fn upload(device: &CudaDevice, stack: &StackRef) -> Result<Self> {
        let blocks = stack
            .blocks
            .iter()
            .map(|&b| CudaBlock::upload(device, b, stack.m, stack.n, stack.k).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let grid = stack
            .grid
            .as_ref()
            .map(|g| CudaGrid::upload(device, g, stack.m, stack.n).map(Arc::new))
            .transpose()?;
        Self::new(device, stack.m, stack.n, stack.k, blocks)?.with_grid(grid)
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The weight's rows and columns, `(m, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.m, self.n)
    }

    /// Device memory of the blocks and the grid (the pointer table aside).
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.bytes()).sum::<usize>()
            + self.grid.as_ref().map_or(0, |g| g.bytes())
    }

    /// `x·Wᵀ` for a contiguous `x` of shape `[.., n]` on this stack's device.
    pub fn cuda_matmul_t(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Rows {
            start,
            rows,
            out_shape,
            ..
        } = rows_of(layout, self.m, self.n)?;
        let empty = self.blocks.is_empty() && self.grid.is_none();
        let out = if rows == 0 || self.m == 0 || empty {
            zeros(&self.device, x.dtype(), rows * self.m)?
        } else if rows <= DECODE_MAX_ROWS {
            self.decode(x, start, rows)?
        } else {
            self.prefill(x, start, rows)?
        };
        Ok((out, out_shape))
    }

    fn decode(&self, x: &CudaStorage, start: usize, rows: usize) -> Result<CudaStorage> {
        let (m, n) = (self.m, self.n);
        let dev = &self.device;
        let row_blocks = m.div_ceil(DECODE_ROWS);
        let stages = n.div_ceil(STAGE_COLS).max(1);
        // Two thread blocks per SM fit; aim for that many in all.
        let want = (2 * self.sms).div_ceil(row_blocks).clamp(1, stages);
        let stages_per_split = stages.div_ceil(want);
        let splits = if self.blocks.is_empty() {
            0
        } else {
            stages.div_ceil(stages_per_split)
        };
        // The grid's sums are one more slot after the splits'.
        let slots = splits + usize::from(self.grid.is_some());
        let partial = unsafe { dev.alloc::<f32>(slots * rows * m)? };
        let cfg = LaunchConfig {
            grid_dim: (row_blocks as u32, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (name, len) = (dtype_name(x.dtype())?, rows * m);
        let stream = dev.cuda_stream();
        let func = self.func(&format!("bitstack_decode_{name}"))?;
        let args = kernel_ints([self.blocks.len(), m, n, self.k, rows, stages_per_split])?;
        let reduce = self.func(&format!("bitstack_reduce_{name}"))?;
        let reduce_cfg = LaunchConfig::for_num_elems(len as u32);
        let grid_func = self.func(&format!("bitstack_grid_decode_{name}"))?;
        let grid_cfg = LaunchConfig {
            grid_dim: (m.div_ceil(pack::TILE_ROWS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let grid_args = kernel_ints([m, n, rows])?;
        let grid_slot = splits * rows * m;
        let [slots, len] = kernel_ints([slots, len])?;
        macro_rules! run {
            ($slice:expr, $t:ty, $wrap:ident) => {{
                let x: CudaView<$t> = $slice.slice(start..start + rows * n);
                if splits > 0 {
                    let mut b = stream.launch_builder(&func);
                    b.arg(&self.table).arg(&args[0]).arg(&x).arg(&partial);
                    for a in &args[1..] {
                        b.arg(a);
                    }
                    unsafe { b.launch(cfg) }.w()?;
                }
                if let Some(grid) = &self.grid {
                    let slot = partial.slice(grid_slot..);
                    let mut b = stream.launch_builder(&grid_func);
                    b.arg(&grid.desc).arg(&x).arg(&slot);
                    for a in &grid_args {
                        b.arg(a);
                    }
                    unsafe { b.launch(grid_cfg) }.w()?;
                }
                let out = unsafe { dev.alloc::<$t>(rows * m)? };
                let mut b = stream.launch_builder(&reduce);
                b.arg(&partial).arg(&out).arg(&slots).arg(&len);
                unsafe { b.launch(reduce_cfg) }.w()?;
                CudaStorageSlice::$wrap(out)
            }};
        }
        let slice = match &x.slice {
            CudaStorageSlice::F32(s) => run!(s, f32, F32),
            CudaStorageSlice::F16(s) => run!(s, f16, F16),
            CudaStorageSlice::BF16(s) => run!(s, bf16, BF16),
            _ => unreachable!("dtype_name admits f32, f16 and bf16 only"),
        };
        Ok(CudaStorage {
            slice,
            device: dev.clone(),
        })
    }

    fn prefill(&self, x: &CudaStorage, start: usize, rows: usize) -> Result<CudaStorage> {
        let (m, n) = (self.m, self.n);
        let w = self.dense(x.dtype())?;
        let x_layout = Layout::contiguous_with_offset((rows, n), start);
        let wt_layout = Layout::contiguous((m, n)).transpose(0, 1)?;
        x.matmul(&w, (1, rows, m, n), &x_layout, &wt_layout)
    }

    /// `W = Σ Sᵢ ⊙ (uᵢ·vtᵢ)` (plus the grid part) as a row-major `m×n`
    /// matrix of `dtype` (f32, f16 or bf16) on the device: what prefill
    /// multiplies with, and what a device-resident stack has instead of a
    /// host copy to rebuild from.
    pub fn dense(&self, dtype: DType) -> Result<CudaStorage> {
        let (m, n) = (self.m, self.n);
        let dev = &self.device;
        if m == 0 || n == 0 || (self.blocks.is_empty() && self.grid.is_none()) {
            return zeros(dev, dtype, m * n);
        }
        let stream = dev.cuda_stream();
        let func = self.func(&format!("bitstack_reconstruct_{}", dtype_name(dtype)?))?;
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(pack::CHUNK_COLS) as u32,
                m.div_ceil(pack::TILE_ROWS) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = kernel_ints([self.blocks.len(), m, n, self.k])?;
        // The grid's GridDesc, or a null pointer.
        let grid = self
            .grid
            .as_ref()
            .map_or(0u64, |g| g.desc.device_ptr(&stream).0);
        macro_rules! rebuild {
            ($t:ty, $wrap:ident) => {{
                let w = unsafe { dev.alloc::<$t>(m * n)? };
                let mut b = stream.launch_builder(&func);
                b.arg(&self.table).arg(&args[0]).arg(&w);
                for a in &args[1..] {
                    b.arg(a);
                }
                b.arg(&grid);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::$wrap(w)
            }};
        }
        let slice = match dtype {
            DType::F32 => rebuild!(f32, F32),
            DType::F16 => rebuild!(f16, F16),
            _ => rebuild!(bf16, BF16),
        };
        Ok(CudaStorage {
            slice,
            device: dev.clone(),
        })
    }

    /// A kernel of the PTX built for the newest architecture the device runs.
    fn func(&self, name: &str) -> Result<CudaFunction> {
        let (module, ptx) = self.module;
        Ok(self
            .device
            .get_or_load_custom_func(name, module, ptx)?
            .into_cuda_function())
    }
}

/// Sizes as the kernels' `int` arguments; a size past `i32::MAX` is an
/// error, not a wrapped negative index.
fn kernel_ints<const N: usize>(sizes: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, &v) in out.iter_mut().zip(&sizes) {
        *o = i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!(
                "bitstack cuda: size {v} (of {sizes:?}) does not fit the kernels' 32-bit arguments"
            ))
        })?;
    }
    Ok(out)
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!(
            "bitstack-matmul: activations must be f32, f16 or bf16, not {other:?}"
        ),
    })
}

fn zeros(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    let len = len.max(1);
    let slice = match dtype {
        DType::F32 => CudaStorageSlice::F32(dev.alloc_zeros::<f32>(len)?),
        DType::F16 => CudaStorageSlice::F16(dev.alloc_zeros::<f16>(len)?),
        DType::BF16 => CudaStorageSlice::BF16(dev.alloc_zeros::<bf16>(len)?),
        other => candle_core::bail!(
            "bitstack-matmul: activations must be f32, f16 or bf16, not {other:?}"
        ),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}
