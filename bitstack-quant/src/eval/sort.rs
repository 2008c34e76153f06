//! Ordering the blocks of all linears into one global order.
//!
//! All methods keep the reference's level structure: every linear starts at
//! the floor, every linear gets block b before any gets block b+1, and each
//! level is sorted by a score per byte of the block (a budget between two
//! levels is a knapsack, which this greedy order fills well; the
//! reference's score alone favours the widest linears). They differ in the
//! score. Per byte, SmolLM2's grid planes (`fast`, wiki text) went from
//! 47.1 to 42.0 PPL at 3.0 bits per weight, 22.2 to 21.1 at 3.5 and 18.0
//! to 17.8 at 4.0. Dropping the levels (one order of all blocks by score
//! per byte) measured 27727 at 3.0: scores taken at different levels do
//! not compare.
//!
//! * `exact`: the reference's 'average' algorithm. Each linear alone gets
//!   its next block and is scored by the drop in perplexity of the model
//!   on held-out calibration windows. A linear in layer ℓ leaves layers
//!   < ℓ untouched, so their outputs are cached and only layers ℓ… are
//!   recomputed.
//! * `fast`: the loss change a first-order expansion predicts for each
//!   linear's next block, `⟨∇_W L, ΔW⟩`, from a forward and a backward pass
//!   per scoring window and level instead of a forward per linear. On
//!   SmolLM2's AVD blocks (scored before the division by bytes) its PPL
//!   stays within 1.2% of `exact`'s at 2–6 bits per weight (below it at
//!   2.0, 3.5 and 6.0). One window is three times cheaper but noisy: 2.5×
//!   `exact`'s PPL at 2.0 bits, +5% at 3.0. Measured, not kept: the mean
//!   of the slopes at a level's start and end (the trapezoid rule, exact
//!   for a quadratic loss, one more backward pass per window) on
//!   SmolLM2's format 5 planes, 16 windows: mixed within noise from 2.5
//!   bits up (wiki −1.7% at 2.5, +0.8% at 5.0; Rust code −4.7% at 2.5,
//!   +1.0% at 3.0) and still useless at 2.0 (3.0e4 instead of 9.7e4).
//! * `local`: no backward pass (for memory): the output error a block
//!   removes on the linear's own calibration inputs, relative to the
//!   linear's output energy and per byte. With `G = Σ xxᵀ` and `E_b` the part
//!   of the full-stack weight that `b` blocks leave out, block b's gain is
//!   `tr(E_{b−1} G E_{b−1}ᵀ) − tr(E_b G E_bᵀ)`. It does not know how much a
//!   linear matters to the loss, and measures far worse (4× `exact`'s PPL
//!   at 2.0 bits per weight).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use faer::Mat;
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::eval::calibrate::{window_batches, windows, LayerByLayer};
use crate::eval::perplexity::nll_sum;
use crate::format::checkpoint::{BlockCounts, Checkpoint};
use crate::format::order::{BlockOrder, Geometry};
use crate::runtime::linear::LinearWeight;
use crate::runtime::model::{load_tokenizer, tokenize_file, LinearKind, Llama, NoTaps};
use crate::runtime::placement::Placement;
use crate::runtime::stack::WeightStack;

/// Which algorithm orders the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortMethod {
    /// First-order predicted loss change of each linear's next block.
    Fast,
    /// The reference's perplexity-scored 'average' order.
    Exact,
    /// Layer-local output error removed per byte (no backward pass).
    Local,
}

/// Knobs of `bitstack sort`.
#[derive(Clone, Debug)]
pub struct SortOptions {
    pub method: SortMethod,
    pub calib_text: PathBuf,
    /// Windows to score on.
    pub windows: usize,
    /// Windows at the start of the text to skip (those used for scaling).
    pub skip_windows: usize,
    pub seq_len: usize,
    pub batch: usize,
    /// Where the forward passes run.
    pub device: Device,
}

/// What sorting cost.
#[derive(Debug)]
pub struct SortReport {
    pub elapsed: Duration,
    /// Forward passes over layers (one layer on one batch counts 1).
    pub layer_passes: usize,
}

