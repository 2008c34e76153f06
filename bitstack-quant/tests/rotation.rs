//! Rotated inputs end to end (format version 4): compress fits the planes
//! (and any AVD blocks before them) to `W·R`, every prefix loads and fits
//! better, the kernels' forward on
//! rotated inputs equals the product with the rebuilt weight, the handle
//! resizes, and a rotation that does not fit is refused by name.

mod common;

use std::path::{Path, PathBuf};

use bitstack_quant::format::checkpoint::{BlockCounts, Checkpoint};
use bitstack_quant::format::config::{
    ModelConfig, FORMAT_VERSION_PREFIX_SCALED, FORMAT_VERSION_ROTATED,
};
use bitstack_quant::format::grid::{GridCoding, GridConfig};
use bitstack_quant::format::rotation::RotationConfig;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::{
    compress, CompressOptions, FeedbackOptions, Rotation, BLOCKS_THEN_PLANES_DAMP,
};
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{load_tokenizer, tokenize_file, Llama};
use candle_core::{DType, Device, Tensor};

const PLANES: usize = 4;
/// Divides the synthetic model's 48 and 104 columns.
const BLOCK: usize = 8;

fn options(root: &Path) -> CompressOptions {
    let calib = root.join("calib.txt");
    std::fs::write(&calib, "rotated rows, planes on a grid. ".repeat(40)).unwrap();
    CompressOptions {
        grid: Some(GridConfig {
            group: 16,
            ..GridConfig::new(PLANES)
        }),
        rotation: Rotation::Fixed(RotationConfig::new(BLOCK)),
        ..common::small_options(calib, 2, 0)
    }
}

/// The dense synthetic model in `root/dense` and its rotated checkpoint
/// in `root/rotated`.
fn compressed(root: &Path) -> (PathBuf, PathBuf) {
    let dense = root.join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let out = root.join("rotated");
    compress(&dense, &out, &options(root)).unwrap();
    (dense, out)
}

/// The largest |value| of `t`.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_scalar::<f32>())
        .unwrap()
}

fn tokens() -> Tensor {
    Tensor::new(&[[5u32, 77, 150, 9, 201, 33, 2, 250, 40]], &Device::Cpu).unwrap()
}

#[test]
fn every_prefix_of_a_rotated_checkpoint_loads_and_fits_better() {
    let root = tempfile::tempdir().unwrap();
    let (dense, out) = compressed(root.path());
    let q = ModelConfig::from_dir(&out)
        .unwrap()
        .quantization_config
        .unwrap();
    assert_eq!(q.format_version, FORMAT_VERSION_ROTATED);
    assert_eq!(q.rotation, Some(RotationConfig::new(BLOCK)));

    let reference = common::logits(
        &Llama::load(&dense, &BlockCounts::all(), &Device::Cpu).unwrap(),
        &tokens(),
    );
    let mut errors = Vec::new();
    for count in 1..=PLANES {
        let model = Llama::load(&out, &BlockCounts::uniform(count), &Device::Cpu).unwrap();
        for (_, _, linear) in model.linears() {
            let LinearWeight::BitStack(s) = &linear.weight else {
                panic!("a compressed linear loaded dense");
            };
            assert!(s.rotation.is_some(), "a rotated linear loaded unrotated");
        }
        errors.push(common::relative_error(
            &common::logits(&model, &tokens()),
            &reference,
        ));
    }
    // Without the input's rotation the planes of `W·R` would be noise:
    // each prefix is closer, and all of them about as close as the
    // unrotated checkpoint's.
    for w in errors.windows(2) {
        assert!(w[1] < w[0], "{errors:?}");
    }
    let plain = root.path().join("plain");
    compress(
        &dense,
        &plain,
        &CompressOptions {
            rotation: Rotation::None,
            ..options(root.path())
        },
    )
    .unwrap();
    let model = Llama::load(&plain, &BlockCounts::all(), &Device::Cpu).unwrap();
    let unrotated = common::relative_error(&common::logits(&model, &tokens()), &reference);
    eprintln!("{PLANES} planes: rotated {errors:?}, unrotated {unrotated}");
    assert!(errors[PLANES - 1] < 0.2, "{errors:?}");
    assert!(
        errors[PLANES - 1] < 2.0 * unrotated,
        "{errors:?} against {unrotated}"
    );
}

