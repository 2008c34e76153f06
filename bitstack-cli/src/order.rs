//! `sort` builds the block order (the memory ladder) and `ladder` shows it,
//! as a table, JSON or a plot.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use bitstack_quant::eval::sort::{sort_checkpoint, SortOptions};
use bitstack_quant::format::order::{BlockOrder, Rung, ORDER_FILE, REFERENCE_FILE};
use bitstack_quant::progress::progress_bar;
use bitstack_quant::Checkpoint;
use candle_core::Device;
use clap::Args;

use crate::args::{at_least, CalibArgs, DeviceArgs, WindowArgs, CALIB_WINDOWS, SORT_WINDOWS};
use crate::options::SortMethodArg;
use crate::plot::{Baseline, LadderPlot};

#[derive(Args, Debug)]
pub struct SortArgs {
    /// A BitStack checkpoint dir.
    pub dir: PathBuf,
    #[command(flatten)]
    pub settings: SortSettings,
    #[command(flatten)]
    pub windows: WindowArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// How the blocks are ordered; `demo` sorts with the defaults.
#[derive(Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SortSettings {
    /// All methods give every linear block b before any gets block b+1
    /// (the reference's levels), order a level by what each block gains
    /// per byte it costs, and differ in how they measure the gain.
    /// `fast`: the loss change a first-order expansion predicts for each
    /// linear's next block (a backward pass per window and level; minutes
    /// on a CPU, seconds on a GPU). `exact`: the drop in perplexity with
    /// each linear's next block added alone, the reference's 'average'
    /// algorithm (one forward per linear and level: hours on a CPU, a
    /// minute on a GPU). `local`: the output error a block removes on its
    /// own inputs (no backward pass; worse).
    #[arg(long, value_enum, default_value_t = SortMethodArg::Fast)]
    pub method: SortMethodArg,
    /// Calibration windows to score on (fewer is faster and noisier).
    #[arg(long, default_value_t = SORT_WINDOWS, value_parser = at_least::<1>)]
    pub sort_windows: usize,
    /// Windows at the start of the calibration text to skip (the scaling windows).
    #[arg(long, default_value_t = CALIB_WINDOWS)]
    pub skip_windows: usize,
}

impl Default for SortSettings {
    /// The flags' defaults, for `demo`.
    fn default() -> Self {
        Self {
            method: SortMethodArg::Fast,
            sort_windows: SORT_WINDOWS,
            skip_windows: CALIB_WINDOWS,
        }
    }
}

impl SortSettings {
    /// The library's options: these settings, scoring `calib_text` cut by
    /// `windows` on `device`.
    pub fn options(&self, calib_text: PathBuf, windows: WindowArgs, device: Device) -> SortOptions {
        SortOptions {
            method: self.method.into(),
            calib_text,
            windows: self.sort_windows,
            skip_windows: self.skip_windows,
            seq_len: windows.seq_len,
            batch: windows.batch,
            device,
        }
    }
}

impl SortArgs {
    /// The library's options for these flags.
    pub fn options(&self, calib_text: PathBuf, device: Device) -> SortOptions {
        self.settings.options(calib_text, self.windows, device)
    }
}

/// `bitstack sort`.
pub fn sort(args: &SortArgs) -> Result<()> {
    let opts = args.options(args.calib.path()?, args.device.device.open()?);
    let mut checkpoint = Checkpoint::open_to_reorder(&args.dir)?;
    sort_and_report(&mut checkpoint, &opts)
}

