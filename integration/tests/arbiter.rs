//! The weight arbiter of the mistral.rs patch, driven directly with trivial
//! elastic backends (no model): it shrinks and grows by what backends
//! report, holds no lock while they run (a backend may call back into it),
//! survives a panicking backend, refuses a budget below the floor, and
//! brackets steps however they end. Plus the registry patch with a trivial
//! quantization method.
//!
//! The arbiter is process-global, so the tests take turns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mistralrs_core::weight_arbiter::{
    self, begin_step, clear_elastic_weights, rebalance, register_elastic_weights,
    set_memory_budget, ElasticWeights, KvDemand, HEADROOM_TOKENS,
};

static TURN: Mutex<()> = Mutex::new(());

/// One test at a time, starting from an empty arbiter.
fn turn() -> MutexGuard<'static, ()> {
    let guard = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    clear_elastic_weights();
    set_memory_budget(None).unwrap();
    guard
}

/// Weights of `floor..=max` bytes in steps of `step`, with what happens
/// inside a resize left to `during`.
struct Steps {
    resident: AtomicUsize,
    floor: usize,
    max: usize,
    step: usize,
    during: Box<dyn Fn() + Send + Sync>,
    begun: AtomicUsize,
    ended: AtomicUsize,
}

impl Steps {
    fn new(resident: usize, floor: usize, max: usize, step: usize) -> Self {
        Self {
            resident: AtomicUsize::new(resident),
            floor,
            max,
            step,
            during: Box::new(|| {}),
            begun: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
        }
    }

    fn resident(&self) -> usize {
        self.resident.load(Ordering::SeqCst)
    }
}

impl ElasticWeights for Steps {
    fn name(&self) -> String {
        "steps".into()
    }
    fn resident_bytes(&self) -> usize {
        self.resident()
    }
    fn floor_bytes(&self) -> usize {
        self.floor
    }
    fn max_bytes(&self) -> usize {
        self.max
    }
    fn shrink_by(&self, bytes: usize) -> usize {
        (self.during)();
        let now = self.resident();
        // Whole steps, at least `bytes`, not below the floor.
        let steps = bytes.div_ceil(self.step);
        let to = now.saturating_sub(steps * self.step).max(self.floor);
        self.resident.store(to, Ordering::SeqCst);
        now - to
    }
    fn grow_by(&self, bytes: usize) -> usize {
        (self.during)();
        let now = self.resident();
        let to = (now + bytes / self.step * self.step).min(self.max);
        self.resident.store(to, Ordering::SeqCst);
        to - now
    }
    fn begin_step(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
    }
    fn end_step(&self) {
        self.ended.fetch_add(1, Ordering::SeqCst);
    }
}

fn demand(bytes: usize, per_token: usize, sequences: usize) -> KvDemand {
    KvDemand {
        bytes,
        bytes_per_token: per_token,
        sequences,
    }
}

/// Runs `f` on another thread and fails if it does not end within 10 s
/// (a deadlock would otherwise hang the test run).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the arbiter did not return within 10 s (deadlock?)")
}

#[test]
fn shrinks_for_the_kv_cache_and_grows_back_into_room_left_after_the_headroom() {
    let _turn = turn();
    let weights = Arc::new(Steps::new(1000, 200, 1000, 10));
    register_elastic_weights(weights.clone());
    set_memory_budget(Some(1500)).unwrap();

    // 1000 of weights and 400 of KV fit in 1500: nothing moves.
    let r = rebalance(demand(400, 1, 1));
    assert_eq!((r.freed, r.taken, r.over), (0, 0, 0));
    assert_eq!(weights.resident(), 1000);

    // 900 of KV: 400 over, plus the headroom of 2 sequences.
    let r = rebalance(demand(900, 1, 2));
    let need = 1000 + 900 + 2 * HEADROOM_TOKENS - 1500;
    assert!(r.freed >= need && r.freed < need + 10, "{r:?}");
    assert_eq!(weights.resident(), 1000 - r.freed);
    assert_eq!(r.over, 0);

    // Far more KV than the floor leaves room for: at the floor, and `over` says by how much.
    let r = rebalance(demand(1400, 1, 1));
    assert_eq!(weights.resident(), 200);
    assert_eq!(r.over, 200 + 1400 - 1500);

    // Idle: the weights take back all the room they can.
    let r = rebalance(demand(0, 0, 0));
    assert_eq!(weights.resident(), 1000);
    assert_eq!(r.taken, 800);
}

