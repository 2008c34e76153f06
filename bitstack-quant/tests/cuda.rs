//! Device-resident stacks on a CUDA GPU (feature `cuda`; run by
//! `scripts/device-check.sh` from the bundle `scripts/build-cuda.sh` makes).
//!
//! A model opened on CUDA keeps its blocks on the device only: it computes
//! what the same model on the CPU computes, its weights rebuild on the
//! device as the host rebuilds them, and a shrink gives device memory back
//! to the driver (a grow takes it again, reading the blocks anew).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use bitstack_kernels::cuda::memory::{pool_bytes, PoolBytes};
use bitstack_kernels::{OwnedBlock, TiledSigns};
use bitstack_quant::format::block::BlockShape;
use bitstack_quant::format::grid::{grid_planes, GridCoding, GridConfig};
use bitstack_quant::format::synthetic::{random_block, SyntheticSpec};
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::residence::Residence;
use bitstack_quant::runtime::stack::{StackBlock, StackPart, StackPlane, WeightStack};
use candle_core::backend::BackendDevice;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

/// Free device memory after the queued work and frees have run.
fn free_bytes(device: &Device) -> usize {
    let Device::Cuda(d) = device else {
        unreachable!("a CUDA device")
    };
    d.synchronize().unwrap();
    d.cuda_stream().context().mem_get_info().unwrap().0
}

/// What the memory pool of the device's allocations holds.
fn pool(device: &Device) -> PoolBytes {
    let Device::Cuda(d) = device else {
        unreachable!("a CUDA device")
    };
    pool_bytes(d).unwrap()
}

/// Tile-aligned shapes (rows a multiple of 16, columns of 64), so that
/// device bytes are the checkpoint's bytes.
fn spec() -> SyntheticSpec {
    SyntheticSpec {
        hidden: 256,
        intermediate: 640,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        ..Default::default()
    }
}

fn logits(handle: &BitStackHandle, device: &Device, vocab: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..9u32).map(|i| (i * 53 + 7) % vocab as u32).collect();
    let tokens = Tensor::from_slice(&ids, (1, ids.len()), device).unwrap();
    handle
        .snapshot()
        .forward(&tokens)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn stacks(handle: &BitStackHandle) -> Vec<Arc<WeightStack>> {
    handle
        .snapshot()
        .linears()
        .filter_map(|(_, _, l)| match &l.weight {
            LinearWeight::BitStack(s) => Some(s.clone()),
            LinearWeight::Dense(_) => None,
        })
        .collect()
}

/// Largest |a − b| over the largest |b|.
fn relative_max_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn a_model_on_cuda_keeps_its_blocks_on_the_device_and_computes_what_the_cpu_does() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("packed");
    let spec = spec();
    spec.write_bitstack(&dir, 4, 8).unwrap();
    let gpu = cuda();
    let on_cpu = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    let on_gpu = BitStackHandle::open(&dir, None, &gpu).unwrap();

    for s in stacks(&on_gpu) {
        assert!(!s.is_on_host(), "a {}×{} stack kept a host copy", s.m, s.n);
    }
    for s in stacks(&on_cpu) {
        assert!(s.is_on_host());
    }
    // Device bytes: the ladder's figure for tile-aligned shapes.
    let blocks = |h: &BitStackHandle| h.snapshot().stack_bytes();
    assert_eq!(blocks(&on_gpu), blocks(&on_cpu));

    // At three levels, the logits and every rebuilt weight agree.
    let top = on_gpu.max_level();
    for level in [0, top / 2, top] {
        on_cpu.set_level(level).unwrap();
        on_gpu.set_level(level).unwrap();
        let (want, got) = (
            logits(&on_cpu, &Device::Cpu, spec.vocab),
            logits(&on_gpu, &gpu, spec.vocab),
        );
        // f16 tensor-core operands against f32 on the CPU.
        let err = relative_max_error(&got, &want);
        assert!(err < 2e-2, "level {level}: logits differ by {err}");
        for (c, g) in stacks(&on_cpu).iter().zip(stacks(&on_gpu)) {
            let want = c.dense().unwrap();
            let e = g.dense().unwrap_err().to_string();
            assert!(e.contains("CUDA device only"), "{e}");
            let got: Vec<f32> = g
                .dense_tensor(&gpu, DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = relative_max_error(&got, &want);
            assert!(err < 1e-5, "level {level}: {}×{} weight {err}", c.m, c.n);
        }
    }
}

#[test]
fn shrinking_a_model_on_cuda_gives_device_memory_back() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("packed");
    // Big enough that the blocks dwarf the driver's 2 MiB pages.
    let spec = SyntheticSpec {
        hidden: 1024,
        intermediate: 2816,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        vocab: 512,
        ..Default::default()
    };
    spec.write_bitstack(&dir, 6, 16).unwrap();
    let gpu = cuda();
    let handle = BitStackHandle::open(&dir, None, &gpu).unwrap();
    let top = logits(&handle, &gpu, spec.vocab);
    let full = handle.snapshot().stack_bytes();

    let (before, pool_before) = (free_bytes(&gpu), pool(&gpu));
    handle.set_level(0).unwrap();
    handle.wait_released();
    let floor = handle.snapshot().stack_bytes();
    let (after, pool_after) = (free_bytes(&gpu), pool(&gpu));
    let freed = after as i64 - before as i64;
    let dropped = (full - floor) as i64;
    let report = format!(
        "shrinking dropped {dropped} B of blocks ({full} → {floor}); the driver got {freed} B back; \
         the memory pool went from {pool_before:?} to {pool_after:?}"
    );
    eprintln!("{report}");
    // Freed buffers reach the pool first; the shrink must also empty the
    // pool's chunks back to the driver.
    assert!(freed >= dropped * 9 / 10, "{report}");

    let before = free_bytes(&gpu);
    handle.set_level(handle.max_level()).unwrap();
    let taken = before as i64 - free_bytes(&gpu) as i64;
    assert!(
        taken >= dropped * 9 / 10,
        "growing read {dropped} B of blocks but took {taken} B"
    );
    // The blocks read again are the ones dropped.
    assert_eq!(logits(&handle, &gpu, spec.vocab), top);
}

