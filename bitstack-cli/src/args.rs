//! Flag groups that several commands share, declared once and flattened into
//! each (`#[command(flatten)]`), and the defaults they and `demo` agree on.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bitstack_quant::runtime::device::DeviceSpec;
use clap::Args;

/// Tokens per window of text, for calibration, sorting and evaluation alike.
pub const SEQ_LEN: usize = 512;
/// Windows per forward pass.
pub const BATCH: usize = 4;
/// Calibration windows for the activation scales and the sign feedback's
/// Gram matrices; sorting skips as many, so it scores on text the scales
/// were not fitted to. 32 fit SmolLM2 about as well on the wiki eval text
/// (perplexity within 0.8% at 2.5, 3.5 and 5 bits per weight) in a quarter
/// of the calibration time, but fewer samples fit the Gram matrices more
/// closely to their text, so the default keeps 128.
pub const CALIB_WINDOWS: usize = 128;
/// Windows of the eval text scored by `eval` and `demo`.
pub const EVAL_WINDOWS: usize = 64;
/// Calibration windows `sort` scores on.
pub const SORT_WINDOWS: usize = 4;

/// A count flag's value parser: a whole number of at least `MIN`. clap
/// refuses anything else with the flag's name before any work starts, so a
/// zero never reaches a division or a `chunks_exact`.
pub fn at_least<const MIN: usize>(s: &str) -> std::result::Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    if v < MIN {
        return Err(format!("must be at least {MIN}, got {v}"));
    }
    Ok(v)
}

/// `--device`, for every command that runs the model.
#[derive(Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceSpec,
}

/// `--seq-len` and `--batch`: how a text is cut into windows and fed to the model.
#[derive(Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowArgs {
    /// Tokens per window (at least 2: each window scores its tokens after the first).
    #[arg(long, default_value_t = SEQ_LEN, value_parser = at_least::<2>)]
    pub seq_len: usize,
    /// Windows per forward pass (memory vs speed).
    #[arg(long, default_value_t = BATCH, value_parser = at_least::<1>)]
    pub batch: usize,
}

impl Default for WindowArgs {
    /// The flags' defaults, for `demo`.
    fn default() -> Self {
        Self {
            seq_len: SEQ_LEN,
            batch: BATCH,
        }
    }
}

/// `--calib`, for the commands that run the model on calibration text.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct CalibArgs {
    /// Calibration text [default: the wiki calibration text of fetch-assets].
    #[arg(long)]
    pub calib: Option<PathBuf>,
}

impl CalibArgs {
    /// The text given, else the one `fetch-assets` stored.
    pub fn path(&self) -> Result<PathBuf> {
        match &self.calib {
            Some(p) => Ok(p.clone()),
            None => default_asset("wiki-calib.txt"),
        }
    }
}

/// `--windows` of `eval` and `demo`.
#[derive(Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreArgs {
    /// Windows of the text to score (non-overlapping, from the start).
    #[arg(long, default_value_t = EVAL_WINDOWS, value_parser = at_least::<1>)]
    pub windows: usize,
}

/// A file `fetch-assets` stores, or an error that says to run it.
pub fn default_asset(name: &str) -> Result<PathBuf> {
    let p = bitstack_assets::default_assets_dir()?.join(name);
    if !p.exists() {
        bail!(
            "{} does not exist: run `bitstack fetch-assets` first (or pass a file)",
            p.display()
        );
    }
    Ok(p)
}
