//! Resizing a running BitStack model by one level in every decoder linear,
//! against a plain read of the same bytes from the page cache.
//!
//! The targets: a one-level resize takes under 1 ms plus the time to read
//! its bytes, and growing reads at 80% or more of the page-cache read
//! bandwidth measured in the same run. The checkpoints are random BitStack
//! checkpoints ([`SyntheticSpec::write_bitstack`]) in the temporary dir,
//! written once per shape and reused (`BITSTACK_BENCH_DIR` moves them).
//! `cargo bench --bench resize` runs both shapes; run as a test (no
//! `--bench` argument) it runs only the small one, unless
//! `BITSTACK_RESIZE_SHAPES` (comma-separated shape names) says otherwise.
//!
//! Fresh memory costs more than the copy into it: the kernel faults in and
//! zeroes every new page, at several times the cost of copying the page.
//! Whether a buffer gets new pages or recycled ones is up to the allocator,
//! so glibc's threshold for mapping large buffers is pinned (it would
//! otherwise move with what was freed before): every buffer of 128 KiB or
//! more then gets new pages, in a grow as in the baseline, and is returned
//! to the system when freed, as a shrink that makes room must. The second
//! baseline reads into buffers allocated once: the page cache's bandwidth
//! with no new memory, the bound no grow into new memory reaches.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitstack_quant::format::block::names;
use bitstack_quant::format::store::safetensors_files;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::DenseDtype;
use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

/// A model shape and its stacks: `blocks` per linear of rank `k`.
struct Shape {
    name: &'static str,
    spec: SyntheticSpec,
    blocks: usize,
    k: usize,
}

fn shapes() -> Vec<Shape> {
    let smollm2 = Shape {
        name: "smollm2-135m",
        spec: SyntheticSpec {
            model_type: "llama",
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            vocab: 49152,
            tied: true,
            seed: 7,
            dense_dtype: DenseDtype::default(),
        },
        blocks: 3,
        k: 4,
    };
    // Two blocks per linear: about 2 GB on disk. The vocabulary is small
    // because only the stacks move.
    let llama3 = Shape {
        name: "llama3-8b",
        spec: SyntheticSpec {
            model_type: "llama",
            hidden: 4096,
            intermediate: 14336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            vocab: 1024,
            tied: true,
            seed: 7,
            dense_dtype: DenseDtype::default(),
        },
        blocks: 2,
        k: 4,
    };
    let wanted: Option<Vec<String>> = std::env::var("BITSTACK_RESIZE_SHAPES")
        .ok()
        .map(|s| s.split(',').map(|n| n.trim().to_string()).collect());
    // Without `--bench` criterion only tests the benches once: keep that quick.
    let benching = std::env::args().any(|a| a == "--bench");
    [smollm2, llama3]
        .into_iter()
        .filter(|s| match &wanted {
            Some(names) => names.iter().any(|n| n == s.name),
            None => benching || s.name == "smollm2-135m",
        })
        .collect()
}

