//! Decode and prefill kernels against candle's dense f32 and f16 products
//! on the same shape, in the same run; grid planes against AVD blocks of
//! the same bits (`grid_…` groups); and the host-side repacking of signs
//! for a CUDA upload against a plain copy of the same bytes (`cuda_pack_…`).

use std::time::Duration;

use bitstack_kernels::decode::table_matmul_t;
use bitstack_kernels::layout::GridValues;
use bitstack_kernels::prefill::panel_matmul_t;
use bitstack_kernels::tmac::{self, shuffle_matmul_t};
use bitstack_kernels::{stack_matmul_t, Isa, OwnedGrid, OwnedStack, TiledSigns};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random_stack(m: usize, n: usize, k: usize, blocks: usize) -> OwnedStack {
    let mut rng = StdRng::seed_from_u64(1);
    let blocks = (0..blocks).map(|_| {
        let signs: Vec<u8> = (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect();
        let u = (0..m * k)
            .map(|_| f16::from_f32(rng.random::<f32>() - 0.5))
            .collect();
        let vt = (0..k * n)
            .map(|_| f16::from_f32(rng.random::<f32>() - 0.5))
            .collect();
        (signs, u, vt)
    });
    OwnedStack::from_row_major(m, n, k, blocks)
}

/// `planes` random grid planes (groups of 128, one outlier each) and no
/// block; 8-bit codes under per-row steps (format 3, what compress writes)
/// or f16 numbers (format 2).
fn random_grid(m: usize, n: usize, planes: usize, coded: bool) -> OwnedStack {
    let mut rng = StdRng::seed_from_u64(3);
    let (group, outliers) = (128, 1);
    let groups = n.div_ceil(group);
    let mut f = |len: usize| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32(rng.random::<f32>() - 0.5))
            .collect()
    };
    let values = if coded {
        GridValues::Int8 {
            center_code: (0..m * groups).map(|_| rng.random::<i8>()).collect(),
            half_code: (0..m * groups).map(|_| rng.random::<u8>()).collect(),
            outlier_code: (0..m * groups).map(|_| rng.random::<i8>()).collect(),
            center_step: vec![f16::from_f32(1.0 / 256.0); m],
            half_step: vec![f16::from_f32(1.0 / 512.0); m],
            outlier_step: vec![f16::from_f32(1.0 / 128.0); m],
        }
    } else {
        GridValues::F16 {
            center: f(m * groups),
            half: f(m * groups),
            outlier: f(m * groups),
        }
    };
    let planes = (0..planes)
        .map(|_| {
            let bytes: Vec<u8> = (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect();
            TiledSigns::from_row_major(&bytes, m, n)
        })
        .collect();
    let grid = OwnedGrid {
        group,
        values,
        outliers,
        outlier_col: (0..m * groups).map(|_| rng.random::<u8>() % 128).collect(),
        planes,
        prefix_scale: 0.92,
    };
    OwnedStack::with_grid(m, n, 1, Vec::new(), Some(grid))
}

