//! Grid planes end to end, with prefix scales (format version 5): every
//! prefix loads and fits better, the runtime handle resizes through the
//! planes, a broken grid or plane is an error that names it, and formats 2
//! and 3 load and fit alike.

mod common;

use std::path::{Path, PathBuf};

use bitstack_quant::format::checkpoint::{BlockCounts, Checkpoint};
use bitstack_quant::format::config::{
    ModelConfig, FORMAT_VERSION_GRID, FORMAT_VERSION_GRID_INT8, FORMAT_VERSION_PREFIX_SCALED,
};
use bitstack_quant::format::grid::{GridCoding, GridConfig};
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::{compress, CompressOptions};
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::Llama;
use candle_core::{Device, Tensor};

const AVD: usize = 1;
const PLANES: usize = 4;

fn options(root: &Path) -> CompressOptions {
    let calib = root.join("calib.txt");
    std::fs::write(&calib, "planes on a grid, nested like blocks. ".repeat(40)).unwrap();
    CompressOptions {
        grid: Some(GridConfig {
            group: 16,
            coding: GridCoding::Int8Scaled,
            ..GridConfig::new(PLANES)
        }),
        ..common::small_options(calib, 2, AVD)
    }
}

/// The dense synthetic model in `root/dense` and its grid checkpoint in
/// `root/packed`.
fn compressed(root: &Path) -> (PathBuf, PathBuf) {
    let dense = root.join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let out = root.join("packed");
    compress(&dense, &out, &options(root)).unwrap();
    (dense, out)
}

fn tokens() -> Tensor {
    Tensor::new(&[[5u32, 77, 150, 9, 201, 33, 2, 250, 40]], &Device::Cpu).unwrap()
}

#[test]
fn every_prefix_loads_and_more_planes_fit_better() {
    let root = tempfile::tempdir().unwrap();
    let (dense, out) = compressed(root.path());
    let cfg = ModelConfig::from_dir(&out).unwrap();
    let q = cfg.quantization_config.as_ref().unwrap();
    assert_eq!(q.format_version, FORMAT_VERSION_PREFIX_SCALED);
    assert_eq!((q.niter, q.avd_blocks()), (AVD + PLANES, AVD));

    let reference = common::logits(
        &Llama::load(&dense, &BlockCounts::all(), &Device::Cpu).unwrap(),
        &tokens(),
    );
    let mut errors = Vec::new();
    for count in 1..=AVD + PLANES {
        let model = Llama::load(&out, &BlockCounts::uniform(count), &Device::Cpu).unwrap();
        for (_, _, linear) in model.linears() {
            let LinearWeight::BitStack(s) = &linear.weight else {
                panic!("a compressed linear loaded dense");
            };
            assert_eq!((s.blocks.len(), s.planes.len()), (AVD, count - AVD));
        }
        errors.push(common::relative_error(
            &common::logits(&model, &tokens()),
            &reference,
        ));
    }
    // The planes after the first refine: each prefix is closer.
    for w in errors[AVD..].windows(2) {
        assert!(w[1] < w[0], "{errors:?}");
    }
    assert!(errors.last().unwrap() < &0.1, "{errors:?}");

    // The ladder counts the grid with the first plane.
    let checkpoint = Checkpoint::open(&out).unwrap();
    let ladder = checkpoint.ladder();
    assert!(ladder
        .windows(2)
        .all(|w| w[0].total_bytes < w[1].total_bytes));
    let slot = &checkpoint.geometry().linears[0];
    assert!(slot.block_bytes(AVD) > slot.block_bytes(AVD + 1));
    let model =
        Llama::from_checkpoint(&checkpoint, &checkpoint.plan_all().counts, &Device::Cpu).unwrap();
    let held: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    assert_eq!(held, ladder.last().unwrap().linear_bytes);
}

