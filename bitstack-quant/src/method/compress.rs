//! The compression pipeline: calibrate, scale and fold, decompose, write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rayon::prelude::*;

use crate::eval::calibrate::{windows, LayerByLayer, LayerStats};
use crate::format::block::{reconstruct, Block, BlockShape};
use crate::format::checkpoint::BlockCounts;
use crate::format::config::{ModelConfig, QuantizationConfig};
use crate::format::dense::DenseDtype;
use crate::format::grid::{grid_planes, GridCoding, GridConfig, GridPlanes};
use crate::format::rotation::{rotate_gram, rotate_rows, Direction, RotationConfig};
use crate::format::store::TensorStore;
use crate::format::writer::{CheckpointWriter, LinearBlocks, OwnedTensor};
use crate::method::decompose::{decompose_with, Refit};
use crate::method::feedback::{ColumnOrder, Feedback};
use crate::method::plane_feedback::grid_planes_with_feedback;
use crate::method::prefix_scale::fit_prefix_scales_to_outputs;
use crate::method::scale::{fold, scaled_gram, LayerScales, AVD_SCALE_POWER, GRID_SCALE_POWER};
use crate::method::svd::SvdMethod;
use crate::progress::progress_bar;
use crate::runtime::linear::LinearWeight;
use crate::runtime::model::{
    linear_shape, load_tokenizer, stored_tensor, tokenize_file, DecoderContext, DecoderLayer,
    LinearKind, Rope, TapPoint,
};
use crate::runtime::placement::Placement;

/// Rank of the blocks by default. On SmolLM2's 576-wide matrices a block of
/// rank 4 costs about 1.2 bits per weight (rank 16: 1.6–2.8), so the ladder
/// has finer steps; with error-feedback signs it measures better than k = 2
/// and, at 2.5 and 4–6 bits per weight, than k = 8.
pub const DEFAULT_K: usize = 4;
/// Blocks per linear of the AVD layout by default: up to about 9.5 bits
/// per weight at k = 4.
pub const DEFAULT_NITER: usize = 8;
/// Rank of the one AVD block of [`CompressOptions::blocks_then_planes`].
/// Rank 4 (0.18 bits per weight on SmolLM2) against rank 1 (0.05), damp
/// 10, 16 windows, at 2.0 bits: SmolLM2 1073 against 1285 on wiki and
/// 2504 against 1.5e4 on Rust code; Qwen2.5-Coder 298 against 725 and 399
/// against 2544. Rank 1 leaves more to the planes, which pays only from
/// about 2.25 bits on wiki (SmolLM2 513 against 707), where rank 4 still
/// wins on code (1378 against 4169).
pub const BLOCKS_THEN_PLANES_K: usize = 4;
/// AVD blocks of [`CompressOptions::blocks_then_planes`]: one, the single
/// bit a linear holds below the planes' two-plane rung.
pub const BLOCKS_THEN_PLANES_NITER: usize = 1;
/// Feedback damping of [`CompressOptions::blocks_then_planes`]' block, as a
/// fraction of the Gram's mean diagonal. GPTQ's 0.01 fits a one-bit code
/// to the calibration's kind of text and ruins others (SmolLM2, rank 4,
/// 2.0 bits: 342 on wiki but 8916 on Rust code; 10 gives 1073 and 2504);
/// at rank 1, 10 measured better than 1 on both texts at 2.0 bits (wiki
/// 1285 against 1530, code 1.5e4 against 1.7e4), while signs without
/// feedback are no better than a plane (1.4e5).
pub const BLOCKS_THEN_PLANES_DAMP: f64 = 10.0;
/// Grid planes per linear by default: up to 6.3 bits per weight, a rung at
/// every whole bit from 2.3 on; at 6 bits SmolLM2 is within 1% of dense.
pub const DEFAULT_PLANES: usize = 6;
/// Largest rotation block [`Rotation::Widest`] takes. Blocks of 64 cut
/// SmolLM2's perplexity at 3 and 4 bits per weight by 17% and 6–8% on the
/// wiki text and by 15% and 7% on Rust code (sorted ladder); on
/// Qwen2.5-Coder, whose widths 128 divides, blocks of 128 measured 1–2%
/// better than 64 at 3 and 4 planes on both texts.
pub const WIDEST_ROTATION_BLOCK: usize = 128;

