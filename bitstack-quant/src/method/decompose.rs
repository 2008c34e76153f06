//! Absolute value decomposition (AVD), the heart of BitStack.
//!
//! Starting from `R₀ = W`, each iteration takes `S = sign(R)` (0 → +1) and
//! the top-`k` SVD of `|R|`, stores `u = U_k·√Σ_k`, `vt = √Σ_k·V_kᵀ` in f16,
//! and subtracts `S ⊙ (u·vt)` computed with the *unrounded* f32 factors, as
//! the reference implementation does.

use faer::Mat;
use half::f16;

use crate::format::block::Block;
use crate::format::pack;
use crate::method::feedback::Feedback;
use crate::method::svd::{top_k, SvdMethod};

/// Errors of the decomposition.
#[derive(Debug, thiserror::Error)]
pub enum DecomposeError {
    #[error("rank k = {k} is larger than min(m, n) = {max} for a {m}×{n} matrix")]
    RankTooLarge {
        k: usize,
        m: usize,
        n: usize,
        max: usize,
    },
    #[error("k and niter must be at least 1 (got k = {k}, niter = {niter})")]
    Empty { k: usize, niter: usize },
    #[error("weight holds a non-finite value at row {row}, column {col}")]
    NonFinite { row: usize, col: usize },
    #[error("weight has {got} values, expected {m}×{n}")]
    Shape { got: usize, m: usize, n: usize },
    #[error("SVD did not converge at iteration {iteration}")]
    Svd { iteration: usize },
}

/// The blocks of one matrix and how well they fit it.
#[derive(Debug)]
pub struct Decomposition {
    pub blocks: Vec<Block>,
    /// `‖R_i‖_F` for i = 0…niter: the norm of the weight, then of the residual
    /// after each block.
    pub residual_norms: Vec<f64>,
}

/// How the factors are re-fitted once feedback has chosen the signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refit {
    /// Keep the factors fitted to `|R|`.
    None,
    /// Top-k SVD of `S⊙R`: the best factors in Frobenius norm.
    Svd,
    /// `Svd`, then each row of `u` re-fitted to the block's output error on
    /// the calibration inputs.
    Weighted,
}

/// Decomposes the row-major `m×n` weight `w` into `niter` blocks of rank `k`.
pub fn decompose(
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    niter: usize,
    method: SvdMethod,
) -> Result<Decomposition, DecomposeError> {
    decompose_with(w, m, n, k, niter, method, None)
}

/// [`decompose`], choosing signs with error feedback when `feedback` is given
/// (see [`crate::method::feedback`]); the factors are then re-fitted to the chosen
/// signs, and with more than one round the signs chosen again for the new
/// factors.
pub fn decompose_with(
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    niter: usize,
    method: SvdMethod,
    feedback: Option<(&Feedback, Refit, usize)>,
) -> Result<Decomposition, DecomposeError> {
    if w.len() != m * n {
        return Err(DecomposeError::Shape { got: w.len(), m, n });
    }
    if k == 0 || niter == 0 {
        return Err(DecomposeError::Empty { k, niter });
    }
    if k > m.min(n) {
        return Err(DecomposeError::RankTooLarge {
            k,
            m,
            n,
            max: m.min(n),
        });
    }
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err(DecomposeError::NonFinite {
            row: i / n,
            col: i % n,
        });
    }

    let mut residual = w.to_vec();
    let mut blocks = Vec::with_capacity(niter);
    let mut residual_norms = vec![frobenius(&residual)];
    for iteration in 0..niter {
        let abs = Mat::<f32>::from_fn(m, n, |i, j| residual[i * n + j].abs());
        let method = match method {
            SvdMethod::Randomized {
                oversample,
                power_iters,
                seed,
            } => SvdMethod::Randomized {
                oversample,
                power_iters,
                seed: seed.wrapping_add(iteration as u64),
            },
            exact => exact,
        };
        let (mut u, mut vt) = factors(&abs, k, method, iteration)?;
        let mut uv = &u * &vt;
        let signs = match feedback {
            None => pack::pack_signs(&residual),
            Some((fb, refit, rounds)) => {
                let mut chosen = Vec::new();
                for _ in 0..rounds.max(1) {
                    let mag: Vec<f32> = (0..m * n).map(|x| uv[(x / n, x % n)]).collect();
                    chosen = fb.choose_signs(&residual, &mag, m);
                    if refit != Refit::None {
                        // For fixed signs S, the best rank-k S⊙(u·vt) in
                        // Frobenius norm is the top-k SVD of S⊙R.
                        let flipped = Mat::<f32>::from_fn(m, n, |i, j| {
                            chosen[i * n + j] * residual[i * n + j]
                        });
                        (u, vt) = factors(&flipped, k, method, iteration)?;
                    }
                    if refit == Refit::Weighted {
                        let mut flat_u: Vec<f32> = (0..m * k).map(|x| u[(x / k, x % k)]).collect();
                        let flat_vt: Vec<f32> = (0..k * n).map(|x| vt[(x / n, x % n)]).collect();
                        fb.refit_rows(&residual, &chosen, &mut flat_u, &flat_vt, k);
                        u = Mat::<f32>::from_fn(m, k, |i, a| flat_u[i * k + a]);
                    }
                    uv = &u * &vt;
                }
                pack::pack_signs(&chosen)
            }
        };
        for i in 0..m {
            for j in 0..n {
                let idx = i * n + j;
                residual[idx] -= pack::sign_at(&signs, idx) * uv[(i, j)];
            }
        }
        residual_norms.push(frobenius(&residual));
        blocks.push(Block {
            signs,
            u: (0..m * k)
                .map(|x| f16::from_f32(u[(x / k, x % k)]))
                .collect(),
            vt: (0..k * n)
                .map(|x| f16::from_f32(vt[(x / n, x % n)]))
                .collect(),
        });
    }
    Ok(Decomposition {
        blocks,
        residual_norms,
    })
}

