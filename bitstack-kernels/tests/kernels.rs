//! Every kernel, on every instruction set this CPU runs, against the f64
//! reference on random stacks of awkward shapes.

use std::sync::Arc;

use bitstack_kernels::{
    decode, prefill, reference, BlockRef, Isa, StackRef, StackSource, TiledSigns,
};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The owned parts of a random stack: its signs drawn row-major, as a
/// checkpoint stores them, and re-tiled for the kernels.
struct Owned {
    m: usize,
    n: usize,
    k: usize,
    blocks: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)>,
    tiled: Vec<TiledSigns>,
}

impl Owned {
    fn random(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> Self {
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

fn random_x(rows: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * n)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect()
}

/// Fails unless `got` is `want` within `tol` of the output's RMS, element by element.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len().max(1) as f32).sqrt();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (rms + 1e-6),
            "{what}: element {i} is {g}, the reference says {w} (rms {rms})"
        );
    }
}

/// (m, n, k, blocks): n not a multiple of 8 or of the group size, one row of
/// W, k = 1, 4, 16 and 1 or 16 blocks.
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 13, 1, 1),
    (7, 9, 3, 2),
    (33, 65, 4, 5),
    (19, 8, 16, 16),
    (70, 200, 16, 4),
    (5, 1030, 4, 1),
    (129, 77, 1, 16),
    (40, 96, 5, 3),
];

#[test]
fn decode_matches_the_reference_on_every_isa() {
    for (s, &(m, n, k, nb)) in SHAPES.iter().enumerate() {
        let owned = Owned::random(m, n, k, nb, s as u64);
        let stack = owned.stack();
        for rows in 1..=decode::MAX_ROWS {
            let x = random_x(rows, n, 100 + s as u64);
            let mut want = vec![0f32; rows * m];
            reference::matmul_t(&x, rows, &owned.stack(), &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * m];
                decode::matmul_t(isa, &x, rows, &stack, &mut got);
                assert_close(
                    &got,
                    &want,
                    1e-4,
                    &format!("decode {isa:?} {m}×{n} k{k} ×{nb}, {rows} rows"),
                );
            }
        }
    }
}

#[test]
fn prefill_matches_the_reference_on_every_isa() {
    for (s, &(m, n, k, nb)) in SHAPES.iter().enumerate() {
        let owned = Owned::random(m, n, k, nb, 50 + s as u64);
        let stack = owned.stack();
        for rows in [1, 3, 600] {
            let x = random_x(rows, n, 200 + s as u64);
            let mut want = vec![0f32; rows * m];
            reference::matmul_t(&x, rows, &owned.stack(), &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * m];
                prefill::matmul_t(isa, &x, rows, &stack, &mut got);
                assert_close(
                    &got,
                    &want,
                    1e-4,
                    &format!("prefill {isa:?} {m}×{n} k{k} ×{nb}, {rows} rows"),
                );
            }
        }
    }
}

#[test]
fn the_candle_op_takes_f32_f16_and_bf16() {
    let owned = Arc::new(Owned::random(37, 90, 4, 3, 9));
    // 9 and 20 rows cross the decode kernel's 8-row steps.
    for rows in [1, 2, 9, 20, 45] {
        let x = random_x(rows, 90, 7);
        let mut want = vec![0f32; rows * 37];
        reference::matmul_t(&x, rows, &owned.stack(), &mut want);
        let xt = Tensor::from_vec(x, (1, rows, 90), &Device::Cpu).unwrap();
        // Activations rounded to the dtype, then f32 math: the error is the
        // rounding of the inputs and of the outputs, and for a few rows the
        // shuffle kernel's quantized tables.
        let f32_tol = if rows <= bitstack_kernels::DECODE_MAX_ROWS {
            bitstack_kernels::tmac::RELATIVE_MAX_ERROR_BOUND
        } else {
            1e-4
        };
        for (dtype, tol) in [
            (DType::F32, f32_tol),
            (DType::F16, 1e-2),
            (DType::BF16, 5e-2),
        ] {
            let y = bitstack_kernels::op::matmul_t(&xt.to_dtype(dtype).unwrap(), owned.clone())
                .unwrap();
            assert_eq!(y.dims(), &[1, rows, 37]);
            assert_eq!(y.dtype(), dtype);
            let got: Vec<f32> = y
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_close(&got, &want, tol, &format!("{dtype:?}, {rows} rows"));
        }
    }
    // A wrong feature count is an error, not a panic.
    let bad = Tensor::zeros((2, 91), DType::F32, &Device::Cpu).unwrap();
    let e = bitstack_kernels::op::matmul_t(&bad, owned.clone()).unwrap_err();
    assert!(e.to_string().contains("91 features"), "{e}");
}

#[test]
fn an_empty_stack_gives_zeros() {
    let owned = Owned::random(6, 10, 2, 0, 1);
    let x = random_x(2, 10, 3);
    for isa in Isa::available() {
        let mut got = vec![f32::NAN; 12];
        decode::matmul_t(isa, &x, 2, &owned.stack(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
        let mut got = vec![f32::NAN; 12];
        prefill::matmul_t(isa, &x, 2, &owned.stack(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
        let mut got = vec![f32::NAN; 12];
        bitstack_kernels::matmul_t(&x, 2, &owned.stack(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
    }
}
