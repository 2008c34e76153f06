//! `compress`: a dense model dir into a BitStack checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use bitstack_quant::format::grid::GridConfig;
use bitstack_quant::hub::resolve_model;
use bitstack_quant::method::compress::{
    compress_on, CompressOptions, FeedbackOptions, DEFAULT_K, DEFAULT_NITER,
};
use bitstack_quant::runtime::model::LinearKind;
use bitstack_quant::DenseDtype;
use clap::Args;

use crate::args::{at_least, CalibArgs, DeviceArgs, WindowArgs, CALIB_WINDOWS};
use crate::options::{DTypeArg, GridCodingArg, RefitArg, SignsArg, SvdArg};

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// Dense model dir (or Hugging Face model id).
    pub model: String,
    /// Where to write the checkpoint (must not exist or be empty).
    pub out_dir: PathBuf,
    /// Rank of each block's u·vt product (k = 16 is the paper's).
    #[arg(long, default_value_t = DEFAULT_K, value_parser = at_least::<1>)]
    pub k: usize,
    /// Rank per kind of linear, overriding --k: `k_proj=8,v_proj=8`.
    #[arg(long, value_name = "KIND=K,…", value_delimiter = ',', value_parser = parse_k_for)]
    pub k_for: Vec<(LinearKind, usize)>,
    /// AVD blocks per linear.
    #[arg(long, default_value_t = DEFAULT_NITER)]
    pub niter: usize,
    /// Grid planes per linear after the AVD blocks: nested bit planes of
    /// what the blocks leave, on a grid per row and group of input
    /// columns (format version 3). 0 writes AVD blocks only.
    #[arg(long, default_value_t = 0)]
    pub planes: usize,
    /// Input columns per group of the grid planes (8…128; a width that is
    /// not a multiple is split into equal groups).
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    /// Weights per row and group of the grid kept exact.
    #[arg(long, default_value_t = 1)]
    pub outliers: usize,
    /// How the grid stores each row and group's center and half-range and
    /// each outlier's value.
    #[arg(long, value_enum, default_value_t = GridCodingArg::Int8)]
    pub grid_coding: GridCodingArg,
    /// Exponent α of the activation scales `‖x‖^α` folded into the
    /// weights before compressing: 1 (the reference's) when there are AVD
    /// blocks, 0.5 for grid planes alone (--niter 0 --planes P), where it
    /// measured far better; 0 scales nothing.
    #[arg(long, value_name = "ALPHA")]
    pub scale_power: Option<f32>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Windows of calibration text for the activation scales.
    #[arg(long, default_value_t = CALIB_WINDOWS, value_parser = at_least::<1>)]
    pub calib_windows: usize,
    #[command(flatten)]
    pub windows: WindowArgs,
    /// Top-k SVD: `exact` (faer's thin SVD, as the reference) or
    /// `randomized` (subspace iteration, several times faster).
    #[arg(long, value_enum, default_value_t = SvdArg::Randomized)]
    pub svd: SvdArg,
    /// How each block's signs are chosen: `avd` takes sign(R) (the
    /// paper); `feedback` chooses them column by column so that each
    /// sign cancels the output error of the earlier ones on calibration
    /// activations, then re-fits u·vt to those signs.
    #[arg(long, value_enum, default_value_t = SignsArg::Feedback)]
    pub signs: SignsArg,
    /// Damping of the activation Gram matrix for `--signs feedback`,
    /// as a fraction of its mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// With `--signs feedback`, how u·vt follow the chosen signs: `none`,
    /// `svd` (best in Frobenius norm) or `weighted` (`svd`, then each row
    /// of u re-fitted to the output error on calibration activations).
    #[arg(long, value_enum, default_value_t = RefitArg::Weighted)]
    pub refit: RefitArg,
    /// With `--signs feedback`: rounds of choosing signs and re-fitting
    /// u·vt per block.
    #[arg(long, default_value_t = 1, value_parser = at_least::<1>)]
    pub rounds: usize,
    /// Storage type of the dense parts (embeddings, norms, biases,
    /// lm_head), kept in it in memory: 16 bits halve the floor of a small
    /// model; f16 moves SmolLM2's perplexity less than bf16, which is for
    /// models whose dense parts overflow f16.
    #[arg(long, value_enum, default_value_t = DTypeArg::from(DenseDtype::default()))]
    pub dense_dtype: DTypeArg,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl CompressArgs {
    /// The library's options for these flags, calibrating on `calib_text`.
    pub fn options(&self, calib_text: PathBuf) -> CompressOptions {
        CompressOptions {
            k: self.k,
            k_per_kind: self.k_for.iter().copied().collect(),
            niter: self.niter,
            grid: (self.planes > 0).then_some(GridConfig {
                planes: self.planes,
                group: self.group,
                outliers: self.outliers,
                coding: self.grid_coding.into(),
            }),
            calib_text,
            calib_windows: self.calib_windows,
            seq_len: self.windows.seq_len,
            batch: self.windows.batch,
            svd: self.svd.into(),
            feedback: self.signs.feedback(FeedbackOptions {
                damp: self.damp,
                refit: self.refit.into(),
                rounds: self.rounds,
            }),
            dense_dtype: self.dense_dtype.into(),
            scale_power: self.scale_power,
        }
    }
}

pub fn run(args: &CompressArgs) -> Result<()> {
    let model_dir = resolve_model(&args.model)?;
    let opts = args.options(args.calib.path()?);
    let r = compress_on(
        &model_dir,
        &args.out_dir,
        &opts,
        &args.device.device.open()?,
    )?;
    println!(
        "wrote {} ({} linears, {:.1} MiB of blocks); calibration {:.1}s, decomposition {:.1}s; mean residual ‖R‖/‖W‖ {:.4}",
        r.out_dir.display(),
        r.linears,
        r.blocks_bytes as f64 / (1 << 20) as f64,
        r.calibration_time.as_secs_f64(),
        r.decomposition_time.as_secs_f64(),
        r.mean_relative_residual
    );
    if let Some(peak) = r.peak_resident_bytes {
        println!("peak resident memory {} MiB", peak >> 20);
    }
    Ok(())
}

/// `KIND=K`: the value parser of `--k-for`.
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
