//! Compress → checkpoint → load, and every way a checkpoint can be broken.

mod common;

use std::path::Path;

use common::{edit_safetensors, relative_error};

use bitstack_quant::eval::inspect::inspect;
use bitstack_quant::format::checkpoint::{BlockCounts, Checkpoint};
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::{compress, CompressOptions, FeedbackOptions, Rotation};
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{linear_shape, load_tokenizer, LinearKind, Llama};
use candle_core::{Device, Tensor};

const K: usize = 4;
const NITER: usize = 6;

fn calib_text(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("calib.txt");
    let text: String = (0..400)
        .map(|i| format!("sample {i} of the calibration text; "))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(dir: &Path) -> CompressOptions {
    CompressOptions {
        k: K,
        niter: NITER,
        grid: None,
        calib_text: calib_text(dir),
        calib_windows: 4,
        seq_len: 32,
        batch: 2,
        svd: SvdMethod::Exact,
        feedback: None,
        k_per_kind: Default::default(),
        dense_dtype: Default::default(),
        scale_power: None,
        rotation: Rotation::None,
        plane_feedback: None,
    }
}

/// A compressed synthetic model in `root/packed` (dense source in `root/dense`).
fn compressed(root: &Path) -> std::path::PathBuf {
    let dense = root.join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let out = root.join("packed");
    compress(&dense, &out, &opts(root)).unwrap();
    out
}

fn logits(model: &Llama) -> Vec<f32> {
    let ids = Tensor::from_vec(
        (0..20u32).map(|i| i * 13 % 256).collect::<Vec<_>>(),
        (1, 20),
        &Device::Cpu,
    )
    .unwrap();
    model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn round_trip_and_more_blocks_fit_better() {
    let root = tempfile::tempdir().unwrap();
    let out = compressed(root.path());
    let dense = Llama::load(
        &root.path().join("dense"),
        &BlockCounts::all(),
        &Device::Cpu,
    )
    .unwrap();
    let reference = logits(&dense);

    let info = inspect(&out).unwrap();
    assert_eq!(info.niter, Some(NITER));
    assert_eq!(info.linears.len(), 2 * 7);
    assert!(info
        .linears
        .iter()
        .all(|l| l.blocks == NITER && l.k == Some(K)));

    let mut errors = Vec::new();
    for n in [1, 3, NITER] {
        let m = Llama::load(&out, &BlockCounts::uniform(n), &Device::Cpu).unwrap();
        for (_, _, lin) in m.linears() {
            match &lin.weight {
                LinearWeight::BitStack(s) => assert_eq!(s.blocks.len(), n),
                LinearWeight::Dense(_) => panic!("compressed linear loaded dense"),
            }
        }
        errors.push(relative_error(&logits(&m), &reference));
    }
    assert!(errors[0] > errors[1] && errors[1] > errors[2], "{errors:?}");
    assert!(errors[2] < 0.2, "{errors:?}");

    // blocks read back byte for byte as stored
    let checkpoint = Checkpoint::open(&out).unwrap();
    let m = Llama::from_checkpoint(&checkpoint, &BlockCounts::all(), &Device::Cpu).unwrap();
    let (rows, cols) = linear_shape(&m.cfg, LinearKind::Down);
    let slot = checkpoint.geometry().linears[7 + 6].clone();
    assert_eq!(
        (slot.name.as_str(), slot.m, slot.n, slot.k),
        (LinearKind::Down.path(1).as_str(), rows, cols, K)
    );
    let b = checkpoint.read_block(&slot, 2).unwrap();
    drop(checkpoint);
    match &m.layers[1].down.weight {
        LinearWeight::BitStack(s) => assert_eq!(s.blocks[2].to_block(), Some(b)),
        LinearWeight::Dense(_) => unreachable!(),
    }
    // nothing partial left next to the output
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".bitstack-partial")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn feedback_signs_fit_the_model_better_than_plain_avd() {
    let root = tempfile::tempdir().unwrap();
    let dense_dir = root.path().join("dense");
    SyntheticSpec::default().write(&dense_dir).unwrap();
    let dense = Llama::load(&dense_dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    // Feedback fits the layers' outputs on calibration-like inputs, so
    // score on held-out text of the same kind.
    let text: String = (900..904)
        .map(|i| format!("sample {i} of the calibration text; "))
        .collect();
    let ids: Vec<u32> = load_tokenizer(&dense_dir)
        .unwrap()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = |m: &Llama| -> Vec<f32> {
        m.forward(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let reference = logits(&dense);
    let errors = |name: &str, feedback: Option<FeedbackOptions>| -> Vec<f64> {
        let out = root.path().join(name);
        compress(
            &dense_dir,
            &out,
            &CompressOptions {
                feedback,
                ..opts(root.path())
            },
        )
        .unwrap();
        [1, 2, NITER]
            .iter()
            .map(|&n| {
                let m = Llama::load(&out, &BlockCounts::uniform(n), &Device::Cpu).unwrap();
                relative_error(&logits(&m), &reference)
            })
            .collect()
    };
    let plain = errors("avd", None);
    let fed = errors("feedback", Some(FeedbackOptions::default()));
    assert!(fed[0] > fed[1] && fed[1] > fed[2], "{fed:?}");
    // With 128 calibration tokens for inputs up to 104 wide, the last blocks
    // fit calibration noise; the first ones are where feedback pays.
    for (f, p) in fed.iter().zip(&plain).take(2) {
        assert!(f < p, "feedback {fed:?} vs avd {plain:?}");
    }
}

fn load_err(dir: &Path) -> String {
    match Llama::load(dir, &BlockCounts::all(), &Device::Cpu) {
        Ok(_) => panic!("broken checkpoint loaded"),
        Err(e) => format!("{e:#}"),
    }
}

/// Rewrites the first layer's shard with `edit` applied to its tensors.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<common::RawTensor>)) {
    edit_safetensors(&dir.join("model-00001-of-00003.safetensors"), edit);
}

#[test]
fn broken_checkpoints_give_errors_naming_the_tensor() {
    let root = tempfile::tempdir().unwrap();
    let good = compressed(root.path());
    let copy = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };

    // one flipped bit in a block's signs: its checksum catches it
    let d = copy("corrupted");
    let shard = d.join("model-00001-of-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let name = format!("{}.qweight_1", LinearKind::Down.path(0));
    let (start, _) = meta.info(&name).unwrap().data_offsets;
    bytes[8 + header + start] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains(&format!("block 1 of {}", LinearKind::Down.path(0)))
            && e.contains("fails its checksum")
            && e.contains("model-00001-of-00003.safetensors"),
        "{e}"
    );

    // truncated shard
    let d = copy("truncated");
    let shard = d.join("model-00001-of-00003.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("truncated")
            && e.contains("model-00001-of-00003.safetensors")
            && e.contains("tensor `"),
        "{e}"
    );

    // missing tensor
    let d = copy("missing");
    rewrite(&d, |t| {
        t.retain(|(n, ..)| n != "model.layers.0.mlp.up_proj.vt_3")
    });
    let e = load_err(&d);
    assert!(e.contains("model.layers.0.mlp.up_proj.vt_3"), "{e}");

    // wrong shape
    let d = copy("shape");
    rewrite(&d, |t| {
        let x = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.0.self_attn.q_proj.u_1")
            .unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.u_1") && e.contains("shape"),
        "{e}"
    );

    // NaN
    let d = copy("nan");
    rewrite(&d, |t| {
        let x = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.vt_0")
            .unwrap();
        let nan = half::f16::NAN.to_le_bytes();
        x.3[10] = nan[0];
        x.3[11] = nan[1];
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.vt_0") && e.contains("NaN"),
        "{e}"
    );

    // too many blocks requested
    let e = Llama::load(&good, &BlockCounts::uniform(NITER + 1), &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains(&format!("cannot load {} blocks", NITER + 1)),
        "{e:#}"
    );
}

#[test]
fn compress_refuses_bad_input_and_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec::default().write(&dense).unwrap();

    // k larger than the smallest matrix dimension
    let out = root.path().join("out");
    let e = compress(
        &dense,
        &out,
        &CompressOptions {
            k: 49,
            ..opts(root.path())
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("--k 49 is out of range"), "{e:#}");
    assert!(!out.exists());

    // nonsense feedback damping
    let e = compress(
        &dense,
        &out,
        &CompressOptions {
            feedback: Some(FeedbackOptions {
                damp: f64::NAN,
                ..Default::default()
            }),
            ..opts(root.path())
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("--damp NaN"), "{e:#}");
    assert!(!out.exists());

    // existing output
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = compress(&dense, &out, &opts(root.path())).unwrap_err();
    assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");

    // unwritable output location (a path below a regular file)
    std::fs::write(root.path().join("keep-file"), "x").unwrap();
    let e = compress(
        &dense,
        &root.path().join("keep-file").join("out"),
        &opts(root.path()),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("keep-file"), "{e:#}");

    // missing tokenizer
    let no_tok = root.path().join("no-tok");
    SyntheticSpec::default().write(&no_tok).unwrap();
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    let e = compress(&no_tok, &root.path().join("o2"), &opts(root.path())).unwrap_err();
    assert!(format!("{e:#}").contains("missing tokenizer"), "{e:#}");

    // non-finite weight
    let nan = root.path().join("nan");
    SyntheticSpec::default().write(&nan).unwrap();
    let shard = nan.join("model.safetensors");
    edit_safetensors(&shard, |t| {
        let x = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.1.mlp.gate_proj.weight")
            .unwrap();
        x.3[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let e = compress(&nan, &root.path().join("o3"), &opts(root.path())).unwrap_err();
    assert!(
        format!("{e:#}").contains("model.layers.1.mlp.gate_proj.weight"),
        "{e:#}"
    );
    assert!(!root.path().join("o3").exists());

    // unknown architecture
    let arch = root.path().join("arch");
    SyntheticSpec::default().write(&arch).unwrap();
    let cfg = std::fs::read_to_string(arch.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"falcon\"");
    std::fs::write(arch.join("config.json"), cfg).unwrap();
    let e = compress(&arch, &root.path().join("o4"), &opts(root.path())).unwrap_err();
    assert!(
        format!("{e:#}").contains("unknown architecture `falcon`"),
        "{e:#}"
    );

    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".bitstack-partial")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn half_precision_model_dirs_load() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("bf16");
    SyntheticSpec::default().write(&dir).unwrap();
    let f32_logits = logits(&Llama::load(&dir, &BlockCounts::all(), &Device::Cpu).unwrap());
    for dtype in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
        edit_safetensors(&dir.join("model.safetensors"), |tensors| {
            for (_, d, _, data) in tensors.iter_mut() {
                let values: Vec<f32> = match *d {
                    safetensors::Dtype::F32 => data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    safetensors::Dtype::BF16 => data
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    _ => unreachable!(),
                };
                *data = match dtype {
                    safetensors::Dtype::BF16 => values
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                    _ => values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                *d = dtype;
            }
        });
        let model = Llama::load(&dir, &BlockCounts::all(), &Device::Cpu).unwrap();
        let err = relative_error(&logits(&model), &f32_logits);
        assert!(err < 2e-2, "{dtype:?}: {err}");
    }
}

#[test]
fn rank_per_kind_is_recorded_and_loaded() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let out = root.path().join("packed");
    let mut o = opts(root.path());
    o.k_per_kind = [(LinearKind::K, 2), (LinearKind::Down, 7)]
        .into_iter()
        .collect();
    compress(&dense, &out, &o).unwrap();
    let info = inspect(&out).unwrap();
    for l in &info.linears {
        let want = if l.name.ends_with("k_proj") {
            2
        } else if l.name.ends_with("down_proj") {
            7
        } else {
            K
        };
        assert_eq!(l.k, Some(want), "{}", l.name);
    }
    let model = Llama::load(&out, &BlockCounts::uniform(2), &Device::Cpu).unwrap();
    match &model.layers[1].down.weight {
        LinearWeight::BitStack(s) => {
            assert_eq!((s.k, s.blocks[1].host().unwrap().u.len()), (7, s.m * 7))
        }
        LinearWeight::Dense(_) => unreachable!(),
    }
}

#[test]
fn non_finite_perplexities_are_not_recorded_and_old_nulls_read_as_unmeasured() {
    use bitstack_quant::format::order::{Measurement, ORDER_FILE};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    SyntheticSpec::default().write_bitstack(&dir, 3, 2).unwrap();
    let mut ckpt = Checkpoint::open(&dir).unwrap();
    let at = |level, ppl| Measurement {
        level,
        ppl,
        windows: 4,
        text: "eval.txt".into(),
    };
    ckpt.record(at(1, 12.5)).unwrap();
    for bad in [f64::NAN, f64::INFINITY, 0.0, -3.0] {
        let err = ckpt.record(at(2, bad)).unwrap_err().to_string();
        assert!(err.contains("not recording"), "{err}");
    }
    assert_eq!(
        Checkpoint::open(&dir).unwrap().order().measured,
        [at(1, 12.5)]
    );

    // What an older build wrote for a NaN: `null`. It reads as not measured,
    // and the order, the ladder and budgets keep working.
    let path = dir.join(ORDER_FILE);
    let mut order: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    order["measured"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"level": 2, "ppl": null, "windows": 4, "text": "eval.txt"}));
    std::fs::write(&path, serde_json::to_vec(&order).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.order().measured, [at(1, 12.5)]);
    assert_eq!(ckpt.ladder()[1].ppl, Some(12.5));
    assert_eq!(ckpt.ladder()[2].ppl, None);
}

#[test]
fn concurrent_records_all_land() {
    use bitstack_quant::format::order::Measurement;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    SyntheticSpec::default().write_bitstack(&dir, 3, 2).unwrap();
    // Each thread opens the checkpoint first, as separate `eval --record`
    // processes do, then records its own level.
    let opened: Vec<Checkpoint> = (0..8).map(|_| Checkpoint::open(&dir).unwrap()).collect();
    std::thread::scope(|s| {
        for (level, mut ckpt) in opened.into_iter().enumerate() {
            s.spawn(move || {
                ckpt.record(Measurement {
                    level,
                    ppl: 10.0 + level as f64,
                    windows: 1,
                    text: "t".into(),
                })
                .unwrap()
            });
        }
    });
    let mut levels: Vec<usize> = Checkpoint::open(&dir)
        .unwrap()
        .order()
        .measured
        .iter()
        .map(|m| m.level)
        .collect();
    levels.sort();
    assert_eq!(levels, (0..8).collect::<Vec<_>>());
}
