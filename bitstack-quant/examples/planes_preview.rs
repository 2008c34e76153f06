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
//! `--rotate B` simulates incoherence processing: each linear's columns
//! are rotated in blocks of B (Hadamard, random signs) before it is
//! quantized, and the quantized weight is rotated back.
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

/// `W·(D·H)` per block of `block` columns of each row (`inverse`: `W·(H·D)`,
/// which undoes it): `H` the orthonormal Walsh–Hadamard matrix, `D` the
/// random signs `signs` of the columns.
fn rotate(w: &mut [f32], n: usize, block: usize, signs: &[f32], inverse: bool) {
    let norm = 1.0 / (block as f32).sqrt();
    for row in w.chunks_mut(n) {
        for (blk, d) in row.chunks_mut(block).zip(signs.chunks(block)) {
            if !inverse {
                blk.iter_mut().zip(d).for_each(|(x, s)| *x *= s);
            }
            let mut h = 1;
            while h < block {
                for i in (0..block).step_by(2 * h) {
                    for j in i..i + h {
                        let (a, b) = (blk[j], blk[j + h]);
                        (blk[j], blk[j + h]) = (a + b, a - b);
                    }
                }
                h *= 2;
            }
            blk.iter_mut().for_each(|x| *x *= norm);
            if inverse {
                blk.iter_mut().zip(d).for_each(|(x, s)| *x *= s);
            }
        }
    }
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

/// Random ±1 per column, the same for every linear of width `n`.
fn column_signs(n: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ n as u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if state >> 63 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
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
                let signs = column_signs(n);
                rotate(&mut v, n, args.rotate, &signs, false);
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
                rotate(&mut v, n, args.rotate, signs, true);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_is_orthogonal_and_its_inverse_undoes_it() {
        // 3 rows of 192 columns in blocks of 64: awkward but whole blocks.
        let (m, n, block) = (3, 192, 64);
        let w: Vec<f32> = (0..m * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let signs = column_signs(n);
        let mut r = w.clone();
        rotate(&mut r, n, block, &signs, false);
        assert!(
            r.iter().zip(&w).any(|(a, b)| (a - b).abs() > 1e-3),
            "it moved nothing"
        );
        // Orthogonal: every block keeps its norm.
        for (a, b) in r.chunks(block).zip(w.chunks(block)) {
            let (na, nb) = (
                a.iter().map(|x| x * x).sum::<f32>(),
                b.iter().map(|x| x * x).sum::<f32>(),
            );
            assert!((na - nb).abs() <= 1e-4 * nb, "{na} vs {nb}");
        }
        rotate(&mut r, n, block, &signs, true);
        for (a, b) in r.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
