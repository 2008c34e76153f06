//! The CUDA kernels (feature `cuda`, and a CUDA device to run on) against
//! the f64 CPU reference, on fresh random stacks of awkward shapes each run.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use bitstack_kernels::reference::reference_matmul_t;
use bitstack_kernels::{OwnedStack, StackSource};
use candle_core::{DType, Device, Tensor};

mod common;
use common::{random_grid_stack, random_stack, random_x, values};

/// RMS error relative to the reference's RMS, per activation dtype: the
/// operands of the tensor cores are rounded to f16 (f32 and f16
/// activations) or bf16.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        _ => 3e-3,
    }
}

fn device() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Fills freed device memory with NaN so that an output element a kernel
/// forgets to write shows up (the allocator hands the memory out again).
fn poison(device: &Device) {
    let nan = Tensor::full(f32::NAN, 16 << 20, device).unwrap();
    drop(nan.sum_all().unwrap());
}

fn check(owned: &Arc<OwnedStack>, rows: usize, seed: u64, device: &Device) {
    let (m, n) = (owned.m, owned.n);
    let x = random_x(rows, n, seed);
    let xt = Tensor::from_vec(x, (rows, n), device).unwrap();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        // The reference sees the inputs the kernel sees (rounded to the
        // dtype): a short row's sum can cancel, and the inputs' rounding
        // would then dwarf the kernel's own error.
        let x_in = xt.to_dtype(dtype).unwrap();
        let x_seen = values(&x_in);
        let mut want = vec![0f32; rows * m];
        reference_matmul_t(&x_seen, rows, &owned.stack_ref(), &mut want);
        let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len().max(1) as f32).sqrt();
        poison(device);
        let y = bitstack_kernels::op::bitstack_matmul(&x_in, owned.clone()).unwrap();
        assert_eq!(y.dims(), &[rows, m]);
        assert_eq!(y.dtype(), dtype);
        let got = values(&y);
        let what = format!(
            "{m}×{n} k{} ×{} blocks, {rows} rows, {dtype:?}",
            owned.k,
            owned.blocks.len()
        );
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what}: an output is not finite (unwritten?)"
        );
        let err = (got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).powi(2))
            .sum::<f32>()
            / got.len() as f32)
            .sqrt();
        let rel = err / (rms + 1e-12);
        println!("{what}: relative RMS error {rel:.2e}");
        assert!(
            rel <= tolerance(dtype),
            "{what}: relative RMS error {rel:.2e} > {:.0e}",
            tolerance(dtype)
        );
    }
}

fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    seed
}

#[test]
fn decode_and_prefill_match_the_reference() {
    let device = device();
    let seed = seed();
    // (m, n, k, blocks): rows of W not a multiple of 16, columns not a
    // multiple of 64 or 256, one row, k = 1, 4, 16, 1 and 16 blocks.
    let shapes = [
        (1, 13, 1, 1),
        (17, 65, 4, 5),
        (130, 300, 16, 2),
        (33, 1030, 4, 16),
        (300, 257, 3, 3),
        (129, 77, 16, 1),
    ];
    for (s, &(m, n, k, nb)) in shapes.iter().enumerate() {
        let owned = Arc::new(random_stack(m, n, k, nb, seed.wrapping_add(s as u64)));
        // 1–32 rows decode, more prefill.
        for rows in [1, 3, 8, 32, 33, 600] {
            check(&owned, rows, seed ^ (rows as u64), &device);
        }
    }
}

#[test]
fn grid_planes_match_the_reference() {
    let device = device();
    let seed = seed();
    // (m, n, k, blocks, group, planes, outliers): rows of W not a multiple
    // of 16, columns not a multiple of 64 or of the group, groups that do
    // and do not divide 64, the grid alone and after blocks.
    let shapes = [
        (1, 9, 1, 0, 4, 1, 1),
        (17, 70, 4, 2, 16, 3, 2),
        (130, 300, 4, 0, 128, 4, 1),
        (33, 1030, 4, 3, 128, 5, 0),
        (300, 257, 3, 1, 12, 2, 1),
        (129, 77, 16, 0, 256, 3, 2),
    ];
    for (s, &(m, n, k, nb, group, planes, o)) in shapes.iter().enumerate() {
        let owned = random_grid_stack(m, n, k, nb, group, planes, o, seed.wrapping_add(s as u64));
        let owned = Arc::new(owned);
        for rows in [1, 3, 8, 32, 33, 600] {
            check(&owned, rows, seed ^ (rows as u64), &device);
        }
    }
}

#[test]
fn a_large_stack_is_split_across_thread_blocks_and_summed() {
    let device = device();
    let seed = seed();
    let owned = Arc::new(random_stack(4099, 4111, 4, 2, seed));
    check(&owned, 1, seed, &device);
    check(&owned, 5, seed + 1, &device);
}

#[test]
fn an_empty_stack_gives_zeros_and_a_wrong_width_is_an_error() {
    let device = device();
    let owned = Arc::new(random_stack(6, 10, 2, 0, 1));
    let x = Tensor::ones((2, 10), DType::F16, &device).unwrap();
    let y = bitstack_kernels::op::bitstack_matmul(&x, owned.clone()).unwrap();
    let y = values(&y);
    assert_eq!(y, vec![0.0; 12]);
    let bad = Tensor::ones((2, 11), DType::F16, &device).unwrap();
    let e = bitstack_kernels::op::bitstack_matmul(&bad, owned as Arc<dyn StackSource>).unwrap_err();
    assert!(e.to_string().contains("11 features"), "{e}");
}
