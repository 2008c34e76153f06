//! Autoregressive generation with a KV cache: greedy or temperature sampling.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::runtime::elastic::BitStackHandle;
use crate::runtime::model::{KvCache, Llama};

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SamplingOptions {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// What a generation produced and what it cost.
#[derive(Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prefill: Duration,
    /// Time for the remaining tokens.
    pub decode: Duration,
    /// Bytes of the KV cache at the end.
    pub kv_bytes: usize,
}

impl Generation {
    /// Tokens per second after the first token.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 {
            return 0.0;
        }
        n as f64 / self.decode.as_secs_f64()
    }
}

fn pick(logits: &Tensor, opts: &SamplingOptions, rng: &mut StdRng) -> Result<u32> {
    if opts.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let probs =
        candle_nn::ops::softmax_last_dim(&(logits / opts.temperature)?)?.to_vec1::<f32>()?;
    let mut r = rng.random::<f32>();
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok((probs.len() - 1) as u32)
}

/// Generates up to `opts.max_tokens` tokens after `prompt`, stopping after an
/// `eos` token; `on_token` sees each token as it is produced.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    eos: &[u32],
    opts: &SamplingOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    generate_with(
        &model.device,
        KvCache::new(model),
        |tokens, cache| model.forward_cached(tokens, cache),
        prompt,
        eos,
        opts,
        on_token,
    )
}

/// As [`generate`] on a model that is resized while it runs: every step
/// runs on the handle's snapshot of that moment (the KV cache carries over,
/// as it would in a serving engine).
pub fn generate_elastic(
    handle: &BitStackHandle,
    prompt: &[u32],
    eos: &[u32],
    opts: &SamplingOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let first = handle.snapshot();
    generate_with(
        &first.device,
        KvCache::new(&first),
        |tokens, cache| handle.snapshot().forward_cached(tokens, cache),
        prompt,
        eos,
        opts,
        on_token,
    )
}

/// The decoding loop over `step`, which maps new tokens `[1, L]` and the
/// cache to logits `[1, L, vocab]`.
fn generate_with(
    device: &candle_core::Device,
    mut cache: KvCache,
    mut step: impl FnMut(&Tensor, &mut KvCache) -> candle_core::Result<Tensor>,
    prompt: &[u32],
    eos: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut tokens = Vec::new();
    let start = Instant::now();
    let mut input = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut prefill = Duration::ZERO;
    while tokens.len() < opts.max_tokens {
        let logits = step(&input, &mut cache)?;
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        let next = pick(&last, opts, &mut rng)?;
        if tokens.is_empty() {
            prefill = start.elapsed();
        }
        tokens.push(next);
        on_token(next)?;
        if eos.contains(&next) {
            break;
        }
        input = Tensor::from_slice(&[next], (1, 1), device)?;
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        decode: start.elapsed() - prefill,
        prefill,
        kv_bytes: cache.bytes(),
        tokens,
    })
}

/// End-of-sequence ids from `generation_config.json`, else `config.json`
/// (`eos_token_id` may be one id or a list).
pub fn eos_token_ids(dir: &std::path::Path) -> Vec<u32> {
    for file in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match &json["eos_token_id"] {
            serde_json::Value::Number(n) => {
                return n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            serde_json::Value::Array(a) => {
                return a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            }
            _ => {}
        }
    }
    Vec::new()
}

/// Turns a growing list of token ids into text pieces, holding back an
/// incomplete UTF-8 sequence until its last byte arrives.
pub struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a tokenizers::Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// The new text after adding `id` (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self
            .tokenizer
            .decode(&self.ids, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(match new_piece(&text, self.printed) {
            Some(piece) => {
                self.printed = text.len();
                piece.to_string()
            }
            None => String::new(),
        })
    }
}

/// What of `text`, the whole decoded text so far, is new after the first
/// `printed` bytes were printed; `None` while it ends in an incomplete
/// character or is shorter than what was printed.
///
/// The decoder may rewrite earlier text (a multi-byte character completed,
/// spaces cleaned up), so byte `printed` of the new text may fall inside a
/// character: the piece starts at the next character boundary.
fn new_piece(text: &str, printed: usize) -> Option<&str> {
    if text.ends_with('\u{fffd}') || text.len() < printed {
        return None;
    }
    let mut start = printed;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    Some(&text[start..])
}

#[cfg(test)]
mod tests {
    use super::new_piece;

    #[test]
    fn a_rewritten_text_is_cut_at_a_character_boundary() {
        // "ab" was printed; the decoder then rewrote it to "aé…": byte 2 is
        // inside "é" (bytes 1..3), so slicing there would panic.
        assert_eq!(new_piece("aéz", 2), Some("z"));
        assert_eq!(new_piece("a€", 2), Some(""));
        // Held back: an incomplete character, or text that shrank.
        assert_eq!(new_piece("ab\u{fffd}", 2), None);
        assert_eq!(new_piece("a", 2), None);
        // The plain case: what follows what was printed.
        assert_eq!(new_piece("hello world", 5), Some(" world"));
        assert_eq!(new_piece("", 0), Some(""));
    }
}
