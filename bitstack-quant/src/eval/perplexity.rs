//! Perplexity exactly as the quality protocol measures it (docs/design.md, "Quality protocol").
//!
//! Tokenize the whole text without BOS, cut non-overlapping windows from the
//! start, run each window as an independent forward, score positions 1…L−1.

use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::eval::calibrate::{window_batches, windows};
use crate::format::block::bits_per_weight;
use crate::runtime::model::{target_log_probs, Llama};

/// The result of an evaluation, as `bitstack eval --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Tokens scored.
    pub tokens: usize,
    pub windows: usize,
    pub bits_per_linear_weight: f64,
    pub resident_linear_bytes: usize,
    pub resident_total_bytes: usize,
}

/// Mean NLL of `model` over the first `count` windows of `seq_len` tokens.
/// Returns `(mean nll, tokens scored, windows used)`.
pub fn mean_nll(
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    count: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Result<(f64, usize, usize)> {
    if seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if count == 0 {
        bail!("--windows must be at least 1");
    }
    let wins = windows(tokens, seq_len, 0, count);
    if wins.is_empty() {
        bail!(
            "the text has {} tokens, fewer than one window of {seq_len}",
            tokens.len()
        );
    }
    let mut total = 0f64;
    let mut scored = 0usize;
    for ids in window_batches(&wins, batch, &model.device)? {
        let (sum, count) = nll_sum(model, &model.forward_hidden(&ids)?, &ids)?;
        total += sum;
        scored += count;
        progress.inc(ids.dim(0)? as u64);
    }
    Ok((total / scored as f64, scored, wins.len()))
}

/// Summed NLL and count of positions 1…L−1 of each window in `ids` (`[B, L]`),
/// given the final hidden states (`[B, L, d]`). One window's logits at a time
/// keeps memory at `L × vocab`.
pub fn nll_sum(model: &Llama, hidden: &Tensor, ids: &Tensor) -> candle_core::Result<(f64, usize)> {
    let (b, len) = ids.dims2()?;
    let mut total = 0f64;
    for w in 0..b {
        let logits = model.logits(&hidden.get(w)?.narrow(0, 0, len - 1)?)?;
        let targets = ids.get(w)?.narrow(0, 1, len - 1)?;
        let lp = target_log_probs(&logits, &targets)?.to_vec1::<f32>()?;
        total -= lp.iter().map(|&x| x as f64).sum::<f64>();
    }
    Ok((total, b * (len - 1)))
}

/// Evaluates `model` on `tokens` and fills in its memory footprint.
pub fn evaluate(
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    count: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Result<PerplexityReport> {
    let (nll, scored, used) = mean_nll(model, tokens, seq_len, count, batch, progress)?;
    let linear_bytes: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    Ok(PerplexityReport {
        ppl: nll.exp(),
        nll,
        tokens: scored,
        windows: used,
        bits_per_linear_weight: bits_per_weight(linear_bytes, model.linear_weight_count()),
        resident_linear_bytes: linear_bytes,
        resident_total_bytes: model.resident_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_has_exactly_the_documented_keys() {
        let r = PerplexityReport {
            ppl: 14.9,
            nll: 2.7,
            tokens: 32704,
            windows: 64,
            bits_per_linear_weight: 3.5,
            resident_linear_bytes: 1,
            resident_total_bytes: 2,
        };
        let json = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bits_per_linear_weight",
                "nll",
                "ppl",
                "resident_linear_bytes",
                "resident_total_bytes",
                "tokens",
                "windows"
            ]
        );
    }
}
