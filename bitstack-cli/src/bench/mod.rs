//! `bitstack bench`: a BitStack linear against candle's dense and quantized
//! products, on random weights of model-sized shapes.
//!
//! For each shape `m×n` (out × in features), block count and row count, the
//! median wall time of one `y = x·Wᵀ` is measured four ways in one process:
//!
//! - **ours**: `Linear::forward` on a BitStack weight of that many random
//!   AVD blocks, or of that many grid planes of the dense weight below, so
//!   whatever kernel that forward uses is what gets timed;
//! - **dense f32** and **dense f16**: candle's `matmul` of `x` (cast to the
//!   weight's dtype beforehand) with `Wᵀ`, the faster of `x.matmul(&w.t())`
//!   on the row-major `m×n` weight and `x.matmul(&wt)` on a contiguous
//!   pre-transposed copy (see [`kernels::DenseLayout`]);
//! - **Q4K**: candle's `QMatMul` over `W` quantized to llama.cpp's Q4_K
//!   (4.5 bits per weight), where `n` is a multiple of its 256-wide block.
//!
//! [`kernels`] builds the contenders (public, so the criterion bench times
//! the very same computations), [`measure`] times them, [`table`] prints.

pub mod kernels;
pub mod measure;
pub mod table;

use anyhow::{bail, Context, Result};
use bitstack_quant::progress::progress_bar;
use clap::Args;

use measure::{
    parse_counts, parse_shape, BenchConfig, CountList, DEFAULT_BLOCKS, DEFAULT_K, DEFAULT_PLANES,
    DEFAULT_ROWS, DEFAULT_SHAPES,
};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Weight shapes MxN: M out features (rows of W), N in features (columns
    /// of W, the length of each row of x).
    #[arg(
        long,
        value_name = "MxN,…",
        value_delimiter = ',',
        value_parser = parse_shape,
        default_value = DEFAULT_SHAPES
    )]
    pub shapes: Vec<(usize, usize)>,
    /// AVD block counts to time (each at least 1; `--blocks ''` for none).
    #[arg(long, value_name = "B,…", value_parser = parse_counts, default_value = DEFAULT_BLOCKS)]
    pub blocks: CountList,
    /// Rank of each block's u·vt (at most min(M, N)).
    #[arg(long, default_value_t = DEFAULT_K)]
    pub k: usize,
    /// Grid plane counts to time (each at least 1; `--planes ''` for
    /// none): the default layout of `compress`, its grid fitted to the
    /// same random weight as the dense and Q4K products.
    #[arg(long, value_name = "P,…", value_parser = parse_counts, default_value = DEFAULT_PLANES)]
    pub planes: CountList,
    /// Time every plane count again on inputs rotated in blocks of this
    /// many (`compress --rotate`): what the rotation costs a forward. 0:
    /// not.
    #[arg(long, value_name = "BLOCK", default_value_t = 0)]
    pub rotate: usize,
    /// Rows of x: 1 is one token being decoded, 512 a prompt being prefilled.
    #[arg(long, value_name = "R,…", value_delimiter = ',', default_value = DEFAULT_ROWS)]
    pub rows: Vec<usize>,
    /// Print a JSON list, one object per combination, with times in
    /// milliseconds (q4k_ms null where Q4K cannot hold the shape), and
    /// nothing else on stdout.
    #[arg(long)]
    pub json: bool,
    /// Threads for every contender [default: RAYON_NUM_THREADS, else all
    /// CPUs]. Ours and candle's Q4K run on rayon's global pool, and candle's
    /// dense matmul splits its work into RAYON_NUM_THREADS tasks (all CPUs
    /// when unset) on that pool: this sets both, so all sides use N threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Repeat each measurement until this many milliseconds have passed (at
    /// least 3 timed runs, after 1 warm-up run).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub min_time_ms: u64,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `bitstack bench`: progress on stderr, the table or JSON on stdout.
pub fn run(args: &BenchArgs) -> Result<()> {
    let cfg = BenchConfig {
        shapes: args.shapes.clone(),
        blocks: args.blocks.0.clone(),
        k: args.k,
        planes: args.planes.0.clone(),
        rotate: args.rotate,
        rows: args.rows.clone(),
        min_time: std::time::Duration::from_millis(args.min_time_ms),
        seed: args.seed,
    };
    // Refuse bad input before spending time on anything.
    cfg.validate()?;
    let threads = size_thread_pool(args.threads)?;
    eprintln!("{threads} threads for ours, candle's dense matmul and candle's Q4K");
    if cfg!(target_arch = "x86_64") && !candle_core::utils::with_avx() {
        eprintln!(
            "note: built without the AVX2 target feature, so candle's Q4K runs its portable scalar kernels"
        );
    }
    let pb = progress_bar(cfg.steps(), "benchmarking");
    let rows = measure::run(&cfg, &pb)?;
    pb.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table::format_table(&rows));
    }
    Ok(())
}

/// Builds rayon's global pool with `threads` threads (`None`: the count
/// candle's dense matmul uses, `RAYON_NUM_THREADS`, else all CPUs) and
/// returns the count.
///
/// Ours and candle's Q4_K product run on that pool. Candle's dense matmul
/// splits its work into `RAYON_NUM_THREADS` tasks (read on every call), run
/// on the same pool; so that `--threads N` sets those too, the binary sets
/// the variable in `main` before any thread exists — never here, as library
/// code cannot know that no other thread reads the environment.
///
/// Call it before anything uses rayon: the global pool can be built once.
pub fn size_thread_pool(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("--threads 0: need at least 1 thread"),
        Some(n) => n,
        None => candle_core::utils::get_num_threads(),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("cannot size rayon's global pool (it was already started)")?;
    Ok(n)
}