#[test]
fn the_handle_resizes_through_the_planes() {
    let root = tempfile::tempdir().unwrap();
    let (_, out) = compressed(root.path());
    let handle = BitStackHandle::open(&out, None, &Device::Cpu).unwrap();
    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_eq!(handle.max_level(), 14 * (AVD + PLANES - 1));
    for level in [40, 13, 0, 27, 56, 29, 14] {
        handle.set_level(level).unwrap();
        assert_eq!(handle.resident_bytes(), handle.bytes_at_level(level));
        let fresh = Llama::from_checkpoint(
            &checkpoint,
            &checkpoint.plan_level(level).unwrap().counts,
            &Device::Cpu,
        )
        .unwrap();
        let live = handle.snapshot();
        assert_eq!(
            common::logits(&live.model, &tokens()),
            common::logits(&fresh, &tokens()),
            "level {level}"
        );
    }
}

#[test]
fn plans_count_the_linears_left_a_single_plane() {
    let root = tempfile::tempdir().unwrap();
    let (_, with_avd) = compressed(root.path());
    let checkpoint = Checkpoint::open(&with_avd).unwrap();
    // An AVD block comes first: no linear ever holds a plane alone.
    for level in [0, checkpoint.ladder().len() - 1] {
        let plan = checkpoint.plan_level(level).unwrap();
        assert_eq!(plan.single_plane_linears(checkpoint.geometry()), 0);
    }

    let planes_only = root.path().join("planes");
    let opts = CompressOptions {
        niter: 0,
        ..options(root.path())
    };
    compress(&root.path().join("dense"), &planes_only, &opts).unwrap();
    let checkpoint = Checkpoint::open(&planes_only).unwrap();
    let geometry = checkpoint.geometry();
    let linears = geometry.linears.len();
    let single: Vec<usize> = (0..checkpoint.ladder().len())
        .map(|level| {
            let plan = checkpoint.plan_level(level).unwrap();
            let by_hand = geometry
                .linears
                .iter()
                .filter(|l| plan.counts.for_linear(&l.name, l.stored) == 1)
                .count();
            assert_eq!(
                plan.single_plane_linears(geometry),
                by_hand,
                "level {level}"
            );
            by_hand
        })
        .collect();
    // The floor is one plane everywhere; each level adds one plane to one linear.
    assert_eq!(single[0], linears);
    assert!(single.windows(2).all(|w| w[0] - w[1] <= 1 && w[1] <= w[0]));
    assert_eq!(*single.last().unwrap(), 0);
    // The budget of the floor plans it (and warns; the plan is the same).
    let floor = &checkpoint.ladder()[0];
    let plan = checkpoint
        .plan(bitstack_quant::Budget::Bytes(floor.total_bytes as u64))
        .unwrap();
    assert_eq!(plan.single_plane_linears(geometry), linears);
    // The two-plane level is the first without a lone plane, for the handle too.
    let two = checkpoint.two_plane_level();
    assert_eq!(single[two], 0);
    assert!(two > 0 && single[two - 1] > 0, "level {two}");
    let handle = BitStackHandle::open(&planes_only, None, &Device::Cpu).unwrap();
    assert_eq!(handle.two_plane_level(), two);
    let with_avd = BitStackHandle::open(&with_avd, None, &Device::Cpu).unwrap();
    assert_eq!(with_avd.two_plane_level(), 0);
}