#[test]
fn device_resident_grid_planes_rebuild_and_run_as_host_ones_at_every_prefix() {
    let mut rng = StdRng::seed_from_u64(3);
    let gpu = cuda();
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let device = Residence::Cuda(dev.clone());
    for (m, n, k, avd, group, outliers, coding) in [
        (37, 200, 4, 2, 128, 1, GridCoding::Int8),
        (16, 64, 2, 0, 32, 2, GridCoding::F16),
        (20, 96, 1, 0, 32, 1, GridCoding::Int8Scaled),
    ] {
        let cfg = GridConfig {
            planes: 4,
            group,
            outliers,
            coding,
        };
        let shape = BlockShape { m, n, k };
        let blocks: Vec<OwnedBlock> = (0..avd)
            .map(|_| {
                let b = random_block(m, n, k, 0.1, &mut rng);
                OwnedBlock::from_row_major(&b.signs, m, n, b.u, b.vt)
            })
            .collect();
        let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut gp = grid_planes(&r, m, n, cfg).unwrap();
        if coding == GridCoding::Int8Scaled {
            // Far from 1, so that a scale the device misses shows.
            gp.grid.prefix_scale = vec![0.6, 0.8, 1.3, 0.9];
        }
        let parts = |residence: &Residence| -> Vec<StackPart> {
            let mut parts: Vec<StackPart> = blocks
                .iter()
                .map(|b| {
                    StackPart::Block(Arc::new(
                        StackBlock::place(b.clone(), shape, residence).unwrap(),
                    ))
                })
                .collect();
            for (p, signs) in gp.planes.iter().enumerate() {
                let grid = (p == 0).then(|| (cfg, gp.grid.clone()));
                let signs = TiledSigns::from_row_major(signs, m, n);
                let plane = StackPlane::place(signs, grid, residence).unwrap();
                parts.push(StackPart::Plane(Arc::new(plane)));
            }
            parts
        };
        let host = WeightStack::from_parts(m, n, k, parts(&Residence::Host)).unwrap();
        let on_gpu = WeightStack::from_parts(m, n, k, parts(&device)).unwrap();
        assert!(!on_gpu.is_on_host());
        for level in 1..=host.len() {
            let (h, g) = (host.prefix(level), on_gpu.prefix(level));
            let want = h.dense().unwrap();
            let got: Vec<f32> = g
                .dense_tensor(&gpu, DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = relative_max_error(&got, &want);
            assert!(err < 1e-5, "{m}×{n} level {level}: weight {err}");
            // Decode (1 row) through the kernels.
            let x = Tensor::randn(0f32, 1.0, (1, n), &gpu).unwrap();
            let y = bitstack_kernels::op::bitstack_matmul(&x, Arc::new(g.clone()))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = (0..m)
                .map(|i| (0..n).map(|c| want[i * n + c] * xs[c]).sum())
                .collect();
            let err = relative_max_error(&y, &want);
            assert!(err < 2e-2, "{m}×{n} level {level}: decode {err}");
        }
    }
}

/// Rotated inputs (format version 4) on the device: the input rotation runs
/// as a product with `H` there, and a device-rebuilt weight is turned back
/// as the host turns it back.
#[test]
fn a_rotated_checkpoint_on_cuda_computes_what_the_cpu_does() {
    use bitstack_quant::format::rotation::RotationConfig;
    use bitstack_quant::method::compress::{compress, CompressOptions, Rotation};
    let root = tempfile::tempdir().unwrap();
    let spec = spec();
    let dense = root.path().join("dense");
    spec.write(&dense).unwrap();
    let calib = root.path().join("calib.txt");
    std::fs::write(&calib, "rotated on the device. ".repeat(60)).unwrap();
    let dir = root.path().join("rotated");
    let opts = CompressOptions {
        grid: Some(GridConfig {
            group: 64,
            ..GridConfig::new(4)
        }),
        rotation: Rotation::Fixed(RotationConfig::new(64)),
        calib_windows: 2,
        seq_len: 32,
        batch: 2,
        ..CompressOptions::recommended(calib)
    };
    compress(&dense, &dir, &opts).unwrap();
    let gpu = cuda();
    let on_cpu = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    let on_gpu = BitStackHandle::open(&dir, None, &gpu).unwrap();
    let top = on_gpu.max_level();
    for level in [0, top / 2, top] {
        on_cpu.set_level(level).unwrap();
        on_gpu.set_level(level).unwrap();
        let err = relative_max_error(
            &logits(&on_gpu, &gpu, spec.vocab),
            &logits(&on_cpu, &Device::Cpu, spec.vocab),
        );
        assert!(err < 2e-2, "level {level}: logits differ by {err}");
        for (c, g) in stacks(&on_cpu).iter().zip(stacks(&on_gpu)) {
            assert!(g.rotation.is_some());
            let got: Vec<f32> = g
                .dense_tensor(&gpu, DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = relative_max_error(&got, &c.dense().unwrap());
            assert!(err < 1e-5, "level {level}: {}×{} weight {err}", c.m, c.n);
        }
    }
}
