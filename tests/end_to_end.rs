//! The whole job on the real SmolLM2-135M-Instruct, through the `bitstack`
//! commands (run in-process, as the binary runs them): compress → sort →
//! eval at several budgets (recorded with the ladder) → generate, then a
//! running model resized down and up equals fresh loads of those rungs.
//! Slow: `#[ignore]`d in the fast suite, run by CI with `--include-ignored`.

use std::path::{Path, PathBuf};

use bitstack::runtime::model::load_tokenizer;
use bitstack::{BitStackHandle, Budget, Checkpoint, Llama};
use bitstack_cli::cli::Cli;
use candle_core::{DType, Device, Tensor};
use clap::Parser;

fn bitstack(args: &[&str]) {
    let cli = Cli::try_parse_from(std::iter::once("bitstack").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("bitstack {args:?}: {e}"));
    bitstack_cli::run(cli).unwrap_or_else(|e| panic!("bitstack {args:?}: {e:#}"));
}

/// The dense f32 SmolLM2 dir, imported once per assets dir, and the
/// calibration and evaluation texts.
fn smollm2() -> (PathBuf, PathBuf, PathBuf) {
    let assets = bitstack_assets::fetch_assets(None).expect("fetch-assets");
    let dir = assets.dir.join("SmolLM2-135M-Instruct");
    // Both tests of this file may import at once.
    bitstack_assets::import_gguf_once(&assets.gguf, &dir, DType::F32).expect("import");
    (dir, assets.calib_text, assets.eval_text)
}

