//! The kernels, fuzzed against the f64 reference: random shapes (`m`, `n`
//! up to 300, `k` in 1..=80, up to 4 blocks, up to 40 rows of `x`), with
//! and without grid planes of any group size, on every instruction set this
//! CPU runs (the baseline forced too), through the dispatch and the candle
//! op, and some cases from inside rayon tasks (nested calls).
//!
//! See `tests/fuzz_harness` at the workspace root for the seeds, the case
//! counts, the allocation bound and how to replay a case;
//! `scripts/fuzz.sh SECONDS` runs long.

#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

mod common;

use std::sync::Arc;

use bitstack_kernels::decode::table_matmul_t;
use bitstack_kernels::grid::grid_matmul_t_add;
use bitstack_kernels::prefill::panel_matmul_t;
use bitstack_kernels::reference::reference_matmul_t;
use bitstack_kernels::tmac::{self, shuffle_matmul_t};
use bitstack_kernels::{stack_matmul_t, Isa, OwnedStack, DECODE_MAX_ROWS};
use candle_core::{Device, Tensor};
use common::{assert_close, random_grid, random_stack, random_x, values};
use fuzz_harness::CASE_BOUND;
use rand::rngs::StdRng;
use rand::Rng;
use rayon::prelude::*;

/// A dimension up to `max`: any, small, or next to a multiple of 8, 32 or 64
/// (where the kernels' tiles and chunks end).
fn dim(rng: &mut StdRng, max: usize) -> usize {
    match rng.random_range(0..4) {
        0 => rng.random_range(1..=16.min(max)),
        1 => {
            let unit = *fuzz_harness::pick(rng, &[8, 32, 64]);
            let base = unit * rng.random_range(1..=(max / unit).max(1));
            (base + rng.random_range(0..3))
                .saturating_sub(1)
                .clamp(1, max)
        }
        _ => rng.random_range(1..=max),
    }
}

/// One random case: the stack, `x` and its rows, and a description.
struct Case {
    stack: OwnedStack,
    x: Vec<f32>,
    rows: usize,
    what: String,
}

fn random_case(rng: &mut StdRng) -> Case {
    let (m, n) = (dim(rng, 300), dim(rng, 300));
    let k = rng.random_range(1..=80);
    let blocks = rng.random_range(0..=4);
    let rows = if rng.random_bool(0.03) {
        0
    } else {
        rng.random_range(1..=40)
    };
    let seed: u64 = rng.random();
    let stack = random_stack(m, n, k, blocks, seed);
    // A grid in about half the cases: any group size 1..=256, groups that
    // start on a sign byte (the shuffle kernel's own path) or one group.
    let (stack, grid) = if rng.random_bool(0.5) {
        let group = match rng.random_range(0..4) {
            0 => 8 * rng.random_range(1..=32),
            1 => n.min(256),
            _ => rng.random_range(1..=256),
        };
        let planes = rng.random_range(1..=5);
        let last = n - (n.div_ceil(group) - 1) * group;
        let outliers = rng.random_range(0..=3usize).min(group.min(last));
        let grid = random_grid(m, n, group, planes, outliers, seed);
        let stack = OwnedStack::with_grid(m, n, k, stack.blocks, Some(grid));
        (stack, format!(" grid g{group} p{planes} o{outliers}"))
    } else {
        (stack, String::new())
    };
    let x = random_x(rows, n, seed ^ 0x5eed);
    let what = format!("{m}×{n} k{k} ×{blocks}{grid}, {rows} rows");
    Case {
        stack,
        x,
        rows,
        what,
    }
}

/// The shuffle kernel's tolerance (its tables are int8; tiny outputs have
/// a noisy RMS), as the grid tests state it.
fn shuffle_tolerance(outputs: usize) -> f32 {
    if outputs >= 64 {
        tmac::RELATIVE_MAX_ERROR_BOUND
    } else {
        4.0 * tmac::RELATIVE_MAX_ERROR_BOUND
    }
}

/// `kernel` over `x` in calls of at most `step` rows.
fn in_steps(c: &Case, step: usize, mut kernel: impl FnMut(&[f32], usize, &mut [f32])) -> Vec<f32> {
    let (m, n) = (c.stack.m, c.stack.n);
    let mut out = vec![f32::NAN; c.rows * m];
    for r0 in (0..c.rows).step_by(step) {
        let rows = step.min(c.rows - r0);
        kernel(
            &c.x[r0 * n..][..rows * n],
            rows,
            &mut out[r0 * m..][..rows * m],
        );
    }
    out
}

/// The kernels one instruction set runs, each against `want`.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    Decode,
    Shuffle,
    Prefill,
    Grid,
}

