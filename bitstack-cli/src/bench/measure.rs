//! What `bitstack bench` measures and how: the combinations of shapes,
//! block counts and row counts, each product's median time, and the checks
//! that refuse what cannot be measured before any time is spent.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Module, Tensor};
use indicatif::ProgressBar;
use serde::Serialize;

use super::kernels::{
    grid_stack, random_input, random_stack, rotated_grid_stack, stack_linear, DenseBaselines,
    DenseLayout,
};
use bitstack_quant::format::rotation::RotationConfig;

/// The default shapes (`m×n`): a Llama-3-8B attention projection, SmolLM2's
/// attention, up/gate and down projections, and Llama-3-8B's up/gate and down
/// projections.
pub const DEFAULT_SHAPES: &str = "4096x4096,576x576,1536x576,576x1536,14336x4096,4096x14336";
/// The default block counts.
pub const DEFAULT_BLOCKS: &str = "1,2,3,4,6,8";
/// The default grid plane counts: the 3-to-6-bit range they serve.
pub const DEFAULT_PLANES: &str = "3,4,5";
/// The default rows of `x`: one token (decoding) and a 512-token prefill.
pub const DEFAULT_ROWS: &str = "1,512";
/// The default rank of each block's `u·vt`.
pub const DEFAULT_K: usize = 16;
/// Timed repetitions at the least, however long they take.
pub const MIN_REPS: usize = 3;
/// Bits per weight of llama.cpp's Q4_K (144 bytes per 256 weights).
pub const Q4K_BPW: f64 = 4.5;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `(m, n)`: out features, in features.
    pub shapes: Vec<(usize, usize)>,
    /// AVD block counts (rank `k`).
    pub blocks: Vec<usize>,
    pub k: usize,
    /// Grid plane counts (the default layout's grid, fitted to the random
    /// dense weight the baselines use).
    pub planes: Vec<usize>,
    /// With a block, every plane count is timed again on rotated inputs
    /// (`compress --rotate`); 0: not.
    pub rotate: usize,
    pub rows: Vec<usize>,
    /// Each measurement repeats until this much time has passed (and at
    /// least [`MIN_REPS`] times).
    pub min_time: Duration,
    pub seed: u64,
}

