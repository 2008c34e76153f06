//! Activation-aware sign choice with error feedback (beyond the paper).
//!
//! AVD takes `S = sign(R)`: each sign on its own is the best choice for the
//! weight, but what matters is the layer's *output* on real inputs,
//! `‖(R − S⊙M)·X‖`. Choosing the signs of one row column by column and
//! pushing each column's error onto the columns not yet chosen, weighted by
//! the inverse Gram matrix of the inputs (the optimal-brain-compression
//! update that GPTQ uses for scalar quantizers), lets later signs cancel
//! earlier errors. Rows are independent, so they run in parallel.
//!
//! Columns are visited in order of decreasing input energy, so the channels
//! that matter most are chosen while the most freedom is left.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Side};
use rayon::prelude::*;

/// Errors building the feedback weights.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("Gram matrix has {got} values, expected {n}×{n}")]
    Shape { got: usize, n: usize },
    #[error("Gram matrix holds a non-finite value at row {row}, column {col}")]
    NonFinite { row: usize, col: usize },
    #[error("Gram matrix is not positive definite even after damping")]
    NotPositiveDefinite,
}

/// The inverse-Gram weights that carry one column's error onto the next.
#[derive(Clone, Debug)]
pub struct Feedback {
    /// Columns in the order they are chosen (most input energy first).
    pub order: Vec<usize>,
    /// Upper Cholesky factor `U` of `(H + λI)⁻¹` in that order: row-major `n×n`.
    pub chol: Vec<f32>,
    /// The (scaled, undamped) Gram matrix in that order.
    pub gram: Mat<f32>,
    pub n: usize,
}

/// Columns whose errors are pushed onward together (GPTQ's block size).
pub const COLUMN_BATCH: usize = 128;

/// A quantizer driven by [`Feedback::quantize_with`].
pub trait ColumnQuantizer {
    /// Called before the column at `position` of the visiting order is
    /// quantized. `upcoming` holds the columns from `position` on (column `p`
    /// is position `position + p`), updated by the errors of every column
    /// before `position` — except that columns past the current batch of
    /// [`COLUMN_BATCH`] lack the errors of this batch's earlier columns,
    /// which reach them at the batch's end. A quantizer
    /// that fits its grid to the weights as they are when it reaches them
    /// (GPTQ's groups) does it here.
    fn begin_column(&mut self, position: usize, upcoming: MatRef<'_, f32>) {
        let _ = (position, upcoming);
    }

    /// The value that stands for the error-updated weight `x` at `row`,
    /// `column` (the column's index in the matrix, not its position).
    fn pick(&mut self, row: usize, column: usize, x: f32) -> f32;
}

impl<F: FnMut(usize, usize, f32) -> f32> ColumnQuantizer for F {
    fn pick(&mut self, row: usize, column: usize, x: f32) -> f32 {
        self(row, column, x)
    }
}

/// The order in which the columns (input channels) are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnOrder {
    /// As stored: column 0 first.
    Natural,
    /// Most input energy (largest Gram diagonal) first, GPTQ's "act-order":
    /// the channels that matter most are chosen while the most columns are
    /// left to absorb their error.
    DecreasingEnergy,
}

impl Feedback {
    /// From the Gram matrix `gram = Σ x xᵀ` (row-major `n×n`) of the inputs
    /// as the linear sees them (divided by its activation scales, see
    /// [`crate::method::scale::scaled_gram`]), with damping
    /// `λ = damp · mean(diag H)`.
    pub fn from_gram(gram: &[f64], n: usize, damp: f64) -> Result<Self, FeedbackError> {
        Self::from_gram_in(gram, n, damp, ColumnOrder::DecreasingEnergy)
    }