/// Sorts `checkpoint` and writes its order files.
pub fn sort_checkpoint(
    checkpoint: &mut Checkpoint,
    opts: &SortOptions,
    progress: &ProgressBar,
) -> Result<(BlockOrder, SortReport)> {
    let tokenizer = load_tokenizer(checkpoint.dir())?;
    let ids = tokenize_file(&tokenizer, &opts.calib_text)?;
    let wins = windows(&ids, opts.seq_len, opts.skip_windows, opts.windows);
    if wins.len() < opts.windows {
        bail!(
            "{} has {} tokens: after skipping {} windows of {}, {} of the {} requested scoring windows remain",
            opts.calib_text.display(),
            ids.len(),
            opts.skip_windows,
            opts.seq_len,
            wins.len(),
            opts.windows
        );
    }
    sort_on_device(
        checkpoint,
        opts.method,
        &wins,
        opts.batch,
        &opts.device,
        progress,
    )
}

/// Sorts `checkpoint` scoring on token windows `wins` (equal lengths) and
/// writes its order files.
pub fn sort_on_windows(
    checkpoint: &mut Checkpoint,
    method: SortMethod,
    wins: &[Vec<u32>],
    batch: usize,
    progress: &ProgressBar,
) -> Result<(BlockOrder, SortReport)> {
    sort_on_device(checkpoint, method, wins, batch, &Device::Cpu, progress)
}

/// As [`sort_on_windows`], running the forward passes on `device`.
pub fn sort_on_device(
    checkpoint: &mut Checkpoint,
    method: SortMethod,
    wins: &[Vec<u32>],
    batch: usize,
    device: &Device,
    progress: &ProgressBar,
) -> Result<(BlockOrder, SortReport)> {
    if wins.is_empty() {
        bail!("sorting needs at least one scoring window");
    }
    // A window of one token scores nothing: its order would be noise, and it
    // would replace the checkpoint's order and measurements.
    let len = wins[0].len();
    if len < 2 || wins.iter().any(|w| w.len() != len) {
        bail!(
            "sorting needs scoring windows of one length, at least 2 tokens (--seq-len), got {len}"
        );
    }
    if batch == 0 {
        bail!("sorting needs at least 1 window per batch (--batch)");
    }
    let geometry = checkpoint.geometry().clone();
    // Scoring rebuilds weights from the blocks on the host: keep them there
    // whatever the device (a CUDA forward uploads what it runs).
    let model = Llama::from_store(
        checkpoint.config().clone(),
        checkpoint.store(),
        &BlockCounts::all(),
        device,
        &Placement::default(),
    )?;
    let start = Instant::now();
    let (order, layer_passes) = match method {
        SortMethod::Local => {
            let (scores, passes) = proxy_scores(&model, &geometry, wins, batch, progress)?;
            (order_by_gains(&geometry, &scores, "local"), passes)
        }
        SortMethod::Exact => exact(model, &geometry, wins, batch, progress)?,
        SortMethod::Fast => gradient(model, &geometry, wins, progress)?,
    };
    checkpoint.set_order(order)?;
    Ok((
        checkpoint.order().clone(),
        SortReport {
            elapsed: start.elapsed(),
            layer_passes,
        },
    ))
}

/// `gains[b]` for b = 1…stored−1: output error removed by block b, and the
/// output energy of the full stack.
pub fn block_gains(stack: &WeightStack, gram: &Mat<f32>) -> Result<(Vec<f64>, f64)> {
    let (m, n) = (stack.m, stack.n);
    let full = stack.dense()?;
    let to_mat = |v: &[f32]| Mat::<f32>::from_fn(m, n, |i, j| v[i * n + j]);
    let quad = |e: &Mat<f32>| -> f64 {
        let eg = e * gram;
        let mut t = 0f64;
        for j in 0..n {
            for i in 0..m {
                t += (eg[(i, j)] * e[(i, j)]) as f64;
            }
        }
        t
    };
    let mut remaining = full.clone();
    let energy = quad(&to_mat(&full));
    let mut errors = Vec::with_capacity(stack.len());
    for level in 0..stack.len() {
        let single = stack.level_dense(level)?;
        remaining.iter_mut().zip(&single).for_each(|(r, s)| *r -= s);
        errors.push(quad(&to_mat(&remaining)));
    }
    // errors[i] = error with blocks 0..=i; gain of block b = errors[b-1] - errors[b]
    let gains = (1..stack.len())
        .map(|b| errors[b - 1] - errors[b])
        .collect();
    Ok((gains, energy))
}

