//! Perplexity as served: text scored one token at a time through the KV
//! cache, so every linear runs the decode kernels (whole-window `bitstack
//! eval` runs the prefill path). Compares kernels on a real checkpoint.
//!
//! ```text
//! cargo run --release --example decode_ppl -- MODEL_DIR --budget 3.0bpw [--windows 3] [--seq-len 128]
//! ```

use std::path::PathBuf;

use anyhow::Result;
use bitstack_quant::runtime::model::{load_tokenizer, KvCache, Llama};
use bitstack_quant::{BlockCounts, Budget, Checkpoint};
use candle_core::{Device, Tensor, D};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// A BitStack checkpoint (or dense model) dir.
    model: PathBuf,
    /// Memory budget (see `bitstack eval --budget`); all blocks without it.
    #[arg(long)]
    budget: Option<Budget>,
    /// Text to score [default: the wiki eval text of `bitstack fetch-assets`].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Windows, taken 1000 tokens apart.
    #[arg(long, default_value_t = 3)]
    windows: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = match args.budget {
        Some(b) => {
            let checkpoint = Checkpoint::open(&args.model)?;
            let plan = checkpoint.plan(b)?;
            Llama::from_checkpoint(&checkpoint, &plan.counts, &Device::Cpu)?
        }
        None => Llama::load(&args.model, &BlockCounts::all(), &Device::Cpu)?,
    };
    let tokenizer = load_tokenizer(&args.model)?;
    let text = match args.text {
        Some(p) => std::fs::read_to_string(p)?,
        None => {
            std::fs::read_to_string(bitstack_assets::default_assets_dir()?.join("wiki-eval.txt"))?
        }
    };
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let (mut nll, mut scored) = (0f64, 0usize);
    for w in 0..args.windows {
        let Some(window) = ids.get(w * 1000..w * 1000 + args.seq_len) else {
            break;
        };
        let mut cache = KvCache::new(&model);
        for pair in window.windows(2) {
            let x = Tensor::new(&[[pair[0]]], &Device::Cpu)?;
            let logits = model.forward_cached(&x, &mut cache)?.flatten_all()?;
            let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            nll -= log_probs.get(pair[1] as usize)?.to_scalar::<f32>()? as f64;
            scored += 1;
        }
    }
    println!(
        "decode perplexity {:.3} over {scored} tokens",
        (nll / scored.max(1) as f64).exp()
    );
    Ok(())
}