/// Decode (one row) of `p` grid planes beside `p` AVD blocks (k = 4 and 16)
/// and the dense f32 product, at 2048×2048.
fn grid(c: &mut Criterion) {
    let isa = Isa::detect();
    let (m, n) = (2048, 2048);
    let mut rng = StdRng::seed_from_u64(2);
    let x: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut out = vec![0f32; m];
    for p in [3, 4] {
        let mut group = c.benchmark_group(format!("grid_{m}x{n}_p{p}_rows1"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let grid = random_grid(m, n, p, true);
        let stack = grid.stack_ref();
        group.bench_function(BenchmarkId::new("grid_tmac", format!("{isa:?}")), |b| {
            b.iter(|| shuffle_matmul_t(isa, &x, 1, &stack, &mut out))
        });
        let f16_grid = random_grid(m, n, p, false);
        let f16_stack = f16_grid.stack_ref();
        group.bench_function(BenchmarkId::new("grid_tmac_f16", format!("{isa:?}")), |b| {
            b.iter(|| shuffle_matmul_t(isa, &x, 1, &f16_stack, &mut out))
        });
        group.bench_function(BenchmarkId::new("grid_decode", format!("{isa:?}")), |b| {
            b.iter(|| table_matmul_t(isa, &x, 1, &stack, &mut out))
        });
        group.bench_function(BenchmarkId::new("grid_dispatch", format!("{isa:?}")), |b| {
            b.iter(|| stack_matmul_t(&x, 1, &stack, &mut out))
        });
        for k in [4, 16] {
            let avd = random_stack(m, n, k, p);
            let stack = avd.stack_ref();
            group.bench_function(
                BenchmarkId::new(format!("avd_k{k}_tmac"), format!("{isa:?}")),
                |b| b.iter(|| shuffle_matmul_t(isa, &x, 1, &stack, &mut out)),
            );
        }
        let xt = Tensor::from_vec(x.clone(), (1, n), &Device::Cpu).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        group.bench_function(BenchmarkId::new("dense", "F32"), |b| {
            b.iter(|| xt.matmul(&wt).unwrap())
        });
        group.finish();
    }
}

fn kernels(c: &mut Criterion) {
    let isa = Isa::detect();
    for (m, n, k, nb, rows) in [
        (4096, 4096, 16, 4, 1),
        (4096, 4096, 4, 4, 1),
        (1536, 576, 4, 4, 1),
        (576, 576, 4, 8, 1),
        (14336, 4096, 4, 4, 1),
        (4096, 4096, 16, 4, 512),
    ] {
        let mut group = c.benchmark_group(format!("{m}x{n}_k{k}_b{nb}_rows{rows}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let owned = random_stack(m, n, k, nb);
        let stack = owned.stack_ref();
        let mut rng = StdRng::seed_from_u64(2);
        let x: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut out = vec![0f32; rows * m];
        let name = if rows <= bitstack_kernels::DECODE_MAX_ROWS {
            "decode"
        } else {
            "prefill"
        };
        group.bench_function(BenchmarkId::new(name, format!("{isa:?}")), |b| {
            b.iter(|| {
                if rows <= bitstack_kernels::DECODE_MAX_ROWS {
                    table_matmul_t(isa, &x, rows, &stack, &mut out)
                } else {
                    panel_matmul_t(isa, &x, rows, &stack, &mut out)
                }
            })
        });
        if rows <= tmac::MAX_ROWS {
            group.bench_function(BenchmarkId::new("tmac", format!("{isa:?}")), |b| {
                b.iter(|| shuffle_matmul_t(isa, &x, rows, &stack, &mut out))
            });
        }
        let xt = Tensor::from_vec(x.clone(), (rows, n), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16] {
            let (xd, wt) = (
                xt.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap().t().unwrap(),
            );
            group.bench_function(BenchmarkId::new("dense", format!("{dtype:?}")), |b| {
                b.iter(|| xd.matmul(&wt).unwrap())
            });
        }
        group.finish();
    }
}

/// Repacking a block's signs into the CUDA decode layout, which every
/// upload does, against copying the same bytes: the floor any repacking has.
fn cuda_pack(c: &mut Criterion) {
    let (m, n) = (4096, 4096);
    let mut rng = StdRng::seed_from_u64(4);
    let bytes: Vec<u8> = (0..(m * n) / 8).map(|_| rng.random()).collect();
    let signs = TiledSigns::from_row_major(&bytes, m, n);
    let mut group = c.benchmark_group(format!("cuda_pack_{m}x{n}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("mma_sign_words", |b| {
        b.iter(|| bitstack_kernels::cuda::pack::mma_sign_words(&signs))
    });
    group.bench_function("copy", |b| b.iter(|| signs.as_bytes().to_vec()));
    group.bench_function("sign_by_sign", |b| b.iter(|| sign_by_sign(&signs)));
    group.finish();
}

/// The layout of `mma_sign_words` made one sign at a time, through
/// `TiledSigns::sign` and `pack::position`: how uploads repacked before.
fn sign_by_sign(signs: &TiledSigns) -> Vec<u32> {
    use bitstack_kernels::cuda::pack::{position, words_for, CHUNK_COLS, TILE_ROWS};
    let (m, n) = (signs.m(), signs.n());
    let chunks = n.div_ceil(CHUNK_COLS);
    use rayon::prelude::*;
    let mut words = vec![0u32; words_for(m, n)];
    words
        .par_chunks_mut(chunks * 32)
        .enumerate()
        .for_each(|(tile, words)| {
            for row in 0..TILE_ROWS.min(m - tile * TILE_ROWS) {
                for c in 0..n {
                    if !signs.sign(tile * TILE_ROWS + row, c) {
                        let (lane, bit) = position(row, c % CHUNK_COLS);
                        words[(c / CHUNK_COLS) * 32 + lane] |= 1 << bit;
                    }
                }
            }
        });
    words
}

criterion_group!(benches, kernels, grid, cuda_pack);
criterion_main!(benches);
