//! Tensor-parallel ranks hold slices of the one-process model: at every
//! level, rank r's column-parallel stacks rebuild rows r·m/w… of the whole
//! weight and its row-parallel ones columns r·n/w…, exactly; the ranks'
//! bytes add up to the whole plus the factors each keeps whole; a world that does not divide the model is
//! refused before anything is loaded.

mod common;

use std::path::Path;

use bitstack_quant::format::architecture::LinearKind;
use bitstack_quant::format::grid::{GridCoding, GridConfig};
use bitstack_quant::format::rotation::RotationConfig;
use bitstack_quant::format::shard::{Split, TensorParallel};
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::{compress, CompressOptions, Rotation};
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::placement::Placement;
use bitstack_quant::runtime::stack::WeightStack;
use bitstack_quant::Checkpoint;
use candle_core::Device;

/// Every split dimension a multiple of 32 rows per rank (the CPU sign
/// tiles) at two ranks, so bytes add up exactly.
fn spec() -> SyntheticSpec {
    SyntheticSpec {
        hidden: 128,
        intermediate: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 300,
        ..Default::default()
    }
}

/// An AVD checkpoint written directly, a compressed one ending in grid
/// planes, and one of grid planes on rotated inputs.
fn checkpoints(root: &Path) -> Vec<std::path::PathBuf> {
    let avd = root.join("avd");
    spec().write_bitstack(&avd, 4, 8).unwrap();
    let dense = root.join("dense");
    spec().write(&dense).unwrap();
    let calib = root.join("calib.txt");
    std::fs::write(&calib, "slices of a stack, rank by rank. ".repeat(40)).unwrap();
    let grid = root.join("grid");
    let options = CompressOptions {
        grid: Some(GridConfig {
            planes: 3,
            group: 16,
            ..GridConfig::new(3)
        }),
        ..common::small_options(calib, 4, 1)
    };
    compress(&dense, &grid, &options).unwrap();
    // Grid planes alone on rotated inputs (format version 4): each rank
    // of o and down turns back its own columns' blocks.
    let rotated = root.join("rotated");
    let options = CompressOptions {
        niter: 0,
        rotation: Rotation::Fixed(RotationConfig::new(32)),
        ..options
    };
    compress(&dense, &rotated, &options).unwrap();
    vec![avd, grid, rotated]
}

fn stacks(handle: &BitStackHandle) -> Vec<(LinearKind, WeightStack)> {
    handle
        .snapshot()
        .linears()
        .map(|(_, kind, l)| match &l.weight {
            LinearWeight::BitStack(s) => (kind, WeightStack::clone(s)),
            LinearWeight::Dense(_) => panic!("a dense linear in a BitStack checkpoint"),
        })
        .collect()
}

fn rank_handle(dir: &Path, rank: usize, world: usize) -> anyhow::Result<BitStackHandle> {
    let checkpoint = Checkpoint::open(dir)?;
    let plan = checkpoint.plan_all();
    let placement = Placement::default().with_tensor_parallel(TensorParallel::new(rank, world)?);
    BitStackHandle::from_checkpoint_placed(checkpoint, &plan, &Device::Cpu, placement)
}