/// The first calibration window of `opts` and the dense model's logits on
/// it: where feedback was fitted, so where it must fit better.
fn first_calibration_window(dense: &Path, opts: &CompressOptions) -> (Tensor, Vec<f32>) {
    let ids = tokenize_file(&load_tokenizer(dense).unwrap(), &opts.calib_text).unwrap();
    let window = Tensor::new(&ids[..opts.seq_len], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let reference = common::logits(
        &Llama::load(dense, &BlockCounts::all(), &Device::Cpu).unwrap(),
        &window,
    );
    (window, reference)
}

/// Planes chosen with error feedback on the rotated inputs' Gram matrices
/// (`plane_feedback`) fit the model better at their level than planes
/// rounded to nearest, on the windows they were calibrated on, and every
/// prefix still loads. A Gram left unrotated, or scaled the wrong way,
/// would mislead the feedback.
#[test]
fn planes_chosen_with_feedback_fit_better_at_their_level() {
    let root = tempfile::tempdir().unwrap();
    let (dense, rounded) = compressed(root.path());
    let opts = options(root.path());
    let (window, reference) = first_calibration_window(&dense, &opts);
    let error = |dir: &Path, count: usize| {
        let model = Llama::load(dir, &BlockCounts::uniform(count), &Device::Cpu).unwrap();
        common::relative_error(&common::logits(&model, &window), &reference)
    };
    for level in [2, 3] {
        let fed = root.path().join(format!("fed{level}"));
        let fed_opts = CompressOptions {
            plane_feedback: Some(level),
            ..options(root.path())
        };
        compress(&dense, &fed, &fed_opts).unwrap();
        let (e_fed, e_rounded) = (error(&fed, level), error(&rounded, level));
        eprintln!("{level} planes: feedback {e_fed}, rounded {e_rounded}");
        assert!(
            e_fed < e_rounded,
            "{level} planes: feedback {e_fed}, rounded {e_rounded}"
        );
        for count in 1..=PLANES {
            assert!(error(&fed, count).is_finite());
        }
    }
    // A level past the planes stored is refused before any work.
    let err = compress(
        &dense,
        &root.path().join("too-many"),
        &CompressOptions {
            plane_feedback: Some(PLANES + 1),
            ..options(root.path())
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("--plane-feedback 5"), "{err:#}");
    assert!(!root.path().join("too-many").exists());
}

/// An AVD block fitted to `W·R` ahead of the planes (`--layout
/// blocks+planes`): every prefix loads rotated, the planes bring the fit
/// close, and the block's feedback signs, chosen on the rotated
/// inputs' Gram, fit the calibration window better than `sign(W·R)`. A Gram
/// left unrotated would pair each weight with another column's inputs.
#[test]
fn a_rotated_block_with_feedback_signs_fits_before_the_planes() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let opts = |feedback: Option<FeedbackOptions>| CompressOptions {
        k: 1,
        niter: 1,
        feedback,
        ..options(root.path())
    };
    let (window, reference) = first_calibration_window(&dense, &opts(None));
    let errors = |dir: &Path| -> Vec<f64> {
        (1..=1 + PLANES)
            .map(|count| {
                let model = Llama::load(dir, &BlockCounts::uniform(count), &Device::Cpu).unwrap();
                for (_, _, linear) in model.linears() {
                    let LinearWeight::BitStack(s) = &linear.weight else {
                        panic!("a compressed linear loaded dense");
                    };
                    assert!(s.rotation.is_some(), "a rotated linear loaded unrotated");
                }
                common::relative_error(&common::logits(&model, &window), &reference)
            })
            .collect()
    };
    let (fed, signs) = (root.path().join("fed"), root.path().join("signs"));
    // The layout's damping: GPTQ's 0.01 leaves a residual that is small
    // on the calibration's inputs and large elsewhere, which a first plane
    // rounded to nearest makes worse there.
    let damped = FeedbackOptions {
        damp: BLOCKS_THEN_PLANES_DAMP,
        ..FeedbackOptions::default()
    };
    compress(&dense, &fed, &opts(Some(damped))).unwrap();
    compress(&dense, &signs, &opts(None)).unwrap();
    let q = ModelConfig::from_dir(&fed)
        .unwrap()
        .quantization_config
        .unwrap();
    assert_eq!(q.rotation, Some(RotationConfig::new(BLOCK)));
    assert_eq!(q.niter, 1 + PLANES);
    let (e_fed, e_signs) = (errors(&fed), errors(&signs));
    eprintln!("block, then planes: feedback {e_fed:?}, sign(W·R) {e_signs:?}");
    // The first plane, rounded to nearest on the residual, need not help
    // on this tiny model's 64 calibration tokens (on SmolLM2 the ladder
    // falls from 1.2e6 with the blocks alone to 1530 at 2.0 bits); every
    // later one does, and all of them together far more than the block.
    for w in e_fed[1..].windows(2) {
        assert!(w[1] < w[0], "{e_fed:?}");
    }
    assert!(e_fed[0] < e_signs[0], "{e_fed:?} against {e_signs:?}");
    assert!(e_fed[PLANES] < 0.1, "{e_fed:?}");
    assert!(e_fed[PLANES] < e_fed[0] / 3.0, "{e_fed:?}");
}

/// The kernels run on rotated inputs; the rebuilt weight is turned back.
/// Both must give the same model, in f32 and f16 activations.
#[test]
fn the_kernels_on_rotated_inputs_equal_the_rebuilt_weight() {
    let root = tempfile::tempdir().unwrap();
    let (_, out) = compressed(root.path());
    let model = Llama::load(&out, &BlockCounts::uniform(3), &Device::Cpu).unwrap();
    for (_, kind, linear) in model.linears() {
        let LinearWeight::BitStack(s) = &linear.weight else {
            panic!("a compressed linear loaded dense");
        };
        let w = s.dense_tensor(&Device::Cpu, DType::F32).unwrap();
        for rows in [1, 7, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, s.n), &Device::Cpu).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = linear.forward_weight(&x).unwrap();
            let scale = max_abs(&want);
            let diff = max_abs(&(got - &want).unwrap());
            // Decode-sized inputs go through int8 tables (see the kernels'
            // tmac module), larger ones through f32 sums.
            let tolerance = if rows <= bitstack_kernels::DECODE_MAX_ROWS {
                4.0 * bitstack_kernels::tmac::RELATIVE_MAX_ERROR_BOUND
            } else {
                1e-4
            };
            assert!(
                diff <= tolerance * scale,
                "{kind:?}, {rows} rows: {diff} of {scale}"
            );
            let half = linear
                .forward_weight(&x.to_dtype(DType::F16).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let diff = max_abs(&(half - &want).unwrap());
            assert!(
                diff <= (tolerance + 1e-2) * scale,
                "{kind:?} f16, {rows} rows: {diff} of {scale}"
            );
        }
    }
    // A model whose weights are rebuilt once scores the same tokens alike.
    let mut rebuilt = Llama::load(&out, &BlockCounts::uniform(3), &Device::Cpu).unwrap();
    rebuilt.materialize().unwrap();
    let e = common::relative_error(
        &common::logits(&rebuilt, &tokens()),
        &common::logits(&model, &tokens()),
    );
    eprintln!("rebuilt against kernels: relative error {e}");
    assert!(e < 1e-3, "{e}");
}

