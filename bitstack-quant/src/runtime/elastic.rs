//! The runtime control handle: resize a running BitStack model.
//!
//! A [`BitStackHandle`] owns the open checkpoint, the global block
//! order and the current [`Snapshot`] of the model. A snapshot is an
//! immutable model at one level of the order; forwards take one
//! ([`BitStackHandle::snapshot`]) and run on it from start to end, so a
//! forward never mixes levels across layers however the budget moves.
//!
//! A resize builds the next snapshot next to the current one — shared
//! tensors and blocks are reused, only the stacks that change are new —
//! then swaps a pointer. It never waits for a forward. Blocks that were
//! dropped are freed when the last snapshot holding them is dropped, that
//! is when the last forward that started before the shrink ends; the
//! handle's own reference goes to a background thread, because freeing
//! hundreds of MiB takes far longer than the swap
//! ([`BitStackHandle::wait_released`] waits for it). Grown
//! blocks are read into memory the model owns and checked against the
//! checksums written at compression time before any forward can see them.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use bitstack_quant::runtime::elastic::BitStackHandle;
//! let handle = BitStackHandle::open("smollm2-bitstack".as_ref(), None, &candle_core::Device::Cpu)?;
//! handle.subscribe(|r| eprintln!("resize: level {} → {}", r.from_level, r.to_level));
//! // The KV cache needs 20 MiB: free at least that much, in reverse order.
//! let freed = handle.shrink_by(20 << 20)?;
//! assert!(freed.bytes_freed() >= 20 << 20);
//! // Load is down again: take back what fits in 20 MiB, in order.
//! handle.grow_by(20 << 20)?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use parking_lot::{Condvar, Mutex, RwLock};
use rayon::prelude::*;

use crate::format::budget::Budget;
use crate::format::checkpoint::{Checkpoint, Plan};
use crate::format::order::Geometry;
use crate::format::shard::TensorParallel;
use crate::runtime::linear::LinearWeight;
use crate::runtime::model::{LinearKind, Llama};
use crate::runtime::placement::Placement;
use crate::runtime::stack::{ReadPart, StackPart};

/// Why a resize was refused. A refused resize changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The request would leave less than one block in some linear.
    #[error("a budget of {requested} bytes is below the floor of {floor} bytes (one block in every linear plus the dense parts); nothing was changed")]
    BelowFloor { requested: u64, floor: u64 },
    /// A block to be added could not be read or failed its checks.
    #[error("cannot grow to level {level}; the model stays at level {current}: {source:#}")]
    Grow {
        level: usize,
        current: usize,
        source: anyhow::Error,
    },
}

/// What one resize did: the host hands `bytes_freed` to its KV cache, or
/// knows that `bytes_taken` are now in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    pub from_level: usize,
    pub to_level: usize,
    /// Resident bytes (dense parts and blocks) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub blocks_added: usize,
    pub blocks_dropped: usize,
    /// The budget now in force.
    pub budget: u64,
    /// The snapshot counter after the resize (unchanged when nothing moved).
    pub epoch: u64,
    /// Wall time of the resize, reading included.
    pub elapsed: Duration,
}

impl Resize {
    /// Bytes released (0 when the model grew).
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }

    /// Bytes newly in use (0 when the model shrank).
    pub fn bytes_taken(&self) -> u64 {
        self.bytes_after.saturating_sub(self.bytes_before)
    }
}

impl fmt::Display for Resize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / 1048576.0;
        write!(
            f,
            "level {} → {}, resident {:.2} MiB → {:.2} MiB (+{} −{} blocks) in {:.3} ms",
            self.from_level,
            self.to_level,
            mib(self.bytes_before),
            mib(self.bytes_after),
            self.blocks_added,
            self.blocks_dropped,
            self.elapsed.as_secs_f64() * 1e3
        )
    }
}

/// The model at one level of the order. Immutable: a resize makes a new one.
pub struct Snapshot {
    pub model: Llama,
    /// Blocks of the order resident beyond the floor.
    pub level: usize,
    /// Counts snapshots: every resize that changes the level adds one.
    pub epoch: u64,
}

impl std::ops::Deref for Snapshot {
    type Target = Llama;
    fn deref(&self) -> &Llama {
        &self.model
    }
}

/// A callback that hears every resize that changed the level.
type Subscriber = Arc<dyn Fn(&Resize) + Send + Sync>;

/// Identifies a subscription, to end it with [`BitStackHandle::unsubscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubscriptionId(u64);