/// The shape's checkpoint, opened with every block resident: reused when a
/// previous run left a valid one (opening verifies every block), else written.
fn open_checkpoint(shape: &Shape) -> (PathBuf, BitStackHandle) {
    let root = std::env::var_os("BITSTACK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let s = &shape.spec;
    // Every input of the generator is in the name, with its version.
    let dir = root.join(format!(
        "bitstack-resize-bench-v1-{}-h{}-i{}-l{}-a{}-kv{}-v{}-{}-{}-b{}-k{}-s{}",
        shape.name,
        s.hidden,
        s.intermediate,
        s.layers,
        s.heads,
        s.kv_heads,
        s.vocab,
        if s.tied { "tied" } else { "untied" },
        s.model_type,
        shape.blocks,
        shape.k,
        s.seed
    ));
    if dir.exists() {
        match BitStackHandle::open(&dir, None, &Device::Cpu) {
            Ok(h) => return (dir, h),
            Err(e) => {
                eprintln!("rewriting {}: {e:#}", dir.display());
                std::fs::remove_dir_all(&dir).expect("remove the stale checkpoint");
            }
        }
    }
    let t = Instant::now();
    s.write_bitstack(&dir, shape.blocks, shape.k)
        .expect("write the checkpoint");
    eprintln!(
        "{}: wrote {} in {:.1} s",
        shape.name,
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    let h = BitStackHandle::open(&dir, None, &Device::Cpu).expect("open the checkpoint");
    (dir, h)
}

/// File byte ranges (file, offset, length) of tensors `names`, in file order.
fn byte_ranges(dir: &Path, names: &[String]) -> (Vec<File>, Vec<(usize, u64, usize)>) {
    let mut files = Vec::new();
    let mut at: HashMap<String, (usize, u64, usize)> = HashMap::new();
    for (fi, path) in safetensors_files(dir).unwrap().iter().enumerate() {
        let file = File::open(path).unwrap();
        // SAFETY: read-only map of a file nothing writes while the bench runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let (header, meta) = safetensors::SafeTensors::read_metadata(&map).unwrap();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            at.insert(name, (fi, (8 + header + s) as u64, e - s));
        }
        files.push(file);
    }
    let mut ranges: Vec<_> = names.iter().map(|n| at[n]).collect();
    ranges.sort_unstable();
    (files, ranges)
}

/// One shape's checkpoint, open, with the byte ranges of its top level.
struct Level {
    handle: BitStackHandle,
    /// The level with every block, and one level (a block per linear) less.
    top: usize,
    low: usize,
    bytes: u64,
    files: Vec<File>,
    ranges: Vec<(usize, u64, usize)>,
    reused: Vec<Vec<u8>>,
}

impl Level {
    fn new(shape: &Shape) -> Self {
        let (dir, handle) = open_checkpoint(shape);
        let linears = handle.geometry().linears.len();
        // Round-robin order: the top `linears` levels are the last block of
        // every linear.
        let top = handle.max_level();
        let low = top - linears;
        let bytes = handle.bytes_at_level(top) - handle.bytes_at_level(low);
        let last = shape.blocks - 1;
        let names: Vec<String> = handle
            .geometry()
            .linears
            .iter()
            .flat_map(|l| {
                [
                    names::qweight(&l.name, last),
                    names::u(&l.name, last),
                    names::vt(&l.name, last),
                ]
            })
            .collect();
        let (files, ranges) = byte_ranges(&dir, &names);
        let range_bytes: usize = ranges.iter().map(|r| r.2).sum();
        assert_eq!(range_bytes as u64, bytes, "the level is its tensors");
        eprintln!(
            "{}: {} linears, {} blocks each of rank {}; one level = {} bytes ({:.2} MiB), all blocks = {:.2} MiB",
            shape.name,
            linears,
            shape.blocks,
            shape.k,
            bytes,
            bytes as f64 / 1048576.0,
            (handle.max_bytes() - handle.geometry().dense_bytes as u64) as f64 / 1048576.0
        );
        let reused = ranges.iter().map(|r| vec![0u8; r.2]).collect();
        let mut level = Self {
            handle,
            top,
            low,
            bytes,
            files,
            ranges,
            reused,
        };
        // Cache the pages, whatever ran before.
        level.read_reused();
        level
    }

    /// Times a shrink from the top level: until the new snapshot is in
    /// place, or with `until_freed` until the release thread has freed the
    /// dropped blocks too. `held`: with the old snapshot held, as by a
    /// forward in flight, so its blocks are freed when that ends.
    fn shrink(&self, held: bool, until_freed: bool) -> Duration {
        self.handle.set_level(self.top).unwrap();
        let snapshot = held.then(|| self.handle.snapshot());
        let t = Instant::now();
        self.handle.set_level(self.low).unwrap();
        if until_freed {
            self.handle.wait_released();
        }
        let dt = t.elapsed();
        drop(snapshot);
        self.handle.wait_released();
        dt
    }

    /// Times a grow to the top level.
    fn grow(&self) -> Duration {
        self.handle.set_level(self.low).unwrap();
        self.handle.wait_released();
        let t = Instant::now();
        self.handle.set_level(self.top).unwrap();
        t.elapsed()
    }

    /// Times reading the level's bytes into new buffers, one after another.
    fn read_fresh(&mut self) -> Duration {
        let t = Instant::now();
        let bufs: Vec<Vec<u8>> = self
            .ranges
            .iter()
            .map(|&(fi, offset, len)| {
                let mut buf = vec![0u8; len];
                read_at(&mut self.files[fi], offset, &mut buf);
                buf
            })
            .collect();
        let dt = t.elapsed();
        drop(bufs);
        dt
    }

    /// Times reading the level's bytes into the same buffers again.
    fn read_reused(&mut self) -> Duration {
        let t = Instant::now();
        for (buf, &(fi, offset, _)) in self.reused.iter_mut().zip(&self.ranges) {
            read_at(&mut self.files[fi], offset, buf);
        }
        t.elapsed()
    }
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) {
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(buf).unwrap();
}

/// `iter_custom`'s routine: `iters` timed runs of `f`.
fn timed(iters: u64, mut f: impl FnMut() -> Duration) -> Duration {
    (0..iters).map(|_| f()).sum()
}

/// The median of `times`.
fn middle(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// Buffers of 128 KiB or more are mapped fresh and unmapped when freed.
fn pin_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets an allocator tunable before the bench allocates its buffers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

fn resize(c: &mut Criterion) {
    pin_allocator();
    for shape in shapes() {
        let mut level = Level::new(&shape);
        let mut group = c.benchmark_group(format!("resize/{}", shape.name));
        // Large levels take about a second per run, set-up included.
        let secs = if level.bytes > 100 << 20 { 12 } else { 2 };
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(secs));
        group.bench_function("shrink one level", |b| {
            b.iter_custom(|iters| timed(iters, || level.shrink(false, false)))
        });
        group.bench_function("shrink one level, until freed", |b| {
            b.iter_custom(|iters| timed(iters, || level.shrink(false, true)))
        });
        group.bench_function("shrink one level, snapshot held", |b| {
            b.iter_custom(|iters| timed(iters, || level.shrink(true, false)))
        });
        group.throughput(Throughput::Bytes(level.bytes));
        group.bench_function("grow one level", |b| {
            b.iter_custom(|iters| timed(iters, || level.grow()))
        });
        group.bench_function("page-cache read, fresh buffers", |b| {
            b.iter_custom(|iters| timed(iters, || level.read_fresh()))
        });
        group.bench_function("page-cache read, reused buffers", |b| {
            b.iter_custom(|iters| timed(iters, || level.read_reused()))
        });
        group.finish();

        // The ratios from runs taken in turn, so that other load on the
        // machine weighs on grow and baseline alike.
        let runs = 7;
        let (mut grows, mut fresh, mut reused) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            grows.push(level.grow());
            fresh.push(level.read_fresh());
            reused.push(level.read_reused());
        }
        let (grow, fresh, reused) = (middle(grows), middle(fresh), middle(reused));
        let shrink = middle((0..runs).map(|_| level.shrink(false, false)).collect());
        let freed = middle((0..runs).map(|_| level.shrink(false, true)).collect());
        let held = middle((0..runs).map(|_| level.shrink(true, false)).collect());
        let gibps = |d: Duration| level.bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "{}: one level = {} bytes ({:.2} MiB); medians of {runs} runs in turn: \
             shrink {:.3} ms (until freed {:.2} ms, snapshot held {:.3} ms); grow {:.2} ms = {:.2} GiB/s; \
             page-cache read into fresh buffers {:.2} ms = {:.2} GiB/s, into reused buffers \
             {:.2} ms = {:.2} GiB/s; grow / fresh read = {:.0}%, grow / reused read = {:.0}%",
            shape.name,
            level.bytes,
            level.bytes as f64 / 1048576.0,
            ms(shrink),
            ms(freed),
            ms(held),
            ms(grow),
            gibps(grow),
            ms(fresh),
            gibps(fresh),
            ms(reused),
            gibps(reused),
            100.0 * gibps(grow) / gibps(fresh),
            100.0 * gibps(grow) / gibps(reused)
        );
    }
}

criterion_group!(benches, resize);
criterion_main!(benches);
