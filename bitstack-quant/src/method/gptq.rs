//! GPTQ: the fixed-precision quantizer a user would pick instead of an
//! any-size model, as the baseline BitStack is measured against.
//!
//! Each linear's columns are rounded to a `bits`-bit asymmetric grid one at
//! a time, and each column's rounding error is pushed onto the columns not
//! yet rounded, weighted by the inverse Gram matrix of the linear's inputs
//! on calibration text (Frantar et al., 2022). The error-feedback loop is
//! the one sign feedback uses ([`Feedback::quantize_with`]); only the
//! quantizer differs.
//!
//! Grids are per row and per group of `group` consecutive input channels,
//! with an f16 scale and zero point each (as [`crate::method::rtn`]). In the
//! natural order a group's grid is fitted to its weights when the first of
//! them is reached, with the errors of the columns before, as GPTQ does
//! (when the group size does not divide 128, the part of a group in the
//! next batch of columns lacks the latest batch's errors); with act-order the
//! columns of a group are visited far apart, so the grids are fitted to the
//! weights before any update ("static groups"). The model is quantized
//! layer by layer, each layer calibrated on the outputs of the layers
//! already quantized.

use anyhow::{bail, Context, Result};
use faer::MatRef;
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::eval::calibrate::LayerByLayer;
use crate::method::feedback::{ColumnOrder, ColumnQuantizer, Feedback};
use crate::method::rtn::{fit_grid, round_to_grid, rtn_bits_per_weight};
use crate::runtime::linear::LinearWeight;
use crate::runtime::model::{LinearKind, Llama};

/// Knobs of the GPTQ baseline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Bits per weight of the grid, 1…8.
    pub bits: u32,
    /// Input channels per scale and zero point.
    pub group: usize,
    /// Visit columns in order of decreasing input energy (act-order).
    pub order: ColumnOrder,
    /// Damping `λ = damp · mean(diag H)`, GPTQ's 1%.
    pub damp: f64,
}

impl GptqOptions {
    /// GPTQ's usual settings for `bits` and `group`: natural order, 1% damping.
    pub fn new(bits: u32, group: usize) -> Self {
        Self {
            bits,
            group,
            order: ColumnOrder::Natural,
            damp: 0.01,
        }
    }

    /// Checks the options, before any calibration is spent on them.
    pub fn check(&self) -> Result<()> {
        if !(1..=8).contains(&self.bits) {
            bail!("--gptq takes 1…8 bits, got {}", self.bits);
        }
        if self.group == 0 {
            bail!("the group size must be at least 1");
        }
        if !(self.damp.is_finite() && self.damp >= 0.0) {
            bail!("damping {} must be a finite fraction ≥ 0", self.damp);
        }
        Ok(())
    }
}

/// The grids of a matrix: an f16-rounded scale and zero point per row and
/// group of input channels.
struct Grid {
    scale: Vec<f32>,
    zero: Vec<f32>,
    max_q: f32,
    group: usize,
    n: usize,
    /// Refit each group when the natural order reaches it.
    refit: bool,
}

impl Grid {
    /// The grids of the row-major `m×n` `w`, as round-to-nearest fits them.
    fn fit(w: &[f32], n: usize, bits: u32, group: usize) -> Self {
        let groups = n.div_ceil(group);
        let m = w.len() / n;
        let mut grid = Self {
            scale: vec![0.0; m * groups],
            zero: vec![0.0; m * groups],
            max_q: ((1u32 << bits) - 1) as f32,
            group,
            n,
            refit: false,
        };
        for (i, row) in w.chunks(n).enumerate() {
            for (g, values) in row.chunks(group).enumerate() {
                grid.set(i * groups + g, values.iter().copied());
            }
        }
        grid
    }

    /// Fits grid `g` to span `values`, as round-to-nearest does.
    fn set(&mut self, g: usize, values: impl Iterator<Item = f32>) {
        (self.scale[g], self.zero[g]) = fit_grid(values, self.max_q);
    }

    /// The grid point nearest to `x` in row `i`, column `c`.
    fn round(&self, i: usize, c: usize, x: f32) -> f32 {
        let g = i * self.n.div_ceil(self.group) + c / self.group;
        round_to_grid(x, (self.scale[g], self.zero[g]), self.max_q)
    }
}

/// A [`Grid`] that keeps what it picked.
struct Recording {
    grid: Grid,
    values: Vec<f32>,
}

impl ColumnQuantizer for Recording {
    /// In the natural order (position = column), refits a group's grids
    /// when its first column is reached.
    fn begin_column(&mut self, position: usize, upcoming: MatRef<'_, f32>) {
        let grid = &mut self.grid;
        if !grid.refit || !position.is_multiple_of(grid.group) {
            return;
        }
        let g = position / grid.group;
        let groups = grid.n.div_ceil(grid.group);
        let cols = grid.group.min(upcoming.ncols());
        for i in 0..upcoming.nrows() {
            let values = (0..cols).map(|p| upcoming[(i, p)]);
            grid.set(i * groups + g, values);
        }
    }

