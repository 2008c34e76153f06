//! The straightforward kernel: one weight at a time, in f64. Slow and
//! obviously right; every fast path is tested against it.

use crate::StackRef;

/// Sign of `W[i, c]` in a row-major packed sign matrix with rows of `n`
/// bits (the checkpoint's layout): what re-tiling is checked against.
pub fn sign(signs: &[u8], n: usize, i: usize, c: usize) -> f64 {
    let bit = i * n + c;
    if (signs[bit / 8] >> (7 - bit % 8)) & 1 == 1 {
        1.0
    } else {
        -1.0
    }
}

/// `out = x·Wᵀ` (`x`: `rows×n`, `out`: `rows×m`).
pub fn matmul_t(x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
    let (m, n, k) = (stack.m, stack.n, stack.k);
    for r in 0..rows {
        for i in 0..m {
            let mut y = 0f64;
            for b in &stack.blocks {
                for c in 0..n {
                    let mut w = 0f64;
                    for j in 0..k {
                        w += b.u[i * k + j].to_f64() * b.vt[j * n + c].to_f64();
                    }
                    let sign = if b.signs.sign(i, c) { 1.0 } else { -1.0 };
                    y += sign * w * x[r * n + c] as f64;
                }
            }
            out[r * m + i] = y as f32;
        }
    }
}