impl BenchConfig {
    /// Refuses what cannot be measured, saying why.
    pub fn validate(&self) -> Result<()> {
        if self.shapes.is_empty()
            || (self.blocks.is_empty() && self.planes.is_empty())
            || self.rows.is_empty()
        {
            bail!("nothing to measure: --shapes, --rows and one of --blocks and --planes each need at least one value");
        }
        if let Some(p) = self.planes.iter().find(|&&p| p == 0) {
            bail!("--planes {p}: a grid weight needs at least 1 plane");
        }

        if self.k == 0 {
            bail!("--k 0: each block needs a rank of at least 1");
        }
        if let Some(b) = self.blocks.iter().find(|&&b| b == 0) {
            bail!("--blocks {b}: a BitStack weight needs at least 1 block");
        }
        if self.rotate > 0 {
            RotationConfig::new(self.rotate)
                .check()
                .map_err(|e| anyhow::anyhow!("--rotate: {e}"))?;
            if self.planes.is_empty() {
                bail!(
                    "--rotate {} rotates grid planes: give --planes too",
                    self.rotate
                );
            }
            for &(m, n) in &self.shapes {
                if !n.is_multiple_of(self.rotate) {
                    bail!(
                        "--rotate {} does not divide the {n} input columns of shape {m}x{n}",
                        self.rotate
                    );
                }
            }
        }
        if self.rows.contains(&0) {
            bail!("--rows 0: x needs at least 1 row");
        }
        for &(m, n) in &self.shapes {
            if m == 0 || n == 0 {
                bail!("shape {m}x{n}: both sizes must be at least 1");
            }
            if !self.blocks.is_empty() && self.k > m.min(n) {
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
    /// layouts each, Q4K), per block count and per plane count, for every
    /// shape and row count.
    pub fn steps(&self) -> u64 {
        let rotated = if self.rotate > 0 {
            self.planes.len()
        } else {
            0
        };
        let ours = self.blocks.len() + self.planes.len() + rotated;
        (self.shapes.len() * self.rows.len() * (5 + ours)) as u64
    }
}

/// One measured combination; times are medians in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub m: usize,
    pub n: usize,
    /// `blocks` (AVD blocks of rank `k`) or `planes` (grid planes).
    pub layout: Layout,
    /// How many blocks or planes.
    pub blocks: usize,
    /// The blocks' rank; `None` for grid planes.
    pub k: Option<usize>,
    pub rows: usize,
    /// Bits per weight of the BitStack weight.
    pub bpw: f64,
    pub ours_ms: f64,
    pub dense_f32_ms: f64,
    pub dense_f16_ms: f64,
    /// `None` where Q4_K cannot hold the shape (`n` not a multiple of 256).
    pub q4k_ms: Option<f64>,
}

/// What a row of the bench times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// AVD blocks: signs times a rank-k product.
    Blocks,
    /// Grid planes (`compress --layout planes`).
    Planes,
    /// Grid planes on rotated inputs (`compress --rotate`).
    #[serde(rename = "rotated_planes")]
    RotatedPlanes,
}

/// `MxN` (or `MXN`) as `(m, n)`: the value parser of `--shapes`.
/// A comma-separated list of counts, where `''` is the empty list (clap's
/// own list splitting would hand the parser one empty string instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountList(pub Vec<usize>);

/// Parses `--blocks` and `--planes`: `1,2,4`, or `''` for none.
pub fn parse_counts(s: &str) -> Result<CountList, String> {
    if s.trim().is_empty() {
        return Ok(CountList(Vec::new()));
    }
    s.split(',')
        .map(|c| {
            c.trim().parse().map_err(|_| {
                format!("`{c}` in `{s}` is not a count: expected e.g. 1,2,4 (or '' for none)")
            })
        })
        .collect::<Result<_, _>>()
        .map(CountList)
}

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
/// (m·n)`, signs padded to 32-row tiles): the formula the measured
/// resident bytes are checked against.
#[cfg(test)]
pub fn stack_bits_per_weight(m: usize, n: usize, k: usize, blocks: usize) -> f64 {
    use bitstack_quant::format::block::block_bytes;
    bitstack_quant::bits_per_weight(blocks * block_bytes(m, n, k), m * n)
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

impl Layout {
    /// The word for a count of them.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Blocks => "blocks",
            Layout::Planes => "planes",
            Layout::RotatedPlanes => "rotated",
        }
    }
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
    let max_blocks = cfg.blocks.iter().copied().max().unwrap_or(0);
    let max_planes = cfg.planes.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for (i, &(m, n)) in cfg.shapes.iter().enumerate() {
        let seed = cfg.seed.wrapping_add(1000 * i as u64);
        pb.set_message(format!("{m}x{n} setup"));
        let dense = DenseBaselines::random(m, n, seed)?;
        let full = random_stack(m, n, cfg.k.min(m.min(n)), max_blocks, seed + 1);
        let grid = if max_planes > 0 {
            pb.set_message(format!("{m}x{n} grid planes"));
            Some(grid_stack(&dense.w_f32, max_planes)?)
        } else {
            None
        };
        let rotated = if cfg.rotate > 0 {
            pb.set_message(format!("{m}x{n} rotated grid planes"));
            let rotation = RotationConfig::new(cfg.rotate);
            Some(rotated_grid_stack(
                &dense.w_f32,
                max_planes,
                Some(rotation),
            )?)
        } else {
            None
        };
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
            let ours = cfg
                .blocks
                .iter()
                .map(|&b| (Layout::Blocks, b, full.prefix(b)))
                .chain(grid.iter().flat_map(|grid| {
                    cfg.planes
                        .iter()
                        .map(|&p| (Layout::Planes, p, grid.prefix(p)))
                }))
                .chain(rotated.iter().flat_map(|grid| {
                    cfg.planes
                        .iter()
                        .map(|&p| (Layout::RotatedPlanes, p, grid.prefix(p)))
                }));
            for (layout, b, stack) in ours {
                let bpw = bitstack_quant::bits_per_weight(stack.resident_bytes(), m * n);
                let linear = stack_linear(stack);
                let what = format!("{b} {}", layout.name());
                let ours_ms = timed(&what, &mut || linear.forward(&x))?;
                out.push(BenchRow {
                    m,
                    n,
                    layout,
                    blocks: b,
                    k: (layout == Layout::Blocks).then_some(cfg.k),
                    rows,
                    bpw,
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

#[cfg(test)]
mod tests {
    use super::*;

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
            planes: vec![3],
            rotate: 0,
            rows: vec![1, 3],
            min_time: Duration::ZERO,
            seed: 0,
        };
        ok.validate().unwrap();
        assert_eq!(ok.steps(), 2 * 2 * (5 + 2 + 1));
        let err = |f: &dyn Fn(&mut BenchConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.blocks = vec![1, 0]).contains("--blocks 0"));
        assert!(err(&|c| c.rows = vec![0]).contains("--rows 0"));
        assert!(err(&|c| c.k = 0).contains("--k 0"));
        assert!(err(&|c| c.k = 34).contains("min(m, n) = 33"));
        // A rotation must be a power of two dividing every width, of planes.
        assert!(err(&|c| c.rotate = 16).contains("shape 33x40"));
        assert!(err(&|c| c.rotate = 24).contains("power of two"));
        let rotated = BenchConfig {
            shapes: vec![(64, 256), (33, 48)],
            rotate: 16,
            ..ok.clone()
        };
        rotated.validate().unwrap();
        assert_eq!(rotated.steps(), 2 * 2 * (5 + 2 + 1 + 1));
        assert!(err(&|c| {
            c.shapes = vec![(64, 256)];
            c.rotate = 16;
            c.planes = vec![];
        })
        .contains("--planes too"));
        assert!(err(&|c| c.shapes = vec![(0, 4)]).contains("0x4"));
        assert!(err(&|c| c.planes = vec![0]).contains("--planes 0"));
        assert!(err(&|c| {
            c.blocks.clear();
            c.planes.clear()
        })
        .contains("nothing to measure"));
        // Planes alone need no rank.
        let planes_only = BenchConfig {
            blocks: vec![],
            k: 1000,
            ..ok.clone()
        };
        planes_only.validate().unwrap();
    }

    #[test]
    fn count_lists_parse_and_the_empty_one_is_none() {
        assert_eq!(parse_counts("1,2, 4").unwrap(), CountList(vec![1, 2, 4]));
        assert_eq!(parse_counts("").unwrap(), CountList(vec![]));
        assert_eq!(parse_counts("3").unwrap(), CountList(vec![3]));
        let err = parse_counts("1,,2").unwrap_err();
        assert!(err.contains("`` in `1,,2`"), "{err}");
        assert!(parse_counts("1,x").unwrap_err().contains("`x`"));
    }

    #[test]
    fn bits_per_weight_counts_signs_and_factors() {
        // 1 bit of sign + 2·16·8192·16 bits of u, vt over 4096² weights.
        assert!((stack_bits_per_weight(4096, 4096, 16, 1) - 1.125).abs() < 1e-12);
        assert!((stack_bits_per_weight(4096, 4096, 16, 4) - 4.5).abs() < 1e-12);
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
}
