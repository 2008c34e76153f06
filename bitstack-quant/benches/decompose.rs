//! Top-k SVD and one AVD block: exact (faer thin SVD) against randomized
//! subspace iteration, on SmolLM2-shaped matrices with random entries.

use bitstack_quant::method::svd::{top_k, SvdMethod};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::Mat;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn svd(c: &mut Criterion) {
    faer::set_global_parallelism(faer::Par::Seq);
    let mut group = c.benchmark_group("top16_svd_of_abs");
    group.sample_size(10);
    for (m, n) in [(576, 576), (1536, 576), (192, 576)] {
        let mut rng = StdRng::seed_from_u64(1);
        let a = Mat::<f32>::from_fn(m, n, |_, _| rng.random::<f32>());
        for (name, method) in [
            ("exact", SvdMethod::Exact),
            ("randomized", SvdMethod::randomized(0)),
        ] {
            group.bench_with_input(BenchmarkId::new(name, format!("{m}x{n}")), &a, |b, a| {
                b.iter(|| top_k(a, 16, method).map(|t| t.s[0]).unwrap_or(0.0))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, svd);
criterion_main!(benches);