    fn pick(&mut self, row: usize, column: usize, x: f32) -> f32 {
        let v = self.grid.round(row, column, x);
        self.values[row * self.grid.n + column] = v;
        v
    }
}

/// Quantizes the row-major `m×n` `w` in place with GPTQ, given the Gram
/// matrix `gram = Σ x xᵀ` (row-major `n×n`) of its inputs.
pub fn gptq_in_place(
    w: &mut [f32],
    m: usize,
    n: usize,
    gram: &[f64],
    opts: &GptqOptions,
) -> Result<()> {
    opts.check()?;
    if w.len() != m * n {
        bail!("weight has {} values, expected {m}×{n}", w.len());
    }
    let feedback = Feedback::from_gram_in(gram, n, opts.damp, opts.order)?;
    let mut grid = Grid::fit(w, n, opts.bits, opts.group);
    grid.refit = opts.order == ColumnOrder::Natural;
    let mut q = Recording {
        grid,
        values: vec![0f32; m * n],
    };
    feedback.quantize_with(w, m, &mut q);
    if let Some(x) = q.values.iter().position(|v| !v.is_finite()) {
        // Each error pushed onward can grow the weights after it; on an
        // ill-conditioned Gram with few bits that runs away.
        bail!(
            "GPTQ diverged (row {}, column {} is not finite): raise the damping",
            x / n,
            x % n
        );
    }
    w.copy_from_slice(&q.values);
    Ok(())
}

