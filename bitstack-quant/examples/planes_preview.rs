//! End-to-end A/B of nested bit planes without writing a checkpoint:
//! every linear of a dense model is replaced by the first P bit planes of
//! a per-group uniform grid, and the model is scored.
//!
//! `--method planes` is the first sketch (groups of exactly 128 columns);
//! `--method grid` runs the library's grid planes, what `compress
//! --planes` stores (see `bitstack_quant::format::grid`), optionally after
//! `--avd-blocks` AVD blocks; `--method rtn` scores round-to-nearest at
//! the same bits instead. The `--outliers` largest weights of each group
//! stay exact. With `--calib`, each layer is first scaled and folded as
//! `compress` does (activation scales from the dense model's inputs).
//! `--rotate B` rotates each linear's columns in blocks of B before it is
//! quantized and the quantized weight back, as `compress --rotate B` and
//! its runtime do (see `bitstack_quant::format::rotation`).
//!
//! ```text
//! cargo run --release --example planes_preview -- MODEL TEXT --calib CALIB.txt --method grid --planes 3,4
//! ```

use std::path::PathBuf;

use anyhow::{bail, Result};
use bitstack_quant::eval::calibrate::{calibrate, windows};
use bitstack_quant::eval::perplexity::evaluate;
use bitstack_quant::format::block::reconstruct;
use bitstack_quant::format::grid::{grid_planes, GridCoding, GridConfig};
use bitstack_quant::format::rotation::{rotate_rows, Direction, RotationConfig};
use bitstack_quant::method::decompose::decompose;
use bitstack_quant::method::rtn::{rtn_bits_per_weight, rtn_in_place};
use bitstack_quant::method::scale::{fold, LayerScales};
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::progress::progress_bar;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{load_tokenizer, tokenize_file, LinearKind};
use bitstack_quant::{BlockCounts, Llama, ModelDir};
use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use half::f16;

const GROUP: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    Planes,
    /// The library's grid planes, as `compress --planes` writes them.
    Grid,
    Rtn,
}

#[derive(Parser, Debug)]
struct Args {
    /// Dense model directory.
    model: PathBuf,
    /// Text to score.
    text: PathBuf,
    /// Calibration text for the activation scales; unscaled without it.
    #[arg(long)]
    calib: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    calib_windows: usize,
    /// Windows of 512 tokens to score.
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Planes (or RTN bits) to score, one run each.
    #[arg(long, value_delimiter = ',', default_value = "3,4")]
    planes: Vec<u32>,
    /// Weights per group kept exact.
    #[arg(long, default_value_t = 1)]
    outliers: usize,
    #[arg(long, value_enum, default_value_t = Method::Planes)]
    method: Method,
    /// AVD blocks (rank 4, sign(R)) before the planes, which then grid the
    /// residual.
    #[arg(long, default_value_t = 0)]
    avd_blocks: usize,
    /// Planes made (`grid`); each run scores a prefix of them.
    #[arg(long, default_value_t = 6)]
    total_planes: usize,
    /// Target columns per group of the grid (`grid`; compress's `--group`).
    #[arg(long, default_value_t = GROUP)]
    group: usize,
    /// Exponent α of the activation scales `‖x‖^α` (compress's
    /// `--scale-power`).
    #[arg(long, default_value_t = 1.0)]
    alpha: f32,
    /// Incoherence processing: before quantizing, each row's columns are
    /// rotated in blocks of this many (a power of two dividing every
    /// width) by a Hadamard transform with random column signs, and the
    /// quantized weight is rotated back: what a runtime that rotates each
    /// linear's input the same way would compute. 0: no rotation.
    #[arg(long, default_value_t = 0)]
    rotate: usize,
}