/// How `compress` rotates the linears' inputs (format version 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// Store the weights as they are.
    None,
    /// Blocks of the widest power of two, up to [`WIDEST_ROTATION_BLOCK`],
    /// that divides every linear's input width (none if no block of 2 or
    /// more does).
    Widest,
    /// As given (checked against every width).
    Fixed(RotationConfig),
}

impl Rotation {
    /// The rotation of the model `cfg` describes.
    pub fn resolve(self, cfg: &ModelConfig) -> Option<RotationConfig> {
        match self {
            Rotation::None => None,
            Rotation::Fixed(r) => Some(r),
            Rotation::Widest => {
                let widths: Vec<usize> = LinearKind::ALL
                    .iter()
                    .map(|&kind| linear_shape(cfg, kind).1)
                    .collect();
                let mut block = WIDEST_ROTATION_BLOCK;
                while block >= 2 && widths.iter().any(|n| !n.is_multiple_of(block)) {
                    block /= 2;
                }
                (block >= 2).then(|| RotationConfig::new(block))
            }
        }
    }
}

const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Knobs of `bitstack compress`.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Rank of the blocks of every linear not in `k_per_kind`.
    pub k: usize,
    /// Rank per kind of linear (`q_proj`, …), overriding `k`.
    pub k_per_kind: std::collections::BTreeMap<LinearKind, usize>,
    /// AVD blocks per linear.
    pub niter: usize,
    /// Grid planes of the residual after the AVD blocks (format version
    /// 2 or 3, by the grid's coding); `None` writes AVD blocks only
    /// (version 1).
    pub grid: Option<GridConfig>,
    /// Calibration text (UTF-8).
    pub calib_text: PathBuf,
    pub calib_windows: usize,
    pub seq_len: usize,
    /// Windows per calibration forward.
    pub batch: usize,
    /// Top-k SVD algorithm of the decomposition.
    pub svd: SvdMethod,
    /// Choose signs with activation-aware error feedback (see
    /// [`crate::method::feedback`]) instead of `sign(R)`; `None` keeps the paper's AVD.
    pub feedback: Option<FeedbackOptions>,
    /// Storage type of the dense parts (embeddings, norms, biases, lm_head).
    pub dense_dtype: DenseDtype,
    /// Exponent of the activation scales; `None` takes the layout's
    /// ([`CompressOptions::scale_power`]).
    pub scale_power: Option<f32>,
    /// Rotate every linear's input before compressing it (format version
    /// 4 or 5): the planes and any AVD blocks are fitted to `W·R`.
    pub rotation: Rotation,
    /// Choose the first this many grid planes (1 to the planes stored)
    /// with error feedback on the inputs' Gram matrices (GPTQ at that many
    /// bits; see [`crate::method::plane_feedback`]); `None` rounds every
    /// plane to nearest.
    pub plane_feedback: Option<usize>,
}

/// Settings of error-feedback sign choice.
#[derive(Clone, Copy, Debug)]
pub struct FeedbackOptions {
    /// Damping `λ = damp · mean(diag H)` added to the Gram matrix.
    pub damp: f64,
    /// How the factors follow the chosen signs.
    pub refit: Refit,
    /// Rounds of choosing signs and re-fitting factors per block.
    pub rounds: usize,
}

impl Default for FeedbackOptions {
    /// GPTQ's damping, the weighted re-fit, one round (a second measured no
    /// better on SmolLM2 beyond 2 blocks per linear).
    fn default() -> Self {
        Self {
            damp: 0.01,
            refit: Refit::Weighted,
            rounds: 1,
        }
    }
}

impl CompressOptions {
    /// The defaults of `bitstack compress` on `calib_text`: grid planes
    /// alone on rotated inputs, the better layout from 3 bits per weight up,
    /// with prefix scales fitted to the outputs (format version 5).
    pub fn recommended(calib_text: PathBuf) -> Self {
        Self {
            niter: 0,
            grid: Some(GridConfig {
                coding: GridCoding::Int8Scaled,
                ..GridConfig::new(DEFAULT_PLANES)
            }),
            rotation: Rotation::Widest,
            ..Self::avd_blocks(calib_text)
        }
    }