fn last_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x).unwrap();
    let last = logits.dim(1).unwrap() - 1;
    logits
        .narrow(1, last, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
#[ignore = "end to end: fetches SmolLM2, compresses, sorts and scores it"]
fn compress_sort_eval_and_resize_the_real_model() {
    let (dense, calib, eval_text) = smollm2();
    let root = tempfile::tempdir().unwrap();
    let packed = root.path().join("smollm2-bitstack");
    let window = ["--seq-len", "128", "--batch", "4"];

    let compress = [
        "compress",
        s(&dense),
        s(&packed),
        "--layout",
        "blocks",
        "--k",
        "4",
        "--niter",
        "3",
        "--signs",
        "avd",
        "--calib",
        s(&calib),
        "--calib-windows",
        "4",
    ];
    bitstack(&[&compress[..], &window].concat());
    let sort = [
        "sort",
        s(&packed),
        "--calib",
        s(&calib),
        "--sort-windows",
        "1",
        "--skip-windows",
        "4",
    ];
    bitstack(&[&sort[..], &window].concat());

    // Three rungs: the floor, the middle and the top of the ladder.
    let ladder = Checkpoint::open(&packed).unwrap().ladder();
    assert_eq!(ladder.len(), 1 + 2 * 210);
    let rungs = [&ladder[0], &ladder[210], &ladder[420]];
    for rung in rungs {
        let budget = format!("{}B", rung.total_bytes);
        let eval = [
            "eval",
            s(&packed),
            "--text",
            s(&eval_text),
            "--windows",
            "4",
            "--budget",
            &budget,
            "--record",
        ];
        bitstack(&[&eval[..], &window].concat());
    }
    let checkpoint = Checkpoint::open(&packed).unwrap();
    let measured: Vec<(usize, f64)> = checkpoint
        .order()
        .measured
        .iter()
        .map(|m| (m.level, m.ppl))
        .collect();
    let levels: Vec<usize> = measured.iter().map(|m| m.0).collect();
    assert_eq!(levels, [0, 210, 420]);
    // More blocks, better model; all of them far better than the floor.
    assert!(
        measured[0].1 > measured[1].1 && measured[1].1 > measured[2].1,
        "{measured:?}"
    );
    assert!(measured[2].1 < 0.5 * measured[0].1, "{measured:?}");
    bitstack(&[
        "generate",
        s(&packed),
        "--prompt",
        "The capital of France is",
        "--budget",
        "100%",
        "--max-tokens",
        "4",
    ]);

    // A running model resized down and back up equals fresh loads.
    let ids = load_tokenizer(&packed)
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let fresh: Vec<Vec<f32>> = rungs
        .iter()
        .map(|r| {
            let plan = checkpoint.plan_level(r.level).unwrap();
            let model = Llama::from_checkpoint(&checkpoint, &plan.counts, &Device::Cpu).unwrap();
            last_logits(&model, &ids)
        })
        .collect();
    let plan = checkpoint
        .plan(Budget::Bytes(rungs[2].total_bytes as u64))
        .unwrap();
    let handle = BitStackHandle::from_checkpoint(checkpoint, &plan, &Device::Cpu).unwrap();
    for (i, rung) in [2, 0, 1, 2].map(|i| (i, rungs[i])) {
        handle.set_budget(rung.total_bytes as u64).unwrap();
        assert_eq!(handle.level(), rung.level);
        assert_eq!(handle.resident_bytes(), rung.total_bytes as u64);
        assert_eq!(last_logits(&handle.snapshot(), &ids), fresh[i], "rung {i}");
    }
}

/// The quality check CI runs: SmolLM2 compressed as grid planes (calibrated
/// on 4 short windows, so it takes seconds) against round-to-nearest w4 g128
/// and dense on the first windows of the wiki eval text. The full protocol's
/// numbers are in the README; these bounds catch a kernel, format or
/// quantizer change that costs quality.
#[test]
#[ignore = "end to end: fetches SmolLM2, compresses it as grid planes and scores a few windows"]
fn grid_planes_stay_near_dense_and_ahead_of_rtn() {
    use bitstack::eval::perplexity::mean_nll;
    use bitstack::format::checkpoint::BlockCounts;
    use bitstack::method::rtn::apply_rtn;
    use bitstack::runtime::model::tokenize_file;
    use indicatif::ProgressBar;

    let (dense, calib, eval_text) = smollm2();
    let root = tempfile::tempdir().unwrap();
    let packed = root.path().join("smollm2-planes");
    bitstack(&[
        "compress",
        s(&dense),
        s(&packed),
        "--planes",
        "5",
        "--calib",
        s(&calib),
        "--calib-windows",
        "4",
        "--seq-len",
        "128",
    ]);
    let ids = tokenize_file(&load_tokenizer(&dense).unwrap(), &eval_text).unwrap();
    let ppl = |model: &Llama| {
        let (nll, _, used) = mean_nll(model, &ids, 256, 16, 4, &ProgressBar::hidden()).unwrap();
        assert_eq!(used, 16);
        nll.exp()
    };
    let cpu = Device::Cpu;
    let dense_ppl = ppl(&Llama::load(&dense, &BlockCounts::all(), &cpu).unwrap());
    let mut rtn = Llama::load(&dense, &BlockCounts::all(), &cpu).unwrap();
    apply_rtn(&mut rtn, 4, 128).unwrap();
    let rtn_ppl = ppl(&rtn);
    let planes: Vec<f64> = (3..=5)
        .map(|p| ppl(&Llama::load(&packed, &BlockCounts::uniform(p), &cpu).unwrap()))
        .collect();
    eprintln!("dense {dense_ppl:.3}, RTN w4 {rtn_ppl:.3}, 3/4/5 planes {planes:.3?}");
    assert!(planes[0] > planes[1] && planes[1] > planes[2], "{planes:?}");
    // Measured: dense 14.59, RTN w4 19.84, 3/4/5 planes 26.53 / 16.63 /
    // 14.95 on rotated inputs (27.9 / 16.99 / 15.07 without, 70.4 / 19.87
    // / 15.87 before the scales' exponent 1/2). 4 planes cost 4.40 bits
    // per weight here, RTN w4 g128 4.27; sorted budgets do better than
    // these uniform rungs (README).
    assert!(
        planes[0] < 2.0 * dense_ppl,
        "3 planes {} vs dense {dense_ppl}",
        planes[0]
    );
    assert!(
        planes[1] < 0.9 * rtn_ppl,
        "4 planes {} vs RTN w4 {rtn_ppl}",
        planes[1]
    );
    assert!(
        planes[2] < 1.045 * dense_ppl,
        "5 planes {} vs dense {dense_ppl}",
        planes[2]
    );
}
