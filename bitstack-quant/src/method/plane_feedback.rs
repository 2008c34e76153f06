//! Grid planes with error feedback: GPTQ on the planes' own grid.
//!
//! Round to nearest ([`grid_planes`]) takes each weight's closest point of
//! every prefix on its own. With the inputs' Gram matrix at hand, the
//! first `level` planes can instead be chosen as GPTQ chooses a
//! `level`-bit code (Frantar et al., 2022): column by column, each
//! weight takes the point of the `2^level`-level grid nearest to its
//! error-updated value, and its error is pushed onto the columns not yet
//! chosen ([`Feedback::quantize_with`]). The grid (ranges and outliers) is
//! fitted to the weights beforehand, as GPTQ's static groups are.
//!
//! The planes stay nested: a prefix of fewer planes is the coarser cell
//! that holds the chosen point, as before. The planes after `level` refine
//! toward the weight itself, round to nearest within the chosen cell: at
//! those sizes the columns before carry far smaller errors than the ones
//! the feedback compensated. Choosing every plane with feedback, one at a
//! time, measured worse at every size (a sign flipped early moves a weight
//! to a cell the later planes cannot leave); GPTQ at one level keeps the
//! levels below it within a cell of what round to nearest picks.

use crate::format::grid::{
    fit_grid, fit_prefix_scales, plane_weight, GridCoding, GridConfig, GridError, GridPlanes,
};
use crate::format::pack;
use crate::method::feedback::Feedback;

