//! BitStack for mistral.rs.
//!
//! A BitStack checkpoint's `config.json` says `"quant_method": "bitstack"`.
//! With the upstream patches of `integration/upstream/`, mistral.rs hands
//! every linear of such a model to the factory registered under that name;
//! [`register`] registers one over a [`BitStackHandle`], so all linears of
//! the mistral.rs model run on the handle's current snapshot and resize
//! together. With a memory budget for weights plus KV cache, the handle is
//! also registered with mistral.rs's weight arbiter, which shrinks the
//! weights before the KV cache would overflow the budget and grows them
//! back when it empties.

pub mod guard;
pub mod linear;
pub mod server;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context};
use bitstack_quant::format::shard::{Split, TensorParallel};
use bitstack_quant::runtime::placement::Placement;
use bitstack_quant::{BitStackHandle, Budget, Checkpoint, ResizeError, QUANT_METHOD};
use candle_core::{DType, Device};
use mistralrs_core::weight_arbiter::{self, ElasticWeights};
use mistralrs_quant::{
    ExternalParallel, ExternalQuantFactory, ExternalTp, QuantMethod, ShardedVarBuilder,
};

pub use linear::{BitStackLinear, LevelSync, LinearSite, StepSnapshot};

/// Builds mistral.rs linears over one [`BitStackHandle`].
pub struct BitStackFactory {
    handle: BitStackHandle,
    step: StepSnapshot,
    dtype: DType,
}

impl BitStackFactory {
    /// Linears made by this factory run on `step`'s pinned snapshot while
    /// an engine step holds one, else on the handle's current one.
    pub fn new(handle: BitStackHandle, step: StepSnapshot, dtype: DType) -> Self {
        Self {
            handle,
            step,
            dtype,
        }
    }
}

impl ExternalQuantFactory for BitStackFactory {
    fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        _config: &serde_json::Value,
        vb: ShardedVarBuilder,
    ) -> candle_core::Result<Arc<dyn QuantMethod>> {
        let prefix = vb.prefix();
        match LinearSite::from_prefix(&prefix) {
            Some(site) => Ok(Arc::new(BitStackLinear::new(
                self.handle.clone(),
                self.step.clone(),
                site,
                (in_dim, out_dim),
                self.dtype,
                bias,
            )?)),
            // BitStack stacks the seven projections of each decoder layer;
            // anything else (an untied lm_head) is stored dense.
            None => {
                let weight = vb.get((out_dim, in_dim), "weight")?;
                let bias = if bias {
                    Some(vb.get(out_dim, "bias")?)
                } else {
                    None
                };
                let linear = candle_nn::Linear::new(weight, bias);
                Ok(Arc::new(
                    <mistralrs_quant::UnquantLinear as QuantMethod>::new(
                        mistralrs_quant::QuantMethodConfig::Unquantized(linear),
                    )?,
                ))
            }
        }
    }

    /// This rank's part of a linear under mistral.rs's tensor parallelism:
    /// the slices of the handle's stacks that
    /// [`bitstack_quant::format::shard`] cuts, which must be the ones
    /// mistral.rs asks for (q, k, v, gate, up split by output, o and down by
    /// input; the handle was opened for this rank by [`register_rank`]).
    ///
    /// The first linear of the model (layer 0's q) also keeps every rank at
    /// rank 0's level: at each forward it broadcasts rank 0's level through
    /// mistral.rs's all-reduce and pins that level's snapshot for the step
    /// on every rank (see [`LevelSync`]).
    fn tensor_parallel_linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        config: &serde_json::Value,
        vb: ShardedVarBuilder,
        tp: &ExternalTp,
    ) -> candle_core::Result<Arc<dyn QuantMethod>> {
        let prefix = vb.prefix();
        let (rank, world) = (tp.comm.rank(), tp.comm.world_size());
        let held = self.handle.tensor_parallel();
        let held_world = held.map_or(1, |t| t.world());
        if world != held_world || held.is_some_and(|t| t.rank() != rank) {
            candle_core::bail!(
                "bitstack: {prefix}: mistral.rs runs rank {rank} of {world}, but the BitStack checkpoint was opened for rank {} of {held_world}",
                held.map_or(0, |t| t.rank())
            );
        }
        let (dim, parts, part) = match tp.shard {
            mistralrs_quant::Shard::Simple {
                dim,
                rank,
                world_size,
            } => (dim, world_size, rank),
            other => candle_core::bail!(
                "bitstack: {prefix}: mistral.rs asks for the slice {other:?}, which BitStack cannot cut (replicated key/value heads are not supported)"
            ),
        };
        if parts == 1 && world == 1 {
            return self.linear(in_dim, out_dim, false, config, vb);
        }
        let Some(site) = LinearSite::from_prefix(&prefix) else {
            candle_core::bail!(
                "bitstack: {prefix} is not a decoder linear and cannot be split over ranks"
            );
        };
        let want = match Split::of(site.kind) {
            Split::Rows => (ExternalParallel::Column, 0),
            Split::Columns => (ExternalParallel::Row, 1),
        };
        if (tp.kind, dim) != want || (parts, part) != (world, rank) {
            candle_core::bail!(
                "bitstack: {prefix}: mistral.rs asks for part {part} of {parts} along dimension {dim} ({:?}); BitStack holds part {rank} of {world} along dimension {} ({:?})",
                tp.kind,
                want.1,
                want.0
            );
        }
        let (local_in, local_out) = match tp.kind {
            ExternalParallel::Column => (in_dim, out_dim / world),
            ExternalParallel::Row => (in_dim / world, out_dim),
        };
        // The parallel layer adds its part of the bias (column) or the
        // whole bias after the ranks' sum (row).
        let linear = BitStackLinear::new(
            self.handle.clone(),
            self.step.clone(),
            site,
            (local_in, local_out),
            self.dtype,
            false,
        )?;
        let first = site.layer == 0 && site.kind == bitstack_quant::LinearKind::Q;
        Ok(Arc::new(if first {
            linear.with_level_sync(LevelSync::new(&tp.comm)?)
        } else {
            linear
        }))
    }

    /// How many 16-bit weights one stored weight stands for, for mistral.rs's
    /// memory estimates: 16 over the bits per weight of the current level.
    fn pack_factor(&self, _config: &serde_json::Value, _dtype: DType) -> usize {
        let geometry = self.handle.geometry();
        let bits = bitstack_quant::bits_per_weight(
            self.handle.resident_bytes() as usize,
            geometry.parameters.max(1),
        );
        (16.0 / bits.max(1e-3)).floor().max(1.0) as usize
    }
}

