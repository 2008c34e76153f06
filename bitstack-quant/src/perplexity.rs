//! Perplexity exactly as DESIGN §7 measures it.
//!
//! Tokenize the whole text without BOS, cut non-overlapping windows from the
//! start, run each window as an independent forward, score positions 1…L−1.

use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::calibrate::windows;
use crate::model::{target_log_probs, Llama};

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
    let wins = windows(tokens, seq_len, 0, count);
    if wins.is_empty() {
        bail!(
            "the text has {} tokens, fewer than one window of {seq_len}",
            tokens.len()
        );
    }
    let mut total = 0f64;
    let mut scored = 0usize;
    for chunk in wins.chunks(batch.max(1)) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), seq_len), &model.device)?;
        let hidden = model.forward_hidden(&ids)?;
        for (w, window) in chunk.iter().enumerate() {
            let h = hidden.get(w)?.narrow(0, 0, seq_len - 1)?;
            let logits = model.logits(&h)?;
            let targets = Tensor::from_slice(&window[1..], seq_len - 1, &model.device)?;
            let lp = target_log_probs(&logits, &targets)?.to_vec1::<f32>()?;
            total -= lp.iter().map(|&x| x as f64).sum::<f64>();
            scored += lp.len();
            progress.inc(1);
        }
    }
    Ok((total / scored as f64, scored, wins.len()))
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
        bits_per_linear_weight: linear_bytes as f64 * 8.0 / model.linear_weight_count() as f64,
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
