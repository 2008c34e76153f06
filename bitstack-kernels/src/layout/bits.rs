//! Packed sign bits: the one place that says which bit is which sign.
//!
//! Signs are packed most significant bit first; a set bit is +1, a clear
//! bit −1. Row-major packed signs (the checkpoint's layout) hold `W[i, c]`
//! of an `m×n` matrix at bit `i·n + c`, so rows do not start on a byte
//! unless `n` is a multiple of 8.

/// Whether bit `t` of `byte`, counted from the most significant (bit 7 is
/// `t = 0`), is set: the sign it packs is +1.
#[inline(always)]
pub(crate) const fn byte_sign(byte: u8, t: usize) -> bool {
    (byte >> (7 - t)) & 1 == 1
}

/// Whether column `q` (0..4) of a four-column group is +1 in `nibble`, the
/// group's half of a sign byte (bit 3 = the group's first column): the
/// sign pattern a lookup-table entry stands for.
#[inline(always)]
pub(crate) const fn nibble_sign(nibble: usize, q: usize) -> bool {
    byte_sign(nibble as u8, 4 + q)
}

/// Whether sign `bit` of a packed run of signs (eight to a byte, the first
/// in the most significant bit) is +1: the one place a sign bit is read.
#[inline(always)]
pub fn packed_sign(signs: &[u8], bit: usize) -> bool {
    byte_sign(signs[bit / 8], bit % 8)
}

/// Whether `W[i, c]` is +1 in a row-major packed sign matrix with rows of
/// `n` bits (the checkpoint's layout).
#[inline(always)]
pub fn row_major_sign(signs: &[u8], n: usize, i: usize, c: usize) -> bool {
    packed_sign(signs, i * n + c)
}

/// Room for one row's realigned sign bits, needed only when rows do not
/// start on a byte.
pub(crate) fn unaligned_buffer(n: usize) -> Vec<u8> {
    if n.is_multiple_of(8) {
        Vec::new()
    } else {
        vec![0u8; n.div_ceil(8)]
    }
}

/// The sign bits of row `i` (`row_bytes = ⌈n/8⌉`), starting on a byte: the
/// packed row itself when `n` is a multiple of 8, else shifted into
/// `aligned`. Bits past the row's end belong to the next row; callers
/// ignore them.
#[inline(always)]
pub(crate) fn row_bits<'a>(
    signs: &'a [u8],
    n: usize,
    i: usize,
    row_bytes: usize,
    aligned: &'a mut [u8],
) -> &'a [u8] {
    if n.is_multiple_of(8) {
        return &signs[i * row_bytes..][..row_bytes];
    }
    let first = i * n;
    let (start, shift) = (first / 8, (first % 8) as u32);
    for (q, a) in aligned.iter_mut().enumerate() {
        let hi = signs.get(start + q).copied().unwrap_or(0);
        let lo = signs.get(start + q + 1).copied().unwrap_or(0);
        *a = if shift == 0 {
            hi
        } else {
            (hi << shift) | (lo >> (8 - shift))
        };
    }
    aligned
}

/// `SIGN_MASKS[byte][t]` flips a float's sign bit where bit `7 − t` of
/// `byte` is 0 (sign −1): XOR-ing it in applies eight signs without a branch.
pub(crate) static SIGN_MASKS: [[u32; 8]; 256] = sign_masks();

const fn sign_masks() -> [[u32; 8]; 256] {
    let mut table = [[0u32; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut t = 0;
        while t < 8 {
            if !byte_sign(byte as u8, t) {
                table[byte][t] = 0x8000_0000;
            }
            t += 1;
        }
        byte += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realigned_rows_read_the_same_bits() {
        // 3 rows of 13 bits, packed back to back.
        let n = 13;
        let bits: Vec<bool> = (0..3 * n).map(|b| (b * 7 + 3) % 5 < 2).collect();
        let mut signs = vec![0u8; bits.len().div_ceil(8)];
        for (b, &on) in bits.iter().enumerate() {
            if on {
                signs[b / 8] |= 1 << (7 - b % 8);
            }
        }
        let mut aligned = unaligned_buffer(n);
        for i in 0..3 {
            let row = row_bits(&signs, n, i, 2, &mut aligned).to_vec();
            for c in 0..n {
                assert_eq!(
                    row_major_sign(&row, n, 0, c),
                    bits[i * n + c],
                    "row {i} col {c}"
                );
            }
        }
    }

    #[test]
    fn masks_flip_the_minus_signs() {
        let v = 1.5f32;
        let flipped: Vec<f32> = SIGN_MASKS[0b1010_0001]
            .iter()
            .map(|m| f32::from_bits(v.to_bits() ^ m))
            .collect();
        assert_eq!(flipped, [1.5, -1.5, 1.5, -1.5, -1.5, -1.5, -1.5, 1.5]);
    }
}
