//! One BitStack linear forward against candle's dense f32 and f16 products
//! (both layouts of `Wᵀ`) and Q4K, on random weights (the helpers
//! `bitstack bench` uses).
//!
//! `cargo bench -p bitstack-cli --bench linear`; `bitstack bench` covers
//! more shapes and prints a table.

use bitstack_cli::bench::kernels::{
    random_input, random_stack, rotated_grid_stack, stack_linear, DenseBaselines, DenseLayout,
};
use bitstack_cli::bench::size_thread_pool;
use bitstack_quant::format::rotation::RotationConfig;
use candle_core::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

const K: usize = 16;
/// Grid planes of the default layout, plain and on inputs rotated in
/// blocks of [`ROTATION`] (`compress --rotate 64`): the pair's ratio is
/// what the rotation costs a forward.
const PLANES: usize = 4;
const ROTATION: usize = 64;

fn linear(c: &mut Criterion) {
    // Every contender on the same threads (RAYON_NUM_THREADS, else all
    // CPUs); if rayon's pool were already running it keeps its size.
    let _ = size_thread_pool(None);
    for (m, n) in [(4096, 4096), (1536, 576)] {
        let mut group = c.benchmark_group(format!("linear_{m}x{n}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(4));
        let dense = DenseBaselines::random(m, n, 1).expect("dense weight");
        let full = random_stack(m, n, K, 4, 2);
        let planes = stack_linear(rotated_grid_stack(&dense.w_f32, PLANES, None).expect("planes"));
        let rotated = stack_linear(
            rotated_grid_stack(&dense.w_f32, PLANES, Some(RotationConfig::new(ROTATION)))
                .expect("rotated planes"),
        );
        for rows in [1, 512] {
            let x = random_input(rows, n, 3).expect("input");
            let x16 = x.to_dtype(DType::F16).expect("f16 input");
            for blocks in [1, 4] {
                let ours = stack_linear(full.prefix(blocks));
                group.bench_function(
                    BenchmarkId::new(format!("ours_b{blocks}_k{K}"), rows),
                    |b| b.iter(|| ours.forward(&x).expect("forward")),
                );
            }
            for (name, linear) in [("planes", &planes), ("rotated_planes", &rotated)] {
                group.bench_function(BenchmarkId::new(format!("{name}{PLANES}"), rows), |b| {
                    b.iter(|| linear.forward(&x).expect("forward"))
                });
            }
            for layout in DenseLayout::ALL {
                for (dtype, x) in [("f32", &x), ("f16", &x16)] {
                    let id = BenchmarkId::new(format!("dense_{dtype}_{layout:?}"), rows);
                    group.bench_function(id, |b| {
                        b.iter(|| dense.forward(x, layout).expect("dense matmul"))
                    });
                }
            }
            if dense.q4k.is_some() {
                group.bench_function(BenchmarkId::new("q4k", rows), |b| {
                    b.iter(|| dense.forward_q4k(&x).expect("Q4K").expect("Q4K matmul"))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, linear);
criterion_main!(benches);