#[test]
fn a_broken_grid_or_plane_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (_, out) = compressed(root.path());
    let shard = out.join("model-00001-of-00003.safetensors");
    let q_proj = "model.layers.0.self_attn.q_proj";

    // A flipped sign bit fails the plane's checksum.
    let broken = root.path().join("flipped");
    copy_dir(&out, &broken);
    common::edit_safetensors(&broken.join(shard.file_name().unwrap()), |tensors| {
        let plane = tensors
            .iter_mut()
            .find(|t| t.0 == format!("{q_proj}.plane_2"))
            .unwrap();
        plane.3[0] ^= 1;
    });
    let e = format!(
        "{:#}",
        Llama::load(&broken, &BlockCounts::all(), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("plane 2") && e.contains("checksum"), "{e}");
    assert!(e.contains(q_proj), "{e}");
    // Up to the plane before it, the same checkpoint loads.
    Llama::load(&broken, &BlockCounts::uniform(AVD + 2), &Device::Cpu).unwrap();

    // A missing spread tensor is named when the checkpoint is opened.
    let missing = root.path().join("missing");
    copy_dir(&out, &missing);
    common::rewrite_safetensors(
        &missing.join(shard.file_name().unwrap()),
        |tensors| tensors.retain(|t| t.0 != format!("{q_proj}.grid_outlier_code")),
        false,
    );
    let e = format!("{:#}", Checkpoint::open(&missing).err().unwrap());
    assert!(e.contains(&format!("{q_proj}.grid_outlier_code")), "{e}");

    // A NaN in a row's outlier step is named with its tensor.
    let nan = root.path().join("nan");
    copy_dir(&out, &nan);
    common::rewrite_safetensors(
        &nan.join(shard.file_name().unwrap()),
        |tensors| {
            let t = tensors
                .iter_mut()
                .find(|t| t.0 == format!("{q_proj}.grid_outlier_step"))
                .unwrap();
            t.3[2..4].copy_from_slice(&half::f16::NAN.to_le_bytes());
        },
        false,
    );
    let e = format!(
        "{:#}",
        Llama::load(&nan, &BlockCounts::all(), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains(&format!("{q_proj}.grid_outlier_step")) && e.contains("non-finite"),
        "{e}"
    );

    // So is a NaN prefix scale (without checksums, the check on the
    // values finds it).
    let scale = root.path().join("scale");
    copy_dir(&out, &scale);
    common::rewrite_safetensors(
        &scale.join(shard.file_name().unwrap()),
        |tensors| {
            let t = tensors
                .iter_mut()
                .find(|t| t.0 == format!("{q_proj}.grid_prefix_scale"))
                .unwrap();
            t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        },
        false,
    );
    let e = format!(
        "{:#}",
        Llama::load(&scale, &BlockCounts::all(), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains(q_proj) && e.contains("prefix scale of 2 planes is NaN"),
        "{e}"
    );

    // A version this build does not know is refused by name.
    let future = root.path().join("future");
    copy_dir(&out, &future);
    let text = std::fs::read_to_string(future.join("config.json")).unwrap();
    std::fs::write(
        future.join("config.json"),
        text.replace("\"format_version\": 5", "\"format_version\": 6"),
    )
    .unwrap();
    let e = format!("{:#}", Checkpoint::open(&future).err().unwrap());
    assert!(e.contains("format_version 6 is not supported"), "{e}");

    // Format 2 with 8-bit ranges is a contradiction, refused by name.
    std::fs::write(
        future.join("config.json"),
        text.replace("\"format_version\": 5", "\"format_version\": 2"),
    )
    .unwrap();
    let e = format!("{:#}", Checkpoint::open(&future).err().unwrap());
    assert!(
        e.contains("format_version 2 does not go with grid coding Int8Scaled"),
        "{e}"
    );
}

#[test]
fn formats_2_and_3_still_load_and_fit_as_format_5() {
    let root = tempfile::tempdir().unwrap();
    let (dense, scaled) = compressed(root.path());
    let with_coding = |name: &str, coding: GridCoding, version: u32| {
        let dir = root.path().join(name);
        let mut opts = options(root.path());
        opts.grid = opts.grid.map(|g| GridConfig { coding, ..g });
        compress(&dense, &dir, &opts).unwrap();
        let q = ModelConfig::from_dir(&dir)
            .unwrap()
            .quantization_config
            .unwrap();
        assert_eq!(q.format_version, version, "{coding:?}");
        dir
    };
    let f16 = with_coding("f16", GridCoding::F16, FORMAT_VERSION_GRID);
    let int8 = with_coding("int8", GridCoding::Int8, FORMAT_VERSION_GRID_INT8);

    let reference = common::logits(
        &Llama::load(&dense, &BlockCounts::all(), &Device::Cpu).unwrap(),
        &tokens(),
    );
    let error = |dir: &Path| {
        let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
        common::relative_error(&common::logits(&model, &tokens()), &reference)
    };
    let (e16, e8, e5) = (error(&f16), error(&int8), error(&scaled));
    assert!(
        e16 < 0.1 && e8 < 0.1 && e5 < 0.1,
        "f16 {e16}, int8 {e8}, scaled {e5}"
    );
    assert!(e8 < 1.25 * e16, "8-bit codes fit worse: {e8} against {e16}");
    assert!(e5 < 1.25 * e8, "prefix scales fit worse: {e5} against {e8}");
    // Format 3 and 5 share the planes and the grid's codes: only the
    // scales (an f32 per plane) differ.
    let (c8, c5) = (
        Checkpoint::open(&int8).unwrap(),
        Checkpoint::open(&scaled).unwrap(),
    );
    let scales: usize = c5
        .geometry()
        .linears
        .iter()
        .map(|s| 4 * s.grid.unwrap().planes)
        .sum();
    let bytes = |c: &Checkpoint| c.ladder().last().unwrap().linear_bytes;
    assert_eq!(bytes(&c5) - bytes(&c8), scales);

    // 8-bit codes save 2 bytes per (row, group) and 1 per outlier, and
    // cost 6 per row.
    let c16 = Checkpoint::open(&f16).unwrap();
    let saved: usize = c16
        .geometry()
        .linears
        .iter()
        .map(|s| {
            let g = s.grid.unwrap();
            let cells = s.m * g.groups(s.n);
            2 * cells + cells * g.outliers - 6 * s.m
        })
        .sum();
    assert_eq!(bytes(&c16) - bytes(&c8), saved);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The exponent of the activation scales is the layout's unless given, is
/// recorded in the config, and is what the folded norms show: the dense
/// norm over the stored one is the scale `s^α`.
#[test]
fn the_scale_power_is_the_layouts_and_is_folded_in() {
    use bitstack_quant::format::store::TensorStore;
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    let spec = SyntheticSpec::default();
    spec.write(&dense).unwrap();
    let norm = "model.layers.1.input_layernorm.weight";
    let stored = |name: &str, opts: CompressOptions| {
        let out = root.path().join(name);
        compress(&dense, &out, &opts).unwrap();
        let q = ModelConfig::from_dir(&out).unwrap().quantization_config;
        let ln = TensorStore::open_dir(&out)
            .unwrap()
            .f32_shaped(norm, &[spec.hidden])
            .unwrap();
        (q.unwrap().scale_power, ln)
    };
    // AVD blocks alone take the reference's 1; any grid planes, 1/2.
    let blocks_only = CompressOptions {
        grid: None,
        ..options(root.path())
    };
    let planes_only = CompressOptions {
        niter: 0,
        ..options(root.path())
    };
    let (avd_power, s1) = stored("avd", blocks_only);
    let (grid_power, s_half) = stored("grid", planes_only.clone());
    let (mixed_power, _) = stored("mixed", options(root.path()));
    let (none_power, s0) = stored(
        "none",
        CompressOptions {
            scale_power: Some(0.0),
            ..planes_only.clone()
        },
    );
    assert_eq!(
        (avd_power, grid_power, mixed_power, none_power),
        (Some(1.0), Some(0.5), Some(0.5), Some(0.0))
    );
    let source = TensorStore::open_dir(&dense)
        .unwrap()
        .f32_shaped(norm, &[spec.hidden])
        .unwrap();
    for c in 0..spec.hidden {
        let (s, half) = (source[c] / s1[c], source[c] / s_half[c]);
        assert!(
            (s0[c] - source[c]).abs() <= 2e-3 * source[c].abs(),
            "α = 0 scaled column {c}"
        );
        assert!(
            (half * half - s).abs() <= 5e-3 * s,
            "column {c}: s = {s}, s^½ = {half}"
        );
        assert!(
            (s - 1.0).abs() > 1e-2,
            "column {c}: a scale of 1 tests nothing"
        );
    }
    // Out of range or not a number: refused before any work.
    for bad in [3.0, -0.5, f32::NAN] {
        let e = compress(
            &dense,
            &root.path().join("bad"),
            &CompressOptions {
                scale_power: Some(bad),
                ..planes_only.clone()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--scale-power"), "{e}");
        assert!(!root.path().join("bad").exists());
    }
}
