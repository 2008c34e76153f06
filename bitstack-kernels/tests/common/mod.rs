//! Random stacks and a tolerance check shared by the kernel tests.
#![allow(dead_code)]

use bitstack_kernels::{BlockRef, StackRef, StackSource, TiledSigns};
use candle_core::{DType, Tensor};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The owned parts of a random stack: its signs drawn row-major, as a
/// checkpoint stores them, and re-tiled for the kernels.
pub struct Owned {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub blocks: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)>,
    pub tiled: Vec<TiledSigns>,
}

impl Owned {
    pub fn random(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut f = |len: usize, scale: f32| -> Vec<f16> {
            (0..len)
                .map(|_| f16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * scale))
                .collect()
        };
        let blocks = (0..blocks)
            .map(|b| {
                let u = f(m * k, 1.0 / (b + 1) as f32);
                let vt = f(k * n, 0.5);
                (Vec::<u8>::new(), u, vt)
            })
            .collect::<Vec<_>>();
        let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd);
        let blocks = blocks
            .into_iter()
            .map(|(_, u, vt)| {
                let signs: Vec<u8> = (0..(m * n).div_ceil(8))
                    .map(|_| rng.random::<u8>())
                    .collect();
                (signs, u, vt)
            })
            .collect::<Vec<_>>();
        let tiled = blocks
            .iter()
            .map(|(signs, _, _)| TiledSigns::from_row_major(signs, m, n))
            .collect();
        Self {
            m,
            n,
            k,
            blocks,
            tiled,
        }
    }
}

impl StackSource for Owned {
    fn stack(&self) -> StackRef<'_> {
        StackRef {
            m: self.m,
            n: self.n,
            k: self.k,
            blocks: self
                .blocks
                .iter()
                .zip(&self.tiled)
                .map(|((_, u, vt), signs)| BlockRef { signs, u, vt })
                .collect(),
        }
    }
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