/// `u = U_k·√Σ_k` and `vt = √Σ_k·V_kᵀ` of the top-k SVD of `a`.
fn factors(
    a: &Mat<f32>,
    k: usize,
    method: SvdMethod,
    iteration: usize,
) -> Result<(Mat<f32>, Mat<f32>), DecomposeError> {
    let (m, n) = (a.nrows(), a.ncols());
    let top = top_k(a, k, method).map_err(|_| DecomposeError::Svd { iteration })?;
    let root: Vec<f32> = top.s.iter().map(|s| s.max(0.0).sqrt()).collect();
    let u = Mat::<f32>::from_fn(m, k, |i, j| top.u[(i, j)] * root[j]);
    let vt = Mat::<f32>::from_fn(k, n, |i, j| root[i] * top.v[(j, i)]);
    Ok((u, vt))
}

fn frobenius(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::block::reconstruct;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..m * n)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn residual_norm_strictly_decreases_on_random() {
        for (m, n, k) in [(37, 53, 4), (64, 21, 16), (3, 9, 1)] {
            let w = random(m, n, 7);
            let d = decompose(&w, m, n, k, 8, SvdMethod::Exact).unwrap();
            for pair in d.residual_norms.windows(2) {
                assert!(pair[1] < pair[0], "{m}×{n} k={k}: {:?}", d.residual_norms);
            }
        }
    }

    #[test]
    fn all_blocks_reconstruct_the_weight() {
        let (m, n, k) = (48, 40, 8);
        let w = random(m, n, 3);
        let d = decompose(&w, m, n, k, 16, SvdMethod::Exact).unwrap();
        let r = reconstruct(&d.blocks, m, n, k);
        let err: f64 = w
            .iter()
            .zip(&r)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let rel = err / d.residual_norms[0];
        // f16 rounding of the factors bounds how close we can get.
        assert!(rel < 0.05, "relative error {rel}");
        // and the f16 reconstruction tracks the f32 residual closely
        let last = *d.residual_norms.last().unwrap() / d.residual_norms[0];
        assert!((rel - last).abs() < 0.02, "f16 {rel} vs f32 {last}");
    }

    /// A matrix shaped like a trained weight: a low-rank part plus noise,
    /// with uneven column scales (as activation scaling produces).
    fn weight_like(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let r = 6;
        let a: Vec<f32> = (0..m * r).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..r * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let col: Vec<f32> = (0..n)
            .map(|_| 0.2 + 3.0 * rng.random::<f32>().powi(3))
            .collect();
        (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                let low: f32 = (0..r).map(|t| a[i * r + t] * b[t * n + j]).sum();
                (low + 0.3 * (rng.random::<f32>() - 0.5)) * col[j]
            })
            .collect()
    }

    #[test]
    fn randomized_svd_matches_exact_blocks() {
        for (m, n, k) in [(150, 61, 8), (61, 150, 16), (97, 97, 4)] {
            let w = weight_like(m, n, 21);
            let exact = decompose(&w, m, n, k, 6, SvdMethod::Exact).unwrap();
            let fast = decompose(&w, m, n, k, 6, SvdMethod::randomized(3)).unwrap();
            // The first block is the same up to rounding: same signs, same
            // rank-k product within 1% (relative Frobenius).
            assert_eq!(exact.blocks[0].signs, fast.blocks[0].signs);
            let uv = |b: &Block| reconstruct(std::slice::from_ref(b), m, n, k);
            let (a, b) = (uv(&exact.blocks[0]), uv(&fast.blocks[0]));
            let diff: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                diff / norm < 1e-2,
                "{m}×{n} k={k}: first block differs by {}",
                diff / norm
            );
            // Later blocks may pick a different but equally good subspace:
            // every residual norm is within 2% of the exact one.
            for (i, (e, f)) in exact
                .residual_norms
                .iter()
                .zip(&fast.residual_norms)
                .enumerate()
            {
                assert!(
                    (f - e).abs() <= 0.02 * e,
                    "{m}×{n} k={k} block {i}: {f} vs {e}"
                );
            }
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let w = random(4, 5, 1);
        assert!(matches!(
            decompose(&w, 4, 5, 5, 1, SvdMethod::Exact),
            Err(DecomposeError::RankTooLarge { .. })
        ));
        assert!(matches!(
            decompose(&w, 4, 4, 1, 1, SvdMethod::Exact),
            Err(DecomposeError::Shape { .. })
        ));
        let mut bad = w.clone();
        bad[7] = f32::NAN;
        let e = decompose(&bad, 4, 5, 2, 1, SvdMethod::Exact).unwrap_err();
        assert!(e.to_string().contains("row 1, column 2"), "{e}");
    }
}
