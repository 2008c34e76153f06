//! One residual block of a BitStack weight: `S ⊙ (u·vt)`.

use half::f16;

use crate::format::pack;

/// A residual block of an `m×n` weight: packed signs, `u` (`m×k`) and `vt` (`k×n`).
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// Row-major packed signs, `ceil(m·n/8)` bytes (see [`crate::format::pack`]).
    pub signs: Vec<u8>,
    /// Left factor, `m×k` row-major.
    pub u: Vec<f16>,
    /// Right factor, `k×n` row-major.
    pub vt: Vec<f16>,
}

/// The shape of every block of one `m×n` linear of rank `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockShape {
    /// Output features (rows of the weight).
    pub m: usize,
    /// Input features (columns of the weight).
    pub n: usize,
    /// Rank of `u·vt`.
    pub k: usize,
}

impl BlockShape {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k }
    }

    /// Bytes of the packed signs as stored: `⌈m·n/8⌉`.
    pub fn sign_bytes(&self) -> usize {
        pack::packed_len(self.m * self.n)
    }

    /// Bytes one block occupies when resident: its signs re-tiled for the
    /// kernels (`⌈m/32⌉·32·⌈n/8⌉`, which is `m·n/8` for every real model
    /// shape) plus `2·k·(m+n)` for the f16 factors.
    pub fn resident_bytes(&self) -> usize {
        block_bytes(self.m, self.n, self.k)
    }
}

/// [`BlockShape::resident_bytes`] of an `m×n` block of rank `k`.
pub fn block_bytes(m: usize, n: usize, k: usize) -> usize {
    bitstack_kernels::TiledSigns::bytes_for(m, n) + 2 * k * (m + n)
}

/// Bits per weight of `bytes` spread over `weights` weights: the one
/// formula behind every bits-per-linear-weight figure.
pub fn bits_per_weight(bytes: usize, weights: usize) -> f64 {
    bytes as f64 * 8.0 / weights as f64
}

/// The tensor names of a block, as the reference writes them: block `i` of
/// linear `P` is `P.qweight_{i}` (u8 `[⌈m·n/8⌉]`), `P.u_{i}` (f16 `[m, k]`)
/// and `P.vt_{i}` (f16 `[k, n]`); its CRC-32 is the file metadata entry
/// `P.crc32_{i}` (ours only).
pub mod names {
    pub fn qweight(linear: &str, i: usize) -> String {
        format!("{linear}.qweight_{i}")
    }
    pub fn u(linear: &str, i: usize) -> String {
        format!("{linear}.u_{i}")
    }
    pub fn vt(linear: &str, i: usize) -> String {
        format!("{linear}.vt_{i}")
    }
    pub fn checksum(linear: &str, i: usize) -> String {
        format!("{linear}.crc32_{i}")
    }
}

/// CRC-32 of a block's bytes as stored: signs, then u and vt as
/// little-endian f16.
pub fn checksum(signs: &[u8], u: &[f16], vt: &[f16]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(signs);
    h.update(&as_le_bytes(u));
    h.update(&as_le_bytes(vt));
    h.finalize()
}

/// The bytes of `values` as stored (little-endian), without a copy where
/// the machine is little-endian.
pub(crate) fn as_le_bytes(values: &[f16]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

impl Block {
    /// Bytes of this block as stored in a checkpoint.
    pub fn bytes(&self) -> usize {
        self.signs.len() + 2 * (self.u.len() + self.vt.len())
    }

    /// CRC-32 of this block as stored (see [`checksum`]).
    pub fn checksum(&self) -> u32 {
        checksum(&self.signs, &self.u, &self.vt)
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
