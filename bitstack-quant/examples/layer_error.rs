//! Per-linear output error of BitStack blocks, RTN, GPTQ and nested bit
//! planes at their bits per weight: a fast A/B for decomposition changes,
//! minutes instead of the hour a compress, sort and ladder take.
//!
//! Each chosen decoder layer is calibrated (on the dense model's own
//! hidden states) on `--windows` windows of the calibration text, scaled
//! and folded as `compress` does, and every method is fitted to the scaled
//! weight. The error printed is the relative output error
//! `tr(E·H·Eᵀ) / tr(W·H·Wᵀ)` on the Gram `H` of the calibration windows and
//! on that of `--held-out` text (a text of another kind shows which
//! methods overfit the calibration's domain).
//!
//! ```text
//! cargo run --release --example layer_error -- MODEL CALIB.txt HELD_OUT.txt --layers 5,20
//! ```

use std::path::PathBuf;

use anyhow::Result;
use bitstack_quant::eval::calibrate::{windows, LayerByLayer};
use bitstack_quant::format::block::reconstruct;
use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::format::config::ModelConfig;
use bitstack_quant::format::store::TensorStore;
use bitstack_quant::method::decompose::{decompose_with, Refit};
use bitstack_quant::method::feedback::Feedback;
use bitstack_quant::method::gptq::{gptq_in_place, GptqOptions};
use bitstack_quant::method::rtn::{rtn_bits_per_weight, rtn_in_place};
use bitstack_quant::method::scale::{fold, scaled_gram, LayerScales};
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{
    linear_shape, load_tokenizer, stored_tensor, tokenize_file, DecoderContext, DecoderLayer,
    LinearKind, Rope,
};
use bitstack_quant::{bits_per_weight, BlockShape};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use faer::Mat;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// Today's blocks: AVD with error-feedback signs and the weighted refit.
    Bitstack,
    /// Round to nearest, groups of 128.
    Rtn,
    /// GPTQ, groups of 128, natural column order.
    Gptq,
    /// Nested uniform bit planes (MSB first) of a per-group grid: a center
    /// and a half-range per row and 128 columns, plane b of magnitude
    /// half-range/2^(b+1). Every prefix is a uniform grid, but none has a
    /// level at zero.
    Planes,
}

#[derive(Parser, Debug)]
struct Args {
    /// Dense model directory.
    model: PathBuf,
    /// Calibration text: the methods are fitted on its Grams.
    calib: PathBuf,
    /// Held-out text: errors are also measured on its Grams.
    held_out: PathBuf,
    /// Decoder layers to measure.
    #[arg(long, value_delimiter = ',', default_value = "5")]
    layers: Vec<usize>,
    /// Linears to measure (short names) [default: all].
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "bitstack,rtn,gptq")]
    methods: Vec<Method>,
    /// Calibration windows of 512 tokens.
    #[arg(long, default_value_t = 32)]
    windows: usize,
    /// Held-out windows of 512 tokens.
    #[arg(long, default_value_t = 32)]
    held_out_windows: usize,
    /// Rank of the BitStack blocks.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Planes: weights per group of 128 kept exact (the largest in
    /// magnitude; f16 value and 7-bit index each) and left out of the grid.
    #[arg(long, default_value_t = 0)]
    outliers: usize,
    /// BitStack blocks (and bit planes) per linear.
    #[arg(long, default_value_t = 6)]
    niter: usize,
}

/// `tr(E·H·Eᵀ)` for the row-major `m×n` `e`.
fn output_energy(e: &[f32], m: usize, n: usize, h: &Mat<f32>) -> f64 {
    let em = Mat::<f32>::from_fn(m, n, |i, j| e[i * n + j]);
    let eh = &em * h;
    (0..m)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| (eh[(i, j)] * em[(i, j)]) as f64)
        .sum()
}

/// A row-major `n×n` Gram matrix as an f32 matrix.
fn gram_matrix(g: &[f64], n: usize) -> Mat<f32> {
    Mat::from_fn(n, n, |p, q| g[p * n + q] as f32)
}

