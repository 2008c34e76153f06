//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use bitstack_quant::method::compress::CompressOptions;
use bitstack_quant::method::svd::SvdMethod;

/// Compression options for the small synthetic test models: the paper's
/// signs, the exact SVD, two calibration windows of 32 tokens.
pub fn small_options(calib_text: PathBuf, k: usize, niter: usize) -> CompressOptions {
    CompressOptions {
        k,
        niter,
        calib_text,
        calib_windows: 2,
        seq_len: 32,
        batch: 2,
        svd: SvdMethod::Exact,
        feedback: None,
        k_per_kind: Default::default(),
    }
}
