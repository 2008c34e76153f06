//! Every kernel, on every instruction set this CPU runs, against the f64
//! reference on random stacks of awkward shapes.

use std::sync::Arc;

use bitstack_kernels::cuda::pack;
use bitstack_kernels::decode::{self, table_matmul_t};
use bitstack_kernels::prefill::panel_matmul_t;
use bitstack_kernels::reference::reference_matmul_t;
use bitstack_kernels::{Isa, TiledSigns};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::{assert_close, random_stack, random_x, values};

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
        let owned = random_stack(m, n, k, nb, s as u64);
        let stack = owned.stack_ref();
        for rows in 1..=decode::MAX_ROWS {
            let x = random_x(rows, n, 100 + s as u64);
            let mut want = vec![0f32; rows * m];
            reference_matmul_t(&x, rows, &owned.stack_ref(), &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * m];
                table_matmul_t(isa, &x, rows, &stack, &mut got);
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
        let owned = random_stack(m, n, k, nb, 50 + s as u64);
        let stack = owned.stack_ref();
        for rows in [1, 3, 600] {
            let x = random_x(rows, n, 200 + s as u64);
            let mut want = vec![0f32; rows * m];
            reference_matmul_t(&x, rows, &owned.stack_ref(), &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * m];
                panel_matmul_t(isa, &x, rows, &stack, &mut got);
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
    let owned = Arc::new(random_stack(37, 90, 4, 3, 9));
    // 9 and 20 rows cross the decode kernel's 8-row steps.
    for rows in [1, 2, 9, 20, 45] {
        let x = random_x(rows, 90, 7);
        let mut want = vec![0f32; rows * 37];
        reference_matmul_t(&x, rows, &owned.stack_ref(), &mut want);
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
            let y =
                bitstack_kernels::op::bitstack_matmul(&xt.to_dtype(dtype).unwrap(), owned.clone())
                    .unwrap();
            assert_eq!(y.dims(), &[1, rows, 37]);
            assert_eq!(y.dtype(), dtype);
            let got = values(&y);
            assert_close(&got, &want, tol, &format!("{dtype:?}, {rows} rows"));
        }
    }
    // A wrong feature count is an error, not a panic.
    let bad = Tensor::zeros((2, 91), DType::F32, &Device::Cpu).unwrap();
    let e = bitstack_kernels::op::bitstack_matmul(&bad, owned.clone()).unwrap_err();
    assert!(e.to_string().contains("91 features"), "{e}");
}

#[test]
fn an_empty_stack_gives_zeros() {
    let owned = random_stack(6, 10, 2, 0, 1);
    let x = random_x(2, 10, 3);
    for isa in Isa::available() {
        let mut got = vec![f32::NAN; 12];
        table_matmul_t(isa, &x, 2, &owned.stack_ref(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
        let mut got = vec![f32::NAN; 12];
        panel_matmul_t(isa, &x, 2, &owned.stack_ref(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
        let mut got = vec![f32::NAN; 12];
        bitstack_kernels::stack_matmul_t(&x, 2, &owned.stack_ref(), &mut got);
        assert!(got.iter().all(|&v| v == 0.0));
    }
}

/// The CUDA decode kernel's sign layout, read back the way the kernel reads
/// it: lane `l`, 16-column step `s`, A register `reg` holds row
/// `l/4 + 8·(reg odd)` and columns `16s + 2(l%4) + 8·(reg ≥ 2)` (bit
/// `4s + reg`) and the column after it (bit `4s + reg + 16`); set = −1.
#[test]
fn mma_sign_words_hold_every_sign_where_the_tensor_core_fragment_wants_it() {
    for (seed, (m, n)) in [
        (1usize, 1usize),
        (16, 64),
        (17, 65),
        (3, 200),
        (40, 129),
        (33, 7),
        (15, 63),
        (100, 300),
        (257, 1000),
        (2, 4097),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(seed as u64);
        let bytes: Vec<u8> = (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect();
        let signs = TiledSigns::from_row_major(&bytes, m, n);
        let words = pack::mma_sign_words(&signs);
        assert_eq!(words.len(), pack::words_for(m, n));
        let chunks = n.div_ceil(pack::CHUNK_COLS);
        let mut seen = vec![false; m * n];
        for (w, &word) in words.iter().enumerate() {
            let (lane, piece) = (w % 32, w / 32);
            let (tile, chunk) = (piece / chunks, piece % chunks);
            for step in 0..4 {
                for reg in 0..4 {
                    for half in 0..2 {
                        let row = tile * 16 + lane / 4 + 8 * (reg % 2);
                        let col = chunk * 64 + step * 16 + 2 * (lane % 4) + 8 * (reg / 2) + half;
                        let negative = (word >> (4 * step + reg + 16 * half)) & 1 == 1;
                        if row < m && col < n {
                            assert_eq!(
                                negative,
                                !signs.sign(row, col),
                                "{m}×{n}: sign of ({row}, {col})"
                            );
                            seen[row * n + col] = true;
                        } else {
                            assert!(!negative, "{m}×{n}: padding ({row}, {col}) is set");
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s), "{m}×{n}: some sign has no bit");
    }
}

/// Decode called from rayon tasks, while the calling threads are inside
/// other decode calls (a model run from a parallel iterator): the per-thread
/// scratch buffers are taken, and each call must still give the reference.
#[test]
fn nested_decode_calls_from_rayon_tasks_match_the_reference() {
    use rayon::prelude::*;
    let (m, n, rows) = (700, 1030, 4);
    let stacks: Vec<_> = (0..4)
        .map(|s| common::random_grid_stack(m, n, 4, 3, 128, 2, 1, 900 + s))
        .collect();
    let x = random_x(rows, n, 7);
    let want: Vec<Vec<f32>> = stacks
        .iter()
        .map(|owned| {
            let mut want = vec![0f32; rows * m];
            reference_matmul_t(&x, rows, &owned.stack_ref(), &mut want);
            want
        })
        .collect();
    // More threads than cores, so that threads waiting inside a call steal
    // the outer loop's tasks.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(8)
        .build()
        .unwrap();
    for isa in Isa::available() {
        pool.install(|| {
            (0..32usize).into_par_iter().for_each(|i| {
                let (owned, want) = (&stacks[i % stacks.len()], &want[i % stacks.len()]);
                let mut got = vec![f32::NAN; rows * m];
                table_matmul_t(isa, &x, rows, &owned.stack_ref(), &mut got);
                assert_close(&got, want, 1e-4, &format!("nested {isa:?}"));
            })
        });
    }
}
