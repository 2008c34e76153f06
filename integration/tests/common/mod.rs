//! What the integration tests share: the SmolLM2 checkpoint they run.

use std::path::PathBuf;
use std::sync::OnceLock;

use bitstack_quant::format::grid::{GridCoding, GridConfig};
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::{compress, CompressOptions, DenseDtype, Rotation};
use candle_core::DType;

/// The dense SmolLM2 (f32, imported from the pinned GGUF once per assets
/// folder), with its tokenizer and chat template.
#[allow(dead_code)]
pub fn dense() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let assets = bitstack_assets::fetch_assets(None).expect("fetch-assets");
        let dense = assets.dir.join("SmolLM2-135M-Instruct");
        bitstack_assets::import_gguf_once(&assets.gguf, &dense, DType::F32).expect("import");
        dense
    })
}

/// A quick BitStack checkpoint of SmolLM2 (4 blocks of rank 4 per linear,
/// round-robin order), made once per assets folder.
#[allow(dead_code)]
pub fn checkpoint() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        compressed_once("SmolLM2-135M-Instruct-bitstack-k4x4", |calib_text| {
            CompressOptions {
                k: 4,
                k_per_kind: Default::default(),
                niter: 4,
                grid: None,
                calib_text,
                calib_windows: 8,
                seq_len: 256,
                batch: 4,
                svd: SvdMethod::randomized(0),
                feedback: None,
                // The shared checkpoint predates 16-bit dense parts.
                dense_dtype: DenseDtype::F32,
                scale_power: None,
                rotation: Rotation::None,
                plane_feedback: None,
            }
        })
    })
}

/// A quick grid-plane checkpoint of SmolLM2 (the default layout: 4 planes
/// per linear, 8-bit grid numbers, inputs rotated in blocks of 64, format
/// version 4; round-robin order),
/// made once per assets folder.
#[allow(dead_code)]
pub fn grid_checkpoint() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        compressed_once(
            "SmolLM2-135M-Instruct-bitstack-planes4-rot64-scaled",
            |calib_text| CompressOptions {
                grid: Some(GridConfig {
                    coding: GridCoding::Int8Scaled,
                    ..GridConfig::new(4)
                }),
                calib_windows: 8,
                seq_len: 256,
                ..CompressOptions::recommended(calib_text)
            },
        )
    })
}

/// The dense SmolLM2 compressed into `name` in the assets folder with the
/// options `opts` gives for the calibration text, unless a run before made
/// it: written as `name.partial`, then renamed, so a killed run leaves no
/// half checkpoint under `name`.
#[allow(dead_code)]
fn compressed_once(name: &str, opts: impl FnOnce(PathBuf) -> CompressOptions) -> PathBuf {
    let assets = bitstack_assets::fetch_assets(None).expect("fetch-assets");
    let out = assets.dir.join(name);
    if !out.join("config.json").exists() {
        let partial = out.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        compress(dense(), &partial, &opts(assets.calib_text.clone())).expect("compress");
        std::fs::rename(&partial, &out).expect("rename");
    }
    out
}

/// The raw logits mistral.rs returns for a one-message chat, as flat f32,
/// and the prompt's tokens.
#[allow(dead_code)]
pub async fn raw_logits(model: &mistralrs::Model, prompt: &str) -> (Vec<f32>, Vec<u32>) {
    let messages =
        mistralrs::TextMessages::new().add_message(mistralrs::TextMessageRole::User, prompt);
    let (chunks, tokens) = model.send_raw_chat_request(messages).await.unwrap();
    (flat_f32(chunks.last().unwrap()), tokens)
}

/// A tensor's values, flattened, as f32.
#[allow(dead_code)]
pub fn flat_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Our runner's logits for `tokens` (one sequence) at the handle's level,
/// on its device, as flat f32.
#[allow(dead_code)]
pub fn our_logits(handle: &bitstack_quant::BitStackHandle, tokens: &[u32]) -> Vec<f32> {
    let snapshot = handle.snapshot();
    let ids = candle_core::Tensor::new(tokens, &snapshot.device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    flat_f32(&snapshot.model.forward(&ids).unwrap())
}

/// The largest |a - b|, and the scale it is judged against: the largest |b|.
#[allow(dead_code)]
pub fn gap(a: &[f32], b: &[f32]) -> (f32, f32) {
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (worst, b.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// The index of the largest value (the greedy token).
#[allow(dead_code)]
pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}