    /// `bitstack compress --layout blocks+planes`: one AVD block of rank 4
    /// with strongly damped feedback signs, then grid planes of what it
    /// leaves, all on rotated inputs. Its first unit is a sign chosen with
    /// error feedback (below 2.3 bits some linears hold nothing else),
    /// which the planes then grid anew, so the later planes are not
    /// trapped by it as planes chosen with feedback are. The layout to try
    /// for budgets below 2.3 bits per weight, calibrated on text like the
    /// model's use: SmolLM2 at 2.0 bits scores 1073 on wiki and 2504 on
    /// Rust code, against the default's 9.7e4 and 2.8e5 and the AVD
    /// blocks' 1846 and 1.6e5 (16 windows); Qwen2.5-Coder, calibrated on
    /// wiki, 298 on wiki and 399 on Rust code against 1926 and 959. From
    /// 2.3 bits up the default is better off the calibration's kind of
    /// text.
    pub fn blocks_then_planes(calib_text: PathBuf) -> Self {
        Self {
            k: BLOCKS_THEN_PLANES_K,
            niter: BLOCKS_THEN_PLANES_NITER,
            feedback: Some(FeedbackOptions {
                damp: BLOCKS_THEN_PLANES_DAMP,
                ..FeedbackOptions::default()
            }),
            ..Self::recommended(calib_text)
        }
    }

    /// `bitstack compress --layout blocks`: AVD blocks with error-feedback
    /// signs, unrotated.
    pub fn avd_blocks(calib_text: PathBuf) -> Self {
        Self {
            k: DEFAULT_K,
            k_per_kind: Default::default(),
            niter: DEFAULT_NITER,
            grid: None,
            calib_text,
            calib_windows: 128,
            seq_len: 512,
            batch: 4,
            svd: SvdMethod::randomized(0),
            feedback: Some(FeedbackOptions::default()),
            dense_dtype: DenseDtype::default(),
            scale_power: None,
            rotation: Rotation::None,
            plane_feedback: None,
        }
    }

    /// The exponent of the activation scales: as given, else the
    /// reference's 1 for AVD blocks alone and 1/2 where there are grid
    /// planes (see [`crate::method::scale`]).
    pub fn scale_power(&self) -> f32 {
        self.scale_power.unwrap_or(if self.grid.is_none() {
            AVD_SCALE_POWER
        } else {
            GRID_SCALE_POWER
        })
    }

    /// Rank of the blocks of `kind`.
    pub fn k_of(&self, kind: LinearKind) -> usize {
        self.k_per_kind.get(&kind).copied().unwrap_or(self.k)
    }
}

/// What a compression run did.
#[derive(Debug)]
pub struct CompressReport {
    pub out_dir: PathBuf,
    pub calibration_time: Duration,
    pub decomposition_time: Duration,
    pub linears: usize,
    pub blocks_bytes: usize,
    /// Mean over linears of ‖R_niter‖/‖W‖ (scaled weights).
    pub mean_relative_residual: f64,
    /// Peak resident memory of the process so far, where the OS reports it.
    pub peak_resident_bytes: Option<u64>,
}

/// A linear as compress stores it: its AVD blocks and grid planes.
struct LinearParts {
    blocks: Vec<Block>,
    grid: Option<GridPlanes>,
    /// Bytes as stored.
    bytes: usize,
    /// `‖W − Ŵ‖/‖W‖` with every part (scaled weights).
    relative_residual: f64,
}

/// What the calibration says about a linear's inputs, in the coordinates
/// its grid planes are in.
#[derive(Clone, Copy)]
struct PlaneInputs<'a> {
    /// Error feedback for [`CompressOptions::plane_feedback`].
    feedback: Option<&'a Feedback>,
    /// The inputs' Gram matrix, for prefix scales fitted to the outputs.
    gram: Option<&'a [f64]>,
}

