//! End to end on the real SmolLM2-135M-Instruct (fetched and pinned by
//! `bitstack-assets`). Slow: `#[ignore]`d in the fast suite, run by CI with
//! `--include-ignored`.

#[path = "../bitstack-quant/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use bitstack_quant::eval::calibrate::{calibrate, windows};
use bitstack_quant::eval::perplexity::mean_nll;
use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::method::decompose::decompose;
use bitstack_quant::method::scale::{fold, o_is_scalable, LayerScales};
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::runtime::generate::{generate, SamplingOptions};
use bitstack_quant::runtime::model::{load_tokenizer, LinearKind, Llama};
use candle_core::{DType, Device, Tensor};
use common::{dense_weight, logits, relative_error};
use indicatif::ProgressBar;

/// The dense f32 model dir, imported once per assets dir.
fn smollm2() -> &'static (PathBuf, PathBuf) {
    static DIR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let assets = bitstack_assets::fetch_assets(None).expect("fetch-assets");
        let dir = assets.dir.join("SmolLM2-135M-Instruct");
        bitstack_assets::import_gguf_once(&assets.gguf, &dir, DType::F32).expect("import");
        (dir, assets.eval_text)
    })
}

#[test]
#[ignore = "end to end: fetches SmolLM2 and scores 64 windows"]
fn dense_perplexity_matches_transformers() {
    let (dir, eval) = smollm2();
    let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    let tok = load_tokenizer(dir).unwrap();
    let ids = tok
        .encode(std::fs::read_to_string(eval).unwrap(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.len(), 107_872);
    let (nll, scored, used) = mean_nll(&model, &ids, 512, 64, 4, &ProgressBar::hidden()).unwrap();
    assert_eq!((scored, used), (32_704, 64));
    let ppl = nll.exp();
    // PyTorch 2.5.1 / transformers 4.45.2 on the same protocol: 14.918.
    assert!((ppl - 14.918).abs() / 14.918 < 0.005, "PPL {ppl}");
}

#[test]
#[ignore = "end to end: needs SmolLM2"]
fn greedy_answers_paris() {
    let (dir, _) = smollm2();
    let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    let tok = load_tokenizer(dir).unwrap();
    let ids = tok
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    let opts = SamplingOptions {
        max_tokens: 2,
        temperature: 0.0,
        seed: 0,
    };
    let g = generate(&model, &ids, &[], &opts, |_| Ok(())).unwrap();
    let text = tok.decode(&g.tokens, false).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}

#[test]
#[ignore = "end to end: needs SmolLM2"]
fn folding_scales_keeps_logits_and_skips_o_under_gqa() {
    let (dir, eval) = smollm2();
    let mut model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    assert!(!o_is_scalable(&model.cfg), "SmolLM2 uses GQA");
    let tok = load_tokenizer(dir).unwrap();
    let text: String = std::fs::read_to_string(eval)
        .unwrap()
        .chars()
        .take(4000)
        .collect();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let calib = windows(&ids, 64, 0, 3);
    let probe = Tensor::from_vec(ids[200..264].to_vec(), (1, 64), &Device::Cpu).unwrap();
    let before = logits(&model, &probe);
    let o_before = dense_weight(&model, 3, LinearKind::O);
    let stats = calibrate(&model, &calib, 3, false, &ProgressBar::hidden()).unwrap();
    for (l, s) in stats.iter().enumerate() {
        let scales = LayerScales::from_stats(s, &model.cfg).unwrap();
        assert!(scales.o.is_none());
        fold(&mut model.layers[l], &scales).unwrap();
    }
    assert_eq!(o_before, dense_weight(&model, 3, LinearKind::O));
    let rel = relative_error(&logits(&model, &probe), &before);
    assert!(rel < 1e-4, "relative change {rel}");
}

#[test]
#[ignore = "end to end: needs SmolLM2"]
fn residual_decreases_on_real_matrices() {
    let (dir, _) = smollm2();
    let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    for (layer, kind) in [(0, LinearKind::K), (29, LinearKind::Down)] {
        let w = dense_weight(&model, layer, kind);
        let (m, n) = bitstack_quant::runtime::model::linear_shape(&model.cfg, kind);
        let d = decompose(&w, m, n, 16, 8, SvdMethod::Exact).unwrap();
        for pair in d.residual_norms.windows(2) {
            assert!(
                pair[1] < pair[0],
                "{}: {:?}",
                kind.path(layer),
                d.residual_norms
            );
        }
        // 8 blocks of rank 16 recover most of the matrix
        let rel = d.residual_norms[8] / d.residual_norms[0];
        assert!(rel < 0.25, "{}: ‖R₈‖/‖W‖ = {rel}", kind.path(layer));
    }
}

#[test]
#[ignore = "end to end: needs SmolLM2"]
fn randomized_svd_matches_exact_on_real_matrices() {
    let (dir, _) = smollm2();
    let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    for (layer, kind) in [(3, LinearKind::Q), (17, LinearKind::Up)] {
        let w = dense_weight(&model, layer, kind);
        let (m, n) = bitstack_quant::runtime::model::linear_shape(&model.cfg, kind);
        let exact = decompose(&w, m, n, 16, 4, SvdMethod::Exact).unwrap();
        let fast = decompose(&w, m, n, 16, 4, SvdMethod::randomized(0)).unwrap();
        for (i, (e, f)) in exact
            .residual_norms
            .iter()
            .zip(&fast.residual_norms)
            .enumerate()
        {
            assert!(
                (f - e).abs() <= 0.01 * e,
                "{} block {i}: {f} vs exact {e}",
                kind.path(layer)
            );
        }
    }
}
