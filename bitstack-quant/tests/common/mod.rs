//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use bitstack_quant::method::compress::{CompressOptions, Rotation};
use bitstack_quant::method::svd::SvdMethod;

use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{LinearKind, Llama};
use candle_core::Tensor;
use safetensors::Dtype;

/// A tensor as raw safetensors parts: name, dtype, shape, bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites the safetensors file at `path` after `edit` changed its tensors
/// (keeping its metadata, the blocks' checksums included).
pub fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
    rewrite_safetensors(path, edit, true)
}

/// As [`edit_safetensors`]; without `keep_metadata` the file loses its
/// metadata, as a checkpoint edited on purpose should lose its checksums.
pub fn rewrite_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut Vec<RawTensor>),
    keep_metadata: bool,
) {
    let bytes = std::fs::read(path).unwrap();
    let metadata = safetensors::SafeTensors::read_metadata(&bytes)
        .unwrap()
        .1
        .metadata()
        .clone()
        .filter(|_| keep_metadata);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// `‖a − b‖ / ‖b‖`.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The dense weight of a linear, flattened.
pub fn dense_weight(model: &Llama, layer: usize, kind: LinearKind) -> Vec<f32> {
    match &model.layers[layer].linear(kind).weight {
        LinearWeight::Dense(w) => w.flatten_all().unwrap().to_vec1().unwrap(),
        LinearWeight::BitStack(_) => panic!("{} is not dense", kind.path(layer)),
    }
}

/// All logits of `ids` (`[1, L]`), flattened.
pub fn logits(model: &Llama, ids: &Tensor) -> Vec<f32> {
    model
        .forward(ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Compression options for the small synthetic test models: the paper's
/// signs, the exact SVD, two calibration windows of 32 tokens.
pub fn small_options(calib_text: PathBuf, k: usize, niter: usize) -> CompressOptions {
    CompressOptions {
        k,
        niter,
        grid: None,
        calib_text,
        calib_windows: 2,
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
