//! Random stacks and a tolerance check shared by the kernel tests.
#![allow(dead_code)]

use bitstack_kernels::layout::GridValues;
use bitstack_kernels::{OwnedGrid, OwnedStack, TiledSigns};
use candle_core::{DType, Tensor};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A random stack: the factors of every block from `seed`, then the signs
/// of every block, drawn row-major as a checkpoint stores them, from a
/// second generator.
pub fn random_stack(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> OwnedStack {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = |len: usize, scale: f32| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * scale))
            .collect()
    };
    let factors = (0..blocks)
        .map(|b| {
            let u = f(m * k, 1.0 / (b + 1) as f32);
            let vt = f(k * n, 0.5);
            (u, vt)
        })
        .collect::<Vec<_>>();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd);
    let blocks = factors.into_iter().map(|(u, vt)| {
        let signs: Vec<u8> = (0..(m * n).div_ceil(8))
            .map(|_| rng.random::<u8>())
            .collect();
        (signs, u, vt)
    });
    OwnedStack::from_row_major(m, n, k, blocks)
}

/// Random grid planes for an `m×n` linear: `planes` planes, `outliers`
/// per (row, group) on distinct columns (every group needs that many), each
/// of a value up to ±3. The grid's weights are about as large as a random
/// block's. Even seeds store the numbers as f16 (format 2), odd ones as
/// 8-bit codes under per-row steps (format 3), so every kernel test meets
/// both; one seed in three has no prefix scale (before format 5), the
/// others a random one.
pub fn random_grid(
    m: usize,
    n: usize,
    group: usize,
    planes: usize,
    outliers: usize,
    seed: u64,
) -> OwnedGrid {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6121d);
    let groups = n.div_ceil(group);
    let f = |len: usize, lo: f32, hi: f32, rng: &mut StdRng| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32(lo + rng.random::<f32>() * (hi - lo)))
            .collect()
    };
    let mut outlier_col = Vec::with_capacity(m * groups * outliers);
    for _ in 0..m {
        for g in 0..groups {
            let len = group.min(n - g * group);
            assert!(outliers <= len, "{outliers} outliers in a group of {len}");
            let cols = rand::seq::index::sample(&mut rng, len, outliers);
            outlier_col.extend(cols.iter().map(|c| c as u8));
        }
    }
    let (cells, slots) = (m * groups, m * groups * outliers);
    let values = if seed.is_multiple_of(2) {
        GridValues::F16 {
            center: f(cells, -0.2, 0.2, &mut rng),
            half: f(cells, 0.1, 1.0, &mut rng),
            outlier: f(slots, -3.0, 3.0, &mut rng),
        }
    } else {
        let center_code = (0..cells).map(|_| rng.random::<i8>()).collect();
        let half_code = (0..cells).map(|_| rng.random::<u8>()).collect();
        let outlier_code = (0..slots).map(|_| rng.random::<i8>()).collect();
        GridValues::Int8 {
            center_code,
            half_code,
            outlier_code,
            center_step: f(m, 0.0, 0.2 / 127.0, &mut rng),
            half_step: f(m, 0.0, 1.0 / 255.0, &mut rng),
            outlier_step: f(m, 0.0, 3.0 / 127.0, &mut rng),
        }
    };
    let planes = (0..planes)
        .map(|_| {
            let bytes: Vec<u8> = (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect();
            TiledSigns::from_row_major(&bytes, m, n)
        })
        .collect();
    let prefix_scale = if seed.is_multiple_of(3) {
        1.0
    } else {
        rng.random_range(0.5..1.0)
    };
    OwnedGrid {
        group,
        values,
        outliers,
        outlier_col,
        planes,
        prefix_scale,
    }
}

/// [`random_stack`] followed by [`random_grid`] (same seed).
#[allow(clippy::too_many_arguments)]
pub fn random_grid_stack(
    m: usize,
    n: usize,
    k: usize,
    blocks: usize,
    group: usize,
    planes: usize,
    outliers: usize,
    seed: u64,
) -> OwnedStack {
    let stack = random_stack(m, n, k, blocks, seed);
    let grid = random_grid(m, n, group, planes, outliers, seed);
    OwnedStack::with_grid(m, n, k, stack.blocks, Some(grid))
}

pub fn random_x(rows: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * n)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect()
}

/// Fails unless `got` is `want` within `tol` of the output's RMS, element by element.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len().max(1) as f32).sqrt();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (rms + 1e-6),
            "{what}: element {i} is {g}, the reference says {w} (rms {rms})"
        );
    }
}

/// The elements of `t`, as f32, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
