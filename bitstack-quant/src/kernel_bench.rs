//! `bitstack bench`: a BitStack linear against candle's dense and quantized
//! products, on random weights of model-sized shapes.
//!
//! For each shape `m×n` (out × in features), block count and row count, the
//! median wall time of one `y = x·Wᵀ` is measured four ways in one process:
//!
//! - **ours**: [`Linear::forward`] on a [`LinearWeight::BitStack`] weight of
//!   that many random blocks, so whatever kernel that forward uses is what
//!   gets timed;
//! - **dense f32** and **dense f16**: candle's `matmul` of `x` (cast to the
//!   weight's dtype beforehand) with `Wᵀ`, the faster of `x.matmul(&w.t())`
//!   on the row-major `m×n` weight and `x.matmul(&wt)` on a contiguous
//!   pre-transposed copy (see [`DenseLayout`]);
//! - **Q4K**: candle's `QMatMul` over `W` quantized to llama.cpp's Q4_K
//!   (4.5 bits per weight), where `n` is a multiple of its 256-wide block.
//!
//! The random weights are fixed by a seed; so are the inputs. The shared
//! helpers ([`random_stack`], [`random_dense`], [`random_input`],
//! [`DenseBaselines`]) are public so the criterion bench times the very same
//! computations.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use indicatif::ProgressBar;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::format::block::{block_bytes, Block};
use crate::runtime::linear::{Linear, LinearWeight};
use crate::runtime::stack::WeightStack;

/// The default shapes (`m×n`): a Llama-3-8B attention projection, SmolLM2's
/// attention, up/gate and down projections, and Llama-3-8B's up/gate and down
/// projections.
pub const DEFAULT_SHAPES: &str = "4096x4096,576x576,1536x576,576x1536,14336x4096,4096x14336";
/// The default block counts.
pub const DEFAULT_BLOCKS: &str = "1,2,3,4,6,8";
/// The default rows of `x`: one token (decoding) and a 512-token prefill.
pub const DEFAULT_ROWS: &str = "1,512";
/// The default rank of each block's `u·vt`.
pub const DEFAULT_K: usize = 16;
/// Timed repetitions at the least, however long they take.
pub const MIN_REPS: usize = 3;
/// Bits per weight of llama.cpp's Q4_K (144 bytes per 256 weights).
pub const Q4K_BPW: f64 = 4.5;
/// Q4_K quantizes rows in blocks of this many weights.
pub const Q4K_BLOCK: usize = 256;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `(m, n)`: out features, in features.
    pub shapes: Vec<(usize, usize)>,
    pub blocks: Vec<usize>,
    pub k: usize,
    pub rows: Vec<usize>,
    /// Each measurement repeats until this much time has passed (and at
    /// least [`MIN_REPS`] times).
    pub min_time: Duration,
    pub seed: u64,
}

impl BenchConfig {
    /// Refuses what cannot be measured, saying why.
    pub fn validate(&self) -> Result<()> {
        if self.shapes.is_empty() || self.blocks.is_empty() || self.rows.is_empty() {
            bail!("nothing to measure: --shapes, --blocks and --rows each need at least one value");
        }
        if self.k == 0 {
            bail!("--k 0: each block needs a rank of at least 1");
        }
        if let Some(b) = self.blocks.iter().find(|&&b| b == 0) {
            bail!("--blocks {b}: a BitStack weight needs at least 1 block");
        }
        if self.rows.contains(&0) {
            bail!("--rows 0: x needs at least 1 row");
        }
        for &(m, n) in &self.shapes {
            if m == 0 || n == 0 {
                bail!("shape {m}x{n}: both sizes must be at least 1");
            }
            if self.k > m.min(n) {
                bail!(
                    "--k {} is larger than min(m, n) = {} of shape {m}x{n}: a block's u·vt has rank at most min(m, n)",
                    self.k,
                    m.min(n)
                );
            }
        }
        Ok(())
    }

    /// Progress steps of [`run`]: one per baseline (dense f32 and f16 in two
    /// layouts each, Q4K) and per block count, for every shape and row count.
    pub fn steps(&self) -> u64 {
        (self.shapes.len() * self.rows.len() * (5 + self.blocks.len())) as u64
    }
}