/// The AVD blocks of the row-major `m×n` weight `w`, then, with a grid,
/// the planes of what they leave (as the blocks are stored, in f16).
fn decompose_linear(
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    opts: &CompressOptions,
    feedback: Option<&Feedback>,
    planes_see: PlaneInputs,
) -> Result<LinearParts> {
    let blocks = if opts.niter == 0 {
        Vec::new()
    } else {
        decompose_with(
            w,
            m,
            n,
            k,
            opts.niter,
            opts.svd,
            feedback
                .zip(opts.feedback)
                .map(|(fb, f)| (fb, f.refit, f.rounds)),
        )?
        .blocks
    };
    let mut approx = reconstruct(&blocks, m, n, k);
    let mut bytes: usize = blocks.iter().map(Block::bytes).sum();
    let grid = match opts.grid {
        None => None,
        Some(cfg) => {
            let residual: Vec<f32> = w.iter().zip(&approx).map(|(w, a)| w - a).collect();
            let mut gp = match planes_see.feedback.zip(opts.plane_feedback) {
                Some((fb, level)) => grid_planes_with_feedback(&residual, m, n, cfg, fb, level)?,
                None => grid_planes(&residual, m, n, cfg)?,
            };
            // Prefix scales serve the model, not the weights: refit them to
            // the outputs where the calibration's Gram is at hand.
            if let Some(gram) = planes_see
                .gram
                .filter(|_| cfg.coding == GridCoding::Int8Scaled)
            {
                gp.grid.prefix_scale =
                    fit_prefix_scales_to_outputs(&residual, m, n, &gp, &cfg, gram);
            }
            let planes: Vec<&[u8]> = gp.planes.iter().map(Vec::as_slice).collect();
            gp.grid.add_to(&planes, m, n, &cfg, &mut approx);
            bytes += cfg.grid_stored_bytes(m, n) + planes.iter().map(|p| p.len()).sum::<usize>();
            Some(gp)
        }
    };
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let relative_residual = norm(&mut w.iter().zip(&approx).map(|(w, a)| w - a))
        / norm(&mut w.iter().copied()).max(f64::MIN_POSITIVE);
    Ok(LinearParts {
        blocks,
        grid,
        bytes,
        relative_residual,
    })
}

/// Each input a layer's linears read, with the first linear that reads it:
/// q, k and v share one, gate and up another, so one Gram each.
fn tap_points() -> Vec<(TapPoint, LinearKind)> {
    let mut points: Vec<(TapPoint, LinearKind)> = Vec::new();
    for kind in LinearKind::ALL {
        if !points.iter().any(|(p, _)| *p == kind.input()) {
            points.push((kind.input(), kind));
        }
    }
    points
}

/// GPTQ's damping of the Gram matrices for [`CompressOptions::plane_feedback`].
const PLANE_FEEDBACK_DAMP: f64 = 0.01;

/// Whether compress needs each tap point's Gram matrix in the stored
/// parts' coordinates (scaled, and rotated if the weights are): for the
/// feedback signs of AVD blocks and of [`CompressOptions::plane_feedback`],
/// and for prefix scales, which are fitted to the outputs.
fn needs_stored_grams(opts: &CompressOptions) -> bool {
    opts.plane_feedback.is_some()
        || (opts.niter > 0 && opts.feedback.is_some())
        || opts
            .grid
            .is_some_and(|g| g.coding == GridCoding::Int8Scaled)
}

/// The Gram matrix of each tap point's inputs as the stored parts see
/// them: divided by the activation scales and rotated as the weights are
/// (none unless [`needs_stored_grams`]).
fn stored_grams(
    opts: &CompressOptions,
    rotation: Option<RotationConfig>,
    cfg: &ModelConfig,
    stats: &LayerStats,
    scales: &LayerScales,
    layer: usize,
) -> Result<HashMap<TapPoint, Vec<f64>>> {
    if !needs_stored_grams(opts) {
        return Ok(HashMap::new());
    }
    tap_points()
        .par_iter()
        .map(|&(point, kind)| {
            let n = linear_shape(cfg, kind).1;
            let gram = stats.grams.get(&point).with_context(|| {
                format!(
                    "calibration recorded no input Gram for {}",
                    kind.path(layer)
                )
            })?;
            let mut gram = scaled_gram(gram, n, scales.of(kind));
            if let Some(r) = &rotation {
                rotate_gram(&mut gram, r.block, &r.signs(0..n));
            }
            Ok((point, gram))
        })
        .collect()
}

/// The error feedback of each tap point's linears for
/// [`CompressOptions::plane_feedback`] (none without it), from
/// [`stored_grams`].
fn plane_feedbacks(
    opts: &CompressOptions,
    cfg: &ModelConfig,
    grams: &HashMap<TapPoint, Vec<f64>>,
    layer: usize,
) -> Result<HashMap<TapPoint, Feedback>> {
    if opts.plane_feedback.is_none() {
        return Ok(HashMap::new());
    }
    // One tap point at a time, each factorisation on every thread: the
    // widest (down_proj's input) costs far more than the rest together.
    faer::set_global_parallelism(faer::Par::rayon(0));
    let feedbacks = tap_points()
        .iter()
        .map(|&(point, kind)| {
            let n = linear_shape(cfg, kind).1;
            let gram = grams
                .get(&point)
                .expect("stored_grams covers every tap point");
            let fb =
                Feedback::from_gram_in(gram, n, PLANE_FEEDBACK_DAMP, ColumnOrder::DecreasingEnergy)
                    .with_context(|| format!("input Gram of {}", kind.path(layer)))?;
            Ok((point, fb))
        })
        .collect();
    // The decomposition runs one linear per thread.
    faer::set_global_parallelism(faer::Par::Seq);
    feedbacks
}

