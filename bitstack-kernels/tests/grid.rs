//! Grid planes: the definition pinned by hand, then every kernel against the
//! f64 reference on stacks of blocks, grids, and both, of awkward sizes.

use std::sync::Arc;

use bitstack_kernels::decode::table_matmul_t;
use bitstack_kernels::grid::grid_matmul_t_add;
use bitstack_kernels::layout::GridValues;
use bitstack_kernels::prefill::panel_matmul_t;
use bitstack_kernels::reference::{grid_weight, reference_matmul_t};
use bitstack_kernels::tmac::{self, shuffle_matmul_t};
use bitstack_kernels::{stack_matmul_t, Isa, OwnedGrid, OwnedStack, TiledSigns};
use candle_core::{Device, Tensor};
use half::f16;

mod common;
use common::{assert_close, random_grid, random_grid_stack, random_stack, random_x, values};

/// (m, n, group): n not a multiple of the group, of 8 or of 32; groups that
/// start on a sign byte (multiples of 8, the shuffle kernel's own path) and
/// groups that do not (4, 12, 5); one row; the largest group.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 9, 4),
    (3, 200, 128),
    (33, 200, 128),
    (70, 9, 4),
    (19, 136, 8),
    (40, 257, 16),
    (5, 1030, 256),
    (8, 64, 64),
    (129, 77, 12),
    (7, 23, 5),
    (65, 300, 40),
];

/// (AVD blocks, k): none, and two of rank 3.
const BLOCKS: [(usize, usize); 2] = [(0, 4), (2, 3)];

/// Every case: shape × blocks × planes 1..=5 × outliers 0..=2, thinned so
/// that each shape sees every plane count and outlier count.
fn cases() -> Vec<(OwnedStack, String)> {
    let mut cases = Vec::new();
    for (s, &(m, n, group)) in SHAPES.iter().enumerate() {
        for (bi, &(nb, k)) in BLOCKS.iter().enumerate() {
            for planes in 1..=5 {
                // As many as the shortest group holds (1 for n = 9, 257).
                let shortest = group.min(n - (n.div_ceil(group) - 1) * group);
                let outliers = ((planes + s + bi) % 3).min(shortest);
                let seed = (s * 100 + bi * 10 + planes) as u64;
                let stack = random_grid_stack(m, n, k, nb, group, planes, outliers, seed);
                let what = format!("{m}×{n} g{group} p{planes} o{outliers} ×{nb}");
                cases.push((stack, what));
            }
        }
    }
    cases
}

fn reference(stack: &OwnedStack, x: &[f32], rows: usize) -> Vec<f32> {
    let mut want = vec![0f32; rows * stack.m];
    reference_matmul_t(x, rows, &stack.stack_ref(), &mut want);
    want
}

/// A 1×4 weight worked out by hand: groups of 2, two planes, one outlier
/// per group.
fn hand_stack(coded: bool) -> OwnedStack {
    // Plane 0: + − + +; plane 1: − − + −.
    let planes = [0b1011_0000u8, 0b0010_0000]
        .iter()
        .map(|&b| TiledSigns::from_row_major(&[b], 1, 4))
        .collect();
    let h = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
    // The same centers, halves and outliers, as f16 or as codes times a
    // row step.
    let values = if coded {
        GridValues::Int8 {
            center_code: vec![1, -2],
            half_code: vec![1, 2],
            outlier_code: vec![6, -5],
            center_step: h(&[0.5]),
            half_step: h(&[2.0]),
            outlier_step: h(&[0.5]),
        }
    } else {
        GridValues::F16 {
            center: h(&[0.5, -1.0]),
            half: h(&[2.0, 4.0]),
            outlier: h(&[3.0, -2.5]),
        }
    };
    let grid = OwnedGrid {
        group: 2,
        values,
        outliers: 1,
        outlier_col: vec![1, 0],
        planes,
        prefix_scale: 1.0,
    };
    OwnedStack::with_grid(1, 4, 1, Vec::new(), Some(grid))
}