/// One measured combination; times are medians in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub m: usize,
    pub n: usize,
    pub blocks: usize,
    pub k: usize,
    pub rows: usize,
    /// Bits per weight of the BitStack weight.
    pub bpw: f64,
    pub ours_ms: f64,
    pub dense_f32_ms: f64,
    pub dense_f16_ms: f64,
    /// `None` where Q4_K cannot hold the shape (`n` not a multiple of 256).
    pub q4k_ms: Option<f64>,
}

/// `MxN` (or `MXN`) as `(m, n)`: the value parser of `--shapes`.
pub fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let bad = || {
        format!("`{s}` is not a shape: expected MxN (out features x in features), e.g. 4096x4096")
    };
    let (m, n) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let m: usize = m.trim().parse().map_err(|_| bad())?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    if m == 0 || n == 0 {
        return Err(format!("`{s}`: both sizes of a shape must be at least 1"));
    }
    Ok((m, n))
}

/// Bits per weight of `blocks` resident BitStack blocks of an `m×n` weight
/// with rank `k` ([`block_bytes`]: about `blocks · (m·n/8 + 2·k·(m+n)) · 8 /
/// (m·n)`, signs padded to 32-row tiles).
pub fn bits_per_weight(m: usize, n: usize, k: usize, blocks: usize) -> f64 {
    (blocks * block_bytes(m, n, k)) as f64 * 8.0 / (m * n) as f64
}

/// Sets the thread count of both sides of the comparison and returns it.
///
/// Our kernels and candle's Q4_K product run on rayon's global pool; candle's
/// dense matmul hands the `gemm` crate a thread count read from
/// `RAYON_NUM_THREADS` (else every CPU), whose tasks then run on that same
/// pool. Setting the variable and the pool to one number makes all of them
/// use it. `None` keeps what candle would pick on its own (`RAYON_NUM_THREADS`,
/// else all CPUs) and pins the pool to that.
///
/// Call it before anything starts threads or uses rayon: the global pool can
/// be built only once, and the environment is process-wide.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("--threads 0: need at least 1 thread"),
        Some(n) => n,
        None => candle_core::utils::get_num_threads(),
    };
    // Safe here: called at start-up, before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("cannot size rayon's global pool (it was already started)")?;
    Ok(n)
}

/// A random `m×n` BitStack weight of `blocks` blocks of rank `k`
/// ([`crate::format::synthetic::random_block`]).
pub fn random_stack(m: usize, n: usize, k: usize, blocks: usize, seed: u64) -> WeightStack {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks: Vec<Block> = (0..blocks)
        .map(|_| crate::format::synthetic::random_block(m, n, k, 1.0, &mut rng))
        .collect();
    WeightStack::new(m, n, k, blocks)
}

/// A random dense `m×n` f32 weight (entries Gaussian, standard deviation `1/√n`).
pub fn random_dense(m: usize, n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = 1.0 / (n as f32).sqrt();
    let w: Vec<f32> = (0..m * n)
        .map(|_| s * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(w, (m, n), &Device::Cpu)?)
}

/// A random `rows×n` f32 input with standard Gaussian entries.
pub fn random_input(rows: usize, n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..rows * n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(x, (rows, n), &Device::Cpu)?)
}

/// `stack` as a bias-free [`Linear`].
pub fn stack_linear(stack: WeightStack) -> Linear {
    Linear {
        weight: LinearWeight::BitStack(Arc::new(stack)),
        bias: None,
    }
}

/// How the dense products hand candle `Wᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLayout {
    /// `x.matmul(&w.t())` on the row-major `m×n` weight: the transposed view
    /// is a column-major right-hand side, which candle's `gemm` reads in
    /// place. The layout a checkpoint stores and [`Linear`] uses.
    View,
    /// `x.matmul(&wt)` with `Wᵀ` copied once into a contiguous `n×m` tensor.
    Contiguous,
}

impl DenseLayout {
    pub const ALL: [DenseLayout; 2] = [DenseLayout::View, DenseLayout::Contiguous];
}

