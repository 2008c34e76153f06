//! The harness of the workspace's fuzz tests (`tests/fuzz.rs` of
//! bitstack-quant, bitstack-assets and bitstack-kernels include it with
//! `#[path]`): seeded case loops that run as ordinary tests on stable Rust,
//! under a counting allocator and a watchdog.
//!
//! - `BITSTACK_FUZZ_SECONDS` unset: a fixed seed per target and a fixed,
//!   small number of cases (the CI run). Set: each target runs for that
//!   many seconds with a seed from the clock.
//! - `BITSTACK_FUZZ_SEED=S` replays seed `S`; with `BITSTACK_FUZZ_CASE=I`
//!   only its case `I` runs. Every case draws from its own generator, made
//!   from the seed and its index, so one case replays alone.
//! - Each target ends with a line `fuzz TARGET: N cases, seed S, …` (see
//!   `scripts/fuzz.sh`); a failing case prints how to replay it, and with
//!   `BITSTACK_FUZZ_DEBUG` set the config, budget and gguf targets print
//!   each case's input.
//! - Memory: the allocator counts live bytes and refuses any allocation
//!   that would take them past [`HARD_CAP`], so a case that tries to
//!   exhaust memory aborts the test binary (a failure) instead of swapping
//!   or hanging; each case's peak above what was live when it started must
//!   also stay within the bound its target states.
//! - Time: a case that runs longer than [`HANG_SECONDS`] aborts the binary
//!   with its seed and index.
//!
//! Targets of one binary run one at a time (they share the counters).
#![allow(dead_code)] // each fuzz binary uses its own subset

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Live heap bytes past which an allocation is refused (and the process
/// aborts, as Rust does when an allocation fails).
pub const HARD_CAP: usize = 2 << 30;

/// A case running longer than this is a hang.
pub const HANG_SECONDS: u64 = 120;

pub const MIB: usize = 1 << 20;

/// The per-case bound of the targets that parse files of a few KiB and run
/// a tiny model: far below anything a length field taken at its word would
/// allocate, above what a case really needs (a few MiB) plus the one-time
/// cost of symbolizing a candle error's backtrace when `RUST_BACKTRACE` is
/// set (about 70 MiB, kept for the rest of the process).
pub const CASE_BOUND: usize = 256 * MIB;

/// `System`, counting live bytes and their peak, refusing past [`HARD_CAP`].
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Counts `n` more live bytes, or refuses them (counting nothing).
fn take(n: usize) -> bool {
    let before = LIVE.fetch_add(n, Ordering::Relaxed);
    match before.checked_add(n) {
        Some(after) if after <= HARD_CAP => {
            PEAK.fetch_max(after, Ordering::Relaxed);
            true
        }
        _ => {
            LIVE.fetch_sub(n, Ordering::Relaxed);
            report_refusal(n, before);
            false
        }
    }
}

fn give(n: usize) {
    LIVE.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` with the caller's arguments;
// only the counters are added, and a refusal returns null as `GlobalAlloc`
// allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !take(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            give(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !take(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            give(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        give(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !take(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                give(new_size - old);
            }
        } else if new_size < old {
            give(old - new_size);
        }
        p
    }
}

/// Live heap bytes now.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// What is running, for the messages of the allocator and the watchdog
/// (which must not allocate, so it is kept in atomics).
static TARGET_PTR: AtomicUsize = AtomicUsize::new(0);
static TARGET_LEN: AtomicUsize = AtomicUsize::new(0);
static SEED: AtomicU64 = AtomicU64::new(0);
static CASE: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`epoch`] when the running case started; 0 when none runs.
static CASE_START_MS: AtomicU64 = AtomicU64::new(0);

fn target_name() -> &'static str {
    let (ptr, len) = (
        TARGET_PTR.load(Ordering::Relaxed),
        TARGET_LEN.load(Ordering::Relaxed),
    );
    if ptr == 0 {
        return "?";
    }
    // SAFETY: set together from a `&'static str` in `run`.
    unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(ptr as *const u8, len)) }
}

