//! CUDA kernel timings against the device's own yardsticks, measured in the
//! same run: device-to-device copy bandwidth, cuBLAS f16 GEMV (decode) and
//! cuBLAS f16 GEMM (prefill), on Llama-3-8B shapes with random weights.
//!
//! `cargo bench -p bitstack-kernels --features cuda --bench cuda -- [--k K]
//! [--blocks 1,2,…] [--shapes MxN,…] [--prefill-rows R] [--json FILE]`
//!
//! Each time is the median over 15 samples of 20 back-to-back calls with a
//! synchronize after each sample.

use std::sync::Arc;
use std::time::Instant;

use bitstack_kernels::cuda::CudaStack;
use bitstack_kernels::op::bitstack_matmul;
use bitstack_kernels::{OwnedStack, StackRef, StackSource};
use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Tensor};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

struct Args {
    k: usize,
    blocks: Vec<usize>,
    shapes: Vec<(usize, usize)>,
    prefill_rows: usize,
    json: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        k: 4,
        blocks: vec![1, 2, 3, 4, 6, 8],
        shapes: vec![(4096, 4096), (14336, 4096), (4096, 14336)],
        prefill_rows: 2048,
        json: None,
    };
    let list =
        |s: &str| -> Vec<usize> { s.split(',').map(|v| v.parse().expect("a number")).collect() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--k" => {
                args.k = it
                    .next()
                    .expect("--k K")
                    .parse()
                    .expect("--k takes a number")
            }
            "--blocks" => args.blocks = list(&it.next().expect("--blocks LIST")),
            "--prefill-rows" => {
                args.prefill_rows = it
                    .next()
                    .expect("--prefill-rows R")
                    .parse()
                    .expect("a number")
            }
            "--json" => args.json = it.next(),
            "--shapes" => {
                args.shapes = it
                    .next()
                    .expect("--shapes MxN,…")
                    .split(',')
                    .map(|s| {
                        let (m, n) = s.split_once('x').expect("a shape is MxN");
                        (m.parse().expect("M"), n.parse().expect("N"))
                    })
                    .collect()
            }
            // cargo bench passes --bench; criterion-style filters are ignored.
            _ => {}
        }
    }
    args
}

/// Random blocks on the host and their upload.
struct Bench {
    host: OwnedStack,
    device: Arc<CudaStack>,
}

impl StackSource for Bench {
    fn stack(&self) -> Result<StackRef<'_>> {
        Ok(self.host.stack_ref())
    }

    fn cuda_stack(&self, _: &CudaDevice) -> Result<Arc<CudaStack>> {
        Ok(self.device.clone())
    }
}

fn random_stack(
    dev: &CudaDevice,
    m: usize,
    n: usize,
    k: usize,
    blocks: usize,
    rng: &mut StdRng,
) -> Result<Bench> {
    let blocks = (0..blocks).map(|_| {
        let signs: Vec<u8> = (0..(m * n).div_ceil(8)).map(|_| rng.random()).collect();
        let mut f = |len: usize| -> Vec<f16> {
            (0..len)
                .map(|_| f16::from_f32(rng.random::<f32>() * 0.02 - 0.01))
                .collect()
        };
        let (u, vt) = (f(m * k), f(k * n));
        (signs, u, vt)
    });
    let host = OwnedStack::from_row_major(m, n, k, blocks);
    let device = Arc::new(CudaStack::upload(dev, &host.stack_ref())?);
    Ok(Bench { host, device })
}

/// Median seconds per call of `f`.
fn time(dev: &CudaDevice, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        for _ in 0..20 {
            f()?;
        }
        dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() / 20.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn main() -> Result<()> {
    let args = parse_args();
    let device = Device::new_cuda(0)?;
    let Device::Cuda(dev) = &device else {
        unreachable!()
    };
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut json = Vec::new();

    // Copy bandwidth: bytes read plus bytes written per second.
    let copy_bytes = 1usize << 30;
    let src = Tensor::zeros(copy_bytes / 2, DType::F16, &device)?;
    let copy_s = time(dev, || src.copy().map(|_| ()))?;
    let copy_bw = 2.0 * copy_bytes as f64 / copy_s;
    println!(
        "device-to-device copy: {:.0} GB/s (read + write)\n",
        copy_bw / 1e9
    );

    println!("## Decode, 1 row, f16, k = {}\n", args.k);
    println!("| shape | blocks | ours µs | cuBLAS f16 GEMV µs | speed-up | bytes read MB | bandwidth GB/s | of copy |");
    println!("|---|---|---|---|---|---|---|---|");
    for &(m, n) in &args.shapes {
        let w = Tensor::randn(0f32, 0.02, (m, n), &device)?.to_dtype(DType::F16)?;
        let x1 = Tensor::randn(0f32, 1.0, (1, n), &device)?.to_dtype(DType::F16)?;
        let wt = w.t()?;
        let dense_s = time(dev, || x1.matmul(&wt).map(|_| ()))?;
        for &nb in &args.blocks {
            let stack = Arc::new(random_stack(dev, m, n, args.k, nb, &mut rng)?);
            let source: Arc<dyn StackSource> = stack.clone();
            let ours_s = time(dev, || bitstack_matmul(&x1, source.clone()).map(|_| ()))?;
            let bytes = stack.device.bytes() as f64;
            let bw = bytes / ours_s;
            println!(
                "| {m}×{n} | {nb} | {:.1} | {:.1} | {:.2}× | {:.1} | {:.0} | {:.0}% |",
                ours_s * 1e6,
                dense_s * 1e6,
                dense_s / ours_s,
                bytes / 1e6,
                bw / 1e9,
                100.0 * bw / copy_bw
            );
            json.push(format!(
                r#"{{"kind":"decode","m":{m},"n":{n},"k":{},"blocks":{nb},"rows":1,"ours_us":{:.2},"cublas_f16_us":{:.2},"bytes":{bytes},"copy_gbps":{:.1}}}"#,
                args.k,
                ours_s * 1e6,
                dense_s * 1e6,
                copy_bw / 1e9
            ));
        }
    }

    let rows = args.prefill_rows;
    println!("\n## Prefill, {rows} rows, f16, k = {}, 4 blocks\n", args.k);
    println!("| shape | ours ms | cuBLAS f16 GEMM ms | throughput vs cuBLAS |");
    println!("|---|---|---|---|");
    for &(m, n) in &args.shapes {
        let w = Tensor::randn(0f32, 0.02, (m, n), &device)?.to_dtype(DType::F16)?;
        let x = Tensor::randn(0f32, 1.0, (rows, n), &device)?.to_dtype(DType::F16)?;
        let wt = w.t()?;
        let dense_s = time(dev, || x.matmul(&wt).map(|_| ()))?;
        let stack: Arc<dyn StackSource> = Arc::new(random_stack(dev, m, n, args.k, 4, &mut rng)?);
        let ours_s = time(dev, || bitstack_matmul(&x, stack.clone()).map(|_| ()))?;
        println!(
            "| {m}×{n} | {:.3} | {:.3} | {:.2}× |",
            ours_s * 1e3,
            dense_s * 1e3,
            dense_s / ours_s
        );
        json.push(format!(
            r#"{{"kind":"prefill","m":{m},"n":{n},"k":{},"blocks":4,"rows":{rows},"ours_us":{:.2},"cublas_f16_us":{:.2}}}"#,
            args.k,
            ours_s * 1e6,
            dense_s * 1e6
        ));
    }
    if let Some(path) = args.json {
        std::fs::write(&path, format!("[\n{}\n]\n", json.join(",\n")))?;
    }
    Ok(())
}
