//! Prefix scales fitted to a linear's outputs.
//!
//! [`fit_prefix_scales`](crate::format::grid::fit_prefix_scales) picks each
//! `σ_p` (format version 5) by least squares on the weights. The weights'
//! error is not the model's: a weight in a column whose input is large
//! moves the output more. With the Gram matrix `H = Σ x·xᵀ` of the linear's
//! calibration inputs (in the coordinates the planes are in), each `σ_p`
//! here minimises the output error instead,
//!
//! ```text
//! Σ_i (t_i − σ·d_i)ᵀ H (t_i − σ·d_i)   ⇒   σ_p = Σ_i t_iᵀH d_i / Σ_i d_iᵀH d_i
//! ```
//!
//! with `t = r − center` and `d = half·Σ_{b<p} ±2^-(b+1)` per weight, both
//! zero at an outlier (exact at every size). With `H = I` it is the
//! weights' fit.

use faer::Mat;

use crate::format::grid::{plane_weight, prefix_scale_from_sums, GridConfig, GridPlanes};
use crate::format::pack;

/// The `σ_p` of every prefix of `gp`'s planes that minimise the output
/// error of the row-major `m×n` weight `r` on inputs whose Gram matrix is
/// the row-major `n×n` `gram`; signs and grid fixed. Kept in [1/4, 2] (1
/// where nothing constrains it), as the weights' fit is.
pub fn fit_prefix_scales_to_outputs(
    r: &[f32],
    m: usize,
    n: usize,
    gp: &GridPlanes,
    cfg: &GridConfig,
    gram: &[f64],
) -> Vec<f32> {
    assert_eq!(r.len(), m * n, "weight is not m×n");
    assert_eq!(gram.len(), n * n, "Gram matrix is not n×n");
    let (gs, groups) = (cfg.group_size(n), cfg.groups(n));
    let values = gp.grid.values.as_ref();
    let mut exact = vec![false; m * n];
    for slot in 0..gp.grid.outlier_col.len() {
        exact[gp.grid.outlier_position(slot, n, cfg)] = true;
    }
    let half = |i: usize, c: usize| values.range(groups, i * groups + c / gs);
    // f32 products (twice f64's speed; the widest Gram, Qwen2.5's 4864
    // down_proj inputs, costs most of the fit), f64 sums.
    let t = Mat::<f32>::from_fn(m, n, |i, c| {
        if exact[i * n + c] {
            0.0
        } else {
            r[i * n + c] - half(i, c).0
        }
    });
    let h = Mat::<f32>::from_fn(n, n, |p, q| gram[p * n + q] as f32);
    let th = &t * &h;
    let mut d = Mat::<f32>::zeros(m, n);
    (0..gp.planes.len())
        .map(|b| {
            let w = plane_weight(b);
            for i in 0..m {
                for c in (0..n).filter(|&c| !exact[i * n + c]) {
                    let step = half(i, c).1 * w;
                    d[(i, c)] += if pack::sign_at(&gp.planes[b], i * n + c) > 0.0 {
                        step
                    } else {
                        -step
                    };
                }
            }
            let dh = &d * &h;
            let (mut td, mut dd) = (0f64, 0f64);
            for c in 0..n {
                for i in 0..m {
                    td += th[(i, c)] as f64 * d[(i, c)] as f64;
                    dd += dh[(i, c)] as f64 * d[(i, c)] as f64;
                }
            }
            prefix_scale_from_sums(td, dd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::grid::{fit_prefix_scales, grid_planes, GridCoding};
    use crate::method::feedback::tests::{correlated_gram, output_error};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_weight(m: usize, n: usize, rng: &mut StdRng) -> Vec<f32> {
        // Bell-shaped, as weights are: the short prefixes' levels sit too
        // far out, so the fitted scales are not 1.
        (0..m * n)
            .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum())
            .collect()
    }

    fn scaled_config(planes: usize, group: usize) -> GridConfig {
        GridConfig {
            group,
            coding: GridCoding::Int8Scaled,
            ..GridConfig::new(planes)
        }
    }

    /// The weight the first `p` planes of `gp` rebuild with `scales`.
    fn rebuilt(gp: &GridPlanes, m: usize, n: usize, cfg: &GridConfig, p: usize) -> Vec<f32> {
        let planes: Vec<&[u8]> = gp.planes[..p].iter().map(Vec::as_slice).collect();
        let mut w = vec![0f32; m * n];
        gp.grid.add_to(&planes, m, n, cfg, &mut w);
        w
    }

    #[test]
    fn with_the_identity_gram_it_is_the_weights_fit() {
        let mut rng = StdRng::seed_from_u64(1);
        for (m, n, group) in [(1, 37, 16), (9, 40, 8), (5, 130, 64)] {
            let cfg = scaled_config(5, group);
            let r = random_weight(m, n, &mut rng);
            let gp = grid_planes(&r, m, n, cfg).unwrap();
            let eye: Vec<f64> = (0..n * n)
                .map(|pq| if pq / n == pq % n { 1.0 } else { 0.0 })
                .collect();
            let out = fit_prefix_scales_to_outputs(&r, m, n, &gp, &cfg, &eye);
            let weights = fit_prefix_scales(&r, m, n, &gp, &cfg);
            for (a, b) in out.iter().zip(&weights) {
                assert!((a - b).abs() < 1e-5, "{m}×{n}: {out:?} against {weights:?}");
            }
        }
    }

    #[test]
    fn the_fit_lowers_the_output_error_of_every_prefix() {
        // Correlated inputs of uneven energy: at every prefix the output
        // error with the fitted σ_p is at most that of σ = 1 and of the
        // weights' fit (it minimises a quadratic in σ), and below both
        // somewhere.
        let mut rng = StdRng::seed_from_u64(7);
        for (m, n, group) in [(1, 45, 16), (12, 64, 32), (30, 97, 32)] {
            let cfg = scaled_config(6, group);
            let mut gram = correlated_gram(3 * n, n, 0.4, &mut rng);
            // A few loud columns, as activations have.
            for c in (0..n).step_by(7) {
                for q in 0..n {
                    gram[c * n + q] *= 3.0;
                    gram[q * n + c] *= 3.0;
                }
            }
            let r = random_weight(m, n, &mut rng);
            let mut gp = grid_planes(&r, m, n, cfg).unwrap();
            let weights = gp.grid.prefix_scale.clone();
            let outputs = fit_prefix_scales_to_outputs(&r, m, n, &gp, &cfg, &gram);
            let err = |gp: &mut GridPlanes, scales: &[f32], p: usize| {
                gp.grid.prefix_scale = scales.to_vec();
                // The rebuild takes σ_p from the scales of its prefix.
                let w = rebuilt(gp, m, n, &cfg, p);
                let e: Vec<f32> = r.iter().zip(&w).map(|(a, b)| a - b).collect();
                output_error(&e, &gram, m, n)
            };
            let mut better = false;
            for p in 1..=cfg.planes {
                let ones = vec![1.0; cfg.planes];
                let (e_out, e_one, e_w) = (
                    err(&mut gp, &outputs, p),
                    err(&mut gp, &ones, p),
                    err(&mut gp, &weights, p),
                );
                let tol = 1e-6 * e_one.max(1e-30);
                assert!(
                    e_out <= e_one + tol && e_out <= e_w + tol,
                    "{m}×{n}, {p} planes: {e_out} against σ=1 {e_one}, weights' fit {e_w}"
                );
                better |= e_out < 0.999 * e_w;
            }
            assert!(
                better,
                "{m}×{n}: the output fit never beat the weights' fit"
            );
        }
    }
}
