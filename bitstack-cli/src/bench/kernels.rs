//! The computations `bitstack bench` times, shared with the criterion bench
//! (`benches/linear.rs`) so both time the very same thing: a BitStack
//! [`Linear`] of random blocks, and candle's dense f32/f16 products (both
//! layouts of `Wᵀ`, see [`DenseLayout`]) and Q4K product with one random
//! weight. Weights and inputs are fixed by a seed.

use std::sync::Arc;

use anyhow::{bail, Result};
use bitstack_quant::format::block::Block;
use bitstack_quant::format::grid::{grid_planes, GridConfig};
use bitstack_quant::format::rotation::{rotate_rows, Direction, RotationConfig};
use bitstack_quant::runtime::linear::{Linear, LinearWeight};
use bitstack_quant::runtime::rotation::InputRotation;
use bitstack_quant::runtime::stack::WeightStack;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Q4_K quantizes rows in blocks of this many weights.
pub const Q4K_BLOCK: usize = 256;

/// A random `m×n` BitStack weight of `blocks` blocks of rank `k`
/// ([`bitstack_quant::format::synthetic::random_block`]).
pub fn random_stack(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> WeightStack {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks: Vec<Block> = (0..blocks)
        .map(|_| bitstack_quant::format::synthetic::random_block(m, n, k, 1.0, &mut rng))
        .collect();
    WeightStack::new(m, n, k, blocks)
}

/// The `m×n` weight `w` as `planes` grid planes of the default layout
/// (`compress --layout planes`: groups of 128 columns, one exact weight
/// per group, 8-bit grid numbers), host-resident.
pub fn grid_stack(w: &Tensor, planes: usize) -> Result<WeightStack> {
    rotated_grid_stack(w, planes, None)
}

/// As [`grid_stack`], the planes fitted to `W·R` when `rotation` is given
/// (`compress --rotate`), so that the stack's forward rotates its input.
pub fn rotated_grid_stack(
    w: &Tensor,
    planes: usize,
    rotation: Option<RotationConfig>,
) -> Result<WeightStack> {
    let (m, n) = w.dims2()?;
    let mut values: Vec<f32> = w.flatten_all()?.to_vec1()?;
    if let Some(r) = rotation {
        rotate_rows(&mut values, r.block, &r.signs(0..n), Direction::Forward);
    }
    let cfg = GridConfig::new(planes);
    let gp = grid_planes(&values, m, n, cfg)?;
    let rotation = rotation
        .map(|r| InputRotation::new(r, 0..n).map(Arc::new))
        .transpose()?;
    WeightStack::from_parts(m, n, 1, WeightStack::grid_parts(&gp, cfg, m, n))?
        .with_rotation(rotation)
}

/// A random dense `m×n` f32 weight (entries Gaussian, standard deviation `1/√n`).
pub fn random_dense(m: usize, n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = 1.0 / (n as f32).sqrt();
    let w: Vec<f32> = (0..m * n)
        .map(|_| s * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(w, (m, n), &Device::Cpu)?)
}

/// A random `rows×n` f32 input with standard Gaussian entries.
pub fn random_input(rows: usize, n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..rows * n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(x, (rows, n), &Device::Cpu)?)
}

/// `stack` as a bias-free [`Linear`].
pub fn stack_linear(stack: WeightStack) -> Linear {
    Linear {
        weight: LinearWeight::BitStack(Arc::new(stack)),
        bias: None,
    }
}

/// How the dense products hand candle `Wᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLayout {
    /// `x.matmul(&w.t())` on the row-major `m×n` weight: the transposed view
    /// is a column-major right-hand side, which candle's `gemm` reads in
    /// place. The layout a checkpoint stores and [`Linear`] uses.
    View,
    /// `x.matmul(&wt)` with `Wᵀ` copied once into a contiguous `n×m` tensor.
    Contiguous,
}

impl DenseLayout {
    pub const ALL: [DenseLayout; 2] = [DenseLayout::View, DenseLayout::Contiguous];
}