struct Shared {
    checkpoint: Checkpoint,
    /// Where grown blocks go (the device's memory on CUDA) and, under
    /// tensor parallelism, which slice of them this rank keeps.
    placement: Placement,
    /// `order.order` as (linear index, block index).
    order: Vec<(usize, usize)>,
    /// Total resident bytes at each level, `0..=order.len()`.
    ladder: Vec<u64>,
    /// See [`BitStackHandle::two_plane_level`].
    two_plane_level: usize,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes resizes.
    resizing: Mutex<()>,
    /// The budget in force; written only by a resize that succeeded.
    budget: AtomicU64,
    subscribers: RwLock<BTreeMap<SubscriptionId, Subscriber>>,
    next_subscriber: AtomicU64,
    release: Release,
}

/// Drops retired snapshots on a background thread.
struct Release {
    queue: Mutex<mpsc::Sender<Arc<Snapshot>>>,
    /// Snapshots sent and not yet dropped.
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl Release {
    fn start(device: &Device) -> Self {
        let device = device.clone();
        let (queue, retired) = mpsc::channel::<Arc<Snapshot>>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = pending.clone();
        // Ends when the last handle, and with it the sender, is dropped.
        let spawned = std::thread::Builder::new()
            .name("bitstack-release".into())
            .spawn(move || {
                bind_to_thread(&device);
                for snapshot in retired {
                    drop(snapshot);
                    give_back_to_driver(&device);
                    let (count, done) = &*counter;
                    *count.lock() -= 1;
                    done.notify_all();
                }
            });
        if let Err(e) = spawned {
            // Without the thread, retired snapshots are dropped in place.
            tracing::warn!(
                "cannot start the release thread ({e}); resizes will free memory inline"
            );
        }
        Self {
            queue: Mutex::new(queue),
            pending,
        }
    }

    fn retire(&self, snapshot: Arc<Snapshot>) {
        *self.pending.0.lock() += 1;
        if let Err(mpsc::SendError(snapshot)) = self.queue.lock().send(snapshot) {
            drop(snapshot);
            *self.pending.0.lock() -= 1;
        }
    }

    fn wait(&self) {
        let (count, done) = &*self.pending;
        let mut count = count.lock();
        while *count > 0 {
            done.wait(&mut count);
        }
    }
}

/// Makes `device`'s CUDA context current on this thread. A thread that
/// drops device buffers needs it: the driver frees them in the current
/// context, and a thread spawned by us has none (the free fails, and the
/// context reports the error to every later call, on any thread).
fn bind_to_thread(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        if let Err(e) = d.cuda_stream().context().bind_to_thread() {
            tracing::warn!("cannot make the CUDA context current on the release thread: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Returns the device memory that dropped blocks left in `device`'s
/// memory pool to the driver. CUDA frees stream-ordered allocations into
/// the pool, which keeps them for the next allocation on this process's
/// stream: the KV cache of another engine, or one that asks the driver
/// how much is free, would never see them.
fn give_back_to_driver(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        if let Err(e) = bitstack_kernels::cuda::memory::trim_memory_pool(d) {
            tracing::warn!("cannot give freed BitStack blocks back to the CUDA driver: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The runtime control handle of a loaded BitStack model.
///
/// `Clone + Send + Sync`: clones share one model. Resizes are serialized;
/// forwards take [`BitStackHandle::snapshot`] and never wait for a resize.
#[derive(Clone)]
pub struct BitStackHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for BitStackHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BitStackHandle")
            .field("level", &self.level())
            .field("resident_bytes", &self.resident_bytes())
            .field("budget", &self.budget())
            .finish()
    }
}

impl BitStackHandle {
    /// Opens the BitStack checkpoint in `dir` on `device` at the highest
    /// level within `budget` bytes (all blocks when `None`).
    pub fn open(dir: &Path, budget: Option<u64>, device: &Device) -> anyhow::Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let plan = match budget {
            None => checkpoint.plan_all(),
            Some(bytes) => {
                let floor = checkpoint.ladder()[0].total_bytes as u64;
                if bytes < floor {
                    return Err(ResizeError::BelowFloor {
                        requested: bytes,
                        floor,
                    }
                    .into());
                }
                checkpoint.plan(Budget::Bytes(bytes))?
            }
        };
        let max = checkpoint.plan_all().rung.total_bytes as u64;
        let placement = Placement::of(device);
        Self::start(
            checkpoint,
            &plan,
            budget.unwrap_or(max).min(max),
            device,
            placement,
        )
    }

    /// Runs `checkpoint` on `device` at the rung `plan` chose (see
    /// [`Checkpoint::plan`]); the budget in force is that rung's bytes.
    pub fn from_checkpoint(
        checkpoint: Checkpoint,
        plan: &Plan,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let budget = plan.rung.total_bytes as u64;
        Self::start(checkpoint, plan, budget, device, Placement::of(device))
    }

    /// Runs `checkpoint` on `device` at the rung `plan` chose, its linears
    /// placed by `placement`: under tensor parallelism this rank's slices,
    /// with every figure (ladder, budget, resident bytes) this rank's.
    /// Every rank at one level holds its slice of the model one process
    /// runs at that level.
    pub fn from_checkpoint_placed(
        checkpoint: Checkpoint,
        plan: &Plan,
        device: &Device,
        placement: Placement,
    ) -> anyhow::Result<Self> {
        placement.check(checkpoint.config())?;
        let ladder = checkpoint
            .order()
            .ladder(&placement.geometry(checkpoint.geometry()));
        let budget = ladder[plan.level()].total_bytes as u64;
        Self::start(checkpoint, plan, budget, device, placement)
    }

    fn start(
        checkpoint: Checkpoint,
        plan: &Plan,
        budget: u64,
        device: &Device,
        placement: Placement,
    ) -> anyhow::Result<Self> {
        let geometry = &placement.geometry(checkpoint.geometry());
        let index = geometry.index();
        let order_ix: Vec<(usize, usize)> = checkpoint
            .order()
            .order
            .iter()
            .map(|(name, b)| (index[name.as_str()], *b))
            .collect();
        let ladder: Vec<u64> = checkpoint
            .order()
            .ladder(geometry)
            .iter()
            .map(|r| r.total_bytes as u64)
            .collect();
        // The floor first, then the levels above it in order, as a grow
        // reads them (a device's memory is then taken in ladder order).
        let floor = checkpoint.order().counts_at(checkpoint.geometry(), 0);
        let model = Llama::from_store(
            checkpoint.config().clone(),
            checkpoint.store(),
            &floor,
            device,
            &placement,
        )?;
        let snapshot = Snapshot {
            model,
            level: 0,
            epoch: 0,
        };
        let two_plane_level = checkpoint.two_plane_level();
        let handle = Self {
            shared: Arc::new(Shared {
                two_plane_level,
                checkpoint,
                placement,
                order: order_ix,
                ladder,
                current: RwLock::new(Arc::new(snapshot)),
                resizing: Mutex::new(()),
                budget: AtomicU64::new(budget),
                subscribers: RwLock::new(BTreeMap::new()),
                next_subscriber: AtomicU64::new(0),
                release: Release::start(device),
            }),
        };
        if plan.level() > 0 {
            let floor = handle.snapshot();
            let grown = handle.grown(&floor, plan.level())?;
            *handle.shared.current.write() = Arc::new(Snapshot { epoch: 0, ..grown });
        }
        Ok(handle)
    }

    /// The current model. Hold it for one forward (or one decode step): it
    /// keeps its blocks alive, whatever resizes happen meanwhile.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.read().clone()
    }

    /// Resident bytes of the current snapshot: dense parts and blocks.
    pub fn resident_bytes(&self) -> u64 {
        self.shared.ladder[self.level()]
    }

    /// Bytes at level 0: one block in every linear plus the dense parts.
    pub fn floor_bytes(&self) -> u64 {
        self.shared.ladder[0]
    }

    /// Bytes with every stored block resident.
    pub fn max_bytes(&self) -> u64 {
        *self.shared.ladder.last().expect("the ladder has a floor")
    }

    /// The budget in force: the last one set, or where the last
    /// `shrink_by`/`grow_by` aimed. `resident_bytes() <= budget()` always.
    pub fn budget(&self) -> u64 {
        self.shared.budget.load(Ordering::Acquire)
    }

    /// Position in the global order: blocks resident beyond the floor.
    pub fn level(&self) -> usize {
        self.shared.current.read().level
    }

    /// Number of levels above the floor (the level with every block).
    pub fn max_level(&self) -> usize {
        self.shared.order.len()
    }

    /// The lowest level where no linear holds a grid plane alone (see
    /// [`Checkpoint::two_plane_level`]): shrinking below it costs far more
    /// quality per byte than above (SmolLM2's default checkpoint: 2.30 bits
    /// per weight; at 2.0 bits its perplexity is about 1e5, against 90 at
    /// 2.5), so an engine making room for its KV cache can treat
    /// `bytes_at_level(two_plane_level())` as a soft floor.
    pub fn two_plane_level(&self) -> usize {
        self.shared.two_plane_level
    }

    /// Resident bytes at `level` (clamped to the top level).
    pub fn bytes_at_level(&self, level: usize) -> u64 {
        self.shared.ladder[level.min(self.max_level())]
    }

    /// The tensor-parallel rank whose slices this handle holds (`None`:
    /// whole linears).
    pub fn tensor_parallel(&self) -> Option<TensorParallel> {
        self.shared.placement.tensor_parallel
    }

    /// The checkpoint's linears and the bytes outside them.
    pub fn geometry(&self) -> &Geometry {
        self.shared.checkpoint.geometry()
    }

    /// The checkpoint the handle reads its blocks from.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.shared.checkpoint
    }

    /// Moves to the highest level whose resident bytes fit `budget`. A budget
    /// above [`max_bytes`](Self::max_bytes) loads everything (the budget is
    /// clamped to it); one below [`floor_bytes`](Self::floor_bytes) is an
    /// error and changes nothing.
    pub fn set_budget(&self, budget: u64) -> Result<Resize, ResizeError> {
        self.resize(|_| budget)
    }

    /// Frees at least `bytes` by dropping blocks in reverse order. An error,
    /// changing nothing, if that would go below the floor.
    pub fn shrink_by(&self, bytes: u64) -> Result<Resize, ResizeError> {
        self.resize(|resident| resident.saturating_sub(bytes))
    }

    /// Adds blocks in order while they fit in `bytes` more; stops at the top
    /// level (what was taken is in the returned [`Resize`]).
    pub fn grow_by(&self, bytes: u64) -> Result<Resize, ResizeError> {
        self.resize(|resident| resident.saturating_add(bytes))
    }

    /// Moves to an exact level of the order (clamped to the top level).
    pub fn set_level(&self, level: usize) -> Result<Resize, ResizeError> {
        let bytes = self.bytes_at_level(level);
        self.resize(|_| bytes)
    }

    /// Blocks until the blocks dropped by earlier resizes are freed, except
    /// those a forward still holds (they go when it ends).
    pub fn wait_released(&self) {
        self.shared.release.wait();
    }

    /// Calls `f` after every resize that changes the level, in the thread
    /// that resized, after the new snapshot is in place and with no lock
    /// held: `f` may call back into the handle (a resize from inside `f`
    /// notifies again, so guard against endless recursion). Resizes from
    /// several threads may be heard out of order; [`Resize::epoch`] orders
    /// them.
    pub fn subscribe(&self, f: impl Fn(&Resize) + Send + Sync + 'static) -> SubscriptionId {
        let id = SubscriptionId(self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed));
        self.shared.subscribers.write().insert(id, Arc::new(f));
        id
    }

    /// Ends a subscription; `false` if it was already gone.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.shared.subscribers.write().remove(&id).is_some()
    }

