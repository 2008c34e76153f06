//! Calibration: run text through the model one decoder layer at a time and
//! keep only per-linear input statistics, never the activations themselves.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::model::{Llama, TapPoint, Taps};

/// Input statistics of one decoder layer's linears.
#[derive(Clone, Debug, Default)]
pub struct LayerStats {
    /// Per tap point and input channel `c`: Σ over windows of `‖x[window, :, c]‖₂`.
    pub norm_sums: HashMap<TapPoint, Vec<f64>>,
    /// Per tap point, when asked for: `Σ x xᵀ` over all positions, row-major `n×n`.
    pub grams: HashMap<TapPoint, Vec<f64>>,
    /// Windows seen.
    pub windows: usize,
}

impl LayerStats {
    /// `mean over windows of ‖x[window, :, c]‖₂`, the reference's activation scale (before eps).
    pub fn mean_norms(&self, point: TapPoint) -> Option<Vec<f64>> {
        let sums = self.norm_sums.get(&point)?;
        Some(sums.iter().map(|s| s / self.windows as f64).collect())
    }
}

struct StatTaps<'a> {
    stats: &'a mut LayerStats,
    grams: bool,
}

impl Taps for StatTaps<'_> {
    fn record(&mut self, point: TapPoint, x: &Tensor) -> candle_core::Result<()> {
        // x: [B, L, n] → per window and channel, the L2 norm over positions.
        let norms = x.sqr()?.sum(1)?.sqrt()?.sum(0)?.to_vec1::<f32>()?;
        let acc = self
            .stats
            .norm_sums
            .entry(point)
            .or_insert_with(|| vec![0.0; norms.len()]);
        for (a, v) in acc.iter_mut().zip(norms) {
            *a += v as f64;
        }
        if self.grams {
            let n = x.dim(candle_core::D::Minus1)?;
            let flat = x.reshape(((), n))?;
            let g = flat.t()?.matmul(&flat)?.flatten_all()?.to_vec1::<f32>()?;
            let acc = self
                .stats
                .grams
                .entry(point)
                .or_insert_with(|| vec![0.0; n * n]);
            for (a, v) in acc.iter_mut().zip(g) {
                *a += v as f64;
            }
        }
        Ok(())
    }
}

/// Splits token ids into up to `count` non-overlapping windows of `len`,
/// skipping the first `skip` windows.
pub fn windows(tokens: &[u32], len: usize, skip: usize, count: usize) -> Vec<Vec<u32>> {
    tokens
        .chunks_exact(len)
        .skip(skip)
        .take(count)
        .map(<[u32]>::to_vec)
        .collect()
}

/// Token windows (all of one length) as `[B, L]` id tensors of up to `batch` windows.
pub fn window_batches(
    windows: &[Vec<u32>],
    batch: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Vec<Tensor>> {
    windows
        .chunks(batch.max(1))
        .map(|chunk| {
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (chunk.len(), chunk[0].len()), device)
        })
        .collect()
}

/// Runs `windows` through `model` layer by layer (in batches of `batch`
/// windows) and returns the input statistics of every layer, with the Gram
/// matrices of the linears' inputs when `grams` is set.
///
/// Memory: the hidden states of all windows at one layer, plus one batch's
/// intermediate activations (and the Gram matrices: `n²` values per input).
pub fn calibrate(
    model: &Llama,
    windows: &[Vec<u32>],
    batch: usize,
    grams: bool,
    progress: &ProgressBar,
) -> Result<Vec<LayerStats>> {
    let mut hidden: Vec<Tensor> = window_batches(windows, batch, &model.device)?
        .iter()
        .map(|ids| model.embed(ids))
        .collect::<candle_core::Result<_>>()?;
    let mut all = Vec::with_capacity(model.layers.len());
    for layer in 0..model.layers.len() {
        let mut stats = LayerStats {
            windows: windows.len(),
            ..Default::default()
        };
        for h in hidden.iter_mut() {
            let mut taps = StatTaps {
                stats: &mut stats,
                grams,
            };
            *h = model.layer_forward(layer, h, &mut taps)?;
        }
        all.push(stats);
        progress.inc(1);
    }
    Ok(all)
}