/// Candle's products with one random dense `m×n` weight: f32 and f16 (each
/// in both [`DenseLayout`]s) and Q4_K.
///
/// Neither layout wins everywhere: measured on an AVX2 machine, the view was
/// clearly faster for one row in f16 on small shapes, the contiguous copy
/// often faster for 512 rows in f16, and f32 mostly a wash. [`run`] times
/// both and reports the faster, so the baselines are candle at its best.
pub struct DenseBaselines {
    /// `W`, row-major `m×n`.
    pub w_f32: Tensor,
    pub w_f16: Tensor,
    /// `Wᵀ`, contiguous `n×m`.
    pub wt_f32: Tensor,
    pub wt_f16: Tensor,
    /// `None` when `n` is not a multiple of [`Q4K_BLOCK`].
    pub q4k: Option<QMatMul>,
}

impl DenseBaselines {
    pub fn new(w: Tensor) -> Result<Self> {
        let (_, n) = w.dims2()?;
        let q4k = if n.is_multiple_of(Q4K_BLOCK) {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K)?)?;
            if !matches!(q, QMatMul::QTensor(_)) {
                bail!(
                    "candle dequantizes Q4K weights (CANDLE_DEQUANTIZE_ALL or CANDLE_DEQUANTIZE_ALL_F16 is set): unset it to time the quantized product"
                );
            }
            Some(q)
        } else {
            None
        };
        let w_f16 = w.to_dtype(DType::F16)?;
        Ok(Self {
            wt_f32: w.t()?.contiguous()?,
            wt_f16: w_f16.t()?.contiguous()?,
            w_f32: w,
            w_f16,
            q4k,
        })
    }

    /// A random weight's baselines (see [`random_dense`]).
    pub fn random(m: usize, n: usize, seed: u64) -> Result<Self> {
        Self::new(random_dense(m, n, seed)?)
    }

    /// `x·Wᵀ` in `x`'s dtype (f32 or f16, cast outside any timing); `x` is `rows×n`.
    pub fn forward(&self, x: &Tensor, layout: DenseLayout) -> candle_core::Result<Tensor> {
        let f16 = x.dtype() == DType::F16;
        match (layout, f16) {
            (DenseLayout::View, false) => x.matmul(&self.w_f32.t()?),
            (DenseLayout::View, true) => x.matmul(&self.w_f16.t()?),
            (DenseLayout::Contiguous, false) => x.matmul(&self.wt_f32),
            (DenseLayout::Contiguous, true) => x.matmul(&self.wt_f16),
        }
    }

    /// `x·Wᵀ` with the Q4_K weight; `x` is `rows×n` f32.
    pub fn forward_q4k(&self, x: &Tensor) -> Option<candle_core::Result<Tensor>> {
        self.q4k.as_ref().map(|q| q.forward(x))
    }
}