#[test]
fn a_budget_below_the_floor_is_refused_and_changes_nothing() {
    let _turn = turn();
    register_elastic_weights(Arc::new(Steps::new(1000, 300, 1000, 10)));
    register_elastic_weights(Arc::new(Steps::new(500, 200, 500, 10)));
    set_memory_budget(Some(4000)).unwrap();
    let e = set_memory_budget(Some(499)).unwrap_err();
    assert_eq!((e.budget, e.floor), (499, 500));
    assert!(e.to_string().contains("below"), "{e}");
    assert_eq!(weight_arbiter::memory_budget(), Some(4000));
    set_memory_budget(Some(500)).unwrap();
}

#[test]
fn backends_may_call_back_into_the_arbiter_while_it_runs_them() {
    let _turn = turn();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut weights = Steps::new(1000, 100, 1000, 10);
    weights.during = Box::new(move || {
        // Everything a subscriber of a resize might do.
        let budget = weight_arbiter::memory_budget();
        set_memory_budget(budget).unwrap();
        let nested = rebalance(demand(0, 0, 0));
        assert_eq!(nested, Default::default(), "a nested rebalance is skipped");
        register_elastic_weights(Arc::new(Steps::new(0, 0, 0, 1)));
        seen.fetch_add(1, Ordering::SeqCst);
    });
    let weights = Arc::new(weights);
    register_elastic_weights(weights.clone());
    set_memory_budget(Some(1200)).unwrap();
    let r = within_10s(|| rebalance(demand(600, 1, 1)));
    assert!(r.freed > 0, "{r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // And from another thread while nothing runs: not blocked by the last call.
    let r = within_10s(|| rebalance(demand(0, 0, 0)));
    assert!(r.taken > 0, "{r:?}");
}

#[test]
fn a_panicking_backend_does_not_break_later_steps() {
    let _turn = turn();
    let mut bad = Steps::new(1000, 100, 1000, 10);
    bad.during = Box::new(|| panic!("backend failed"));
    let bad: Arc<dyn ElasticWeights> = Arc::new(bad);
    register_elastic_weights(bad.clone());
    set_memory_budget(Some(1200)).unwrap();
    let panicked = catch_unwind(AssertUnwindSafe(|| rebalance(demand(600, 1, 1))));
    assert!(panicked.is_err());

    // The engine restarts; the faulty backend goes, a good one comes.
    assert!(weight_arbiter::unregister_elastic_weights(&bad));
    let good = Arc::new(Steps::new(1000, 100, 1000, 10));
    register_elastic_weights(good.clone());
    let r = within_10s(|| rebalance(demand(600, 1, 1)));
    assert!(r.freed > 0, "{r:?}");
    assert!(good.resident() < 1000);
    // A panic inside a step still ends the step.
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let _step = begin_step();
        panic!("forward failed");
    }));
    assert!(panicked.is_err());
    assert_eq!(good.begun.load(Ordering::SeqCst), 1);
    assert_eq!(good.ended.load(Ordering::SeqCst), 1);
}

#[test]
fn steps_are_bracketed_even_without_a_budget() {
    let _turn = turn();
    let weights = Arc::new(Steps::new(1000, 100, 1000, 10));
    register_elastic_weights(weights.clone());
    for _ in 0..3 {
        let step = begin_step();
        assert_eq!(
            weights.begun.load(Ordering::SeqCst),
            weights.ended.load(Ordering::SeqCst) + 1
        );
        drop(step);
    }
    assert_eq!(weights.ended.load(Ordering::SeqCst), 3);
    // No budget: a rebalance moves nothing.
    assert_eq!(rebalance(demand(10_000, 1, 4)), Default::default());
    assert_eq!(weights.resident(), 1000);
}