/// Reconstructions of the first 1…`planes` nested bit planes of `w`.
fn bit_planes(w: &[f32], n: usize, planes: usize, group: usize, outliers: usize) -> Vec<Vec<f32>> {
    let mut center = vec![0f32; w.len()];
    let mut half_range = vec![0f32; w.len()];
    let mut exact = vec![false; w.len()];
    for (r, row) in w.chunks(n).enumerate() {
        for (g, values) in row.chunks(group).enumerate() {
            let at = r * n + g * group;
            let mut by_size: Vec<usize> = (0..values.len()).collect();
            by_size.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
            for &j in by_size.iter().take(outliers) {
                exact[at + j] = true;
            }
            let kept = || {
                (0..values.len())
                    .filter(|&j| !exact[at + j])
                    .map(|j| values[j])
            };
            let lo = kept().fold(f32::INFINITY, f32::min);
            let hi = kept().fold(f32::NEG_INFINITY, f32::max);
            center[at..at + values.len()].fill(half::f16::from_f32((lo + hi) / 2.0).to_f32());
            half_range[at..at + values.len()].fill(half::f16::from_f32((hi - lo) / 2.0).to_f32());
        }
    }
    let mut approx = center;
    (0..planes)
        .map(|b| {
            for (((a, x), h), e) in approx.iter_mut().zip(w).zip(&half_range).zip(&exact) {
                let mag = h / (2u32 << b) as f32;
                *a = if *e {
                    half::f16::from_f32(*x).to_f32()
                } else if x >= a {
                    *a + mag
                } else {
                    *a - mag
                };
            }
            approx.clone()
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = ModelConfig::from_dir(&args.model)?;
    let tok = load_tokenizer(&args.model)?;
    let fit_windows = windows(&tokenize_file(&tok, &args.calib)?, 512, 0, args.windows);
    let held_windows = windows(
        &tokenize_file(&tok, &args.held_out)?,
        512,
        0,
        args.held_out_windows,
    );
    let store = TensorStore::open_dir(&args.model)?;
    let device = Device::Cpu;
    let embed = stored_tensor(
        &store,
        "model.embed_tokens.weight",
        &[cfg.vocab_size, cfg.hidden_size],
        &device,
    )?
    .to_dtype(DType::F32)?;
    let mut fit = LayerByLayer::embedding(&embed, &fit_windows, 4, true)?;
    let mut held = LayerByLayer::embedding(&embed, &held_windows, 4, true)?;
    let rope = Rope::new(&cfg, 512, &device)?;
    let ctx = DecoderContext {
        cfg: &cfg,
        rope: &rope,
        differentiable: false,
    };
    let kinds: Vec<LinearKind> = LinearKind::ALL
        .into_iter()
        .filter(|k| args.kinds.is_empty() || args.kinds.iter().any(|x| x == k.short_name()))
        .collect();
    println!("layer linear method size bits calib_rel_err held_out_rel_err");
    for l in 0..=args.layers.iter().copied().max().unwrap_or(0) {
        let mut layer = DecoderLayer::load(
            &store,
            &cfg,
            l,
            &BlockCounts::all(),
            &device,
            &bitstack_quant::runtime::placement::Placement::default(),
        )?;
        if !args.layers.contains(&l) {
            fit.advance(&ctx, &layer)?;
            held.advance(&ctx, &layer)?;
            continue;
        }
        let fit_stats = fit.next_layer_of(&ctx, &layer)?;
        let held_stats = held.next_layer_of(&ctx, &layer)?;
        let scales = LayerScales::from_stats(&fit_stats, &cfg)?;
        fold(&mut layer, &scales)?;
        for &kind in &kinds {
            let (m, n) = linear_shape(&cfg, kind);
            let LinearWeight::Dense(weight) = &layer.linear(kind).weight else {
                anyhow::bail!("{} is not dense", kind.path(l));
            };
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            let s = scales.of(kind);
            let fit_gram = scaled_gram(&fit_stats.grams[&kind.input()], n, s);
            let grams = [
                gram_matrix(&fit_gram, n),
                gram_matrix(&scaled_gram(&held_stats.grams[&kind.input()], n, s), n),
            ];
            let base = grams.each_ref().map(|h| output_energy(&w, m, n, h));
            let report = |method: &str, size: String, bits: f64, q: &[f32]| {
                let e: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
                let [c, h] = [0, 1].map(|i| output_energy(&e, m, n, &grams[i]) / base[i]);
                println!(
                    "{l} {} {method} {size} {bits:.3} {c:.5} {h:.5}",
                    kind.short_name()
                );
            };
            for &method in &args.methods {
                match method {
                    Method::Bitstack => {
                        let fb = Feedback::from_gram(&fit_gram, n, 0.01)?;
                        let d = decompose_with(
                            &w,
                            m,
                            n,
                            args.k,
                            args.niter,
                            SvdMethod::randomized(0),
                            Some((&fb, Refit::Weighted, 1)),
                        )?;
                        let per_block =
                            bits_per_weight(BlockShape::new(m, n, args.k).resident_bytes(), m * n);
                        for p in 1..=args.niter {
                            let q = reconstruct(&d.blocks[..p], m, n, args.k);
                            report("bitstack", format!("{p}blocks"), p as f64 * per_block, &q);
                        }
                    }
                    Method::Rtn | Method::Gptq => {
                        for bits in 2..=5u32 {
                            let mut q = w.clone();
                            let name = if method == Method::Rtn {
                                rtn_in_place(&mut q, n, bits, 128);
                                "rtn"
                            } else {
                                gptq_in_place(
                                    &mut q,
                                    m,
                                    n,
                                    &fit_gram,
                                    &GptqOptions::new(bits, 128),
                                )?;
                                "gptq"
                            };
                            report(name, format!("w{bits}"), rtn_bits_per_weight(bits, 128), &q);
                        }
                    }
                    Method::Planes => {
                        let planes = bit_planes(&w, n, args.niter, 128, args.outliers);
                        let side =
                            rtn_bits_per_weight(0, 128) + args.outliers as f64 * 23.0 / 128.0;
                        for (p, q) in planes.iter().enumerate() {
                            let bits = (p + 1) as f64 + side;
                            report("planes", format!("{}planes", p + 1), bits, q);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