fn stack_of(model: &Llama, layer: usize, kind: LinearKind) -> Result<Arc<WeightStack>> {
    match &model.layers[layer].linear(kind).weight {
        LinearWeight::BitStack(s) => Ok(s.clone()),
        LinearWeight::Dense(_) => bail!(
            "{} is dense; only BitStack checkpoints can be sorted",
            kind.path(layer)
        ),
    }
}

/// Orders blocks level by level, as the reference does (all second
/// blocks, then all third blocks, …), each level by gain per byte, best
/// first. `gains[i][b − 1]` is what block `b` of linear `i` gains (a loss
/// or error it removes); a NaN gain sorts last.
pub fn order_by_gains(geometry: &Geometry, gains: &[Vec<f64>], method: &str) -> BlockOrder {
    let mut entries = Vec::new();
    for (i, (slot, g)) in geometry.linears.iter().zip(gains).enumerate() {
        for (b, &gain) in (1..).zip(g) {
            let score = if gain.is_nan() {
                f64::NEG_INFINITY
            } else {
                gain / slot.block_bytes(b) as f64
            };
            entries.push((score, b, i, slot.name.clone()));
        }
    }
    entries.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.total_cmp(&a.0)).then(a.2.cmp(&b.2)));
    BlockOrder {
        format_version: 1,
        method: method.into(),
        order: entries
            .into_iter()
            .map(|(_, b, _, name)| (name, b))
            .collect(),
        measured: Vec::new(),
        dense: None,
    }
}

fn proxy_scores(
    model: &Llama,
    geometry: &Geometry,
    wins: &[Vec<u32>],
    batch: usize,
    progress: &ProgressBar,
) -> Result<(Vec<Vec<f64>>, usize)> {
    faer::set_global_parallelism(faer::Par::Seq);
    progress.set_length(model.layers.len() as u64);
    let index = geometry.index();
    let mut scores = vec![Vec::new(); geometry.linears.len()];
    let mut calibration = LayerByLayer::new(model, wins, batch, true)?;
    let mut passes = 0;
    for layer in 0..model.layers.len() {
        let stats = calibration.next_layer(model)?;
        passes += wins.len().div_ceil(batch.max(1));

        let results: Vec<(usize, Vec<f64>)> = LinearKind::ALL
            .par_iter()
            .map(|&kind| {
                let stack = stack_of(model, layer, kind)?;
                let g = &stats.grams[&kind.input()];
                let n = stack.n;
                let gram = Mat::from_fn(n, n, |i, j| g[i * n + j] as f32);
                let (gains, energy) = block_gains(&stack, &gram)?;
                // Relative to the linear's output energy; per byte in
                // `order_by_gains`.
                let s = gains
                    .iter()
                    .map(|g| g / energy.max(f64::MIN_POSITIVE))
                    .collect();
                Ok((index[kind.path(layer).as_str()], s))
            })
            .collect::<Result<_>>()?;
        for (i, s) in results {
            scores[i] = s;
        }
        progress.inc(1);
    }
    Ok((scores, passes))
}

/// Mean NLL of the batches whose inputs to layer `from` are `inputs`.
fn nll_from(model: &Llama, from: usize, inputs: &[Tensor], targets: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    let mut count = 0usize;
    for (x, ids) in inputs.iter().zip(targets) {
        let (sum, n) = nll_sum(model, &model.forward_hidden_from(from, x.clone())?, ids)?;
        total += sum;
        count += n;
    }
    Ok(total / count as f64)
}