/// The median time of `f` over at least [`MIN_REPS`] calls and `min_time`,
/// after one untimed warm-up call.
pub fn median_time<T>(
    min_time: Duration,
    mut f: impl FnMut() -> candle_core::Result<T>,
) -> Result<Duration> {
    black_box(f()?);
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < MIN_REPS || start.elapsed() < min_time {
        let t = Instant::now();
        black_box(f()?);
        times.push(t.elapsed());
    }
    times.sort_unstable();
    let mid = times.len() / 2;
    Ok(if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Measures every combination of `cfg`, advancing `pb` by [`BenchConfig::steps`].
///
/// Per shape one random dense weight and one random stack of the most blocks
/// asked for are built (untimed); each block count times a prefix of that
/// stack. The dense baselines do not depend on the block count, so they are
/// timed once per shape and row count and repeated in each of its rows;
/// each dense time is the faster of the two [`DenseLayout`]s.
/// Rows come shape by shape, then by row count, then by block count.
pub fn run(cfg: &BenchConfig, pb: &ProgressBar) -> Result<Vec<BenchRow>> {
    cfg.validate()?;
    let max_blocks = *cfg.blocks.iter().max().expect("validated");
    let mut out = Vec::new();
    for (i, &(m, n)) in cfg.shapes.iter().enumerate() {
        let seed = cfg.seed.wrapping_add(1000 * i as u64);
        pb.set_message(format!("{m}x{n} setup"));
        let dense = DenseBaselines::random(m, n, seed)?;
        let full = random_stack(m, n, cfg.k, max_blocks, seed + 1);
        for &rows in &cfg.rows {
            let x = random_input(rows, n, seed + 2)?;
            let x16 = x.to_dtype(DType::F16)?;
            let timed = |what: &str, f: &mut dyn FnMut() -> candle_core::Result<Tensor>| {
                pb.set_message(format!("{m}x{n}×{rows} {what}"));
                let t = median_time(cfg.min_time, f)
                    .with_context(|| format!("{what} of {m}x{n} with {rows} rows"));
                pb.inc(1);
                t.map(ms)
            };
            // The faster of candle's two layouts, per dtype.
            let best = |x: &Tensor, what: &str| -> Result<f64> {
                let mut t = f64::INFINITY;
                for layout in DenseLayout::ALL {
                    let name = format!("{what} {layout:?}");
                    t = t.min(timed(&name, &mut || dense.forward(x, layout))?);
                }
                Ok(t)
            };
            let f32_ms = best(&x, "f32")?;
            let f16_ms = best(&x16, "f16")?;
            let q4k_ms = match &dense.q4k {
                Some(q) => Some(timed("Q4K", &mut || q.forward(&x))?),
                None => {
                    pb.inc(1);
                    None
                }
            };
            for &b in &cfg.blocks {
                let linear = stack_linear(full.prefix(b));
                let ours_ms = timed(&format!("{b} blocks"), &mut || linear.forward(&x))?;
                out.push(BenchRow {
                    m,
                    n,
                    blocks: b,
                    k: cfg.k,
                    rows,
                    bpw: bits_per_weight(m, n, cfg.k, b),
                    ours_ms,
                    dense_f32_ms: f32_ms,
                    dense_f16_ms: f16_ms,
                    q4k_ms,
                });
            }
        }
    }
    Ok(out)
}

/// The rows as an aligned text table, one line per combination.
pub fn format_table(rows: &[BenchRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>11} {:>6} {:>3} {:>5} {:>6} {:>10} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "shape",
        "blocks",
        "k",
        "rows",
        "bpw",
        "ours ms",
        "dense f32 ms",
        "dense f16 ms",
        "Q4K ms",
        "ours/f32",
        "ours/f16",
        "ours/Q4K"
    );
    for r in rows {
        let q4k = r.q4k_ms.map_or("-".to_string(), fmt_ms);
        let q4k_ratio = r
            .q4k_ms
            .map_or("-".to_string(), |q| format!("{:.2}", r.ours_ms / q));
        let _ = writeln!(
            s,
            "{:>11} {:>6} {:>3} {:>5} {:>6.3} {:>10} {:>12} {:>12} {:>10} {:>9.2} {:>9.2} {:>9}",
            format!("{}x{}", r.m, r.n),
            r.blocks,
            r.k,
            r.rows,
            r.bpw,
            fmt_ms(r.ours_ms),
            fmt_ms(r.dense_f32_ms),
            fmt_ms(r.dense_f16_ms),
            q4k,
            r.ours_ms / r.dense_f32_ms,
            r.ours_ms / r.dense_f16_ms,
            q4k_ratio
        );
    }
    s
}

/// Milliseconds with three significant decimals where they matter.
fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x·Wᵀ` in f64 from the row-major `w`.
    fn reference(x: &[f32], w: &[f32], rows: usize, m: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * m];
        for r in 0..rows {
            for i in 0..m {
                y[r * m + i] = (0..n)
                    .map(|j| x[r * n + j] as f64 * w[i * n + j] as f64)
                    .sum();
            }
        }
        y
    }

    /// Largest error relative to the largest reference magnitude.
    fn relative_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-12);
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max)
            / scale
    }

    #[test]
    fn the_random_stack_forward_is_its_dense_product() {
        for (m, n, k, blocks, rows) in [
            (64, 256, 4, 2, 3),
            (33, 40, 4, 3, 1),
            (7, 9, 3, 1, 5),
            (1, 13, 1, 2, 2),
        ] {
            let stack = random_stack(m, n, k, blocks, 7);
            assert_eq!(stack.blocks.len(), blocks);
            assert!(stack
                .blocks
                .iter()
                .all(|b| (b.signs.m(), b.signs.n()) == (m, n)
                    && b.u.len() == m * k
                    && b.vt.len() == k * n));
            let w = stack.dense();
            let x = random_input(rows, n, 8).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&xs, &w, rows, m, n);
            let y = stack_linear(stack).forward(&x).unwrap();
            assert_eq!(y.dims(), &[rows, m]);
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let err = relative_error(&got, &want);
            // A few rows run the shuffle kernel, whose tables are quantized.
            let bound = bitstack_kernels::tmac::RELATIVE_RMS_ERROR_BOUND as f64;
            assert!(
                err < bound,
                "{m}x{n}, {blocks} blocks: relative error {err}"
            );
        }
    }

    #[test]
    fn the_baselines_compute_the_same_product() {
        for (m, n) in [(48, 512), (33, 40)] {
            let base = DenseBaselines::random(m, n, 3).unwrap();
            let w: Vec<f32> = base.w_f32.flatten_all().unwrap().to_vec1().unwrap();
            let x = random_input(4, n, 4).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&xs, &w, 4, m, n);
            let flat = |t: Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let x16 = x.to_dtype(DType::F16).unwrap();
            for layout in DenseLayout::ALL {
                let f32_err = relative_error(&flat(base.forward(&x, layout).unwrap()), &want);
                assert!(f32_err < 1e-5, "f32 {layout:?}: {f32_err}");
                let y16 = base.forward(&x16, layout).unwrap();
                assert_eq!(y16.dtype(), DType::F16);
                let f16_err = relative_error(&flat(y16), &want);
                assert!(f16_err < 1e-2, "f16 {layout:?}: {f16_err}");
            }
            match base.forward_q4k(&x) {
                Some(y) => {
                    assert!(n.is_multiple_of(Q4K_BLOCK));
                    let q_err = relative_error(&flat(y.unwrap()), &want);
                    assert!(q_err < 0.2, "Q4K: {q_err}");
                }
                None => assert!(!n.is_multiple_of(Q4K_BLOCK)),
            }
        }
    }

    #[test]
    fn shapes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_shape("4096x14336"), Ok((4096, 14336)));
        assert_eq!(parse_shape(" 33X40 "), Ok((33, 40)));
        for bad in ["12", "x5", "5x", "axb", "4x4x4", "-1x3"] {
            let e = parse_shape(bad).unwrap_err();
            assert!(e.contains("expected MxN"), "{bad}: {e}");
        }
        assert!(parse_shape("0x8").unwrap_err().contains("at least 1"));
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = BenchConfig {
            shapes: vec![(64, 256), (33, 40)],
            blocks: vec![1, 2],
            k: 4,
            rows: vec![1, 3],
            min_time: Duration::ZERO,
            seed: 0,
        };
        ok.validate().unwrap();
        assert_eq!(ok.steps(), 2 * 2 * (5 + 2));
        let err = |f: &dyn Fn(&mut BenchConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.blocks = vec![1, 0]).contains("--blocks 0"));
        assert!(err(&|c| c.rows = vec![0]).contains("--rows 0"));
        assert!(err(&|c| c.k = 0).contains("--k 0"));
        assert!(err(&|c| c.k = 34).contains("min(m, n) = 33"));
        assert!(err(&|c| c.shapes = vec![(0, 4)]).contains("0x4"));
        assert!(err(&|c| c.blocks.clear()).contains("nothing to measure"));
    }

    #[test]
    fn bits_per_weight_counts_signs_and_factors() {
        // 1 bit of sign + 2·16·8192·16 bits of u, vt over 4096² weights.
        assert!((bits_per_weight(4096, 4096, 16, 1) - 1.125).abs() < 1e-12);
        assert!((bits_per_weight(4096, 4096, 16, 4) - 4.5).abs() < 1e-12);
    }

    #[test]
    fn the_median_takes_at_least_three_timed_calls() {
        let mut calls = 0;
        median_time(Duration::ZERO, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 1 + MIN_REPS);
    }

    #[test]
    fn the_table_prints_dashes_without_q4k() {
        let row = BenchRow {
            m: 33,
            n: 40,
            blocks: 2,
            k: 4,
            rows: 1,
            bpw: bits_per_weight(33, 40, 4, 2),
            ours_ms: 2.0,
            dense_f32_ms: 1.0,
            dense_f16_ms: 4.0,
            q4k_ms: None,
        };
        let t = format_table(&[row]);
        let line = t.lines().nth(1).unwrap();
        assert!(line.trim_start().starts_with("33x40"), "{t}");
        assert!(line.contains(" 2.00 ") && line.contains(" 0.50 "), "{t}");
        assert!(line.trim_end().ends_with('-'), "{t}");
    }
}
