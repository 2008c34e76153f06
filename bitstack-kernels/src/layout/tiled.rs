//! [`TiledSigns`]: a packed sign matrix re-tiled 32 rows side by side, the
//! layout the CPU kernels read.

use super::bits::{byte_sign, row_bits, unaligned_buffer};

/// Rows per tile of [`TiledSigns`]: one 32-byte load of the shuffle
/// kernel, one `vpshufb`.
pub const TILE_ROWS: usize = 32;

/// A packed ±1 sign matrix re-tiled for the CPU kernels.
///
/// Rows are taken in tiles of [`TILE_ROWS`]; within a tile, byte `q` of
/// each of the 32 rows is stored consecutively: byte `(t·⌈n/8⌉ + q)·32 + l`
/// is byte `q` of row `32t + l` (bit 7 = column `8q`, bit 1 = +1). Missing
/// rows of the last tile and the columns past `n` in a row's last byte are
/// zero bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiledSigns {
    m: usize,
    n: usize,
    data: Vec<u8>,
}

impl TiledSigns {
    /// Re-tiles `⌈m·n/8⌉` row-major packed bytes (bit `i·n + c`, most
    /// significant bit first, is the sign of `W[i, c]`).
    pub fn from_row_major(signs: &[u8], m: usize, n: usize) -> Self {
        assert_eq!(signs.len(), (m * n).div_ceil(8), "signs are not m×n bits");
        let row_bytes = n.div_ceil(8);
        let mut data = vec![0u8; Self::bytes_for(m, n)];
        let tail = if n.is_multiple_of(8) {
            0xff
        } else {
            0xffu8 << (8 - n % 8)
        };
        let mut aligned = unaligned_buffer(n);
        for i in 0..m {
            let bits = row_bits(signs, n, i, row_bytes, &mut aligned);
            let (t, l) = (i / TILE_ROWS, i % TILE_ROWS);
            for (q, &byte) in bits.iter().enumerate() {
                let byte = if q + 1 == row_bytes {
                    byte & tail
                } else {
                    byte
                };
                data[(t * row_bytes + q) * TILE_ROWS + l] = byte;
            }
        }
        Self { m, n, data }
    }

    /// The row-major packed bytes this was built from.
    pub fn to_row_major(&self) -> Vec<u8> {
        let mut signs = vec![0u8; (self.m * self.n).div_ceil(8)];
        for i in 0..self.m {
            for c in 0..self.n {
                if self.sign(i, c) {
                    let bit = i * self.n + c;
                    signs[bit / 8] |= 0x80 >> (bit % 8);
                }
            }
        }
        signs
    }

    /// Whether `W[i, c]` is positive.
    pub fn sign(&self, i: usize, c: usize) -> bool {
        assert!(i < self.m && c < self.n, "({i}, {c}) is outside the matrix");
        let byte = self.data[self.offset(i / TILE_ROWS, c / 8) + i % TILE_ROWS];
        byte_sign(byte, c % 8)
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Memory held: `⌈m/32⌉·32·⌈n/8⌉` bytes.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// What [`TiledSigns::bytes`] is for an `m×n` matrix.
    pub fn bytes_for(m: usize, n: usize) -> usize {
        m.div_ceil(TILE_ROWS) * TILE_ROWS * n.div_ceil(8)
    }

    /// The tiled bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Offset in [`TiledSigns::as_bytes`] of byte `q` of the first row of
    /// tile `t`.
    pub(crate) fn offset(&self, t: usize, q: usize) -> usize {
        (t * self.n.div_ceil(8) + q) * TILE_ROWS
    }
}

/// Bytes `q0..q0 + out.len()` of row `i` of re-tiled signs into `out`
/// (bit 7 of byte `q` is column `8q`).
#[inline(always)]
pub fn tiled_row(signs: &TiledSigns, i: usize, q0: usize, out: &mut [u8]) {
    let row_bytes = signs.n().div_ceil(8);
    let (t, l) = (i / TILE_ROWS, i % TILE_ROWS);
    let data = signs.as_bytes();
    let base = (t * row_bytes + q0) * TILE_ROWS + l;
    for (q, o) in out.iter_mut().enumerate() {
        *o = data[base + q * TILE_ROWS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::bits::row_major_sign;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_signs(m: usize, n: usize, rng: &mut StdRng) -> Vec<u8> {
        (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect()
    }

    #[test]
    fn tiled_signs_round_trip() {
        let mut rng = StdRng::seed_from_u64(7);
        for (m, n) in [
            (1, 1),
            (1, 13),
            (33, 9),
            (70, 200),
            (32, 64),
            (5, 1030),
            (64, 7),
        ] {
            let signs = random_signs(m, n, &mut rng);
            let tiled = TiledSigns::from_row_major(&signs, m, n);
            assert_eq!(tiled.bytes(), m.div_ceil(32) * 32 * n.div_ceil(8));
            for i in 0..m {
                for c in 0..n {
                    assert_eq!(
                        tiled.sign(i, c),
                        row_major_sign(&signs, n, i, c),
                        "{m}×{n} ({i}, {c})"
                    );
                }
            }
            let mut back = tiled.to_row_major();
            // Bits past m·n in the last byte are not part of the matrix.
            if (m * n) % 8 != 0 {
                let last = signs.len() - 1;
                let mask = 0xffu8 << (8 - (m * n) % 8);
                assert_eq!(back[last] & !mask, 0);
                back[last] |= signs[last] & !mask;
            }
            assert_eq!(back, signs, "{m}×{n}");
            // Padding is zero.
            let row_bytes = n.div_ceil(8);
            for t in 0..m.div_ceil(32) {
                for q in 0..row_bytes {
                    for l in 0..32 {
                        let byte = tiled.as_bytes()[tiled.offset(t, q) + l];
                        let live_bits = if 32 * t + l >= m {
                            0
                        } else {
                            (n - 8 * q).min(8)
                        };
                        let mask = if live_bits == 0 {
                            0
                        } else {
                            0xffu8 << (8 - live_bits)
                        };
                        assert_eq!(byte & !mask, 0, "{m}×{n} tile {t} byte {q} row {l}");
                    }
                }
            }
        }
    }
}
