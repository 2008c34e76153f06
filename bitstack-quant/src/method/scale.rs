//! Activation-aware scaling with folding (docs/design.md, "The method", step 1).
//!
//! `s[c] = (mean over windows of ‖x[window, :, c]‖₂ + 1e-3)^α`; the weight
//! is multiplied by `diag(s)` before decomposition so that channels with
//! large activations are fitted better, and `1/s` is folded into whatever
//! produces the input, so inference pays nothing.
//!
//! The reference takes `α = 1`, which suits AVD blocks. Grid planes want
//! `α = 1/2` (as AWQ's searched exponents tend to): a group's range is set
//! by its largest scaled weights, and at `α = 1` the few columns with large
//! activations stretch it until the rest of the group is rounded to one or
//! two levels. On SmolLM2 (8 windows) `α = 1/2` took 3 planes from 45.2 to
//! 24.9 on wiki text and from 37.3 to 15.3 on Rust code, 4 planes from 16.6
//! to 15.2 and 10.8 to 9.4. For AVD blocks of sign(R) it made 3 blocks far
//! worse; with feedback signs it helped on the calibration's domain only.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use crate::eval::calibrate::LayerStats;
use crate::format::config::ModelConfig;
use crate::runtime::linear::LinearWeight;
use crate::runtime::model::{linear_shape, DecoderLayer, LinearKind, TapPoint};

/// The reference's epsilon added to every scale.
pub const SCALE_EPS: f64 = 1e-3;
/// The exponent `α` of the scales for AVD blocks (the reference's).
pub const AVD_SCALE_POWER: f32 = 1.0;
/// The exponent `α` of the scales for a stack of grid planes only.
pub const GRID_SCALE_POWER: f32 = 0.5;

/// Scales of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerScales {
    /// q, k, v columns; folded into `input_layernorm`.
    pub attn: Vec<f32>,
    /// o columns; folded into the rows of v. `None` under GQA (shapes differ).
    pub o: Option<Vec<f32>>,
    /// gate, up columns; folded into `post_attention_layernorm`.
    pub mlp: Vec<f32>,
    /// down columns; folded into the rows of up.
    pub down: Vec<f32>,
}

/// Whether o_proj can be scaled: only when v_proj and o_proj have equal
/// shapes, i.e. never under grouped-query attention.
pub fn o_is_scalable(cfg: &ModelConfig) -> bool {
    linear_shape(cfg, LinearKind::V) == linear_shape(cfg, LinearKind::O)
}

/// The Gram matrix `Σ x xᵀ` (row-major `n×n`) of inputs divided by
/// `scale`: the inputs as a linear whose columns were multiplied by it
/// sees them (unchanged without a scale).
pub fn scaled_gram(gram: &[f64], n: usize, scale: Option<&[f32]>) -> Vec<f64> {
    let s = |c: usize| scale.map_or(1.0, |s| s[c] as f64);
    (0..n * n)
        .map(|pq| gram[pq] / (s(pq / n) * s(pq % n)))
        .collect()
}

impl LayerScales {
    /// The scale of `kind`'s input columns, `None` where it is not scaled.
    pub fn of(&self, kind: LinearKind) -> Option<&[f32]> {
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => Some(&self.attn),
            LinearKind::O => self.o.as_deref(),
            LinearKind::Gate | LinearKind::Up => Some(&self.mlp),
            LinearKind::Down => Some(&self.down),
        }
    }

    /// The reference's scales (`α = 1`).
    pub fn from_stats(stats: &LayerStats, cfg: &ModelConfig) -> Result<Self> {
        Self::from_stats_with_power(stats, cfg, AVD_SCALE_POWER)
    }

    /// The scales `(norm + ε)^power`.
    pub fn from_stats_with_power(
        stats: &LayerStats,
        cfg: &ModelConfig,
        power: f32,
    ) -> Result<Self> {
        let get = |p: TapPoint| -> Result<Vec<f32>> {
            let v = stats
                .mean_norms(p)
                .with_context(|| format!("calibration recorded no {p:?} input"))?;
            Ok(v.iter()
                .map(|x| ((x + SCALE_EPS) as f32).powf(power))
                .collect())
        };
        Ok(Self {
            attn: get(TapPoint::AttnInput)?,
            o: if o_is_scalable(cfg) {
                Some(get(TapPoint::OInput)?)
            } else {
                None
            },
            mlp: get(TapPoint::MlpInput)?,
            down: get(TapPoint::DownInput)?,
        })
    }
}

