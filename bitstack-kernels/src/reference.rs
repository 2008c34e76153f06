//! The straightforward kernel: one weight at a time, in f64. Slow and
//! obviously right; every fast path is tested against it.

use crate::layout::StackRef;

/// `out = x·Wᵀ` (`x`: `rows×n`, `out`: `rows×m`).
pub fn reference_matmul_t(x: &[f32], rows: usize, stack: &StackRef, out: &mut [f32]) {
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