    /// One resize: `target` maps the current resident bytes to the new budget.
    fn resize(&self, target: impl FnOnce(u64) -> u64) -> Result<Resize, ResizeError> {
        let start = Instant::now();
        let shared = &*self.shared;
        let serialized = shared.resizing.lock();
        let current = self.snapshot();
        let before = shared.ladder[current.level];
        let budget = target(before).min(self.max_bytes());
        let level = level_within(&shared.ladder, budget).ok_or(ResizeError::BelowFloor {
            requested: budget,
            floor: shared.ladder[0],
        })?;
        let mut resize = Resize {
            from_level: current.level,
            to_level: level,
            bytes_before: before,
            bytes_after: shared.ladder[level],
            blocks_added: level.saturating_sub(current.level),
            blocks_dropped: current.level.saturating_sub(level),
            budget,
            epoch: current.epoch,
            elapsed: Duration::ZERO,
        };
        if level == current.level {
            shared.budget.store(budget, Ordering::Release);
            resize.elapsed = start.elapsed();
            return Ok(resize);
        }
        let next = if level > current.level {
            self.grown(&current, level)
                .map_err(|source| ResizeError::Grow {
                    level,
                    current: current.level,
                    source,
                })?
        } else {
            self.shrunk(&current, level)
        };
        resize.epoch = next.epoch;
        let previous = std::mem::replace(&mut *shared.current.write(), Arc::new(next));
        shared.budget.store(budget, Ordering::Release);
        drop(serialized);
        // The old snapshot's dropped blocks are freed by the release thread,
        // or by the last forward still holding it.
        drop(current);
        shared.release.retire(previous);
        resize.elapsed = start.elapsed();
        let subscribers: Vec<Subscriber> = shared.subscribers.read().values().cloned().collect();
        for s in subscribers {
            s(&resize);
        }
        Ok(resize)
    }