/// Runs `kernel` on `isa` and checks it against the reference; the shuffle
/// kernel's result is returned (it must be the same bits on every ISA).
fn check_kernel(c: &Case, want: &[f32], isa: Isa, kernel: Kernel) -> Option<Vec<f32>> {
    let stack = c.stack.stack_ref();
    let what = format!("{kernel:?} {isa:?} {}", c.what);
    match kernel {
        Kernel::Decode => {
            let got = in_steps(c, bitstack_kernels::decode::MAX_ROWS, |x, r, o| {
                table_matmul_t(isa, x, r, &stack, o)
            });
            assert_close(&got, want, 1e-4, &what);
            None
        }
        Kernel::Shuffle => {
            let got = in_steps(c, tmac::MAX_ROWS, |x, r, o| {
                shuffle_matmul_t(isa, x, r, &stack, o)
            });
            assert_close(&got, want, shuffle_tolerance(want.len()), &what);
            Some(got)
        }
        Kernel::Prefill => {
            let mut got = vec![f32::NAN; c.rows * c.stack.m];
            panel_matmul_t(isa, &c.x, c.rows, &stack, &mut got);
            assert_close(&got, want, 1e-4, &what);
            None
        }
        Kernel::Grid => {
            // The grid alone adds to `out`: only for stacks without blocks.
            let grid = stack.grid.as_ref()?;
            if !stack.blocks.is_empty() {
                return None;
            }
            let (m, n) = (c.stack.m, c.stack.n);
            let mut got = in_steps(c, bitstack_kernels::grid::MAX_ROWS, |x, r, o| {
                o.fill(1.0);
                grid_matmul_t_add(isa, x, r, m, n, grid, o)
            });
            got.iter_mut().for_each(|v| *v -= 1.0);
            assert_close(&got, want, 1e-4, &what);
            None
        }
    }
}

const KERNELS: [Kernel; 4] = [
    Kernel::Decode,
    Kernel::Shuffle,
    Kernel::Prefill,
    Kernel::Grid,
];

/// The dispatch and the candle op (f32 activations) against the reference.
fn check_dispatch(c: &Case, want: &[f32]) {
    let tol = if c.rows <= DECODE_MAX_ROWS {
        shuffle_tolerance(want.len())
    } else {
        1e-4
    };
    let mut got = vec![f32::NAN; c.rows * c.stack.m];
    stack_matmul_t(&c.x, c.rows, &c.stack.stack_ref(), &mut got);
    assert_close(&got, want, tol, &format!("dispatch {}", c.what));
    if c.rows > 0 {
        let xt = Tensor::from_vec(c.x.clone(), (c.rows, c.stack.n), &Device::Cpu).unwrap();
        let y = bitstack_kernels::bitstack_matmul(&xt, Arc::new(c.stack.clone())).unwrap();
        assert_eq!(y.dims(), &[c.rows, c.stack.m], "op {}", c.what);
        assert_close(&values(&y), want, tol, &format!("op {}", c.what));
    }
}

/// Every kernel on every instruction set, one after the other.
fn check_all(c: &Case, want: &[f32]) {
    for kernel in KERNELS {
        let mut baseline: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let got = check_kernel(c, want, isa, kernel);
            if let (Some(got), Some(base)) = (&got, &baseline) {
                let same = got
                    .iter()
                    .zip(base)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "shuffle {isa:?} {}: not the baseline's bits", c.what);
            }
            baseline = baseline.or(got);
        }
    }
    check_dispatch(c, want);
}

/// Every (kernel, instruction set) as a task of a rayon pool with more
/// threads than cores, twice over, so that calls start while this thread
/// and others are inside other calls (whose own parallel loops they then
/// help with).
fn check_nested(c: &Case, want: &[f32], pool: &rayon::ThreadPool) {
    let tasks: Vec<(Kernel, Isa)> = KERNELS
        .iter()
        .flat_map(|&k| Isa::available().into_iter().map(move |isa| (k, isa)))
        .collect();
    pool.install(|| {
        (0..2 * tasks.len()).into_par_iter().for_each(|t| {
            let (kernel, isa) = tasks[t % tasks.len()];
            check_kernel(c, want, isa, kernel);
            if t == 0 {
                check_dispatch(c, want);
            }
        })
    });
}

#[test]
fn fuzz_kernels() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(6)
        .build()
        .unwrap();
    fuzz_harness::run("kernels", 40, CASE_BOUND, |rng, index| {
        let c = random_case(rng);
        let mut want = vec![0f32; c.rows * c.stack.m];
        reference_matmul_t(&c.x, c.rows, &c.stack.stack_ref(), &mut want);
        // One case in four from inside rayon tasks.
        if index % 4 == 3 {
            check_nested(&c, &want, &pool);
        } else {
            check_all(&c, &want);
        }
    });
}
