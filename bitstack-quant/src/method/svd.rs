//! Top-k singular triplets of `|R|`, exact or randomized.
//!
//! AVD needs only the leading `k` triplets of an `m×n` matrix, but a full thin
//! SVD computes all `min(m, n)`. The randomized range finder (Halko,
//! Martinsson & Tropp 2011) with a few power iterations gets the leading
//! subspace at a fraction of the cost; a test bounds how far its blocks stray
//! from the exact ones.

use faer::Mat;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// How to compute the top-k SVD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdMethod {
    /// faer's full thin SVD, truncated.
    Exact,
    /// Randomized subspace iteration.
    Randomized {
        /// Extra sketch columns beyond k.
        oversample: usize,
        /// Power iterations (each multiplies by `A·Aᵀ`).
        power_iters: usize,
        seed: u64,
    },
}

impl SvdMethod {
    /// The randomized method with settings that match the exact blocks closely.
    pub fn randomized(seed: u64) -> Self {
        SvdMethod::Randomized {
            oversample: 10,
            power_iters: 6,
            seed,
        }
    }
}

/// The leading `k` singular triplets.
pub struct TopK {
    /// `m×k`, orthonormal columns.
    pub u: Mat<f32>,
    /// Descending singular values.
    pub s: Vec<f32>,
    /// `n×k`, orthonormal columns.
    pub v: Mat<f32>,
}

/// The SVD did not converge.
#[derive(Debug)]
pub struct SvdFailed;

/// Top-`k` SVD of `a` (requires `k ≤ min(m, n)`).
pub fn top_k(a: &Mat<f32>, k: usize, method: SvdMethod) -> Result<TopK, SvdFailed> {
    let (m, n) = (a.nrows(), a.ncols());
    match method {
        SvdMethod::Randomized {
            oversample,
            power_iters,
            seed,
        } if k + oversample < m.min(n) => randomized(a, k, k + oversample, power_iters, seed),
        _ => {
            let svd = a.thin_svd().map_err(|_| SvdFailed)?;
            let s = svd.S().column_vector();
            Ok(TopK {
                u: Mat::from_fn(m, k, |i, j| svd.U()[(i, j)]),
                s: (0..k).map(|j| s[j]).collect(),
                v: Mat::from_fn(n, k, |i, j| svd.V()[(i, j)]),
            })
        }
    }
}

fn randomized(
    a: &Mat<f32>,
    k: usize,
    l: usize,
    power_iters: usize,
    seed: u64,
) -> Result<TopK, SvdFailed> {
    let n = a.ncols();
    let mut rng = StdRng::seed_from_u64(seed);
    let omega = Mat::<f32>::from_fn(n, l, |_, _| StandardNormal.sample(&mut rng));
    let orth = |x: Mat<f32>| x.qr().compute_thin_Q();
    let mut q = orth(a * &omega);
    for _ in 0..power_iters {
        let z = orth(a.transpose() * &q);
        q = orth(a * &z);
    }
    let b = q.transpose() * a; // l×n
    let svd = b.thin_svd().map_err(|_| SvdFailed)?;
    let u = &q * svd.U(); // m×l
    let s = svd.S().column_vector();
    Ok(TopK {
        u: Mat::from_fn(a.nrows(), k, |i, j| u[(i, j)]),
        s: (0..k).map(|j| s[j]).collect(),
        v: Mat::from_fn(n, k, |i, j| svd.V()[(i, j)]),
    })
}