    /// `current` with blocks `order[current.level..level]` read, verified and appended.
    ///
    /// Blocks are read in parallel, a batch at a time (a batch's host
    /// copies live until it is placed), and placed in order: on a device,
    /// a level's blocks take memory after those of every lower level.
    fn grown(&self, current: &Snapshot, level: usize) -> anyhow::Result<Snapshot> {
        /// Blocks read before they are placed.
        const BATCH: usize = 64;
        let shared = &*self.shared;
        let wanted = &shared.order[current.level..level];
        let mut blocks: Vec<StackPart> = Vec::with_capacity(wanted.len());
        for batch in wanted.chunks(BATCH) {
            let read: Vec<ReadPart> = batch
                .par_iter()
                .map(|&(li, b)| {
                    let slot = &shared.checkpoint.geometry().linears[li];
                    let shard = shared
                        .placement
                        .shard(LinearKind::ALL[li % LinearKind::ALL.len()]);
                    ReadPart::read(shared.checkpoint.store(), slot, b, shard)
                        .with_context(|| format!("reading block {b} of {}", slot.name))
                })
                .collect::<anyhow::Result<_>>()?;
            for (&(li, b), part) in batch.iter().zip(read) {
                let name = &shared.checkpoint.geometry().linears[li].name;
                blocks.push(
                    part.place(&shared.placement.residence)
                        .with_context(|| format!("uploading block {b} of {name}"))?,
                );
            }
        }
        let mut added: BTreeMap<usize, Vec<StackPart>> = BTreeMap::new();
        for (&(li, _), block) in wanted.iter().zip(blocks) {
            added.entry(li).or_default().push(block);
        }
        let mut model = current.model.clone();
        for (li, more) in added {
            let slot = model_slot(&mut model, li);
            let LinearWeight::BitStack(stack) = &slot.weight else {
                anyhow::bail!("internal: linear {li} is not a BitStack linear");
            };
            slot.weight = LinearWeight::BitStack(Arc::new(stack.extended(more)?));
        }
        Ok(Snapshot {
            model,
            level,
            epoch: current.epoch + 1,
        })
    }