/// Sorts `checkpoint` and says what was written. It is opened with
/// [`Checkpoint::open_to_reorder`]: an order file that no longer fits is
/// replaced, not refused, since sorting is how it is fixed.
pub fn sort_and_report(checkpoint: &mut Checkpoint, opts: &SortOptions) -> Result<()> {
    let pb = progress_bar(0, "sorting");
    let (order, report) = sort_checkpoint(checkpoint, opts, &pb)?;
    let dir = checkpoint.dir();
    pb.finish_and_clear();
    println!(
        "sorted {} blocks ({:?}) in {:.1}s ({} layer passes); wrote {} and {}",
        order.order.len(),
        opts.method,
        report.elapsed.as_secs_f64(),
        report.layer_passes,
        dir.join(ORDER_FILE).display(),
        dir.join(REFERENCE_FILE).display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct LadderArgs {
    /// A BitStack checkpoint dir.
    pub dir: PathBuf,
    /// Every rung as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also draw perplexity against resident memory into this PNG file:
    /// the rungs measured with `bitstack eval DIR --budget SPEC --record`
    /// as points, the dense model as a dashed line.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// The dense model's perplexity for the plot [default: the one stored
    /// by `bitstack eval DIR --record-dense DENSE_MODEL`, if any].
    #[arg(long, value_name = "PPL", requires = "plot", value_parser = parse_ppl)]
    pub dense_ppl: Option<f64>,
    /// A perplexity measured elsewhere, drawn as a labelled marker at its
    /// bits per linear weight: `--baseline "RTN w4=4.27:20.1"` (repeat for
    /// more).
    #[arg(long, value_name = "LABEL=BITS:PPL", requires = "plot", value_parser = parse_baseline)]
    pub baseline: Vec<Baseline>,
}

/// `bitstack ladder`.
pub fn ladder(args: &LadderArgs) -> Result<()> {
    let dir = &args.dir;
    let checkpoint = Checkpoint::open(dir)?;
    let order = checkpoint.order();
    let ladder = checkpoint.ladder();
    // Refuse before printing anything, so a failed plot leaves no half output.
    if args.plot.is_some() && ladder.iter().all(|r| r.ppl.is_none()) {
        bail!(
            "no rung of {} has a measured perplexity to plot: run `bitstack eval {} --budget SPEC --record` first, once per rung to show",
            dir.display(),
            dir.display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&ladder)?);
    } else {
        print_ladder(order, &ladder);
    }
    if let Some(path) = &args.plot {
        let mut plot = ladder_plot(dir, order, &ladder, args.dense_ppl)?;
        plot.baselines = args.baseline.clone();
        plot.write_png(path)?;
        let msg = format!("wrote {}", path.display());
        if args.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    Ok(())
}

fn print_ladder(order: &BlockOrder, ladder: &[Rung]) {
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
    ladder: &'a [Rung],
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
        baselines: Vec::new(),
    })
}

/// A positive number up to [`crate::plot::MAX_PPL`]: the value parser of
/// `--dense-ppl`.
fn parse_ppl(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 && p <= crate::plot::MAX_PPL => Ok(p),
        _ => Err(format!(
            "`{s}` is not a perplexity (a positive number up to {:e})",
            crate::plot::MAX_PPL
        )),
    }
}

/// `LABEL=BITS:PPL`: the value parser of `--baseline`.
fn parse_baseline(s: &str) -> Result<Baseline, String> {
    let bad = || format!("`{s}` is not LABEL=BITS:PPL, e.g. \"RTN w4=4.27:20.1\"");
    let (label, point) = s.rsplit_once('=').ok_or_else(bad)?;
    let (bits, ppl) = point.split_once(':').ok_or_else(bad)?;
    let bits: f64 = bits.trim().parse().map_err(|_| bad())?;
    if !(bits.is_finite() && bits > 0.0) {
        return Err(format!("`{s}`: bits per weight must be a positive number"));
    }
    let label = label.trim();
    if label.is_empty() {
        return Err(format!("`{s}`: the label is empty"));
    }
    Ok(Baseline {
        label: label.to_string(),
        bits,
        ppl: parse_ppl(ppl)?,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn baselines_parse_and_bad_ones_say_why() {
        let b = parse_baseline("GPTQ w4 g128=4.25:20.7").unwrap();
        assert_eq!(
            b,
            Baseline {
                label: "GPTQ w4 g128".into(),
                bits: 4.25,
                ppl: 20.7
            }
        );
        // The last `=` splits, so a label may hold one.
        assert_eq!(parse_baseline("a=b=3:9").unwrap().label, "a=b");
        for (bad, why) in [
            ("RTN 4.27:20.1", "LABEL=BITS:PPL"),
            ("RTN=4.27", "LABEL=BITS:PPL"),
            ("RTN=x:20", "LABEL=BITS:PPL"),
            ("RTN=0:20", "positive"),
            ("RTN=4:-1", "not a perplexity"),
            ("=4:20", "label is empty"),
        ] {
            let e = parse_baseline(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// `demo` sorts with `SortSettings::default()` and `WindowArgs::default()`:
    /// they must be what `bitstack sort DIR` parses to.
    #[test]
    fn demo_sorts_with_the_defaults_of_sort() {
        match Cli::try_parse_from(["bitstack", "sort", "dir"])
            .unwrap()
            .command
        {
            Command::Sort(s) => {
                assert_eq!(s.settings, SortSettings::default());
                assert_eq!(s.windows, WindowArgs::default());
            }
            _ => panic!("not sort"),
        }
    }
}