fn dense(layer: &mut DecoderLayer, kind: LinearKind) -> Result<&mut Tensor> {
    match &mut layer.linear_mut(kind).weight {
        LinearWeight::Dense(w) => Ok(w),
        LinearWeight::BitStack(_) => anyhow::bail!(
            "{} is already compressed; scaling needs the dense weight",
            kind.name()
        ),
    }
}

fn row(s: &[f32], like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_slice(s, (1, s.len()), like.device())?.to_dtype(like.dtype())
}

/// Folds `s` into a layer: scaled linears get `W·diag(s)`, their producers `÷ s`.
/// The layer computes the same function afterwards (up to rounding).
pub fn fold(layer: &mut DecoderLayer, s: &LayerScales) -> Result<()> {
    let scale_cols = |w: &mut Tensor, s: &[f32]| -> Result<()> {
        *w = w.broadcast_mul(&row(s, w)?)?;
        Ok(())
    };
    let divide_rows = |w: &mut Tensor, s: &[f32]| -> Result<()> {
        *w = w.broadcast_div(&row(s, w)?.t()?)?;
        Ok(())
    };
    // In f32 whatever the source stores: the writer rounds once, at the end.
    let divide_vec = |v: &mut Tensor, s: &[f32]| -> Result<()> {
        *v = v
            .to_dtype(DType::F32)?
            .div(&Tensor::from_slice(s, s.len(), v.device())?)?;
        Ok(())
    };

    for kind in [LinearKind::Q, LinearKind::K, LinearKind::V] {
        scale_cols(dense(layer, kind)?, &s.attn)?;
    }
    divide_vec(&mut layer.input_layernorm, &s.attn)?;

    if let Some(so) = &s.o {
        scale_cols(dense(layer, LinearKind::O)?, so)?;
        divide_rows(dense(layer, LinearKind::V)?, so)?;
        if let Some(b) = &mut layer.v.bias {
            divide_vec(b, so)?;
        }
    }

    for kind in [LinearKind::Gate, LinearKind::Up] {
        scale_cols(dense(layer, kind)?, &s.mlp)?;
    }
    divide_vec(&mut layer.post_attention_layernorm, &s.mlp)?;

    scale_cols(dense(layer, LinearKind::Down)?, &s.down)?;
    divide_rows(dense(layer, LinearKind::Up)?, &s.down)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scaled Gram is the Gram of the inputs divided by the scale.
    #[test]
    fn a_scaled_gram_is_the_gram_of_the_divided_inputs() {
        let (n, tokens) = (5, 7);
        let x: Vec<f64> = (0..tokens * n)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let scale: Vec<f32> = (0..n).map(|c| 0.5 + c as f32 * 0.75).collect();
        let gram_of = |x: &[f64]| -> Vec<f64> {
            (0..n * n)
                .map(|pq| {
                    (0..tokens)
                        .map(|t| x[t * n + pq / n] * x[t * n + pq % n])
                        .sum()
                })
                .collect()
        };
        let divided: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v / scale[i % n] as f64)
            .collect();
        let want = gram_of(&divided);
        let got = scaled_gram(&gram_of(&x), n, Some(&scale));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} against {w}");
        }
        assert_eq!(scaled_gram(&gram_of(&x), n, None), gram_of(&x));
    }
}