    /// `current` without blocks `order[level..current.level]`.
    fn shrunk(&self, current: &Snapshot, level: usize) -> Snapshot {
        let mut dropped: BTreeMap<usize, usize> = BTreeMap::new();
        for &(li, _) in &self.shared.order[level..current.level] {
            *dropped.entry(li).or_default() += 1;
        }
        let mut model = current.model.clone();
        for (li, count) in dropped {
            let slot = model_slot(&mut model, li);
            if let LinearWeight::BitStack(stack) = &slot.weight {
                let keep = stack.len() - count;
                slot.weight = LinearWeight::BitStack(Arc::new(stack.prefix(keep)));
            }
        }
        Snapshot {
            model,
            level,
            epoch: current.epoch + 1,
        }
    }
}

/// The linear with geometry index `li` (layer-major, kinds in [`LinearKind::ALL`] order).
fn model_slot(model: &mut Llama, li: usize) -> &mut crate::runtime::linear::Linear {
    let kinds = LinearKind::ALL.len();
    model.layers[li / kinds].linear_mut(LinearKind::ALL[li % kinds])
}

/// The highest level whose bytes fit `budget`; `None` below the floor.
fn level_within(ladder: &[u64], budget: u64) -> Option<usize> {
    ladder.partition_point(|&b| b <= budget).checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_is_shared_across_threads() {
        fn check<T: Clone + Send + Sync>() {}
        check::<BitStackHandle>();
        check::<Arc<Snapshot>>();
    }

    #[test]
    fn level_within_picks_the_highest_fitting_rung() {
        let ladder = [100, 150, 150, 210];
        assert_eq!(level_within(&ladder, 99), None);
        assert_eq!(level_within(&ladder, 0), None);
        assert_eq!(level_within(&ladder, 100), Some(0));
        assert_eq!(level_within(&ladder, 149), Some(0));
        assert_eq!(level_within(&ladder, 150), Some(2));
        assert_eq!(level_within(&ladder, 209), Some(2));
        assert_eq!(level_within(&ladder, u64::MAX), Some(3));
    }
}
