//! The straightforward kernel: one weight at a time, in f64. Slow and
//! obviously right; every fast path is tested against it.

use crate::layout::{GridRef, StackRef};

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
            if let Some(grid) = &stack.grid {
                for c in 0..n {
                    y += grid_weight(grid, n, i, c) * x[r * n + c] as f64;
                }
            }
            out[r * m + i] = y as f32;
        }
    }
}

/// `Wgrid[i, c]`, by the definition (see [`GridRef`]).
pub fn grid_weight(grid: &GridRef, n: usize, i: usize, c: usize) -> f64 {
    let groups = grid.groups(n);
    let g = c / grid.group;
    let cell = i * groups + g;
    for t in 0..grid.outliers {
        let slot = cell * grid.outliers + t;
        if g * grid.group + grid.outlier_col[slot] as usize == c {
            return grid.values.outlier(groups * grid.outliers, slot) as f64;
        }
    }
    let mut levels = 0f64;
    for (b, plane) in grid.planes.iter().enumerate() {
        let sign = if plane.sign(i, c) { 1.0 } else { -1.0 };
        levels += sign * 0.5f64.powi(b as i32 + 1);
    }
    let (center, half) = grid.range(groups, cell);
    center as f64 + half as f64 * levels
}