    /// As [`Feedback::from_gram`], visiting the columns in `order`.
    pub fn from_gram_in(
        gram: &[f64],
        n: usize,
        damp: f64,
        column_order: ColumnOrder,
    ) -> Result<Self, FeedbackError> {
        if gram.len() != n * n {
            return Err(FeedbackError::Shape { got: gram.len(), n });
        }
        if let Some(i) = gram.iter().position(|x| !x.is_finite()) {
            return Err(FeedbackError::NonFinite {
                row: i / n,
                col: i % n,
            });
        }
        let h = |p: usize, q: usize| gram[p * n + q];
        let mut order: Vec<usize> = (0..n).collect();
        if column_order == ColumnOrder::DecreasingEnergy {
            order.sort_by(|&a, &b| h(b, b).total_cmp(&h(a, a)));
        }
        let mean_diag = (0..n).map(|c| h(c, c)).sum::<f64>() / n as f64;
        let lambda = damp * mean_diag.max(f64::MIN_POSITIVE);
        let hp = Mat::<f64>::from_fn(n, n, |a, b| {
            let (p, q) = (order[a], order[b]);
            let v = h(p, q);
            if a == b {
                // A channel that never fires carries no error: any sign is fine.
                if v <= 0.0 {
                    1.0
                } else {
                    v + lambda
                }
            } else {
                v
            }
        });
        let inv = hp
            .llt(Side::Lower)
            .map_err(|_| FeedbackError::NotPositiveDefinite)?;
        let inv = faer::linalg::solvers::DenseSolveCore::inverse(&inv);
        let l = inv
            .llt(Side::Lower)
            .map_err(|_| FeedbackError::NotPositiveDefinite)?;
        let l = l.L();
        // U = Lᵀ: U[j][t] = L[t][j].
        let chol = (0..n * n)
            .map(|x| {
                let (j, t) = (x / n, x % n);
                if t >= j {
                    l[(t, j)] as f32
                } else {
                    0.0
                }
            })
            .collect();
        let gram = Mat::<f32>::from_fn(n, n, |a, b| h(order[a], order[b]) as f32);
        Ok(Self {
            order,
            chol,
            gram,
            n,
        })
    }

    /// Signs (±1, row-major `m×n`) for a block of magnitudes `mag` fitted to
    /// the residual `r`, chosen with error feedback: each weight takes the
    /// sign of its error-updated value.
    pub fn choose_signs(&self, r: &[f32], mag: &[f32], m: usize) -> Vec<f32> {
        let n = self.n;
        debug_assert_eq!(mag.len(), m * n);
        let mut signs = vec![0f32; m * n];
        self.quantize_with(r, m, &mut |i, c, x| {
            let sign = if x >= 0.0 { 1.0 } else { -1.0 };
            signs[i * n + c] = sign;
            sign * mag[i * n + c]
        });
        signs
    }

    /// The error-feedback loop for any quantizer: visits the columns of the
    /// row-major `m×n` `r` in [`Feedback::order`], asks the quantizer for the
    /// value that stands for each (error-updated) weight, and pushes the
    /// difference onto the columns not yet visited.
    ///
    /// GPTQ's lazy batch update: within a batch of [`COLUMN_BATCH`] columns
    /// each column's error reaches the batch's later columns at once; the
    /// batch's errors reach all columns after it in one matrix product. The
    /// arithmetic is the column-by-column update's, regrouped so that most
    /// of it runs as a GEMM rather than one row update per column.
    pub fn quantize_with(&self, r: &[f32], m: usize, quantizer: &mut impl ColumnQuantizer) {
        let n = self.n;
        debug_assert_eq!(r.len(), m * n);
        // Column-major, in the chosen column order: column j is contiguous.
        let mut work = Mat::<f32>::zeros(m, n);
        for (j, &c) in self.order.iter().enumerate() {
            for (i, w) in work.col_mut(j).iter_mut().enumerate() {
                *w = r[i * n + c];
            }
        }
        let u = MatRef::from_row_major_slice(&self.chol, n, n);
        let mut err = Mat::<f32>::zeros(m, COLUMN_BATCH.min(n));
        for start in (0..n).step_by(COLUMN_BATCH) {
            let end = (start + COLUMN_BATCH).min(n);
            for j in start..end {
                quantizer.begin_column(j, work.as_ref().subcols(j, n - j));
                let d = u[(j, j)];
                let c = self.order[j];
                let e = err
                    .col_mut(j - start)
                    .try_as_col_major_mut()
                    .expect("owned");
                let x = work.col(j).try_as_col_major().expect("owned").as_slice();
                for (i, (e, &x)) in e.as_slice_mut().iter_mut().zip(x).enumerate() {
                    *e = (x - quantizer.pick(i, c, x)) / d;
                }
                let e = err
                    .col(j - start)
                    .try_as_col_major()
                    .expect("owned")
                    .as_slice();
                for t in j + 1..end {
                    let coef = u[(j, t)];
                    let col = work.col_mut(t).try_as_col_major_mut().expect("owned");
                    for (w, &e) in col.as_slice_mut().iter_mut().zip(e) {
                        *w -= e * coef;
                    }
                }
            }
            if end < n {
                matmul(
                    work.as_mut().subcols_mut(end, n - end),
                    Accum::Add,
                    err.as_ref().subcols(0, end - start),
                    u.submatrix(start, end, end - start, n - end),
                    -1.0,
                    faer::get_global_parallelism(),
                );
            }
        }
    }