/// The grid planes of the row-major `m×n` weight `r`, the first `level`
/// of them (at most `cfg.planes`) chosen with `feedback`'s error feedback
/// (its Gram is of `r`'s inputs, in the coordinates `r` is in).
pub fn grid_planes_with_feedback(
    r: &[f32],
    m: usize,
    n: usize,
    cfg: GridConfig,
    feedback: &Feedback,
    level: usize,
) -> Result<GridPlanes, GridError> {
    assert_eq!(r.len(), m * n, "weight is not m×n");
    let grid = fit_grid(r, m, n, cfg)?;
    let (gs, groups, o) = (cfg.group_size(n), cfg.groups(n), cfg.outliers);
    let (planes, level) = (cfg.planes, level.min(cfg.planes));
    let values = grid.values.as_ref();
    // The exact value of each outlier, by position (NaN elsewhere).
    let mut exact = vec![f32::NAN; m * n];
    for slot in 0..grid.outlier_col.len() {
        exact[grid.outlier_position(slot, n, &cfg)] = grid.outlier(groups * o, slot);
    }
    // Plane-major ±1 signs, and each weight's point after `level` planes.
    let mut signs = vec![0i8; planes * m * n];
    let mut coarse = vec![0f32; m * n];
    let descend = |signs: &mut [i8], at: usize, mut q: f32, a: f32, x: f32, b: usize| {
        let up = x >= q;
        signs[b * m * n + at] = if up { 1 } else { -1 };
        let step = a * plane_weight(b);
        q += if up { step } else { -step };
        q
    };
    feedback.quantize_with(r, m, &mut |i: usize, c: usize, x: f32| {
        let at = i * n + c;
        let (mut q, a) = values.range(groups, i * groups + c / gs);
        for b in 0..level {
            q = descend(&mut signs, at, q, a, x, b);
        }
        coarse[at] = q;
        // An outlier is exact at every size: its error is the update alone.
        if exact[at].is_nan() {
            q
        } else {
            exact[at]
        }
    });
    for (at, (&x, &q0)) in r.iter().zip(&coarse).enumerate() {
        let (_, a) = values.range(groups, (at / n) * groups + (at % n) / gs);
        let mut q = q0;
        for b in level..planes {
            q = descend(&mut signs, at, q, a, x, b);
        }
    }
    let planes = signs
        .chunks(m * n)
        .map(|plane| {
            let plane: Vec<f32> = plane.iter().map(|&s| s as f32).collect();
            pack::pack_signs(&plane)
        })
        .collect();
    let mut gp = GridPlanes { grid, planes };
    if cfg.coding == GridCoding::Int8Scaled {
        gp.grid.prefix_scale = fit_prefix_scales(r, m, n, &gp, &cfg);
    }
    Ok(gp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::grid::grid_planes;
    use crate::method::feedback::tests::{correlated_gram, output_error};
    use crate::method::feedback::ColumnOrder;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The weight the first `p` planes of `gp` rebuild.
    fn rebuilt(gp: &GridPlanes, m: usize, n: usize, cfg: &GridConfig, p: usize) -> Vec<f32> {
        let planes: Vec<&[u8]> = gp.planes[..p].iter().map(Vec::as_slice).collect();
        let mut w = vec![0f32; m * n];
        gp.grid.add_to(&planes, m, n, cfg, &mut w);
        w
    }

    fn random_weight(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    #[test]
    fn with_a_diagonal_gram_the_planes_are_round_to_nearest() {
        // Uncorrelated inputs: no column absorbs another's error, so every
        // level picks the planes round to nearest does. 1 row, awkward n.
        let mut rng = StdRng::seed_from_u64(2);
        for (m, n) in [(1, 37), (6, 40), (3, 130)] {
            let mut cfg = GridConfig::new(5);
            cfg.group = 16;
            let gram: Vec<f64> = (0..n * n)
                .map(|pq| {
                    if pq / n == pq % n {
                        0.5 + rng.random::<f64>()
                    } else {
                        0.0
                    }
                })
                .collect();
            let fb = Feedback::from_gram_in(&gram, n, 0.01, ColumnOrder::DecreasingEnergy).unwrap();
            let r = random_weight(m, n, n as u64);
            let rtn = grid_planes(&r, m, n, cfg).unwrap();
            for level in [0, 1, 3, 5, 9] {
                let fed = grid_planes_with_feedback(&r, m, n, cfg, &fb, level).unwrap();
                assert_eq!(fed, rtn, "{m}×{n}, level {level}");
            }
        }
    }

    #[test]
    fn feedback_lowers_the_output_error_at_its_level_and_keeps_the_grid() {
        // Correlated inputs: at the level chosen with feedback, the output
        // error on the calibration inputs is below round to nearest's; the
        // grid (ranges, outliers) is the same, and every prefix rebuilds a
        // point of its own grid (nested planes).
        let (m, n) = (24, 96);
        let cfg = GridConfig {
            group: 32,
            ..GridConfig::new(6)
        };
        let gram = correlated_gram(4 * n, n, 0.5, &mut StdRng::seed_from_u64(5));
        let fb = Feedback::from_gram_in(&gram, n, 0.01, ColumnOrder::DecreasingEnergy).unwrap();
        let r = random_weight(m, n, 8);
        let rtn = grid_planes(&r, m, n, cfg).unwrap();
        let err_of = |w: &[f32]| {
            let d: Vec<f32> = r.iter().zip(w).map(|(a, b)| a - b).collect();
            output_error(&d, &gram, m, n)
        };
        for level in [2, 3, 4] {
            let fed = grid_planes_with_feedback(&r, m, n, cfg, &fb, level).unwrap();
            // The same ranges and outliers; the prefix scales fit each's signs.
            assert_eq!(
                (&fed.grid.values, &fed.grid.outlier_col),
                (&rtn.grid.values, &rtn.grid.outlier_col)
            );
            let (e_fed, e_rtn) = (
                err_of(&rebuilt(&fed, m, n, &cfg, level)),
                err_of(&rebuilt(&rtn, m, n, &cfg, level)),
            );
            assert!(
                e_fed < 0.9 * e_rtn,
                "level {level}: feedback {e_fed} against round to nearest {e_rtn}"
            );
            // Above the level the planes refine toward the weight: the
            // error keeps falling with every plane.
            let errs: Vec<f64> = (1..=cfg.planes)
                .map(|p| err_of(&rebuilt(&fed, m, n, &cfg, p)))
                .collect();
            for p in level..cfg.planes {
                assert!(errs[p] < errs[p - 1], "level {level}: {errs:?}");
            }
        }
    }
}
