//! One residual block of a BitStack weight: `S ⊙ (u·vt)`.

use half::f16;

use crate::pack;

/// A residual block of an `m×n` weight: packed signs, `u` (`m×k`) and `vt` (`k×n`).
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// Row-major packed signs, `ceil(m·n/8)` bytes (see [`crate::pack`]).
    pub signs: Vec<u8>,
    /// Left factor, `m×k` row-major.
    pub u: Vec<f16>,
    /// Right factor, `k×n` row-major.
    pub vt: Vec<f16>,
}

/// Bytes one block occupies when resident: its signs re-tiled for the
/// kernels (`⌈m/32⌉·32·⌈n/8⌉`, which is `m·n/8` for every real model
/// shape) plus `2·k·(m+n)` for the f16 factors.
pub fn block_bytes(m: usize, n: usize, k: usize) -> usize {
    bitstack_kernels::TiledSigns::bytes_for(m, n) + 2 * k * (m + n)
}

impl Block {
    /// Bytes of this block as stored in a checkpoint.
    pub fn bytes(&self) -> usize {
        self.signs.len() + 2 * (self.u.len() + self.vt.len())
    }

    /// Adds this block's `S ⊙ (u·vt)` to the row-major `m×n` matrix `w`.
    ///
    /// The straightforward reference; fast kernels are tested against it.
    pub fn add_to(&self, m: usize, n: usize, k: usize, w: &mut [f32]) {
        debug_assert_eq!(w.len(), m * n);
        let vt: Vec<f32> = self.vt.iter().map(|x| x.to_f32()).collect();
        let mut row = vec![0f32; n];
        for i in 0..m {
            row.iter_mut().for_each(|x| *x = 0.0);
            for j in 0..k {
                let uij = self.u[i * k + j].to_f32();
                for (r, v) in row.iter_mut().zip(&vt[j * n..(j + 1) * n]) {
                    *r += uij * v;
                }
            }
            let out = &mut w[i * n..(i + 1) * n];
            for (c, (o, r)) in out.iter_mut().zip(&row).enumerate() {
                *o += pack::sign_at(&self.signs, i * n + c) * r;
            }
        }
    }
}

/// Dense `m×n` reconstruction from a prefix of blocks.
pub fn reconstruct(blocks: &[Block], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut w = vec![0f32; m * n];
    for b in blocks {
        b.add_to(m, n, k, &mut w);
    }
    w
}