#[test]
fn the_definition_by_hand() {
    for coded in [false, true] {
        let stack = hand_stack(coded);
        // Recomputed by hand for outliers that hold their value: levels
        // ±1/2 ±1/4 per column are 0.25, −0.75, 0.75, 0.25. Weights:
        // 0.5 + 2·0.25 = 1; the outlier 3 (its grid point 0.5 − 2·0.75 = −1
        // replaced); the outlier −2.5 (grid point −1 + 4·0.75 = 2 replaced);
        // −1 + 4·0.25 = 0.
        let grid = stack.stack_ref().grid.unwrap();
        let w: Vec<f64> = (0..4).map(|c| grid_weight(&grid, 4, 0, c)).collect();
        assert_eq!(w, [1.0, 3.0, -2.5, 0.0]);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        // y = 1 + 6 − 7.5 + 0; the kernels' way, grid sums −1 + 6 plus the
        // corrections (3 − (−1))·2 = 8 and (−2.5 − 2)·3 = −13.5: all exact.
        assert_eq!(reference(&stack, &x, 1), [-0.5]);
        for isa in Isa::available() {
            let mut got = [f32::NAN];
            table_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
            assert_eq!(got, [-0.5], "decode {isa:?}");
            let mut got = [f32::NAN];
            panel_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
            assert_eq!(got, [-0.5], "prefill {isa:?}");
            let mut got = [f32::NAN];
            shuffle_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
            assert_eq!(got, [-0.5], "shuffle {isa:?}");
        }
    }
}

/// The same weight with groups of 8 (the shuffle kernel's int8 path): one
/// group, the four columns above and four more.
#[test]
fn the_definition_by_hand_on_whole_bytes() {
    let planes = [0b1011_0110u8, 0b0010_1111]
        .iter()
        .map(|&b| TiledSigns::from_row_major(&[b], 1, 8))
        .collect();
    let grid = OwnedGrid {
        group: 8,
        values: GridValues::F16 {
            center: vec![f16::from_f32(0.5)],
            half: vec![f16::from_f32(2.0)],
            outlier: vec![f16::from_f32(-3.0), f16::from_f32(2.5)],
        },
        outliers: 2,
        outlier_col: vec![7, 1],
        planes,
        prefix_scale: 1.0,
    };
    let stack = OwnedStack::with_grid(1, 8, 1, Vec::new(), Some(grid.clone()));
    // Recomputed by hand for outliers that hold their value: levels
    // .25 −.75 .75 .25 | −.25 .75 .75 −.25; weights 0.5 + 2·level, but
    // −3 at column 7 and 2.5 at column 1.
    let want_w = [1.0, 2.5, 2.0, 1.0, 0.0, 2.0, 2.0, -3.0];
    let g = stack.stack_ref().grid.unwrap();
    let w: Vec<f64> = (0..8).map(|c| grid_weight(&g, 8, 0, c)).collect();
    assert_eq!(w, want_w);
    let x = [1.0f32, -1.0, 0.5, 2.0, 3.0, -2.0, 1.0, 0.25];
    // 1 − 2.5 + 1 + 2 + 0 − 4 + 2 − 0.75.
    let y: f64 = want_w.iter().zip(&x).map(|(w, x)| w * *x as f64).sum();
    assert_eq!(y, -1.25);
    assert_eq!(reference(&stack, &x, 1), [y as f32]);
    for isa in Isa::available() {
        let mut got = [f32::NAN];
        shuffle_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
        assert_close(&got, &[y as f32], 0.01, &format!("shuffle {isa:?}"));
    }

    // A prefix scale of 1/2 halves every half-range, not the centers or
    // the outliers: weights 0.5 + level, −3 and 2.5 as before.
    let scaled = OwnedGrid {
        prefix_scale: 0.5,
        ..grid
    };
    let stack = OwnedStack::with_grid(1, 8, 1, Vec::new(), Some(scaled));
    let want_w = [0.75, 2.5, 1.25, 0.75, 0.25, 1.25, 1.25, -3.0];
    let g = stack.stack_ref().grid.unwrap();
    let w: Vec<f64> = (0..8).map(|c| grid_weight(&g, 8, 0, c)).collect();
    assert_eq!(w, want_w);
    // 0.75 − 2.5 + 0.625 + 1.5 + 0.75 − 2.5 + 1.25 − 0.75.
    let y: f64 = want_w.iter().zip(&x).map(|(w, x)| w * *x as f64).sum();
    assert_eq!(y, -0.875);
    assert_eq!(reference(&stack, &x, 1), [y as f32]);
    for isa in Isa::available() {
        let mut got = [f32::NAN];
        shuffle_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
        assert_close(&got, &[y as f32], 0.01, &format!("scaled, shuffle {isa:?}"));
    }
}

