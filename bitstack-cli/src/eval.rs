//! `eval`: perplexity of a model at some size, optionally recorded with the
//! checkpoint's ladder; also which blocks to load for `--budget`/`--blocks`,
//! which `generate` and `demo` share.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitstack_quant::eval::calibrate::windows;
use bitstack_quant::eval::perplexity::{evaluate, PerplexityReport};
use bitstack_quant::format::order::{DenseMeasurement, Measurement};
use bitstack_quant::hub::resolve_model;
use bitstack_quant::method::feedback::ColumnOrder;
use bitstack_quant::method::gptq::{apply_gptq, GptqOptions};
use bitstack_quant::method::rtn::apply_rtn;
use bitstack_quant::progress::progress_bar;
use bitstack_quant::runtime::model::{load_tokenizer, tokenize_file};
use bitstack_quant::{
    bits_per_weight, BlockCounts, Budget, Checkpoint, Llama, ModelConfig, ModelDir, Plan, Selection,
};
use candle_core::Device;
use clap::Args;

use crate::args::{at_least, default_asset, CalibArgs, DeviceArgs, ScoreArgs, WindowArgs};

/// Calibration windows of `eval --gptq`.
pub const GPTQ_CALIB_WINDOWS: usize = 128;

/// A fixed-precision quantizer applied to a dense model before it is scored.
#[derive(Clone, Debug)]
pub enum Baseline {
    /// Round to nearest.
    Rtn { bits: u32, group: usize },
    /// GPTQ, calibrated on `windows` windows of `text`.
    Gptq {
        opts: GptqOptions,
        text: PathBuf,
        windows: usize,
    },
}

impl Baseline {
    /// The baseline `eval`'s flags ask for, if any.
    fn from_args(args: &EvalArgs) -> Result<Option<Self>> {
        Ok(match (args.rtn, args.gptq) {
            (Some(bits), _) => Some(Baseline::Rtn {
                bits,
                group: args.group,
            }),
            (None, Some(bits)) => {
                let opts = GptqOptions {
                    order: if args.act_order {
                        ColumnOrder::DecreasingEnergy
                    } else {
                        ColumnOrder::Natural
                    },
                    ..GptqOptions::new(bits, args.group)
                };
                opts.check()?;
                Some(Baseline::Gptq {
                    opts,
                    text: args.calib.path()?,
                    windows: args.calib_windows,
                })
            }
            (None, None) => None,
        })
    }

