//! Folding the activation scales must not change what the model computes.

mod common;

use bitstack_quant::eval::calibrate::{calibrate, windows};
use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::scale::{fold, o_is_scalable, LayerScales};
use bitstack_quant::runtime::model::{LinearKind, Llama};
use candle_core::{Device, Tensor};
use common::{dense_weight, logits, relative_error};
use indicatif::ProgressBar;

fn check(spec: SyntheticSpec) {
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path()).unwrap();
    let mut model = Llama::load(dir.path(), &BlockCounts::all(), &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..3 * 37)
        .map(|i| (i * 7919 % spec.vocab) as u32)
        .collect();
    let calib = windows(&tokens, 37, 0, 3);
    let ids = Tensor::from_vec(tokens[..37].to_vec(), (1, 37), &Device::Cpu).unwrap();
    let before = logits(&model, &ids);

    let stats = calibrate(&model, &calib, 2, false, &ProgressBar::hidden()).unwrap();
    let o_before: Vec<Vec<f32>> = (0..spec.layers)
        .map(|l| dense_weight(&model, l, LinearKind::O))
        .collect();
    let q_before = dense_weight(&model, 0, LinearKind::Q);
    for (l, s) in stats.iter().enumerate() {
        let scales = LayerScales::from_stats(s, &model.cfg).unwrap();
        assert_eq!(scales.o.is_some(), o_is_scalable(&model.cfg));
        fold(&mut model.layers[l], &scales).unwrap();
    }
    let rel = relative_error(&logits(&model, &ids), &before);
    assert!(rel < 1e-4, "logits changed by {rel}");
    // the weights themselves did change
    assert_ne!(q_before, dense_weight(&model, 0, LinearKind::Q));
    for (l, o) in o_before.iter().enumerate() {
        let changed = *o != dense_weight(&model, l, LinearKind::O);
        assert_eq!(
            changed,
            o_is_scalable(&model.cfg),
            "layer {l}: o_proj scaled = {changed}"
        );
    }
}

#[test]
fn folded_gqa_model_is_unchanged_and_o_is_not_scaled() {
    check(SyntheticSpec {
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
}

#[test]
fn folded_mha_model_is_unchanged_and_o_is_scaled() {
    check(SyntheticSpec {
        heads: 4,
        kv_heads: 4,
        seed: 5,
        ..Default::default()
    });
}

#[test]
fn folded_qwen2_with_bias_is_unchanged() {
    check(SyntheticSpec {
        model_type: "qwen2",
        heads: 4,
        kv_heads: 4,
        tied: false,
        seed: 9,
        ..Default::default()
    });
}