/// An outlier's weight is its stored value exactly at every plane count:
/// the reference's (a one-hot x at its column reads its weight back), and
/// every kernel's within its usual tolerance.
#[test]
fn an_outlier_weighs_its_value_at_every_plane_count() {
    let (m, n, group, o) = (33, 200, 16, 2);
    for planes in 1..=5 {
        let stack = random_grid_stack(m, n, 1, 0, group, planes, o, 40 + planes as u64);
        let grid = stack.grid.as_ref().unwrap().grid_ref();
        let groups = grid.groups(n);
        // A few rows and groups, the last (shorter) group included.
        for (i, g) in [(0, 0), (5, 3), (32, groups - 1), (17, 7)] {
            for t in 0..o {
                let slot = (i * groups + g) * o + t;
                let c = g * group + grid.outlier_col[slot] as usize;
                let v = grid.values.outlier(groups * o, slot);
                assert_eq!(grid_weight(&grid, n, i, c), v as f64, "p{planes}");
                let mut x = vec![0f32; n];
                x[c] = 1.0;
                let want = reference(&stack, &x, 1);
                assert_eq!(want[i], v, "p{planes} ({i}, {c}): reference");
                let what = format!("p{planes} ({i}, {c})");
                let mut got = vec![f32::NAN; m];
                stack_matmul_t(&x, 1, &stack.stack_ref(), &mut got);
                assert_close(
                    &got,
                    &want,
                    shuffle_tolerance(m),
                    &format!("dispatch {what}"),
                );
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; m];
                    table_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
                    assert_close(&got, &want, 1e-4, &format!("decode {isa:?} {what}"));
                    let mut got = vec![f32::NAN; m];
                    panel_matmul_t(isa, &x, 1, &stack.stack_ref(), &mut got);
                    assert_eq!(got[i], v, "prefill {isa:?} {what}");
                }
            }
        }
    }
}

#[test]
fn decode_tables_match_the_reference() {
    for (stack, what) in cases() {
        for rows in [1, 3, 8] {
            let x = random_x(rows, stack.n, rows as u64 + 7);
            let want = reference(&stack, &x, rows);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * stack.m];
                table_matmul_t(isa, &x, rows, &stack.stack_ref(), &mut got);
                assert_close(
                    &got,
                    &want,
                    1e-4,
                    &format!("decode {isa:?} {what}, {rows} rows"),
                );
            }
        }
    }
}

#[test]
fn the_grid_alone_adds_to_out() {
    for (stack, what) in cases().into_iter().filter(|(s, _)| s.blocks.is_empty()) {
        let rows = 2;
        let x = random_x(rows, stack.n, 5);
        let want = reference(&stack, &x, rows);
        let grid = stack.grid.as_ref().unwrap().grid_ref();
        for isa in Isa::available() {
            let mut got = vec![1.0f32; rows * stack.m];
            grid_matmul_t_add(isa, &x, rows, stack.m, stack.n, &grid, &mut got);
            let got: Vec<f32> = got.iter().map(|v| v - 1.0).collect();
            assert_close(&got, &want, 1e-4, &format!("grid {isa:?} {what}"));
        }
    }
}

/// Tolerance of the shuffle kernel: its tables are int8 (see the tmac
/// module docs), and tiny outputs have a noisy RMS.
fn shuffle_tolerance(outputs: usize) -> f32 {
    if outputs >= 64 {
        tmac::RELATIVE_MAX_ERROR_BOUND
    } else {
        4.0 * tmac::RELATIVE_MAX_ERROR_BOUND
    }
}

#[test]
fn shuffle_matches_the_reference_and_is_the_same_on_every_isa() {
    for (stack, what) in cases() {
        for rows in [1, 3, 8] {
            let x = random_x(rows, stack.n, rows as u64 + 11);
            let want = reference(&stack, &x, rows);
            let mut scalar = vec![f32::NAN; rows * stack.m];
            shuffle_matmul_t(Isa::Baseline, &x, rows, &stack.stack_ref(), &mut scalar);
            let tol = shuffle_tolerance(want.len());
            assert_close(&scalar, &want, tol, &format!("shuffle {what}, {rows} rows"));
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * stack.m];
                shuffle_matmul_t(isa, &x, rows, &stack.stack_ref(), &mut got);
                let same = got
                    .iter()
                    .zip(&scalar)
                    .all(|(g, s)| g.to_bits() == s.to_bits());
                assert!(
                    same,
                    "shuffle {isa:?} {what}, {rows} rows: not the scalar bits"
                );
            }
        }
    }
}

#[test]
fn prefill_matches_the_reference() {
    for (stack, what) in cases() {
        for rows in [1, 3, 8, 33, 70] {
            let x = random_x(rows, stack.n, rows as u64 + 13);
            let want = reference(&stack, &x, rows);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * stack.m];
                panel_matmul_t(isa, &x, rows, &stack.stack_ref(), &mut got);
                assert_close(
                    &got,
                    &want,
                    1e-4,
                    &format!("prefill {isa:?} {what}, {rows} rows"),
                );
            }
        }
    }
}