    /// Quantizes `model`'s linears; returns the bytes they would occupy.
    fn apply(
        &self,
        model: &mut Llama,
        tokenizer: &tokenizers::Tokenizer,
        shape: WindowArgs,
    ) -> Result<usize> {
        match self {
            Baseline::Rtn { bits, group } => apply_rtn(model, *bits, *group),
            Baseline::Gptq {
                opts,
                text,
                windows: count,
            } => {
                let ids = tokenize_file(tokenizer, text)?;
                let wins = windows(&ids, shape.seq_len, 0, *count);
                if wins.len() < *count {
                    bail!(
                        "calibration text {} has {} tokens: {} windows of {} fit, {} requested",
                        text.display(),
                        ids.len(),
                        wins.len(),
                        shape.seq_len,
                        count
                    );
                }
                let pb = progress_bar(0, "GPTQ, layer by layer");
                let bytes = apply_gptq(model, &wins, shape.batch, opts, &pb)?;
                pb.finish_and_clear();
                Ok(bytes)
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model dir (dense or BitStack) or Hugging Face model id.
    pub model: String,
    /// Text to score [default: the wiki eval text of fetch-assets].
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[command(flatten)]
    pub score: ScoreArgs,
    #[command(flatten)]
    pub windows: WindowArgs,
    /// Load N blocks in every BitStack linear [default: all stored].
    #[arg(long, conflicts_with = "budget")]
    pub blocks: Option<usize>,
    /// Load the longest prefix of the block order that fits: bytes with a
    /// unit (900MiB, 3.2GB), bits per linear weight (3.5bpw) or a percent of
    /// the 16-bit model (30%).
    #[arg(long, value_name = "SPEC")]
    pub budget: Option<Budget>,
    /// Store the measured perplexity with the rung in the checkpoint's
    /// block order, so `bitstack ladder` shows it.
    #[arg(long, requires = "budget")]
    pub record: bool,
    /// Score DENSE_MODEL (the dense model MODEL was compressed from, a dir
    /// or Hugging Face id) instead, and store its perplexity in MODEL's block
    /// order as the reference line of `bitstack ladder MODEL --plot`.
    #[arg(
        long,
        value_name = "DENSE_MODEL",
        conflicts_with_all = ["blocks", "budget", "record", "rtn", "gptq"]
    )]
    pub record_dense: Option<String>,
    /// Baseline instead of BitStack: round-to-nearest with this many bits
    /// (asymmetric, f16 scale and zero per group), applied to a dense model.
    #[arg(long, value_name = "BITS", conflicts_with_all = ["blocks", "budget", "record", "gptq"])]
    pub rtn: Option<u32>,
    /// Baseline instead of BitStack: GPTQ with this many bits (the grids of
    /// --rtn, each column's rounding error pushed onto the columns not yet
    /// rounded), calibrated layer by layer on --calib-windows windows of the
    /// calibration text; applied to a dense model.
    #[arg(long, value_name = "BITS", conflicts_with_all = ["blocks", "budget", "record"])]
    pub gptq: Option<u32>,
    /// Group size along the input dimension for --rtn and --gptq (one f16
    /// scale and zero per group: 32/GROUP bits per weight).
    #[arg(long, alias = "rtn-group", default_value_t = 128, value_name = "GROUP", value_parser = at_least::<1>)]
    pub group: usize,
    /// With --gptq: round the input channels with the most activation
    /// energy first ("act-order").
    #[arg(long, requires = "gptq")]
    pub act_order: bool,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// With --gptq: windows of calibration text (GPTQ's paper uses 128
    /// samples; more than compress's 32, so the baseline is not starved).
    #[arg(long, default_value_t = GPTQ_CALIB_WINDOWS, requires = "gptq", value_parser = at_least::<1>)]
    pub calib_windows: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `bitstack eval`: the report as JSON or a sentence.
pub fn run(args: &EvalArgs) -> Result<()> {
    let report = eval(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(args.record_dense.as_ref().unwrap_or(&args.model), &report);
    }
    Ok(())
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
    let baseline = Baseline::from_args(args)?;
    let mut model = ModelDir::open(&dir)?;
    let (counts, plan) = select(&model, args.budget, args.blocks)?;
    let report = eval_model(
        &model,
        &text_path,
        counts,
        baseline.as_ref(),
        args.score.windows,
        args.windows,
        &args.device.device.open()?,
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
        args.score.windows,
        args.windows,
        &args.device.device.open()?,
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

/// Blocks per linear from `--budget` (reporting the rung it resolved to) or
/// `--blocks`; all stored blocks when neither is given.
pub fn select(
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

/// Perplexity of `model_dir` loaded with `counts` (and quantized first by
/// `baseline`), with the bytes it holds.
pub fn eval_model(
    model_dir: &ModelDir,
    text_path: &Path,
    counts: BlockCounts,
    baseline: Option<&Baseline>,
    windows: usize,
    shape: WindowArgs,
    device: &Device,
) -> Result<PerplexityReport> {
    let WindowArgs { seq_len, batch } = shape;
    let tokenizer = load_tokenizer(model_dir.dir())?;
    let ids = tokenize_file(&tokenizer, text_path)?;
    let mut model = Llama::from_model_dir(model_dir, &counts, device)?;
    let baseline_bytes = match baseline {
        Some(b) => Some(b.apply(&mut model, &tokenizer, shape)?),
        None => None,
    };
    // Report the bytes of the blocks, measured before the stacks become
    // dense weights (built once here instead of in every forward).
    let linear_bytes: usize = model.linears().map(|(_, _, l)| l.weight_bytes()).sum();
    let total_bytes = model.resident_bytes();
    model.materialize()?;
    let pb = progress_bar(windows.min(ids.len() / seq_len.max(1)) as u64, "evaluating");
    let mut r = evaluate(&model, &ids, seq_len, windows, batch, &pb)?;
    pb.finish_and_clear();
    r.resident_linear_bytes = linear_bytes;
    r.resident_total_bytes = total_bytes;
    r.bits_per_linear_weight = bits_per_weight(linear_bytes, model.linear_weight_count());
    if let Some(bytes) = baseline_bytes {
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