/// Replaces the row-major `w` (rows of `n`) by its first `planes` planes.
fn bit_planes(w: &mut [f32], n: usize, planes: u32, outliers: usize) {
    for row in w.chunks_mut(n) {
        for g in row.chunks_mut(GROUP) {
            let mut by_size: Vec<usize> = (0..g.len()).collect();
            by_size.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            let mut exact = vec![false; g.len()];
            for &j in by_size.iter().take(outliers) {
                exact[j] = true;
            }
            let (lo, hi) = g
                .iter()
                .zip(&exact)
                .filter(|(_, &e)| !e)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), (&x, _)| {
                    (lo.min(x), hi.max(x))
                });
            let center = f16::from_f32((lo + hi) / 2.0).to_f32();
            let half_range = f16::from_f32((hi - lo) / 2.0).to_f32();
            for (x, &e) in g.iter_mut().zip(&exact) {
                if e {
                    *x = f16::from_f32(*x).to_f32();
                    continue;
                }
                let mut q = center;
                for b in 0..planes {
                    let mag = half_range / (2u32 << b) as f32;
                    q += if *x >= q { mag } else { -mag };
                }
                *x = q;
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rotate > 0 && !args.rotate.is_power_of_two() {
        bail!("--rotate {} is not a power of two", args.rotate);
    }
    let dir = ModelDir::open(&args.model)?;
    let tok = load_tokenizer(dir.dir())?;
    let scored = tokenize_file(&tok, &args.text)?;
    let calib = match &args.calib {
        Some(path) => windows(&tokenize_file(&tok, path)?, 512, 0, args.calib_windows),
        None => Vec::new(),
    };
    // Activation scales from the dense model's inputs, once for every run.
    let scales: Vec<LayerScales> = if calib.is_empty() {
        Vec::new()
    } else {
        let dense = Llama::from_model_dir(&dir, &BlockCounts::all(), &Device::Cpu)?;
        calibrate(&dense, &calib, 4, false, &progress_bar(0, "calibrating"))?
            .iter()
            .map(|stats| LayerScales::from_stats_with_power(stats, &dense.cfg, args.alpha))
            .collect::<Result<_>>()?
    };
    // Every linear, folded, decomposed and gridded once for every run.
    let mut model = Llama::from_model_dir(&dir, &BlockCounts::all(), &Device::Cpu)?;
    let mut prepared = Vec::new();
    let (mut avd_bits, mut weights) = (0f64, 0f64);
    let pb = progress_bar(
        (model.layers.len() * LinearKind::ALL.len()) as u64,
        "preparing",
    );
    for l in 0..model.layers.len() {
        if let Some(s) = scales.get(l) {
            fold(&mut model.layers[l], s)?;
        }
        for kind in LinearKind::ALL {
            let LinearWeight::Dense(w) = &model.layers[l].linear(kind).weight else {
                bail!("{} is not dense", kind.path(l));
            };
            let (m, n) = w.dims2()?;
            let mut v = w.flatten_all()?.to_vec1::<f32>()?;
            weights += (m * n) as f64;
            let mut base = vec![0f32; m * n];
            if args.avd_blocks > 0 {
                let d = decompose(&v, m, n, 4, args.avd_blocks, SvdMethod::randomized(0))?;
                base = reconstruct(&d.blocks, m, n, 4);
                v.iter_mut().zip(&base).for_each(|(x, b)| *x -= b);
                avd_bits += d.blocks.iter().map(|b| b.bytes() as f64 * 8.0).sum::<f64>();
            }
            let cfg = GridConfig {
                planes: args.total_planes,
                group: args.group,
                outliers: args.outliers,
                coding: GridCoding::Int8,
            };
            // The rotation's column signs, when there is one.
            let signs = if args.rotate > 0 {
                if !n.is_multiple_of(args.rotate) {
                    bail!("--rotate {} does not split {n} columns", args.rotate);
                }
                let signs = RotationConfig::new(args.rotate).signs(0..n);
                rotate_rows(&mut v, args.rotate, &signs, Direction::Forward);
                Some(signs)
            } else {
                None
            };
            let grid = match args.method {
                Method::Grid => Some(grid_planes(&v, m, n, cfg)?),
                _ => None,
            };
            prepared.push((l, kind, m, n, v, base, grid, cfg, signs));
            pb.inc(1);
        }
    }
    pb.finish();
    for &p in &args.planes {
        let mut grid_bits = 0f64;
        for (l, kind, m, n, v, base, grid, cfg, signs) in &prepared {
            let (m, n) = (*m, *n);
            let mut v = v.clone();
            match (&args.method, grid) {
                (Method::Planes, _) => bit_planes(&mut v, n, p, args.outliers),
                (Method::Rtn, _) => rtn_in_place(&mut v, n, p, GROUP),
                (Method::Grid, Some(gp)) => {
                    let planes: Vec<&[u8]> =
                        gp.planes[..p as usize].iter().map(Vec::as_slice).collect();
                    v.fill(0.0);
                    gp.grid.add_to(&planes, m, n, cfg, &mut v);
                    grid_bits += 8.0
                        * (cfg.grid_stored_bytes(m, n)
                            + planes.iter().map(|s| s.len()).sum::<usize>())
                            as f64;
                }
                (Method::Grid, None) => unreachable!("prepared above"),
            }
            if let Some(signs) = signs {
                rotate_rows(&mut v, args.rotate, signs, Direction::Inverse);
            }
            v.iter_mut().zip(base).for_each(|(x, b)| *x += b);
            model.layers[*l].linear_mut(*kind).weight =
                LinearWeight::Dense(Tensor::from_vec(v, (m, n), &Device::Cpu)?);
        }
        let report = evaluate(
            &model,
            &scored,
            512,
            args.windows,
            4,
            &progress_bar(0, "scoring"),
        )?;
        let bits = avd_bits / weights
            + match args.method {
                Method::Grid => grid_bits / weights,
                Method::Planes => {
                    p as f64
                        + rtn_bits_per_weight(0, GROUP)
                        + args.outliers as f64 * 23.0 / GROUP as f64
                }
                Method::Rtn => rtn_bits_per_weight(p, GROUP),
            };
        println!(
            "{:?} {p}: {bits:.3} bits per weight, PPL {:.3}",
            args.method, report.ppl
        );
    }
    Ok(())
}