#[test]
fn the_handle_resizes_a_rotated_model() {
    let root = tempfile::tempdir().unwrap();
    let (_, out) = compressed(root.path());
    let handle = BitStackHandle::open(&out, None, &Device::Cpu).unwrap();
    let checkpoint = Checkpoint::open(&out).unwrap();
    let top = handle.max_level();
    for level in [top, 3, 0, top / 2, top] {
        handle.set_level(level).unwrap();
        let fresh = Llama::from_checkpoint(
            &checkpoint,
            &checkpoint.plan_level(level).unwrap().counts,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            common::logits(&handle.snapshot().model, &tokens()),
            common::logits(&fresh, &tokens()),
            "level {level}"
        );
    }
}

#[test]
fn a_rotation_that_does_not_fit_is_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let (dense, out) = compressed(root.path());
    let refused = |opts: CompressOptions| {
        let dir = root.path().join("refused");
        let e = format!("{:#}", compress(&dense, &dir, &opts).unwrap_err());
        assert!(!dir.exists(), "a refused compress left {}", dir.display());
        e
    };
    // 16 does not divide intermediate 104 (down_proj's input).
    let e = refused(CompressOptions {
        rotation: Rotation::Fixed(RotationConfig::new(16)),
        ..options(root.path())
    });
    assert!(e.contains("down_proj") && e.contains("104"), "{e}");
    let e = refused(CompressOptions {
        rotation: Rotation::Fixed(RotationConfig::new(12)),
        ..options(root.path())
    });
    assert!(e.contains("power of two"), "{e}");
    let e = refused(CompressOptions {
        grid: Some(GridConfig {
            group: 16,
            coding: GridCoding::F16,
            ..GridConfig::new(PLANES)
        }),
        ..options(root.path())
    });
    assert!(e.contains("int8"), "{e}");

    // A config that contradicts itself is refused when opened: format 4
    // (8-bit codes, rotated) and format 5 (with prefix scales, which loads).
    let v5 = root.path().join("v5");
    compress(
        &dense,
        &v5,
        &CompressOptions {
            grid: Some(GridConfig {
                group: 16,
                coding: GridCoding::Int8Scaled,
                ..GridConfig::new(PLANES)
            }),
            ..options(root.path())
        },
    )
    .unwrap();
    Llama::load(&v5, &BlockCounts::all(), &Device::Cpu).unwrap();
    let edited = |from_dir: &Path, from: &str, to: &str| {
        let text = std::fs::read_to_string(from_dir.join("config.json")).unwrap();
        assert!(text.contains(from), "config.json lacks {from}");
        let dir = root.path().join("edited");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(from_dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        std::fs::write(dir.join("config.json"), text.replace(from, to)).unwrap();
        format!("{:#}", Checkpoint::open(&dir).err().unwrap())
    };
    // Version 3 with a rotation, version 4 without or with prefix scales,
    // a block that does not divide a width.
    let e = edited(&out, "\"format_version\": 4", "\"format_version\": 3");
    assert!(e.contains("needs format_version 4 or 5"), "{e}");
    let e = edited(&v5, "\"format_version\": 5", "\"format_version\": 4");
    assert!(
        e.contains("format_version 4 does not go with grid coding Int8Scaled"),
        "{e}"
    );
    let e = edited(&out, "\"rotation\"", "\"rotation_\"");
    assert!(e.contains("needs a `rotation`"), "{e}");
    let e = edited(&out, "\"block\": 8", "\"block\": 32");
    assert!(e.contains("rotation block 32"), "{e}");
    assert_eq!(
        ModelConfig::from_dir(&v5)
            .unwrap()
            .quantization_config
            .unwrap()
            .format_version,
        FORMAT_VERSION_PREFIX_SCALED
    );
}
