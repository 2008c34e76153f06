//! `compress`: a dense model dir into a BitStack checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bitstack_quant::format::grid::GridConfig;
use bitstack_quant::format::rotation::RotationConfig;
use bitstack_quant::hub::resolve_model;
use bitstack_quant::method::compress::{
    compress_on, CompressOptions, FeedbackOptions, Rotation, BLOCKS_THEN_PLANES_NITER,
    DEFAULT_NITER, DEFAULT_PLANES,
};
use bitstack_quant::runtime::model::LinearKind;
use bitstack_quant::DenseDtype;
use clap::{Args, ValueEnum};

use crate::args::{at_least, CalibArgs, DeviceArgs, WindowArgs, CALIB_WINDOWS};
use crate::options::{DTypeArg, GridCodingArg, LayoutArg, RefitArg, SignsArg, SvdArg};

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// Dense model dir (or Hugging Face model id).
    pub model: String,
    /// Where to write the checkpoint (must not exist or be empty).
    pub out_dir: PathBuf,
    /// What each linear becomes: grid planes from 2.5 bits per weight up,
    /// one AVD block and planes below.
    #[arg(long, value_enum, default_value_t = LayoutArg::default())]
    pub layout: LayoutArg,
    /// Rank of each AVD block's u·vt product (k = 16 is the paper's)
    /// [default: 4, with every layout].
    #[arg(long, value_parser = at_least::<1>)]
    pub k: Option<usize>,
    /// Rank per kind of linear, overriding --k: `k_proj=8,v_proj=8`.
    #[arg(long, value_name = "KIND=K,…", value_delimiter = ',', value_parser = parse_k_for)]
    pub k_for: Vec<(LinearKind, usize)>,
    /// AVD blocks per linear, with --layout blocks or blocks+planes
    /// [default: 8; 1 with blocks+planes].
    #[arg(long)]
    pub niter: Option<usize>,
    /// Grid planes per linear, with --layout planes or blocks+planes: nested
    /// bit planes (of what the blocks leave, if any) on a grid per row and
    /// group of input columns, each 1 bit per weight [default: 6].
    #[arg(long)]
    pub planes: Option<usize>,
    /// Input columns per group of the grid planes (8…256; a width that is
    /// not a multiple is split into equal groups).
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    /// Weights per row and group of the grid kept exact (with the int8
    /// coding an 8-bit value and a column each: 0.125 bits per weight at
    /// groups of 128).
    #[arg(long, default_value_t = 1)]
    pub outliers: usize,
    /// How the grid stores each row and group's center and half-range and
    /// each outlier's value.
    #[arg(long, value_enum, default_value_t = GridCodingArg::Int8Scaled)]
    pub grid_coding: GridCodingArg,
    /// Exponent α of the activation scales `‖x‖^α` folded into the
    /// weights before compressing: 1 (the reference's) for --layout
    /// blocks, 0.5 where there are grid planes, where it measured far
    /// better; 0 scales nothing.
    #[arg(long, value_name = "ALPHA")]
    pub scale_power: Option<f32>,
    /// Incoherence processing: rotate every linear's input columns in
    /// blocks of this many (a Hadamard transform with random signs; a
    /// power of two dividing every width) before compressing them, so that
    /// a row's few large weights no longer set its groups' ranges. The
    /// runtime rotates each input the same way (format version 4). 0
    /// rotates nothing [default with grid planes: the widest of 128, 64,
    /// 32, … that divides every width (SmolLM2: 64, Qwen2.5: 128); 0 with
    /// --layout blocks, whose rank-k magnitudes follow the unrotated
    /// columns]. A tensor-parallel world must not cut
    /// a block: give 64 to split Qwen2.5-0.5B's 896 columns in two.
    #[arg(long, value_name = "BLOCK")]
    pub rotate: Option<usize>,
    /// With --layout planes: choose the first P grid planes as GPTQ
    /// chooses a P-bit code, with error feedback on the inputs' Gram
    /// matrices from the calibration windows (the later planes refine
    /// round to nearest, and every prefix stays nested). It fits the
    /// calibration text's kind of text better and others worse (4:
    /// SmolLM2 wiki −5.5% at 4 planes, Rust code ±0; Qwen2.5-Coder wiki −2%,
    /// Rust code +2%): give it with --calib text like yours. Costs the
    /// Gram matrices and their factorisations, most on wide down_proj
    /// inputs. 0: round every plane to nearest.
    #[arg(long, value_name = "P", default_value_t = 0)]
    pub plane_feedback: usize,
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
    /// as a fraction of its mean diagonal: more damping fits the
    /// calibration's kind of text less and others better [default: 0.01;
    /// 10 with --layout blocks+planes, whose single block would otherwise
    /// fit the calibration text's kind alone].
    #[arg(long)]
    pub damp: Option<f64>,
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
    /// AVD blocks and grid planes per linear, by `--layout`. A count given
    /// for a part the layout does not have is refused, so `--niter 8`
    /// alone does not quietly write planes.
    pub fn parts(&self) -> Result<(usize, usize)> {
        let (niter, planes) = match self.layout {
            LayoutArg::Planes => {
                if let Some(n @ 1..) = self.niter {
                    bail!("--niter {n} counts AVD blocks, which --layout planes has none of: give --layout blocks (blocks only) or --layout blocks+planes (blocks, then planes)");
                }
                (0, self.planes.unwrap_or(DEFAULT_PLANES))
            }
            LayoutArg::Blocks => {
                if let Some(p @ 1..) = self.planes {
                    bail!("--planes {p} counts grid planes, which --layout blocks has none of: give --layout planes (planes only) or --layout blocks+planes (blocks, then planes)");
                }
                (self.niter.unwrap_or(DEFAULT_NITER), 0)
            }
            LayoutArg::BlocksThenPlanes => (
                self.niter.unwrap_or(BLOCKS_THEN_PLANES_NITER),
                self.planes.unwrap_or(DEFAULT_PLANES),
            ),
        };
        match self.layout {
            LayoutArg::Planes | LayoutArg::BlocksThenPlanes if planes == 0 => {
                bail!(
                    "--planes 0 stores no grid planes: --layout {} needs at least 1",
                    self.layout_name()
                )
            }
            LayoutArg::Blocks | LayoutArg::BlocksThenPlanes if niter == 0 => {
                bail!("--niter 0 stores no AVD blocks: --layout {} needs at least 1 (or give --layout planes)", self.layout_name())
            }
            _ => Ok((niter, planes)),
        }
    }

    fn layout_name(&self) -> String {
        self.layout
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }

    /// The library's options for these flags, calibrating on `calib_text`.
    pub fn options(&self, calib_text: PathBuf) -> Result<CompressOptions> {
        let (niter, planes) = self.parts()?;
        let preset = self.layout.preset(calib_text);
        let preset_damp = preset.feedback.unwrap_or_default().damp;
        Ok(CompressOptions {
            k: self.k.unwrap_or(preset.k),
            k_per_kind: self.k_for.iter().copied().collect(),
            niter,
            grid: (planes > 0).then_some(GridConfig {
                planes,
                group: self.group,
                outliers: self.outliers,
                coding: self.grid_coding.into(),
            }),
            calib_text: preset.calib_text,
            calib_windows: self.calib_windows,
            seq_len: self.windows.seq_len,
            batch: self.windows.batch,
            svd: self.svd.into(),
            feedback: self.signs.feedback(FeedbackOptions {
                damp: self.damp.unwrap_or(preset_damp),
                refit: self.refit.into(),
                rounds: self.rounds,
            }),
            dense_dtype: self.dense_dtype.into(),
            scale_power: self.scale_power,
            rotation: match self.rotate {
                None => preset.rotation,
                Some(0) => Rotation::None,
                Some(block) => Rotation::Fixed(RotationConfig::new(block)),
            },
            plane_feedback: (self.plane_feedback > 0).then_some(self.plane_feedback),
        })
    }
}

pub fn run(args: &CompressArgs) -> Result<()> {
    // Flags that contradict each other are refused before any download.
    args.parts()?;
    let model_dir = resolve_model(&args.model)?;
    let opts = args.options(args.calib.path()?)?;
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
