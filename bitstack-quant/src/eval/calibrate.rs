//! Calibration: run text through the model one decoder layer at a time and
//! keep only per-linear input statistics, never the activations themselves.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};
use indicatif::ProgressBar;

use crate::runtime::model::{DecoderContext, DecoderLayer, Llama, NoTaps, TapPoint, Taps};

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
            let acc = self
                .stats
                .grams
                .entry(point)
                .or_insert_with(|| vec![0.0; n * n]);
            add_gram(acc, &x.reshape(((), n))?)?;
        }
        Ok(())
    }
}

/// Adds the lower triangle of `xᵀx` (`x`: `[T, n]`) to the row-major
/// `n×n` accumulator `acc`; [`mirror_lower`] completes it. On the CPU only
/// the triangle is computed, half the work of the full product, and that
/// work is as large as the forward's.
fn add_gram(acc: &mut [f64], x: &Tensor) -> candle_core::Result<()> {
    let (t, n) = x.dims2()?;
    if x.device().is_cpu() {
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let x = MatRef::from_row_major_slice(&values, t, n);
        let mut g = Mat::<f32>::zeros(n, n);
        triangular::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            x.transpose(),
            BlockStructure::Rectangular,
            x,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
        for q in 0..n {
            let col = g.col(q);
            for p in q..n {
                acc[p * n + q] += col[p] as f64;
            }
        }
    } else {
        let g = x.t()?.matmul(x)?.flatten_all()?.to_vec1::<f32>()?;
        for p in 0..n {
            for q in 0..=p {
                acc[p * n + q] += g[p * n + q] as f64;
            }
        }
    }
    Ok(())
}

/// Copies the lower triangle of the row-major `n×n` `a` onto its upper one.
fn mirror_lower(a: &mut [f64], n: usize) {
    for p in 0..n {
        for q in p + 1..n {
            a[p * n + q] = a[q * n + p];
        }
    }
}

/// Splits token ids into up to `count` non-overlapping windows of `len`,
/// skipping the first `skip` windows (none when `len` is 0).
pub fn windows(tokens: &[u32], len: usize, skip: usize, count: usize) -> Vec<Vec<u32>> {
    if len == 0 {
        return Vec::new();
    }
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

/// Calibration one decoder layer at a time: holds the hidden states of all
/// windows at the next layer, so a caller can use (and drop) each layer's
/// statistics before the next is computed.
pub struct LayerByLayer {
    hidden: Vec<Tensor>,
    next: usize,
    windows: usize,
    grams: bool,
}

impl LayerByLayer {
    /// Embeds `windows` (in batches of `batch` windows); statistics include
    /// the Gram matrices of the linears' inputs when `grams` is set.
    pub fn new(model: &Llama, windows: &[Vec<u32>], batch: usize, grams: bool) -> Result<Self> {
        let hidden = window_batches(windows, batch, &model.device)?
            .iter()
            .map(|ids| model.embed(ids))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self::from_hidden(hidden, windows.len(), grams))
    }

    /// As [`LayerByLayer::new`], looking the tokens up in the embedding
    /// table `embed` (`[vocab, d]`) alone: the caller may drop the table
    /// afterwards.
    pub fn embedding(
        embed: &Tensor,
        windows: &[Vec<u32>],
        batch: usize,
        grams: bool,
    ) -> Result<Self> {
        let d = embed.dim(1)?;
        let hidden = window_batches(windows, batch, embed.device())?
            .iter()
            .map(|ids| {
                let (b, l) = ids.dims2()?;
                embed
                    .index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, l, d))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self::from_hidden(hidden, windows.len(), grams))
    }

    fn from_hidden(hidden: Vec<Tensor>, windows: usize, grams: bool) -> Self {
        Self {
            hidden,
            next: 0,
            windows,
            grams,
        }
    }

    /// Index of the layer [`next_layer`](Self::next_layer) runs.
    pub fn next_index(&self) -> usize {
        self.next
    }

    /// Runs the next layer of `model` (which must compute what it computed
    /// for the earlier layers) and returns its input statistics.
    pub fn next_layer(&mut self, model: &Llama) -> Result<LayerStats> {
        self.next_layer_of(&model.context(), &model.layers[self.next])
    }

    /// Runs `layer`, the next decoder layer, held alone (the model's other
    /// layers need not be loaded), and returns its input statistics.
    pub fn next_layer_of(
        &mut self,
        ctx: &DecoderContext,
        layer: &DecoderLayer,
    ) -> Result<LayerStats> {
        let mut stats = LayerStats {
            windows: self.windows,
            ..Default::default()
        };
        for h in self.hidden.iter_mut() {
            let mut taps = StatTaps {
                stats: &mut stats,
                grams: self.grams,
            };
            *h = layer.forward(ctx, h, &mut taps, None)?;
        }
        stats.finish();
        self.next += 1;
        Ok(stats)
    }

    /// The input statistics of `layer`, the next decoder layer, without
    /// moving on: the caller may change the layer (quantize it, as GPTQ
    /// does) and then [`advance`](Self::advance) through the changed one,
    /// so that later layers are calibrated on what the changed model feeds
    /// them. Costs a second forward of the layer.
    pub fn peek_layer_of(&self, ctx: &DecoderContext, layer: &DecoderLayer) -> Result<LayerStats> {
        let mut stats = LayerStats {
            windows: self.windows,
            ..Default::default()
        };
        for h in &self.hidden {
            let mut taps = StatTaps {
                stats: &mut stats,
                grams: self.grams,
            };
            layer.forward(ctx, h, &mut taps, None)?;
        }
        stats.finish();
        Ok(stats)
    }

    /// Carries the hidden states through `layer`, the next decoder layer,
    /// recording nothing.
    pub fn advance(&mut self, ctx: &DecoderContext, layer: &DecoderLayer) -> Result<()> {
        for h in self.hidden.iter_mut() {
            *h = layer.forward(ctx, h, &mut NoTaps, None)?;
        }
        self.next += 1;
        Ok(())
    }
}

impl LayerStats {
    /// Completes the Gram matrices, of which only the lower triangles were summed.
    fn finish(&mut self) {
        for gram in self.grams.values_mut() {
            let n = (gram.len() as f64).sqrt().round() as usize;
            mirror_lower(gram, n);
        }
    }
}

/// Runs `windows` through `model` layer by layer (in batches of `batch`
/// windows) and returns the input statistics of every layer, with the Gram
/// matrices of the linears' inputs when `grams` is set.
pub fn calibrate(
    model: &Llama,
    windows: &[Vec<u32>],
    batch: usize,
    grams: bool,
    progress: &ProgressBar,
) -> Result<Vec<LayerStats>> {
    let mut calibration = LayerByLayer::new(model, windows, batch, grams)?;
    (0..model.layers.len())
        .map(|_| {
            let stats = calibration.next_layer(model);
            progress.inc(1);
            stats
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gram_accumulates_x_transpose_x() {
        for (t, n) in [(1, 1), (37, 13), (5, 130)] {
            let values: Vec<f32> = (0..t * n)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let x = Tensor::from_vec(values.clone(), (t, n), &Device::Cpu).unwrap();
            let mut acc = vec![0f64; n * n];
            add_gram(&mut acc, &x).unwrap();
            add_gram(&mut acc, &x).unwrap();
            mirror_lower(&mut acc, n);
            for p in 0..n {
                for q in 0..n {
                    let want: f64 = (0..t)
                        .map(|r| 2.0 * values[r * n + p] as f64 * values[r * n + q] as f64)
                        .sum();
                    let got = acc[p * n + q];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{t}×{n} at ({p}, {q}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
