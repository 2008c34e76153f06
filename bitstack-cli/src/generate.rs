//! `generate`: text from a prompt, streamed to stdout.

use std::io::Write;

use anyhow::Result;
use bitstack_quant::format::budget::Budget;
use bitstack_quant::hub::resolve_model;
use bitstack_quant::runtime::generate::{eos_token_ids, generate, SamplingOptions, TextStream};
use bitstack_quant::runtime::model::load_tokenizer;
use bitstack_quant::{bits_per_weight, Llama, ModelDir};
use clap::Args;

use crate::args::DeviceArgs;
use crate::eval::select;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model dir (dense or BitStack) or Hugging Face model id.
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Memory budget for a BitStack checkpoint (see `eval --budget`).
    #[arg(long, value_name = "SPEC", conflicts_with = "blocks")]
    pub budget: Option<Budget>,
    /// Load N blocks in every BitStack linear.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `bitstack generate`: the prompt and the generated text on stdout, the
/// speed and memory on stderr.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let model_dir = ModelDir::open(&resolve_model(&args.model)?)?;
    let (counts, _) = select(&model_dir, args.budget, args.blocks)?;
    let dir = model_dir.dir();
    let opts = SamplingOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    let device = args.device.device.open()?;
    let prompt = &args.prompt;
    let tokenizer = load_tokenizer(dir)?;
    let mut model = Llama::from_model_dir(&model_dir, &counts, &device)?;
    let resident_bytes = model.resident_bytes();
    let linear_bytes: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    if !device.is_cpu() {
        // A GPU would wait on the CPU rebuilding every weight for every token.
        model.materialize()?;
    }
    let ids = tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let mut stream = TextStream::new(&tokenizer);
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    let g = generate(&model, &ids, &eos_token_ids(dir), &opts, |id| {
        write!(out, "{}", stream.push(id)?)?;
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    out.flush()?;
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.2}s, decode {:.2} tokens/s; weights {:.2} MiB ({:.3} bits per linear weight), KV cache {:.2} MiB",
        g.prompt_tokens,
        g.tokens.len(),
        g.prefill.as_secs_f64(),
        g.decode_tokens_per_second(),
        resident_bytes as f64 / 1048576.0,
        bits_per_weight(linear_bytes, model.linear_weight_count()),
        g.kv_bytes as f64 / 1048576.0
    );
    Ok(())
}