fn exact(
    mut model: Llama,
    geometry: &Geometry,
    wins: &[Vec<u32>],
    batch: usize,
    progress: &ProgressBar,
) -> Result<(BlockOrder, usize)> {
    let full = all_stacks(&model)?;
    let stored = geometry.linears.iter().map(|l| l.stored).max().unwrap_or(1);
    // Linears run as dense weights built once, not rebuilt per forward.
    let (device, dtype) = (model.device.clone(), model.dtype());
    let dense = |s: &WeightStack| s.dense_tensor(&device, dtype);
    let tokens = window_batches(wins, batch, &model.device)?;
    let index = geometry.index();
    let mut gains = vec![Vec::new(); geometry.linears.len()];
    progress.set_length(((stored - 1) * geometry.linears.len()) as u64);
    let mut passes = 0;
    for level in 1..stored {
        // Installed one by one, so the last level's W are freed as we go.
        let mut base: Vec<Vec<Tensor>> = Vec::with_capacity(full.len());
        for (l, stacks) in full.iter().enumerate() {
            let mut weights = Vec::with_capacity(stacks.len());
            for (kind, s) in LinearKind::ALL.iter().zip(stacks) {
                let w = dense(&s.prefix(level))?;
                model.layers[l].linear_mut(*kind).weight = LinearWeight::Dense(w.clone());
                weights.push(w);
            }
            base.push(weights);
        }
        // Inputs of every layer at this level: the prefix cache.
        let mut cache = vec![tokens
            .iter()
            .map(|t| model.embed(t))
            .collect::<candle_core::Result<Vec<_>>>()?];
        for l in 0..model.layers.len() - 1 {
            let next = cache[l]
                .iter()
                .map(|h| model.layer_forward(l, h, &mut NoTaps))
                .collect::<candle_core::Result<Vec<_>>>()?;
            passes += next.len();
            cache.push(next);
        }
        // The level's own loss, from the cached inputs of the last layer.
        let last = model.layers.len() - 1;
        let base_nll = nll_from(&model, last, &cache[last], &tokens)?;
        passes += tokens.len();
        for (l, stacks) in full.iter().enumerate() {
            for ((kind, s), w) in LinearKind::ALL.iter().zip(stacks).zip(&base[l]) {
                if level >= s.len() {
                    continue;
                }
                // W of `level + 1` blocks: the level's W plus block `level`
                // alone, for AVD blocks the very sum `WeightStack::dense` of
                // the longer prefix computes (added in order, in f32).
                let single = Tensor::from_vec(s.level_dense(level)?, (s.m, s.n), &device)?
                    .to_dtype(dtype)?;
                model.layers[l].linear_mut(*kind).weight = LinearWeight::Dense((w + single)?);
                let nll = nll_from(&model, l, &cache[l], &tokens)?;
                passes += tokens.len() * (model.layers.len() - l);
                model.layers[l].linear_mut(*kind).weight = LinearWeight::Dense(w.clone());
                gains[index[kind.path(l).as_str()]].push(base_nll.exp() - nll.exp());
                progress.inc(1);
            }
        }
    }
    // The reference sorts each level on its own and concatenates the levels.
    Ok((order_by_gains(geometry, &gains, "exact"), passes))
}

/// All stacks of `model`, per layer, in [`LinearKind::ALL`] order.
fn all_stacks(model: &Llama) -> Result<Vec<Vec<Arc<WeightStack>>>> {
    (0..model.layers.len())
        .map(|l| {
            LinearKind::ALL
                .iter()
                .map(|&k| stack_of(model, l, k))
                .collect()
        })
        .collect()
}

