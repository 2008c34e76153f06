//! `demo`: the main job in one command — fetch the assets, import the model
//! (SmolLM2 unless `--model` says otherwise), compress, sort and evaluate at
//! a few budgets — with the same defaults as the separate commands.

use std::path::PathBuf;

use anyhow::Result;
use bitstack_quant::eval::perplexity::PerplexityReport;
use bitstack_quant::format::budget::Budget;
use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::format::order::ORDER_FILE;
use bitstack_quant::method::compress::{compress_on, CompressOptions};
use bitstack_quant::{Checkpoint, ModelDir};
use candle_core::DType;
use clap::Args;

use crate::args::{DeviceArgs, ScoreArgs, WindowArgs};
use crate::eval::{eval_model, select};
use crate::options::ModelArg;
use crate::order::{sort_and_report, SortSettings};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Which pinned model to run on.
    #[arg(long, value_enum, default_value_t = ModelArg::default())]
    pub model: ModelArg,
    /// Working dir for the imported and compressed models [default: assets dir].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Budgets to load the compressed model at.
    #[arg(long, value_delimiter = ',', default_value = "3bpw,4bpw,5bpw")]
    pub budgets: Vec<Budget>,
    #[command(flatten)]
    pub score: ScoreArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Each step is skipped when its output exists, so a second run only evaluates.
pub fn run(args: &DemoArgs) -> Result<()> {
    let device = args.device.device.open()?;
    let assets = bitstack_assets::fetch_model_assets(None, args.model.into())?;
    let work = args.dir.clone().unwrap_or_else(|| assets.dir.clone());
    // `NAME` and `NAME-bitstack`, NAME the model's own (SmolLM2-135M-Instruct).
    let name = assets.model.name();
    let dense = work.join(name);
    if !dense.join("config.json").exists() {
        eprintln!("importing {}", assets.gguf.display());
        bitstack_assets::import_gguf_once(&assets.gguf, &dense, DType::F32)?;
    }
    let packed = work.join(format!("{name}-bitstack"));
    if !packed.join("config.json").exists() {
        eprintln!("compressing into {}", packed.display());
        let opts = CompressOptions::recommended(assets.calib_text.clone());
        compress_on(&dense, &packed, &opts, &device)?;
    }
    let checkpoint = if packed.join(ORDER_FILE).exists() {
        Checkpoint::open(&packed)?
    } else {
        eprintln!("sorting the blocks of {}", packed.display());
        let opts = SortSettings::default().options(
            assets.calib_text.clone(),
            WindowArgs::default(),
            device.clone(),
        );
        let mut checkpoint = Checkpoint::open_to_reorder(&packed)?;
        sort_and_report(&mut checkpoint, &opts)?;
        checkpoint
    };
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
            args.score.windows,
            WindowArgs::default(),
            &device,
        )
    };
    row(
        "dense",
        &eval(&ModelDir::open(&dense)?, BlockCounts::all())?,
    );
    let packed = ModelDir::BitStack(checkpoint);
    for &budget in &args.budgets {
        let (counts, _) = select(&packed, Some(budget), None)?;
        row(&budget.to_string(), &eval(&packed, counts)?);
    }
    Ok(())
}