/// Compresses the dense model in `model_dir` into a BitStack checkpoint at `out_dir`.
pub fn compress(
    model_dir: &Path,
    out_dir: &Path,
    opts: &CompressOptions,
) -> Result<CompressReport> {
    compress_on(model_dir, out_dir, opts, &Device::Cpu)
}

/// As [`compress`], running the calibration forward passes on `device`
/// (the decomposition always runs on the CPU).
pub fn compress_on(
    model_dir: &Path,
    out_dir: &Path,
    opts: &CompressOptions,
    device: &Device,
) -> Result<CompressReport> {
    let (cfg, raw_cfg) = ModelConfig::from_dir_with_json(model_dir)?;
    if cfg.quantization_config.is_some() {
        bail!("{} is already a BitStack checkpoint", model_dir.display());
    }
    // The rank matters to AVD blocks only.
    for kind in LinearKind::ALL.into_iter().filter(|_| opts.niter > 0) {
        let (m, n) = linear_shape(&cfg, kind);
        let k = opts.k_of(kind);
        if k == 0 || k > m.min(n) {
            bail!(
                "--k {k} is out of range for {} ({m}×{n}): it must be 1…{}",
                kind.name(),
                m.min(n)
            );
        }
    }
    if opts.niter == 0 && opts.grid.is_none() {
        bail!(
            "--niter 0 stores nothing: give at least 1 AVD block, or grid planes with --planes P"
        );
    }
    if opts.seq_len < 2 || opts.batch == 0 || opts.calib_windows == 0 {
        bail!(
            "--seq-len {} (at least 2), --batch {} and --calib-windows {} (at least 1) cannot calibrate",
            opts.seq_len,
            opts.batch,
            opts.calib_windows
        );
    }
    if let Some(grid) = &opts.grid {
        grid.check().map_err(anyhow::Error::msg)?;
    }
    let rotation = opts.rotation.resolve(&cfg);
    if let Some(rotation) = &rotation {
        rotation.check().map_err(anyhow::Error::msg)?;
        if opts.grid.is_some_and(|g| !g.coding.is_int8()) {
            bail!("a rotation of the inputs goes with 8-bit grid codes (--grid-coding int8-scaled or int8)");
        }
        for kind in LinearKind::ALL {
            let n = linear_shape(&cfg, kind).1;
            rotation
                .check_width(n, kind.name())
                .map_err(anyhow::Error::msg)?;
        }
    }
    if let Some(level) = opts.plane_feedback {
        let planes = opts.grid.map_or(0, |g| g.planes);
        if opts.niter > 0 || !(1..=planes).contains(&level) {
            bail!("--plane-feedback {level} needs grid planes alone (--layout planes) and 1…--planes ({planes}) planes to choose");
        }
    }
    let power = opts.scale_power();
    if !(0.0..=2.0).contains(&power) {
        bail!("--scale-power {power} is out of range: it must be 0…2");
    }
    if let Some(f) = &opts.feedback {
        if !(f.damp.is_finite() && f.damp >= 0.0) {
            bail!("--damp {} must be a finite fraction ≥ 0", f.damp);
        }
        if f.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
    }
    let tokenizer = load_tokenizer(model_dir)?;
    // Fail on an unwritable or occupied output before the long work starts.
    let planes = opts.grid.map_or(0, |g| g.planes);
    let mut quantization = QuantizationConfig::new(
        opts.k,
        opts.niter + planes,
        (0..cfg.num_hidden_layers)
            .flat_map(|l| LinearKind::ALL.iter().map(move |&kind| (l, kind)))
            .filter(|&(_, kind)| opts.k_of(kind) != opts.k)
            .map(|(l, kind)| (kind.path(l), opts.k_of(kind)))
            .collect(),
    );
    if let Some(grid) = opts.grid {
        quantization = quantization.with_grid(grid);
    }
    if let Some(rotation) = rotation {
        quantization = quantization.with_rotation(rotation);
    }
    quantization.scale_power = Some(power);
    let mut writer = CheckpointWriter::create(out_dir, raw_cfg, &quantization, opts.dense_dtype)?;

    let ids = tokenize_file(&tokenizer, &opts.calib_text).context("calibration text")?;
    let calib = windows(&ids, opts.seq_len, 0, opts.calib_windows);
    if calib.len() < opts.calib_windows {
        bail!(
            "calibration text {} has {} tokens: {} windows of {} fit, {} requested",
            opts.calib_text.display(),
            ids.len(),
            calib.len(),
            opts.seq_len,
            opts.calib_windows
        );
    }

    // Streaming: the source is read tensor by tensor, not loaded. Only the
    // calibration windows' hidden states, one decoder layer's weights and
    // its input statistics are held, so the resident set does not grow
    // with the layer count.
    let store = TensorStore::open_dir(model_dir)?;
    let mut calibration = {
        let embed = stored_tensor(&store, EMBED, &[cfg.vocab_size, cfg.hidden_size], device)?
            .to_dtype(candle_core::DType::F32)?;
        LayerByLayer::embedding(
            &embed,
            &calib,
            opts.batch,
            // Only feedback signs and prefix scales need the inputs' Grams.
            needs_stored_grams(opts),
        )?
    };
    let rope = Rope::new(&cfg, opts.seq_len, device)?;
    let ctx = DecoderContext {
        cfg: &cfg,
        rope: &rope,
        differentiable: false,
    };

    // Calibrate and decompose one layer at a time, so that only one layer's
    // statistics (its inputs' Gram matrices) are held at once. Folding keeps
    // each layer's function, so later layers see the same inputs.
    let (mut calibration_time, mut decomposition_time) = (Duration::ZERO, Duration::ZERO);
    // Rayon parallelises across linears; keep faer single-threaded inside.
    faer::set_global_parallelism(faer::Par::Seq);
    let pb = progress_bar(
        (cfg.num_hidden_layers * (LinearKind::ALL.len() + 1)) as u64,
        "calibrating and decomposing",
    );
    let mut blocks_bytes = 0;
    let mut residuals = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let t0 = Instant::now();
        // The source model is dense: there are no blocks to keep anywhere.
        let mut layer = DecoderLayer::load(
            &store,
            &cfg,
            l,
            &BlockCounts::all(),
            device,
            &Placement::default(),
        )?;
        let layer_stats = &calibration.next_layer_of(&ctx, &layer)?;
        pb.inc(1);
        calibration_time += t0.elapsed();
        let t1 = Instant::now();
        let scales = LayerScales::from_stats_with_power(layer_stats, &cfg, power)?;
        fold(&mut layer, &scales)?;
        let weights: Vec<(LinearKind, Vec<f32>)> = LinearKind::ALL
            .iter()
            .map(|&kind| match &layer.linear(kind).weight {
                LinearWeight::Dense(w) => {
                    let mut w = w.flatten_all()?.to_vec1::<f32>()?;
                    if let Some(r) = &rotation {
                        let n = linear_shape(&cfg, kind).1;
                        rotate_rows(&mut w, r.block, &r.signs(0..n), Direction::Forward);
                    }
                    Ok((kind, w))
                }
                LinearWeight::BitStack(_) => unreachable!("the source model is dense"),
            })
            .collect::<Result<_>>()?;
        // Linears that read the same input with the same scale (q, k, v;
        // gate, up) share their feedback weights: one inversion each. The
        // blocks are fitted to the scaled (and maybe rotated) weights, so
        // their feedback sees the inputs as those weights do.
        let stored_grams = stored_grams(opts, rotation, &cfg, layer_stats, &scales, l)?;
        let feedbacks: HashMap<TapPoint, Feedback> = match opts.feedback.filter(|_| opts.niter > 0)
        {
            None => HashMap::new(),
            Some(f) => tap_points()
                .par_iter()
                .map(|&(point, kind)| {
                    let n = linear_shape(&cfg, kind).1;
                    let gram = stored_grams
                        .get(&point)
                        .expect("stored_grams covers every tap point");
                    let fb = Feedback::from_gram(gram, n, f.damp)
                        .with_context(|| format!("input Gram of {}", kind.path(l)))?;
                    Ok((point, fb))
                })
                .collect::<Result<_>>()?,
        };
        let plane_feedbacks = plane_feedbacks(opts, &cfg, &stored_grams, l)?;
        let decomposed: Vec<_> = weights
            .par_iter()
            .map(|(kind, w)| {
                let (m, n) = linear_shape(&cfg, *kind);
                let feedback = feedbacks.get(&kind.input());
                let planes_see = PlaneInputs {
                    feedback: plane_feedbacks.get(&kind.input()),
                    gram: stored_grams.get(&kind.input()).map(Vec::as_slice),
                };
                let d = decompose_linear(w, m, n, opts.k_of(*kind), opts, feedback, planes_see)
                    .with_context(|| format!("decomposing {}", kind.path(l)));
                pb.inc(1);
                d.map(|d| (*kind, d))
            })
            .collect::<Result<_>>()?;

        let mut linears = Vec::new();
        let mut dense = Vec::new();
        for (kind, d) in &decomposed {
            let (m, n) = linear_shape(&cfg, *kind);
            let path = kind.path(l);
            blocks_bytes += d.bytes;
            linears.push(LinearBlocks {
                path: path.clone(),
                shape: BlockShape::new(m, n, opts.k_of(*kind)),
                blocks: &d.blocks,
                grid: opts.grid.zip(d.grid.as_ref()),
            });
            if let Some(bias) = &layer.linear(*kind).bias {
                dense.push((format!("{path}.bias"), OwnedTensor::from_tensor(bias)?));
            }
            residuals.push(d.relative_residual);
        }
        dense.push((
            format!("model.layers.{l}.input_layernorm.weight"),
            OwnedTensor::from_tensor(&layer.input_layernorm)?,
        ));
        dense.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            OwnedTensor::from_tensor(&layer.post_attention_layernorm)?,
        ));
        writer.write_layer(l, &linears, dense)?;
        decomposition_time += t1.elapsed();
    }
    pb.finish();

    drop(calibration);

    let d = cfg.hidden_size;
    let mut dense_names = vec![(EMBED, vec![cfg.vocab_size, d]), (NORM, vec![d])];
    if !cfg.tie_word_embeddings {
        if !store.contains(LM_HEAD) {
            bail!("{LM_HEAD} is missing and tie_word_embeddings is false");
        }
        dense_names.push((LM_HEAD, vec![cfg.vocab_size, d]));
    }
    let dense = dense_names
        .into_iter()
        .map(|(name, shape)| {
            let values = store.f32_shaped(name, &shape)?;
            Ok((name.to_string(), OwnedTensor::f32(&values, &shape)))
        })
        .collect::<Result<Vec<_>>>()?;
    writer.write_dense(dense)?;
    for extra in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let src = model_dir.join(extra);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            writer.write_file(extra, &bytes)?;
        }
    }
    let out_dir = writer.finish()?;
    Ok(CompressReport {
        out_dir,
        calibration_time,
        decomposition_time,
        linears: residuals.len(),
        blocks_bytes,
        mean_relative_residual: residuals.iter().sum::<f64>() / residuals.len().max(1) as f64,
        peak_resident_bytes: crate::memory::peak_resident_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::synthetic::SyntheticSpec;

    fn config(hidden: usize, intermediate: usize, heads: usize) -> ModelConfig {
        let json = SyntheticSpec {
            hidden,
            intermediate,
            heads,
            kv_heads: 1,
            ..SyntheticSpec::default()
        }
        .config_json();
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_widest_rotation_divides_every_width() {
        // SmolLM2's widths (576, 1536): 64; Qwen2.5-0.5B's (896, 4864): 128,
        // the most it takes; an odd width: no rotation at all.
        let widest = |cfg: &ModelConfig| Rotation::Widest.resolve(cfg).map(|r| r.block);
        assert_eq!(widest(&config(576, 1536, 9)), Some(64));
        assert_eq!(widest(&config(896, 4864, 14)), Some(128));
        assert_eq!(widest(&config(4096, 14336, 32)), Some(128));
        assert_eq!(widest(&config(48, 104, 4)), Some(8));
        assert_eq!(widest(&config(45, 104, 5)), None);
        let fixed = RotationConfig::new(32);
        assert_eq!(
            Rotation::Fixed(fixed).resolve(&config(45, 104, 5)),
            Some(fixed)
        );
        assert_eq!(Rotation::None.resolve(&config(576, 1536, 9)), None);
    }
}