#[test]
fn dispatch_matches_the_reference() {
    for (stack, what) in cases() {
        for rows in [1, 3, 8, 33, 70] {
            let x = random_x(rows, stack.n, rows as u64 + 17);
            let want = reference(&stack, &x, rows);
            let mut got = vec![f32::NAN; rows * stack.m];
            stack_matmul_t(&x, rows, &stack.stack_ref(), &mut got);
            let tol = if rows <= bitstack_kernels::DECODE_MAX_ROWS {
                shuffle_tolerance(want.len())
            } else {
                1e-4
            };
            assert_close(&got, &want, tol, &format!("dispatch {what}, {rows} rows"));
        }
    }
}

/// A large grid (the benchmark's shape): the shuffle kernel's error stays
/// within the bounds the tmac module states for blocks.
#[test]
fn a_large_grid_stays_within_the_shuffle_bounds() {
    let (m, n) = (256, 4096);
    for (planes, nb) in [(3, 0), (4, 2)] {
        let stack = random_grid_stack(m, n, 4, nb, 128, planes, 1, planes as u64);
        let x = random_x(1, n, 3);
        let want = reference(&stack, &x, 1);
        let mut got = vec![0f32; m];
        shuffle_matmul_t(Isa::detect(), &x, 1, &stack.stack_ref(), &mut got);
        let rms = |v: &mut dyn Iterator<Item = f32>| {
            let (s, c) = v.fold((0f64, 0usize), |(s, c), e| (s + (e as f64).powi(2), c + 1));
            (s / c as f64).sqrt() as f32
        };
        let scale = rms(&mut want.iter().copied());
        let err = rms(&mut got.iter().zip(&want).map(|(g, w)| g - w)) / scale;
        eprintln!("{m}×{n} p{planes} ×{nb}: relative rms error {err}");
        assert!(err <= tmac::RELATIVE_RMS_ERROR_BOUND, "rms error {err}");
        assert_close(&got, &want, tmac::RELATIVE_MAX_ERROR_BOUND, "max error");
    }
}

#[test]
fn the_candle_op_takes_a_grid() {
    let stack = Arc::new(random_grid_stack(37, 90, 4, 2, 16, 3, 1, 9));
    for rows in [1, 9, 45] {
        let x = random_x(rows, 90, 7);
        let want = reference(&stack, &x, rows);
        let xt = Tensor::from_vec(x, (rows, 90), &Device::Cpu).unwrap();
        let y = bitstack_kernels::op::bitstack_matmul(&xt, stack.clone()).unwrap();
        let tol = if rows <= bitstack_kernels::DECODE_MAX_ROWS {
            tmac::RELATIVE_MAX_ERROR_BOUND
        } else {
            1e-4
        };
        assert_close(&values(&y), &want, tol, &format!("op, {rows} rows"));
    }
}

#[test]
fn a_block_only_stack_is_unchanged_by_an_absent_grid() {
    let stack = random_stack(33, 65, 4, 3, 1);
    assert!(stack.grid.is_none() && stack.stack_ref().grid.is_none());
    let x = random_x(2, 65, 2);
    let want = reference(&stack, &x, 2);
    let mut got = vec![f32::NAN; 66];
    stack_matmul_t(&x, 2, &stack.stack_ref(), &mut got);
    assert_close(&got, &want, tmac::RELATIVE_MAX_ERROR_BOUND, "blocks only");
}

#[test]
#[should_panic(expected = "outlier column")]
fn an_outlier_past_its_group_is_refused() {
    // n = 9 with groups of 4: the last group has one column.
    let mut grid = random_grid(3, 9, 4, 2, 1, 1);
    let last = grid.outlier_col.len() - 1;
    grid.outlier_col[last] = 1;
    OwnedStack::with_grid(3, 9, 1, Vec::new(), Some(grid));
}

#[test]
#[should_panic(expected = "repeat")]
fn two_outliers_on_one_column_are_refused() {
    let mut grid = random_grid(3, 40, 8, 2, 2, 1);
    grid.outlier_col[7] = grid.outlier_col[6];
    OwnedStack::with_grid(3, 40, 1, Vec::new(), Some(grid));
}

#[test]
#[should_panic(expected = "not in 1..=256")]
fn a_group_past_256_is_refused() {
    let mut grid = random_grid(2, 300, 300, 1, 0, 1);
    grid.group = 300;
    OwnedStack::with_grid(2, 300, 1, Vec::new(), Some(grid));
}

#[test]
#[should_panic(expected = "steps are not one per row")]
fn coded_values_need_a_step_per_row() {
    // Odd seeds code the numbers in 8 bits.
    let mut grid = random_grid(3, 40, 8, 2, 1, 1);
    let GridValues::Int8 { outlier_step, .. } = &mut grid.values else {
        panic!("an odd seed gives 8-bit codes");
    };
    outlier_step.pop();
    OwnedStack::with_grid(3, 40, 1, Vec::new(), Some(grid));
}