/// Candle's products with one random dense `m×n` weight: f32 and f16 (each
/// in both [`DenseLayout`]s) and Q4_K.
///
/// Neither layout wins everywhere: measured on an AVX2 machine, the view was
/// clearly faster for one row in f16 on small shapes, the contiguous copy
/// often faster for 512 rows in f16, and f32 mostly a wash.
/// [`super::measure::run`] times both and reports the faster, so the
/// baselines are candle at its best.
pub struct DenseBaselines {
    /// `W`, row-major `m×n`.
    pub w_f32: Tensor,
    pub w_f16: Tensor,
    /// `Wᵀ`, contiguous `n×m`.
    pub wt_f32: Tensor,
    pub wt_f16: Tensor,
    /// `None` when `n` is not a multiple of [`Q4K_BLOCK`].
    pub q4k: Option<QMatMul>,
}

impl DenseBaselines {
    pub fn new(w: Tensor) -> Result<Self> {
        let (_, n) = w.dims2()?;
        let q4k = if n.is_multiple_of(Q4K_BLOCK) {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K)?)?;
            if !matches!(q, QMatMul::QTensor(_)) {
                bail!(
                    "candle dequantizes Q4K weights (CANDLE_DEQUANTIZE_ALL or CANDLE_DEQUANTIZE_ALL_F16 is set): unset it to time the quantized product"
                );
            }
            Some(q)
        } else {
            None
        };
        let w_f16 = w.to_dtype(DType::F16)?;
        Ok(Self {
            wt_f32: w.t()?.contiguous()?,
            wt_f16: w_f16.t()?.contiguous()?,
            w_f32: w,
            w_f16,
            q4k,
        })
    }

    /// A random weight's baselines (see [`random_dense`]).
    pub fn random(m: usize, n: usize, seed: u64) -> Result<Self> {
        Self::new(random_dense(m, n, seed)?)
    }

    /// `x·Wᵀ` in `x`'s dtype (f32 or f16, cast outside any timing); `x` is `rows×n`.
    pub fn forward(&self, x: &Tensor, layout: DenseLayout) -> candle_core::Result<Tensor> {
        let f16 = x.dtype() == DType::F16;
        match (layout, f16) {
            (DenseLayout::View, false) => x.matmul(&self.w_f32.t()?),
            (DenseLayout::View, true) => x.matmul(&self.w_f16.t()?),
            (DenseLayout::Contiguous, false) => x.matmul(&self.wt_f32),
            (DenseLayout::Contiguous, true) => x.matmul(&self.wt_f16),
        }
    }

    /// `x·Wᵀ` with the Q4_K weight; `x` is `rows×n` f32.
    pub fn forward_q4k(&self, x: &Tensor) -> Option<candle_core::Result<Tensor>> {
        self.q4k.as_ref().map(|q| q.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x·Wᵀ` in f64 from the row-major `w`.
    fn reference(x: &[f32], w: &[f32], rows: usize, m: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * m];
        for r in 0..rows {
            for i in 0..m {
                y[r * m + i] = (0..n)
                    .map(|j| x[r * n + j] as f64 * w[i * n + j] as f64)
                    .sum();
            }
        }
        y
    }

    /// Largest error relative to the largest reference magnitude.
    fn relative_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-12);
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max)
            / scale
    }

    #[test]
    fn the_random_stack_forward_is_its_dense_product() {
        for (m, n, k, blocks, rows) in [
            (64, 256, 4, 2, 3),
            (33, 40, 4, 3, 1),
            (7, 9, 3, 1, 5),
            (1, 13, 1, 2, 2),
        ] {
            let stack = random_stack(m, n, k, blocks, 7);
            assert_eq!(stack.blocks.len(), blocks);
            assert!(stack.blocks.iter().filter_map(|b| b.host()).all(|b| (
                b.signs.m(),
                b.signs.n()
            ) == (m, n)
                && b.u.len() == m * k
                && b.vt.len() == k * n));
            assert!(stack.is_on_host());
            let w = stack.dense().unwrap();
            let x = random_input(rows, n, 8).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&xs, &w, rows, m, n);
            let y = stack_linear(stack).forward(&x).unwrap();
            assert_eq!(y.dims(), &[rows, m]);
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let err = relative_error(&got, &want);
            // A few rows run the shuffle kernel, whose tables are quantized.
            let bound = bitstack_kernels::tmac::RELATIVE_RMS_ERROR_BOUND as f64;
            assert!(
                err < bound,
                "{m}x{n}, {blocks} blocks: relative error {err}"
            );
        }
    }

    #[test]
    fn grid_stacks_approach_their_dense_weight_plane_by_plane() {
        for (m, n, rows) in [(64, 256, 3), (33, 40, 1), (1, 300, 2)] {
            let w = random_dense(m, n, 5).unwrap();
            let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let x = random_input(rows, n, 6).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&xs, &ws, rows, m, n);
            let full = grid_stack(&w, 6).unwrap();
            assert_eq!((full.blocks.len(), full.planes.len()), (0, 6));
            let mut last = f64::INFINITY;
            for p in [2, 4, 6] {
                let stack = full.prefix(p);
                let bytes = stack.resident_bytes();
                let y = stack_linear(stack).forward(&x).unwrap();
                assert_eq!(y.dims(), &[rows, m]);
                let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let err = relative_error(&got, &want);
                assert!(err < last, "{m}x{n}: {p} planes err {err} ≥ {last}");
                last = err;
                // p bits of signs and the grid: more than p bits per weight,
                // and under half a bit more where no tile is padded and the
                // per-row steps spread over many columns.
                let bpw = bitstack_quant::bits_per_weight(bytes, m * n);
                assert!(bpw > p as f64, "{m}x{n}, {p} planes: {bpw}");
                if m % 32 == 0 && n >= 256 {
                    assert!(bpw < p as f64 + 0.5, "{m}x{n}, {p} planes: {bpw}");
                }
            }
            assert!(last < 0.05, "{m}x{n}: 6 planes err {last}");
        }
    }

    #[test]
    fn the_bits_per_weight_of_blocks_count_their_resident_bytes() {
        for (m, n, k, b) in [(64, 256, 4, 3), (33, 40, 2, 1)] {
            let bytes = random_stack(m, n, k, b, 1).resident_bytes();
            let bpw = bitstack_quant::bits_per_weight(bytes, m * n);
            let formula = super::super::measure::stack_bits_per_weight(m, n, k, b);
            assert!((bpw - formula).abs() < 1e-12, "{bpw} vs {formula}");
        }
    }

    #[test]
    fn the_baselines_compute_the_same_product() {
        for (m, n) in [(48, 512), (33, 40)] {
            let base = DenseBaselines::random(m, n, 3).unwrap();
            let w: Vec<f32> = base.w_f32.flatten_all().unwrap().to_vec1().unwrap();
            let x = random_input(4, n, 4).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&xs, &w, 4, m, n);
            let flat = |t: Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let x16 = x.to_dtype(DType::F16).unwrap();
            for layout in DenseLayout::ALL {
                let f32_err = relative_error(&flat(base.forward(&x, layout).unwrap()), &want);
                assert!(f32_err < 1e-5, "f32 {layout:?}: {f32_err}");
                let y16 = base.forward(&x16, layout).unwrap();
                assert_eq!(y16.dtype(), DType::F16);
                let f16_err = relative_error(&flat(y16), &want);
                assert!(f16_err < 1e-2, "f16 {layout:?}: {f16_err}");
            }
            match base.forward_q4k(&x) {
                Some(y) => {
                    assert!(n.is_multiple_of(Q4K_BLOCK));
                    let q_err = relative_error(&flat(y.unwrap()), &want);
                    assert!(q_err < 0.2, "Q4K: {q_err}");
                }
                None => assert!(!n.is_multiple_of(Q4K_BLOCK)),
            }
        }
    }
}