/// A fixed-size text buffer: formatting into it never allocates.
struct StackText {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes a line naming the running case to stderr, without allocating.
fn say_without_allocating(what: std::fmt::Arguments) {
    use std::fmt::Write as _;
    let mut text = StackText {
        buf: [0; 512],
        len: 0,
    };
    let _ = writeln!(
        text,
        "fuzz {}: {what} in case {} of seed {} (replay: BITSTACK_FUZZ_SEED={} BITSTACK_FUZZ_CASE={} cargo test --release -p {} --test fuzz)",
        target_name(),
        CASE.load(Ordering::Relaxed),
        SEED.load(Ordering::Relaxed),
        SEED.load(Ordering::Relaxed),
        CASE.load(Ordering::Relaxed),
        env!("CARGO_PKG_NAME"),
    );
    let _ = std::io::stderr().write_all(&text.buf[..text.len]);
}

fn report_refusal(n: usize, live: usize) {
    say_without_allocating(format_args!(
        "refused an allocation of {n} bytes with {live} live (cap {HARD_CAP})"
    ));
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1: 0 means "no case".
    epoch().elapsed().as_millis() as u64 + 1
}

/// Starts the watchdog thread once: it aborts the process when a case has
/// run for more than [`HANG_SECONDS`].
fn start_watchdog() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        epoch();
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(500));
                let start = CASE_START_MS.load(Ordering::Relaxed);
                if start != 0 && now_ms().saturating_sub(start) > HANG_SECONDS * 1000 {
                    say_without_allocating(format_args!(
                        "no result after {HANG_SECONDS} s (a hang)"
                    ));
                    std::process::abort();
                }
            })
            .expect("cannot start the fuzz watchdog");
    });
}

/// How long a target runs.
#[derive(Clone, Copy, Debug)]
pub enum Extent {
    /// A fixed number of cases.
    Cases(u64),
    /// Cases until the time is up.
    Time(Duration),
    /// One case (a replay).
    One(u64),
}

/// The settings of this run, from the environment (see the module doc).
pub fn settings(target: &str, fixed_cases: u64) -> (u64, Extent) {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let seconds = var("BITSTACK_FUZZ_SECONDS").map(|s| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or_else(|| panic!("BITSTACK_FUZZ_SECONDS={s} is not a number of seconds"))
    });
    let seed = var("BITSTACK_FUZZ_SEED").map(|s| {
        s.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("BITSTACK_FUZZ_SEED={s} is not a u64"))
    });
    let case = var("BITSTACK_FUZZ_CASE").map(|s| {
        s.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("BITSTACK_FUZZ_CASE={s} is not a case index"))
    });
    let seed = seed.unwrap_or_else(|| match seconds {
        // A new seed per timed run, different for each target.
        Some(_) => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            mix(t ^ name_hash(target))
        }
        // CI: always the same cases.
        None => name_hash(target),
    });
    let extent = match (case, seconds) {
        (Some(i), _) => Extent::One(i),
        (None, Some(s)) => Extent::Time(Duration::from_secs_f64(s)),
        (None, None) => Extent::Cases(fixed_cases),
    };
    (seed, extent)
}

/// SplitMix64's finalizer: seeds of neighbouring cases far apart.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The generator of case `index` of `seed`.
pub fn case_rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(seed ^ mix(index)))
}

/// One target at a time per binary: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds [`SERIAL`] (through [`exclusive`]).
    static HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, no other target of this binary runs.
pub struct Exclusive {
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

/// Runs nothing else of this binary's fuzz targets until the guard is
/// dropped: a target whose setup allocates (a checkpoint made for it) takes
/// it first, so that its setup does not count in another target's cases.
/// [`run`] takes it itself when its thread does not hold it.
pub fn exclusive() -> Exclusive {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| h.set(true));
    Exclusive { _guard: guard }
}

/// What a target's run did.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub cases: u64,
    pub seed: u64,
    /// Largest per-case peak above the bytes live when the case started.
    pub peak: usize,
}