/// Quantizes every decoder linear of the dense `model` with GPTQ, calibrated
/// on `windows` (in batches of `batch`); returns the bytes the quantized
/// linears would occupy (`bits + 32/group` bits per weight).
pub fn apply_gptq(
    model: &mut Llama,
    windows: &[Vec<u32>],
    batch: usize,
    opts: &GptqOptions,
    progress: &ProgressBar,
) -> Result<usize> {
    opts.check()?;
    if windows.is_empty() {
        bail!("GPTQ needs at least one calibration window");
    }
    let mut calibration = LayerByLayer::new(model, windows, batch, true)?;
    progress.set_length(model.layers.len() as u64);
    let mut bytes = 0f64;
    for l in 0..model.layers.len() {
        let stats = calibration.peek_layer_of(&model.context(), &model.layers[l])?;
        let weights: Vec<(LinearKind, Vec<f32>, (usize, usize))> = LinearKind::ALL
            .iter()
            .map(|&kind| match &model.layers[l].linear(kind).weight {
                LinearWeight::Dense(w) => {
                    Ok((kind, w.flatten_all()?.to_vec1::<f32>()?, w.dims2()?))
                }
                LinearWeight::BitStack(_) => {
                    bail!("GPTQ needs a dense model ({} is BitStack)", kind.path(l))
                }
            })
            .collect::<Result<_>>()?;
        let quantized: Vec<(LinearKind, Vec<f32>, (usize, usize))> = weights
            .into_par_iter()
            .map(|(kind, mut w, (m, n))| {
                let gram = stats.grams.get(&kind.input()).with_context(|| {
                    format!("calibration recorded no input Gram for {}", kind.path(l))
                })?;
                gptq_in_place(&mut w, m, n, gram, opts)
                    .with_context(|| format!("GPTQ of {}", kind.path(l)))?;
                Ok((kind, w, (m, n)))
            })
            .collect::<Result<_>>()?;
        for (kind, w, (m, n)) in quantized {
            let lin = model.layers[l].linear_mut(kind);
            let device = match &lin.weight {
                LinearWeight::Dense(t) => t.device().clone(),
                LinearWeight::BitStack(_) => unreachable!("checked above"),
            };
            lin.weight = LinearWeight::Dense(candle_core::Tensor::from_vec(w, (m, n), &device)?);
            bytes += (m * n) as f64 * rtn_bits_per_weight(opts.bits, opts.group) / 8.0;
        }
        calibration.advance(&model.context(), &model.layers[l])?;
        progress.inc(1);
    }
    Ok(bytes.round() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::feedback::tests::{correlated_gram, output_error};
    use crate::method::rtn::rtn_in_place;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn with_a_diagonal_gram_gptq_is_round_to_nearest() {
        // Uncorrelated inputs: no column can absorb another's error, so
        // GPTQ rounds every weight to nearest on the same grids as RTN.
        let mut rng = StdRng::seed_from_u64(11);
        for (m, n, group, bits) in [(5, 13, 4, 3), (1, 130, 128, 4), (9, 33, 33, 2)] {
            let mut gram = vec![0f64; n * n];
            for c in 0..n {
                gram[c * n + c] = 0.5 + rng.random::<f64>();
            }
            let w: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut rtn = w.clone();
            rtn_in_place(&mut rtn, n, bits, group);
            for order in [ColumnOrder::Natural, ColumnOrder::DecreasingEnergy] {
                let mut g = w.clone();
                let opts = GptqOptions {
                    order,
                    ..GptqOptions::new(bits, group)
                };
                gptq_in_place(&mut g, m, n, &gram, &opts).unwrap();
                assert_eq!(g, rtn, "{m}×{n} g{group} w{bits} {order:?}");
            }
        }
    }

    #[test]
    fn gptq_beats_rtn_on_correlated_inputs_and_stays_on_the_grid() {
        let mut rng = StdRng::seed_from_u64(4);
        for (m, n, group, bits) in [(7, 37, 8, 3), (1, 200, 128, 4), (12, 129, 32, 3)] {
            let gram = correlated_gram(3 * n, n, 0.7, &mut rng);
            let w: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut rtn = w.clone();
            rtn_in_place(&mut rtn, n, bits, group);
            let err = |q: &[f32]| -> f64 {
                let e: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
                output_error(&e, &gram, m, n)
            };
            for order in [ColumnOrder::Natural, ColumnOrder::DecreasingEnergy] {
                let mut g = w.clone();
                let opts = GptqOptions {
                    order,
                    ..GptqOptions::new(bits, group)
                };
                gptq_in_place(&mut g, m, n, &gram, &opts).unwrap();
                assert!(
                    err(&g) < err(&rtn),
                    "{m}×{n} {order:?}: GPTQ {} vs RTN {}",
                    err(&g),
                    err(&rtn)
                );
                // At most 2^bits values per row and group; with act-order
                // they are points of the grids fitted to the original weights.
                for row in g.chunks(n) {
                    for values in row.chunks(group) {
                        let mut levels: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                        levels.sort_unstable();
                        levels.dedup();
                        assert!(levels.len() <= 1 << bits, "{m}×{n} {order:?}: {levels:?}");
                    }
                }
                if order == ColumnOrder::DecreasingEnergy {
                    let grid = Grid::fit(&w, n, bits, group);
                    for (x, &v) in g.iter().enumerate() {
                        let (i, c) = (x / n, x % n);
                        assert_eq!(grid.round(i, c, v), v, "{m}×{n}: {v} at ({i}, {c})");
                    }
                }
            }
        }
    }

    /// GPTQ as its paper states it: one column at a time in the natural
    /// order, each group's grid fitted to its weights when its first column
    /// is reached.
    fn gptq_reference(
        w: &[f32],
        m: usize,
        n: usize,
        gram: &[f64],
        bits: u32,
        group: usize,
    ) -> Vec<f32> {
        let fb = Feedback::from_gram_in(gram, n, 0.01, ColumnOrder::Natural).unwrap();
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            let mut work = w[i * n..(i + 1) * n].to_vec();
            let mut grid = Grid::fit(&work, n, bits, group);
            for j in 0..n {
                if j.is_multiple_of(group) {
                    let end = (j + group).min(n);
                    grid.set(j / group, work[j..end].iter().copied());
                }
                let q = grid.round(0, j, work[j]);
                out[i * n + j] = q;
                let u_row = &fb.chol[j * n..(j + 1) * n];
                let e = (work[j] - q) / u_row[j];
                for t in j + 1..n {
                    work[t] -= e * u_row[t];
                }
            }
        }
        out
    }

    #[test]
    fn natural_order_matches_the_column_by_column_algorithm() {
        let mut rng = StdRng::seed_from_u64(8);
        // Groups that divide the batch of 128 columns see every earlier
        // error, as in the column-by-column loop; n spans several batches.
        for (m, n, group, bits) in [(3, 300, 32, 3), (1, 131, 64, 4), (6, 20, 4, 2)] {
            let gram = correlated_gram(2 * n, n, 0.7, &mut rng);
            let w: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut fast = w.clone();
            gptq_in_place(&mut fast, m, n, &gram, &GptqOptions::new(bits, group)).unwrap();
            let slow = gptq_reference(&w, m, n, &gram, bits, group);
            // Regrouped float sums may round a value at a tie the other way.
            let differ = fast
                .iter()
                .zip(&slow)
                .filter(|(a, b)| (*a - *b).abs() > 1e-5)
                .count();
            assert!(
                differ * 100 <= m * n,
                "{m}×{n} g{group}: {differ} values differ"
            );
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let gram = vec![1.0, 0.0, 0.0, 1.0];
        let mut w = vec![0.1f32; 4];
        for opts in [
            GptqOptions::new(0, 2),
            GptqOptions::new(9, 2),
            GptqOptions::new(4, 0),
            GptqOptions {
                damp: f64::NAN,
                ..GptqOptions::new(4, 2)
            },
        ] {
            assert!(
                gptq_in_place(&mut w, 2, 2, &gram, &opts).is_err(),
                "{opts:?}"
            );
        }
        assert!(gptq_in_place(&mut w, 3, 2, &gram, &GptqOptions::new(4, 2)).is_err());
    }
}