    /// Re-fits each row of `u` (`m×k`, row-major) for fixed `signs` and `vt`
    /// (`k×n`) so that the block's output error on the calibration inputs,
    /// `‖(r − s⊙(uᵢ·vt))·X‖`, is least: a `k×k` solve per row. The products
    /// with the Gram matrix for all rows are one matrix product.
    pub fn refit_rows(&self, r: &[f32], signs: &[f32], u: &mut [f32], vt: &[f32], k: usize) {
        let n = self.n;
        let m = u.len() / k;
        // z[p, i·k + a] = s[i, c]·vt[a, c] with c = order[p].
        let z = Mat::<f32>::from_fn(n, m * k, |p, col| {
            let (i, a) = (col / k, col % k);
            let c = self.order[p];
            signs[i * n + c] * vt[a * n + c]
        });
        let y = &self.gram * &z;
        let col = |m: &Mat<f32>, j: usize| -> Vec<f32> { m.col(j).iter().copied().collect() };
        u.par_chunks_mut(k).enumerate().for_each(|(i, ui)| {
            let r_row: Vec<f32> = self.order.iter().map(|&c| r[i * n + c]).collect();
            let ys: Vec<Vec<f32>> = (0..k).map(|a| col(&y, i * k + a)).collect();
            let zs: Vec<Vec<f32>> = (0..k).map(|b| col(&z, i * k + b)).collect();
            let dot = |x: &[f32], y: &[f32]| -> f64 {
                x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let mut lhs = vec![0f64; k * k];
            let mut rhs = vec![0f64; k];
            for a in 0..k {
                rhs[a] = dot(&ys[a], &r_row);
                for b in 0..k {
                    lhs[a * k + b] = dot(&ys[a], &zs[b]);
                }
            }
            if let Some(x) = solve_spd(&mut lhs, &rhs, k) {
                for (dst, v) in ui.iter_mut().zip(x) {
                    *dst = v as f32;
                }
            }
        });
    }
}

/// Solves the `k×k` symmetric positive definite system `a·x = b` by
/// Cholesky, with a tiny ridge; `None` if it is singular.
fn solve_spd(a: &mut [f64], b: &[f64], k: usize) -> Option<Vec<f64>> {
    let trace: f64 = (0..k).map(|i| a[i * k + i]).sum();
    let ridge = 1e-9 * trace / k as f64;
    for i in 0..k {
        a[i * k + i] += ridge;
    }
    // In place: a ← L with a = L·Lᵀ.
    for j in 0..k {
        let d = a[j * k + j] - (0..j).map(|t| a[j * k + t] * a[j * k + t]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let v = a[i * k + j] - (0..j).map(|t| a[i * k + t] * a[j * k + t]).sum::<f64>();
            a[i * k + j] = v / d;
        }
    }
    let mut x = b.to_vec();
    for i in 0..k {
        x[i] = (x[i] - (0..i).map(|t| a[i * k + t] * x[t]).sum::<f64>()) / a[i * k + i];
    }
    for i in (0..k).rev() {
        x[i] = (x[i] - (i + 1..k).map(|t| a[t * k + i] * x[t]).sum::<f64>()) / a[i * k + i];
    }
    Some(x)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `tr(E H Eᵀ)` for a row-major `m×n` error `e`.
    pub(crate) fn output_error(e: &[f32], gram: &[f64], m: usize, n: usize) -> f64 {
        (0..m)
            .map(|i| {
                let row = &e[i * n..(i + 1) * n];
                (0..n)
                    .map(|p| {
                        (0..n)
                            .map(|q| row[p] as f64 * gram[p * n + q] * row[q] as f64)
                            .sum::<f64>()
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    /// Correlated inputs of awkward size, so feedback has something to use.
    pub(crate) fn correlated_gram(
        tokens: usize,
        n: usize,
        mixing: f64,
        rng: &mut StdRng,
    ) -> Vec<f64> {
        let mix: Vec<f64> = (0..n * n).map(|_| rng.random::<f64>() - 0.5).collect();
        let mut gram = vec![0f64; n * n];
        for _ in 0..tokens {
            let z: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
            let x: Vec<f64> = (0..n)
                .map(|p| z[p] + (0..n).map(|q| mix[p * n + q] * z[q]).sum::<f64>() * mixing)
                .collect();
            for p in 0..n {
                for q in 0..n {
                    gram[p * n + q] += x[p] * x[q];
                }
            }
        }
        gram
    }

    #[test]
    fn feedback_lowers_output_error_against_plain_signs() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut total_flips = 0;
        for (m, n) in [(1, 13), (21, 37), (40, 9)] {
            let gram = correlated_gram(4 * n, n, 0.5, &mut rng);
            let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            // One magnitude per row, as a rank-1 fit of |R| roughly gives.
            let mag = vec![0.25f32; m * n];
            let fb = Feedback::from_gram(&gram, n, 0.01).unwrap();
            let fed = fb.choose_signs(&r, &mag, m);
            assert!(fed.iter().all(|s| *s == 1.0 || *s == -1.0));
            let err = |signs: &[f32]| -> Vec<f32> {
                (0..m * n).map(|x| r[x] - signs[x] * mag[x]).collect()
            };
            let plain: Vec<f32> = r
                .iter()
                .map(|x| if *x >= 0.0 { 1.0 } else { -1.0 })
                .collect();
            let (e_fed, e_plain) = (
                output_error(&err(&fed), &gram, m, n),
                output_error(&err(&plain), &gram, m, n),
            );
            let flips = fed.iter().zip(&plain).filter(|(a, b)| a != b).count();
            // Greedy feedback never loses on these inputs, and wins where
            // it flips signs.
            assert!(
                e_fed <= e_plain && (flips == 0 || e_fed < e_plain),
                "{m}×{n}: feedback {e_fed} vs plain {e_plain}, {flips} flips"
            );
            total_flips += flips;
        }
        assert!(total_flips > 0, "feedback never changed a sign");
    }

    /// The column-by-column update, one row at a time, as GPTQ states it.
    fn choose_signs_reference(fb: &Feedback, r: &[f32], mag: &[f32], m: usize) -> Vec<f32> {
        let n = fb.n;
        let mut signs = vec![0f32; m * n];
        for i in 0..m {
            let mut work: Vec<f32> = fb.order.iter().map(|&c| r[i * n + c]).collect();
            for j in 0..n {
                let c = fb.order[j];
                let u_row = &fb.chol[j * n..(j + 1) * n];
                let sign = if work[j] >= 0.0 { 1.0 } else { -1.0 };
                signs[i * n + c] = sign;
                let e = (work[j] - sign * mag[i * n + c]) / u_row[j];
                for t in j + 1..n {
                    work[t] -= e * u_row[t];
                }
            }
        }
        signs
    }

    #[test]
    fn batched_sign_choice_matches_the_column_by_column_update() {
        let mut rng = StdRng::seed_from_u64(21);
        // n spans several column batches, the last one partial.
        for (m, n) in [(1, 300), (19, 2 * COLUMN_BATCH + 3), (5, 7)] {
            let gram = correlated_gram(2 * n, n, 0.5, &mut rng);
            let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let mag: Vec<f32> = (0..m * n)
                .map(|_| 0.2 + 0.1 * rng.random::<f32>())
                .collect();
            let fb = Feedback::from_gram(&gram, n, 0.01).unwrap();
            let fast = fb.choose_signs(&r, &mag, m);
            let slow = choose_signs_reference(&fb, &r, &mag, m);
            // Regrouped float sums may break an exact tie the other way,
            // and the rows then drift apart; on random inputs that is rare.
            let differ = fast.iter().zip(&slow).filter(|(a, b)| a != b).count();
            assert!(
                differ * 200 <= m * n,
                "{m}×{n}: {differ} of {} signs differ",
                m * n
            );
        }
    }

    #[test]
    fn row_refit_lowers_output_error_and_matches_normal_equations() {
        let mut rng = StdRng::seed_from_u64(9);
        for (m, n, k) in [(1, 13, 1), (17, 29, 3), (6, 10, 4)] {
            let gram = correlated_gram(3 * n, n, 0.5, &mut rng);
            let fb = Feedback::from_gram(&gram, n, 0.01).unwrap();
            let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let signs: Vec<f32> = r
                .iter()
                .map(|x| if *x >= 0.0 { 1.0 } else { -1.0 })
                .collect();
            let vt: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() * 0.3).collect();
            let u0: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>()).collect();
            let block = |u: &[f32]| -> Vec<f32> {
                (0..m * n)
                    .map(|x| {
                        let (i, j) = (x / n, x % n);
                        let uv: f32 = (0..k).map(|a| u[i * k + a] * vt[a * n + j]).sum();
                        r[x] - signs[x] * uv
                    })
                    .collect()
            };
            let mut u = u0.clone();
            fb.refit_rows(&r, &signs, &mut u, &vt, k);
            let (before, after) = (
                output_error(&block(&u0), &gram, m, n),
                output_error(&block(&u), &gram, m, n),
            );
            assert!(after < before, "{m}×{n} k={k}: {after} ≥ {before}");
            // At the optimum, no small step along any coordinate helps.
            for probe in 0..m * k {
                for step in [1e-2f32, -1e-2] {
                    let mut moved = u.clone();
                    moved[probe] += step;
                    let e = output_error(&block(&moved), &gram, m, n);
                    assert!(e >= after * (1.0 - 1e-6), "{m}×{n} k={k}: {e} < {after}");
                }
            }
        }
    }

    #[test]
    fn with_identity_gram_feedback_is_plain_sign() {
        // No correlation between inputs: nothing to push errors onto.
        let (m, n) = (7, 11);
        let mut gram = vec![0f64; n * n];
        for c in 0..n {
            gram[c * n + c] = 1.0 + c as f64;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let r: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let mag = vec![0.3f32; m * n];
        let fed = Feedback::from_gram(&gram, n, 0.01)
            .unwrap()
            .choose_signs(&r, &mag, m);
        for (s, x) in fed.iter().zip(&r) {
            assert_eq!(*s, if *x >= 0.0 { 1.0 } else { -1.0 });
        }
    }

    #[test]
    fn bad_gram_is_an_error() {
        assert!(matches!(
            Feedback::from_gram(&[1.0; 5], 2, 0.01),
            Err(FeedbackError::Shape { got: 5, n: 2 })
        ));
        assert!(matches!(
            Feedback::from_gram(&[1.0, f64::NAN, 0.0, 1.0], 2, 0.01),
            Err(FeedbackError::NonFinite { row: 0, col: 1 })
        ));
    }
}
