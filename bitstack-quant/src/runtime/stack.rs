//! `WeightStack`: the resident blocks of one linear, in order.

use std::sync::Arc;

use bitstack_kernels::{tiled_row, OwnedBlock, StackRef};
use rayon::prelude::*;

use anyhow::Result;

use crate::format::block::{block_bytes, Block, BlockShape};
use crate::format::checkpoint::CheckedBlock;
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
    /// the signs re-tiled for the kernels straight out of the memory map:
    /// the grow path of a resize, which copies each sign byte once.
    pub fn read(store: &TensorStore, path: &str, i: usize, shape: BlockShape) -> Result<Self> {
        let checked = CheckedBlock::read(store, path, i, shape)?;
        Ok(Self {
            block: OwnedBlock::from_row_major(
                checked.signs,
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
    pub blocks: Vec<Arc<StackBlock>>,
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
            device: DeviceCopy::default(),
        }
    }

    /// The stack of the first `b` blocks (all of them when there are fewer).
    pub fn prefix(&self, b: usize) -> Self {
        let b = b.min(self.blocks.len());
        Self::new(self.m, self.n, self.k, self.blocks[..b].iter().cloned())
    }

    /// This stack followed by `more` blocks.
    pub fn extended(&self, more: impl IntoIterator<Item = Arc<StackBlock>>) -> Self {
        let blocks = self.blocks.iter().cloned().chain(more);
        Self::new(self.m, self.n, self.k, blocks)
    }

    /// Bytes of all resident blocks.
    pub fn resident_bytes(&self) -> usize {
        self.blocks.len() * block_bytes(self.m, self.n, self.k)
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
        w.par_chunks_mut(n).enumerate().for_each(|(i, out)| {
            let mut row = vec![0f32; n];
            let mut signs = vec![0u8; n.div_ceil(8)];
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
}

impl bitstack_kernels::StackSource for WeightStack {
    fn stack(&self) -> StackRef<'_> {
        StackRef {
            m: self.m,
            n: self.n,
            k: self.k,
            blocks: self.blocks.iter().map(|b| b.block_ref()).collect(),
        }
    }

    /// Uploads each block the first time a CUDA forward needs it; the
    /// blocks a resize keeps keep their uploads.
    #[cfg(feature = "cuda")]
    fn cuda_stack(
        &self,
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> candle_core::Result<Arc<bitstack_kernels::cuda::CudaStack>> {
        use bitstack_kernels::cuda::{CudaBlock, CudaStack};
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
            CudaStack::new(device, self.m, self.n, self.k, blocks)
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
            let grown = stack.prefix(1).extended(stack.blocks[1..].iter().cloned());
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
}