/// A [`BitStackHandle`] as weights the mistral.rs arbiter may resize, and
/// whose snapshot it pins for each engine step.
pub struct ElasticBitStack {
    handle: BitStackHandle,
    step: StepSnapshot,
}

impl ElasticBitStack {
    pub fn new(handle: BitStackHandle, step: StepSnapshot) -> Self {
        Self { handle, step }
    }
}

impl ElasticWeights for ElasticBitStack {
    fn name(&self) -> String {
        format!(
            "bitstack (level {}/{})",
            self.handle.level(),
            self.handle.max_level()
        )
    }

    fn resident_bytes(&self) -> usize {
        self.handle.resident_bytes() as usize
    }

    fn floor_bytes(&self) -> usize {
        self.handle.floor_bytes() as usize
    }

    fn max_bytes(&self) -> usize {
        self.handle.max_bytes() as usize
    }

    fn shrink_by(&self, bytes: usize) -> usize {
        let result = match self.handle.shrink_by(bytes as u64) {
            // Not that much above the floor: go down to it.
            Err(ResizeError::BelowFloor { .. }) => self.handle.set_level(0),
            other => other,
        };
        // What this resize freed, not a difference of two readings that
        // another thread's resize may fall between.
        match result {
            Ok(resize) => resize.bytes_freed() as usize,
            Err(e) => {
                tracing::error!("bitstack: shrink by {bytes} bytes failed: {e}");
                0
            }
        }
    }

    fn grow_by(&self, bytes: usize) -> usize {
        match self.handle.grow_by(bytes as u64) {
            Ok(resize) => resize.bytes_taken() as usize,
            Err(e) => {
                tracing::error!("bitstack: grow by {bytes} bytes failed: {e}");
                0
            }
        }
    }

    fn begin_step(&self) {
        self.step.pin(&self.handle);
    }

    fn end_step(&self) {
        self.step.release();
    }
}

/// The backend [`register`] gave mistral.rs's weight arbiter last.
static REGISTERED: Mutex<Option<Arc<dyn ElasticWeights>>> = Mutex::new(None);

/// What [`register`] set up.
pub struct Registration {
    pub handle: BitStackHandle,
    /// The dtype the mistral.rs model must run in: the one the factory's
    /// layers answer in.
    pub dtype: DType,
    /// The budget for weights plus KV cache, when elastic.
    pub memory_budget: Option<u64>,
}

/// Opens the BitStack checkpoint in `dir` within `weight_budget` (all blocks
/// when `None`) and registers it with mistral.rs: as the `bitstack`
/// quantization method and, with a `memory_budget` (weights plus KV cache,
/// in bytes or a percent of the 16-bit model), as elastic weights.
///
/// One process running the whole model; see [`register_rank`] for one rank
/// of mistral.rs's tensor parallelism.
///
/// `dtype` is the one the mistral.rs model will run in; `None` picks the
/// stored type of the checkpoint's dense parts ([`model_dtype`]), so that
/// mistral.rs holds its embeddings, norms and lm_head as stored — 16 bits
/// for a 16-bit checkpoint, as the handle's byte counts assume.
pub fn register(
    dir: &Path,
    weight_budget: Option<Budget>,
    memory_budget: Option<Budget>,
    device: &Device,
    dtype: Option<DType>,
) -> anyhow::Result<Registration> {
    register_rank(dir, weight_budget, memory_budget, device, dtype, None)
}