/// Runs `case` over the cases of `target` (see the module doc): each gets
/// its generator and index, must not panic, and must keep its peak heap
/// above what was live when it started within `peak_bound` bytes. Prints
/// the counts at the end; a failure prints the seed and case to replay.
pub fn run(
    target: &'static str,
    fixed_cases: u64,
    peak_bound: usize,
    mut case: impl FnMut(&mut StdRng, u64),
) -> Summary {
    let _serial = (!HELD.with(|h| h.get())).then(exclusive);
    start_watchdog();
    let (seed, extent) = settings(target, fixed_cases);
    TARGET_PTR.store(target.as_ptr() as usize, Ordering::Relaxed);
    TARGET_LEN.store(target.len(), Ordering::Relaxed);
    SEED.store(seed, Ordering::Relaxed);
    let started = Instant::now();
    let mut done = 0u64;
    let mut worst = 0usize;
    let mut index = match extent {
        Extent::One(i) => i,
        _ => 0,
    };
    loop {
        let more = match extent {
            Extent::Cases(n) => index < n,
            Extent::Time(t) => started.elapsed() < t,
            Extent::One(i) => index == i,
        };
        if !more {
            break;
        }
        CASE.store(index, Ordering::Relaxed);
        let mut rng = case_rng(seed, index);
        let base = live_bytes();
        PEAK.store(base, Ordering::Relaxed);
        CASE_START_MS.store(now_ms(), Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| case(&mut rng, index)));
        CASE_START_MS.store(0, Ordering::Relaxed);
        let replay = format!(
            "replay: BITSTACK_FUZZ_SEED={seed} BITSTACK_FUZZ_CASE={index} cargo test --release -p {} --test fuzz {target}",
            env!("CARGO_PKG_NAME")
        );
        if let Err(panic) = outcome {
            eprintln!("fuzz {target}: case {index} of seed {seed} panicked ({replay})");
            resume_unwind(panic);
        }
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        worst = worst.max(peak);
        assert!(
            peak <= peak_bound,
            "fuzz {target}: case {index} of seed {seed} allocated up to {peak} bytes at once, more than its bound of {peak_bound} ({replay})"
        );
        done += 1;
        index += 1;
    }
    println!(
        "fuzz {target}: {done} cases, seed {seed}, largest case peak {:.2} MiB, {:.1} s",
        worst as f64 / MIB as f64,
        started.elapsed().as_secs_f64()
    );
    Summary {
        cases: done,
        seed,
        peak: worst,
    }
}

// ---- Small helpers for the generators -------------------------------------

/// A uniformly chosen element of `items`.
pub fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// An integer that a length field could hold and a parser could trip on:
/// small, near a power of two, near the limits of u32/u64/i64, or random.
pub fn nasty_u64(rng: &mut StdRng, near: u64) -> u64 {
    match rng.random_range(0..10) {
        0 => rng.random_range(0..16),
        1 => near.wrapping_add(rng.random_range(0..8)).wrapping_sub(4),
        2 => (1u64 << rng.random_range(0..64))
            .wrapping_add(rng.random_range(0..3))
            .wrapping_sub(1),
        3 => u64::MAX - rng.random_range(0..4),
        4 => u32::MAX as u64 - rng.random_range(0..4) + rng.random_range(0..8),
        5 => i64::MAX as u64 + rng.random_range(0..3),
        6 => near.wrapping_mul(rng.random_range(2..1000)),
        7 => near / rng.random_range(1..5),
        _ => rng.random(),
    }
}

/// Sets 1 to 8 random bytes of `bytes[range]` to random values or flips one bit.
pub fn flip_bytes(rng: &mut StdRng, bytes: &mut [u8], range: std::ops::Range<usize>) {
    if range.is_empty() {
        return;
    }
    for _ in 0..rng.random_range(1..=8) {
        let i = rng.random_range(range.clone());
        if rng.random_bool(0.5) {
            bytes[i] ^= 1 << rng.random_range(0..8);
        } else {
            bytes[i] = rng.random();
        }
    }
}