#[test]
fn the_ranks_hold_slices_of_the_whole_model_at_every_level() {
    let root = tempfile::tempdir().unwrap();
    let world = 2;
    for dir in checkpoints(root.path()) {
        let whole = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
        let ranks: Vec<BitStackHandle> = (0..world)
            .map(|r| rank_handle(&dir, r, world).unwrap())
            .collect();
        let top = whole.max_level();
        for h in &ranks {
            assert_eq!(h.max_level(), top, "the ranks share the global order");
        }
        let dense_bytes = whole.resident_bytes() - whole.snapshot().stack_bytes() as u64;
        for level in [0, top / 3, top] {
            whole.set_level(level).unwrap();
            for h in &ranks {
                h.set_level(level).unwrap();
            }
            let want = stacks(&whole);
            let got: Vec<_> = ranks.iter().map(stacks).collect();
            for (i, (kind, w)) in want.iter().enumerate() {
                let full = w.dense().unwrap();
                let parts: Vec<Vec<f32>> = got.iter().map(|g| g[i].1.dense().unwrap()).collect();
                let joined: Vec<f32> = match Split::of(*kind) {
                    Split::Rows => parts.concat(),
                    Split::Columns => (0..w.m)
                        .flat_map(|row| {
                            let cols = w.n / world;
                            parts
                                .iter()
                                .flat_map(move |p| p[row * cols..(row + 1) * cols].to_vec())
                        })
                        .collect(),
                };
                assert_eq!(joined, full, "{}: {kind:?} at level {level}", dir.display());
                // Signs, planes and grids split; every rank holds the
                // factor along the dimension it keeps whole (f16).
                let replicated = match Split::of(*kind) {
                    Split::Rows => w.k * w.n,
                    Split::Columns => w.m * w.k,
                };
                // And, split by column, a grid's 8-bit codes' three f16
                // steps per row; split either way, its f32 prefix scales.
                let grid = w.planes.first().and_then(|p| p.grid.as_ref());
                let steps = match (Split::of(*kind), grid) {
                    (Split::Columns, Some(g)) if g.cfg.coding.is_int8() => 6 * w.m,
                    _ => 0,
                } + match grid {
                    Some(g) if g.cfg.coding == GridCoding::Int8Scaled => 4 * g.cfg.planes,
                    _ => 0,
                };
                let bytes: usize = got.iter().map(|g| g[i].1.resident_bytes()).sum();
                assert_eq!(
                    bytes,
                    w.resident_bytes() + (world - 1) * (w.blocks.len() * 2 * replicated + steps),
                    "{kind:?} bytes at level {level}"
                );
            }
            // Per-rank figures: the rank's blocks and the whole dense parts.
            for h in &ranks {
                let blocks = h.snapshot().stack_bytes() as u64;
                assert_eq!(h.resident_bytes(), blocks + dense_bytes);
                assert_eq!(h.bytes_at_level(level), h.resident_bytes());
            }
        }
    }
}

#[test]
fn a_world_that_does_not_divide_the_model_is_refused_before_loading() {
    let root = tempfile::tempdir().unwrap();
    let dirs = checkpoints(root.path());
    // 2 key/value heads over 4 ranks.
    let e = rank_handle(&dirs[0], 0, 4).unwrap_err().to_string();
    assert!(e.contains("2 key/value heads"), "{e}");
    // 4 attention heads over 3 ranks.
    let e = rank_handle(&dirs[0], 1, 3).unwrap_err().to_string();
    assert!(e.contains("4 attention heads"), "{e}");
    // A rank past the world.
    let e = rank_handle(&dirs[0], 2, 2).unwrap_err().to_string();
    assert!(e.contains("rank 2 of a world of 2"), "{e}");

    // Grid groups that a split would cut: o_proj's 64 input columns in
    // groups of 64 (a grid of groups 64), split over 2 ranks.
    let spec = SyntheticSpec {
        hidden: 64,
        intermediate: 128,
        heads: 2,
        kv_heads: 2,
        ..spec()
    };
    let dense = root.path().join("dense64");
    spec.write(&dense).unwrap();
    let calib = root.path().join("calib64.txt");
    std::fs::write(&calib, "groups that do not split. ".repeat(40)).unwrap();
    let grid = root.path().join("grid64");
    let options = CompressOptions {
        // Format 2's f16 ranges split as format 3's codes do.
        grid: Some(GridConfig {
            planes: 1,
            group: 64,
            outliers: 0,
            coding: GridCoding::F16,
        }),
        ..common::small_options(calib, 2, 1)
    };
    compress(&dense, &grid, &options).unwrap();
    let e = rank_handle(&grid, 0, 2).unwrap_err().to_string();
    assert!(e.contains("grid groups of 64"), "{e}");
    assert!(rank_handle(&grid, 0, 1).is_ok());

    // Rotation blocks that a split would cut: the same 64 columns rotated
    // in one block of 64, 32 per rank.
    let rotated = root.path().join("rotated64");
    let options = CompressOptions {
        niter: 0,
        grid: Some(GridConfig {
            group: 16,
            ..GridConfig::new(1)
        }),
        rotation: Rotation::Fixed(RotationConfig::new(64)),
        ..options
    };
    compress(&dense, &rotated, &options).unwrap();
    let e = rank_handle(&rotated, 1, 2).unwrap_err().to_string();
    assert!(e.contains("rotated in blocks of 64"), "{e}");
    assert!(rank_handle(&rotated, 0, 1).is_ok());
}