fn gradient(
    mut model: Llama,
    geometry: &Geometry,
    wins: &[Vec<u32>],
    progress: &ProgressBar,
) -> Result<(BlockOrder, usize)> {
    let full = all_stacks(&model)?;
    let stored = geometry.linears.iter().map(|l| l.stored).max().unwrap_or(1);
    let (device, dtype) = (model.device.clone(), model.dtype());
    // One window at a time: the backward pass keeps every intermediate of
    // the forward, several GB for SmolLM2 (6.7 GB peak one
    // window at a time, 11.9 GB four at once), so windows are not batched here.
    let tokens = window_batches(wins, 1, &device)?;
    let index = geometry.index();
    let mut gains = vec![Vec::new(); geometry.linears.len()];
    progress.set_length(((stored - 1) * tokens.len()) as u64);
    model.differentiable = true;
    let mut passes = 0;
    for level in 1..stored {
        let mut slots = Vec::new();
        let mut vars = Vec::new();
        for (l, stacks) in full.iter().enumerate() {
            for (kind, s) in LinearKind::ALL.iter().zip(stacks) {
                let w = s.prefix(level).dense_tensor(&device, dtype)?;
                let var = candle_core::Var::from_tensor(&w)?;
                model.layers[l].linear_mut(*kind).weight =
                    LinearWeight::Dense(var.as_tensor().clone());
                slots.push((l, *kind, s));
                vars.push(var);
            }
        }
        let grads = nll_gradients(&model, &vars, &tokens, progress)?;
        passes += model.layers.len() * tokens.len();
        for ((l, kind, s), grad) in slots.iter().zip(&grads) {
            if level >= s.len() {
                continue;
            }
            let predicted = match grad {
                Some(g) => {
                    let delta = s.level_dense(level)?;
                    let g = g.flatten_all()?.to_vec1::<f32>()?;
                    g.iter()
                        .zip(&delta)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                }
                None => 0.0,
            };
            // What the first-order expansion predicts the block removes.
            gains[index[kind.path(*l).as_str()]].push(-predicted);
        }
    }
    Ok((order_by_gains(geometry, &gains, "fast"), passes))
}

/// The gradient of the NLL summed over `windows` (`[1, L]` token tensors,
/// one backward pass each) with respect to each of `vars`, which must be
/// weights of `model` (differentiable); `None` for one that took no part.
pub fn nll_gradients(
    model: &Llama,
    vars: &[candle_core::Var],
    windows: &[Tensor],
    progress: &ProgressBar,
) -> Result<Vec<Option<Tensor>>> {
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for ids in windows {
        let hidden = model.forward_hidden(ids)?;
        let len = ids.dim(1)?;
        let logits = model.logits(&hidden.narrow(1, 0, len - 1)?.flatten_to(1)?)?;
        let targets = ids.narrow(1, 1, len - 1)?.flatten_all()?;
        let nll = crate::runtime::model::target_log_probs(&logits, &targets)?
            .sum_all()?
            .neg()?;
        let store = nll.backward()?;
        for (acc, var) in grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        progress.inc(1);
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::grid::GridConfig;
    use crate::format::order::LinearSlot;

    /// Two linears with grid planes, one three times the other's width.
    fn geometry() -> Geometry {
        let slot = |name: &str, m| LinearSlot {
            name: name.into(),
            m,
            n: 64,
            k: 1,
            stored: 4,
            grid: Some(GridConfig::new(4)),
        };
        Geometry {
            linears: vec![
                slot("model.layers.0.self_attn.k_proj", 16),
                slot("model.layers.0.mlp.up_proj", 48),
            ],
            dense_bytes: 0,
            linear_weights: 64 * 64,
            parameters: 64 * 64,
        }
    }

    #[test]
    fn a_level_is_ordered_by_gain_per_byte_and_levels_stay_whole() {
        let g = geometry();
        let (small, wide) = (g.linears[0].name.clone(), g.linears[1].name.clone());
        let order = |gains: &[Vec<f64>]| order_by_gains(&g, gains, "test").order;
        // Twice the gain for three times the bytes: the narrow one first.
        let gains = [vec![1.0, 0.5, 0.25], vec![2.0, 1.0, 0.5]];
        let o = order(&gains);
        assert_eq!(o[0], (small.clone(), 1));
        assert_eq!(o[1], (wide.clone(), 1));
        // Four times the gain: the wide one first, at every level.
        let gains = [vec![1.0, 0.5, 0.25], vec![4.0, 2.0, 1.0]];
        let o = order(&gains);
        for level in 0..3 {
            assert_eq!(o[2 * level], (wide.clone(), level + 1));
            assert_eq!(o[2 * level + 1], (small.clone(), level + 1));
        }
        // A huge later gain does not jump its level; a NaN sorts last in
        // its level.
        let gains = [vec![f64::NAN, 1e9, 0.0], vec![0.1, 0.0, 0.0]];
        let o = order(&gains);
        assert_eq!(o[0], (wide.clone(), 1));
        assert_eq!(o[1], (small.clone(), 1));
        assert_eq!(o[2], (small.clone(), 2));
        order_by_gains(&g, &gains, "test").validate(&g).unwrap();
    }
}
