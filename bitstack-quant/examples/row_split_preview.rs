//! What finer units would buy below the rung where every linear holds two
//! grid planes: plane 2 granted per chunk of rows instead of per linear.
//!
//! A sorted grid-plane checkpoint at 2.0 bits per weight leaves about a
//! third of its linears a single plane, and those compound (SmolLM2: PPL
//! about 1e5). This scores, with the gradient `fast` sort's first-order
//! expansion at one plane everywhere, what plane 2 of each chunk of
//! `--rows` rows gains (`−⟨∇_W L, ΔW⟩` over those rows), grants plane 2 to
//! the chunks with the most gain per bit until `--bits` is spent, and
//! scores the model with those weights (dense, rebuilt from the planes).
//! `--rows 0` grants whole linears, as the checkpoint's order does.
//!
//! ```text
//! cargo run --release --example row_split_preview -- DIR TEXT --score-text CALIB.txt --bits 2.0 --rows 0,64,8
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bitstack_quant::eval::perplexity::evaluate;
use bitstack_quant::eval::sort::nll_gradients;
use bitstack_quant::progress::progress_bar;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::runtime::model::{load_tokenizer, tokenize_file, LinearKind};
use bitstack_quant::runtime::stack::WeightStack;
use bitstack_quant::{BlockCounts, Checkpoint, Llama};
use candle_core::{Device, Tensor};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// A sorted grid-plane checkpoint (no AVD blocks).
    checkpoint: PathBuf,
    /// Text to score perplexity on.
    text: PathBuf,
    /// Text the gains are measured on (the sort's: the wiki calibration text).
    #[arg(long)]
    score_text: PathBuf,
    /// Bits per linear weight to spend.
    #[arg(long, default_value_t = 2.0)]
    bits: f64,
    /// Rows per unit, comma-separated; 0 is a whole linear.
    #[arg(long, value_delimiter = ',', default_value = "0,64")]
    rows: Vec<usize>,
    /// Windows the gradient is summed over.
    #[arg(long, default_value_t = 4)]
    score_windows: usize,
    /// Windows of `text` scored.
    #[arg(long, default_value_t = 16)]
    windows: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
}

/// One linear's plane-1 weight, what plane 2 adds, and the gradient at
/// plane 1 everywhere (each `m×n`, row-major).
struct LinearParts {
    layer: usize,
    kind: LinearKind,
    m: usize,
    n: usize,
    one_plane: Vec<f32>,
    delta: Vec<f32>,
    grad: Vec<f32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(&args.checkpoint)?;
    let floor_bits = checkpoint.ladder()[0].bits_per_linear_weight;
    let mut model = Llama::from_checkpoint(&checkpoint, &BlockCounts::all(), &device)?;
    let dtype = model.dtype();
    let tokenizer = load_tokenizer(&args.checkpoint)?;

    let mut stacks: Vec<(usize, LinearKind, WeightStack)> = Vec::new();
    for l in 0..model.layers.len() {
        for kind in LinearKind::ALL {
            match &model.layers[l].linear(kind).weight {
                LinearWeight::BitStack(s) if s.len() >= 2 => {
                    stacks.push((l, kind, s.as_ref().clone()))
                }
                _ => bail!("{} is not a stack of two planes or more", kind.path(l)),
            }
        }
    }

    // Gradient of the scoring windows' NLL at one plane everywhere.
    let mut vars = Vec::new();
    for (l, kind, s) in &stacks {
        let w = s.prefix(1).dense_tensor(&device, dtype)?;
        let var = candle_core::Var::from_tensor(&w)?;
        model.layers[*l].linear_mut(*kind).weight = LinearWeight::Dense(var.as_tensor().clone());
        vars.push(var);
    }
    model.differentiable = true;
    let score_ids = tokenize_file(&tokenizer, &args.score_text)?;
    let windows = score_ids
        .chunks_exact(args.seq_len)
        .take(args.score_windows)
        .map(|w| Tensor::new(w, &device)?.unsqueeze(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let pb = progress_bar(windows.len() as u64, "gradient");
    let grads = nll_gradients(&model, &vars, &windows, &pb)?;
    pb.finish_and_clear();
    model.differentiable = false;

    let mut parts = Vec::new();
    for ((l, kind, s), grad) in stacks.iter().zip(grads) {
        let grad = grad.with_context(|| format!("no gradient for {}", kind.path(*l)))?;
        parts.push(LinearParts {
            layer: *l,
            kind: *kind,
            m: s.m,
            n: s.n,
            one_plane: s.prefix(1).dense()?,
            delta: s.level_dense(1)?,
            grad: grad.flatten_all()?.to_vec1()?,
        });
    }
    let weights: usize = parts.iter().map(|p| p.m * p.n).sum();
    let spare = ((args.bits - floor_bits) * weights as f64).max(0.0);
    println!(
        "floor {floor_bits:.3} bits per weight; {:.3} bits per weight of plane-2 signs to grant",
        spare / weights as f64
    );

    let ids = tokenize_file(&tokenizer, &args.text)?;
    for &rows in &args.rows {
        // (gain per bit, linear, first row, rows)
        let mut units = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let r = if rows == 0 { p.m } else { rows.min(p.m) };
            for start in (0..p.m).step_by(r) {
                let end = (start + r).min(p.m);
                let span = start * p.n..end * p.n;
                let gain: f64 = -p.grad[span.clone()]
                    .iter()
                    .zip(&p.delta[span])
                    .map(|(g, d)| *g as f64 * *d as f64)
                    .sum::<f64>();
                units.push((gain / ((end - start) * p.n) as f64, i, start, end - start));
            }
        }
        units.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut granted: Vec<Vec<bool>> = parts.iter().map(|p| vec![false; p.m]).collect();
        let mut left = spare;
        for &(_, i, start, len) in &units {
            let bits = (len * parts[i].n) as f64;
            if bits <= left {
                left -= bits;
                granted[i][start..start + len]
                    .iter_mut()
                    .for_each(|g| *g = true);
            }
        }
        let mut single = 0;
        for (p, rows_granted) in parts.iter().zip(&granted) {
            let mut w = p.one_plane.clone();
            let rows = w.chunks_exact_mut(p.n).zip(p.delta.chunks_exact(p.n));
            for ((row, delta), _) in rows.zip(rows_granted).filter(|(_, g)| **g) {
                row.iter_mut().zip(delta).for_each(|(w, d)| *w += d);
            }
            if rows_granted.iter().all(|g| !*g) {
                single += 1;
            }
            let t = Tensor::from_vec(w, (p.m, p.n), &device)?.to_dtype(dtype)?;
            model.layers[p.layer].linear_mut(p.kind).weight = LinearWeight::Dense(t);
        }
        let spent = (spare - left) / weights as f64 + floor_bits;
        let pb = progress_bar(args.windows as u64, "evaluating");
        let report = evaluate(&model, &ids, args.seq_len, args.windows, 1, &pb)?;
        pb.finish_and_clear();
        println!(
            "rows per unit {}: {spent:.3} bits per weight, {single} of {} linears without plane 2, PPL {:.2}",
            if rows == 0 { "all".to_string() } else { rows.to_string() },
            parts.len(),
            report.ppl
        );
    }
    Ok(())
}
