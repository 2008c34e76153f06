//! Sign packing, exactly as the BitStack reference stores it.
//!
//! A sign matrix is flattened row-major; eight signs go into one byte with the
//! first sign in the most significant bit; bit 1 means +1, bit 0 means −1.
//! When `m·n` is not a multiple of 8 the last byte is padded with 0 bits.

/// Number of bytes needed for `len` packed signs.
pub fn packed_len(len: usize) -> usize {
    len.div_ceil(8)
}

/// The sign convention of the method: `x ≥ 0` (including −0.0) is +1.
#[inline]
pub fn is_positive(x: f32) -> bool {
    x.is_sign_positive() || x == 0.0
}

/// Packs the signs of `values` (0 counts as +1).
pub fn pack_signs(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(values.len())];
    for (byte, chunk) in out.iter_mut().zip(values.chunks(8)) {
        let mut b = 0u8;
        for (i, &v) in chunk.iter().enumerate() {
            if is_positive(v) {
                b |= 0x80 >> i;
            }
        }
        *byte = b;
    }
    out
}

/// The sign (+1.0 or −1.0) of element `index` of a packed matrix.
#[inline]
pub fn sign_at(packed: &[u8], index: usize) -> f32 {
    if bitstack_kernels::packed_sign(packed, index) {
        1.0
    } else {
        -1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_bytes() {
        // + − + + − − − +  →  1011_0001 ; then + − (padding 0s) → 1000_0000
        let v = [1.0, -2.0, 0.5, 0.0, -0.1, -3.0, -1e-9, 7.0, 4.0, -4.0];
        assert_eq!(pack_signs(&v), vec![0b1011_0001, 0b1000_0000]);
    }

    #[test]
    fn zero_and_negative_zero_are_positive() {
        assert_eq!(pack_signs(&[0.0, -0.0, -1.0]), vec![0b1100_0000]);
    }

    #[test]
    fn padding_when_not_multiple_of_eight() {
        for len in [1usize, 7, 8, 9, 15, 17, 63, 65] {
            let v = vec![1.0f32; len];
            let p = pack_signs(&v);
            assert_eq!(p.len(), len.div_ceil(8), "len {len}");
            let used = len % 8;
            if used != 0 {
                // unused low bits of the last byte are 0
                assert_eq!(p[p.len() - 1] & (0xFFu8 >> used), 0, "len {len}");
            }
        }
    }

    #[test]
    fn round_trip_random() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let v: Vec<f32> = (0..1237)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 - 1000.0
            })
            .collect();
        let p = pack_signs(&v);
        for (i, a) in v.iter().enumerate() {
            assert_eq!(sign_at(&p, i), if *a >= 0.0 { 1.0 } else { -1.0 });
        }
    }
}