/// [`register`] for rank `tensor_parallel` of mistral.rs's tensor
/// parallelism (`None`: the whole model): the handle holds this rank's
/// slice of every linear, and every figure (ladder, budgets, resident
/// bytes) is this rank's. The budgets select levels of the one global
/// order, the same on every rank; rank 0 decides the level (its arbiter
/// gets the memory budget) and the other ranks follow it at each forward.
pub fn register_rank(
    dir: &Path,
    weight_budget: Option<Budget>,
    memory_budget: Option<Budget>,
    device: &Device,
    dtype: Option<DType>,
    tensor_parallel: Option<TensorParallel>,
) -> anyhow::Result<Registration> {
    let checkpoint = Checkpoint::open(dir).map_err(|e| {
        // Say what to do about a model of another kind: mistral.rs users
        // meet it when they pick `--quant bitstack` for a plain model.
        let method = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .map(|config| {
                config
                    .pointer("/quantization_config/quant_method")
                    .and_then(|m| m.as_str())
                    .unwrap_or("(none)")
                    .to_string()
            });
        match method {
            Some(m) if m != QUANT_METHOD => anyhow::anyhow!(
                "{} is not a BitStack checkpoint: its config.json has quant_method {m:?}, not \"{QUANT_METHOD}\" (make one with `bitstack compress`)",
                dir.display()
            ),
            _ => e.context(format!("opening the BitStack checkpoint in {}", dir.display())),
        }
    })?;
    let dtype = dtype.unwrap_or_else(|| model_dtype(&checkpoint));
    let plan = match weight_budget {
        Some(b) => checkpoint.plan(b)?,
        None => checkpoint.plan_all(),
    };
    // mistral.rs holds the embeddings, norms and head; the handle holds
    // the linears only, so they are not held twice.
    let mut placement = Placement::of(device).linears_only();
    if let Some(tp) = tensor_parallel {
        placement = placement.with_tensor_parallel(tp);
    }
    let handle = BitStackHandle::from_checkpoint_placed(checkpoint, &plan, device, placement)
        .with_context(|| format!("loading the BitStack checkpoint in {}", dir.display()))?;
    let memory_budget = match memory_budget {
        None => None,
        Some(b) => Some(b.total_bytes(handle.geometry().parameters).with_context(|| {
            format!("--memory-budget {b} counts weights and KV cache together: give bytes (e.g. 900MiB) or a percent")
        })?),
    };
    if let Some(budget) = memory_budget {
        if budget < handle.floor_bytes() {
            bail!(
                "--memory-budget {budget} bytes is below the weights' floor of {} bytes ({:.1} MiB): nothing would be left for the KV cache",
                handle.floor_bytes(),
                handle.floor_bytes() as f64 / 1048576.0
            );
        }
    }
    let step = StepSnapshot::default();
    mistralrs_quant::register_quant_method(
        QUANT_METHOD,
        Arc::new(BitStackFactory::new(handle.clone(), step.clone(), dtype)),
    )?;
    handle.subscribe(|resize| tracing::info!("bitstack resize: {resize}"));
    // Registered even without a budget: the engine then only brackets its
    // steps, so that a resize made from another thread (a control handle in
    // the host) never lands in the middle of a forward.
    // The factory registered above replaced any earlier one; so does this
    // backend, so that an earlier model's handle is neither pinned nor resized.
    let elastic: Arc<dyn ElasticWeights> = Arc::new(ElasticBitStack::new(handle.clone(), step));
    {
        let mut registered = REGISTERED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(earlier) = registered.replace(elastic.clone()) {
            weight_arbiter::unregister_elastic_weights(&earlier);
        }
    }
    weight_arbiter::register_elastic_weights(elastic);
    let follower = tensor_parallel.is_some_and(|tp| tp.rank() != 0);
    match memory_budget {
        Some(_) if follower => {
            tracing::info!("bitstack: rank 0 decides the level; this rank follows it at each step")
        }
        Some(budget) => weight_arbiter::set_memory_budget(Some(budget as usize))?,
        None => {}
    }
    Ok(Registration {
        handle,
        dtype,
        memory_budget,
    })
}

/// The dtype to run a mistral.rs model of `checkpoint` in: its dense parts'
/// stored type. mistral.rs converts what it loads to the model's dtype, so
/// any other would hold them in another size than the ladder counts.
pub fn model_dtype(checkpoint: &Checkpoint) -> DType {
    checkpoint.dense_dtype().candle()
}
