//! `BitStackLinear`: one linear of a BitStack checkpoint as a mistral.rs
//! `QuantMethod`.
//!
//! It holds no weights of its own: each forward runs the linear of the
//! snapshot pinned for the engine step ([`StepSnapshot`]), or of the
//! handle's current one outside a step, so a resize through the
//! [`BitStackHandle`] reaches every layer of the mistral.rs model at once
//! (at the next step), and the blocks a shrink drops are freed when the last
//! step using them ends.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, PoisonError, RwLock};

use bitstack_quant::runtime::elastic::Snapshot;
use bitstack_quant::runtime::linear::LinearWeight;
use bitstack_quant::{BitStackHandle, LinearKind};
use candle_core::{DType, Device, Result, Tensor};
use mistralrs_quant::{IsqType, QuantMethod, QuantMethodConfig, QuantizeOntoGuard, QuantizedSerde};

/// Where one linear of the checkpoint sits: its decoder layer and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearSite {
    pub layer: usize,
    pub kind: LinearKind,
}

impl LinearSite {
    /// Parses a tensor prefix such as `model.layers.3.self_attn.q_proj`.
    pub fn from_prefix(prefix: &str) -> Option<Self> {
        let rest = prefix.strip_prefix("model.layers.")?;
        let (layer, name) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let kind = LinearKind::ALL.into_iter().find(|k| k.name() == name)?;
        Some(Self { layer, kind })
    }
}

/// The snapshot that every linear runs on during one engine step.
///
/// mistral.rs calls each linear's forward separately; taking the handle's
/// current snapshot in each of them would let a resize made by another
/// thread between two layers mix two levels in one forward. The engine's
/// step bracket (`weight_arbiter::begin_step`) pins one snapshot here and
/// releases it when the step ends, so blocks a shrink drops are not held
/// between steps.
#[derive(Clone, Default)]
pub struct StepSnapshot {
    pinned: Arc<RwLock<Option<Arc<Snapshot>>>>,
}

impl StepSnapshot {
    /// Pins `handle`'s current snapshot for the step that starts.
    pub fn pin(&self, handle: &BitStackHandle) {
        self.pin_snapshot(handle.snapshot());
    }

    /// Pins `snapshot` for the rest of the step.
    pub fn pin_snapshot(&self, snapshot: Arc<Snapshot>) {
        *self.pinned.write().unwrap_or_else(PoisonError::into_inner) = Some(snapshot);
    }

    /// Ends the step: later forwards take the handle's snapshot again.
    pub fn release(&self) {
        self.pinned
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// The pinned snapshot, or `handle`'s current one outside a step.
    pub fn get(&self, handle: &BitStackHandle) -> Arc<Snapshot> {
        let pinned = self.pinned.read().unwrap_or_else(PoisonError::into_inner);
        match &*pinned {
            Some(snapshot) => snapshot.clone(),
            None => handle.snapshot(),
        }
    }
}

/// Keeps the tensor-parallel ranks at one level: rank 0's.
///
/// Each rank holds its own handle, and its own threads may resize it; a
/// forward whose ranks ran different levels would sum slices of different
/// models. So the first linear of every forward broadcasts rank 0's level
/// (an all-reduce of rank 0's level and the others' zeros, through the
/// ranks' own channel, which every rank crosses at the same point of the
/// same forward), moves its rank there, and pins that level's snapshot for
/// the rest of the step. Rank 0 sends the level of the snapshot it pins.
pub struct LevelSync {
    all_reduce: mistralrs_quant::SumAllReduce,
    rank: usize,
}

impl LevelSync {
    pub fn new(comm: &Arc<mistralrs_quant::Comm>) -> Result<Self> {
        Ok(Self {
            all_reduce: mistralrs_quant::SumAllReduce::new(comm),
            rank: comm.rank(),
        })
    }

    /// Moves this rank to rank 0's level and pins that snapshot in `step`.
    fn apply(&self, handle: &BitStackHandle, step: &StepSnapshot) -> Result<()> {
        let mine = (self.rank == 0).then(|| handle.snapshot());
        let sent = mine.as_ref().map_or(0.0, |s| s.level as f32);
        let level = self
            .all_reduce
            .sum_all_reduce(&Tensor::new(&[sent], &Device::Cpu)?)?
            .to_vec1::<f32>()?[0] as usize;
        let snapshot = match mine {
            Some(snapshot) => snapshot,
            None => {
                // A resize by another thread of this rank may land between
                // the move and the read: move again (a few times at most).
                let mut tries = 0;
                loop {
                    let snapshot = handle.snapshot();
                    if snapshot.level == level {
                        break snapshot;
                    }
                    tries += 1;
                    if tries > 8 {
                        candle_core::bail!(
                            "bitstack: this rank cannot stay at rank 0's level {level}: another thread keeps resizing it"
                        );
                    }
                    tracing::info!("bitstack: level {} -> {level}, rank 0's", snapshot.level);
                    handle.set_level(level).map_err(candle_core::Error::wrap)?;
                }
            }
        };
        step.pin_snapshot(snapshot);
        Ok(())
    }
}

/// One BitStack linear of the model behind a [`BitStackHandle`].
pub struct BitStackLinear {
    handle: BitStackHandle,
    step: StepSnapshot,
    site: LinearSite,
    /// The dtype mistral.rs runs the model in: outputs come back in it.
    dtype: DType,
    /// Whether this layer adds the checkpoint's bias: mistral.rs's column-
    /// and row-parallel layers add their own, its replicated ones do not.
    adds_bias: bool,
    /// On the first linear of a tensor-parallel model.
    sync: Option<LevelSync>,
}

impl BitStackLinear {
    /// The linear at `site`; fails unless the handle's model has it, with
    /// `in_dim` inputs and `out_dim` outputs. `adds_bias`: whether its
    /// forward adds the checkpoint's bias (mistral.rs's `bias` argument).
    pub fn new(
        handle: BitStackHandle,
        step: StepSnapshot,
        site: LinearSite,
        (in_dim, out_dim): (usize, usize),
        dtype: DType,
        adds_bias: bool,
    ) -> Result<Self> {
        let snapshot = handle.snapshot();
        let Some(layer) = snapshot.layers.get(site.layer) else {
            candle_core::bail!(
                "bitstack: layer {} is past the checkpoint's {} layers",
                site.layer,
                snapshot.layers.len()
            );
        };
        let linear = layer.linear(site.kind);
        let m = linear.out_features();
        let path = site.kind.path(site.layer);
        if m != out_dim {
            candle_core::bail!("bitstack: {path} has {m} outputs, the model asks for {out_dim}");
        }
        if let LinearWeight::BitStack(s) = &linear.weight {
            if s.n != in_dim {
                candle_core::bail!(
                    "bitstack: {path} has {} inputs, the model asks for {in_dim}",
                    s.n
                );
            }
        }
        Ok(Self {
            handle,
            step,
            site,
            dtype,
            adds_bias,
            sync: None,
        })
    }

    /// This linear, keeping the ranks at one level before each forward.
    pub fn with_level_sync(self, sync: LevelSync) -> Self {
        Self {
            sync: Some(sync),
            ..self
        }
    }

    pub fn site(&self) -> LinearSite {
        self.site
    }
}

impl fmt::Debug for BitStackLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BitStackLinear({}, level {})",
            self.site.kind.path(self.site.layer),
            self.handle.level()
        )
    }
}

impl QuantizedSerde for BitStackLinear {
    fn name(&self) -> &'static str {
        bitstack_quant::QUANT_METHOD
    }
}

impl QuantMethod for BitStackLinear {
    fn new(_: QuantMethodConfig) -> Result<Self> {
        candle_core::bail!("bitstack: layers are made by the registered factory, from a checkpoint")
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        let snapshot = self.step.get(&self.handle);
        let linear = snapshot.layers[self.site.layer].linear(self.site.kind);
        match &linear.weight {
            LinearWeight::BitStack(s) => s.dense_tensor(&snapshot.device, self.dtype),
            LinearWeight::Dense(w) => w.to_dtype(self.dtype),
        }
    }

    fn forward(&self, a: &Tensor) -> Result<Tensor> {
        if let Some(sync) = &self.sync {
            sync.apply(&self.handle, &self.step)?;
        }
        let snapshot = self.step.get(&self.handle);
        let linear = snapshot.layers[self.site.layer].linear(self.site.kind);
        let y = if self.adds_bias {
            linear.forward(a)?
        } else {
            linear.forward_weight(a)?
        };
        y.to_dtype(a.dtype())
    }

    fn quantized_act_type(&self) -> Option<DType> {
        None
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        (self.dtype, self.handle.snapshot().device.clone())
    }

    fn add_delta_w(&self, _: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        candle_core::bail!("bitstack: LoRA deltas cannot be merged into sign blocks")
    }

    fn apply_isq(
        self: Arc<Self>,
        _: Option<IsqType>,
        _: Device,
        _: &AtomicUsize,
        _: Option<Vec<f32>>,
        _: QuantizeOntoGuard,
    ) -> Result<Arc<dyn QuantMethod>> {
        candle_core::bail!("bitstack: a BitStack checkpoint is already quantized; drop --isq")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_name_a_layer_and_a_kind() {
        let site = LinearSite::from_prefix("model.layers.12.mlp.down_proj").unwrap();
        assert_eq!((site.layer, site.kind), (12, LinearKind::Down));
        assert_eq!(
            LinearSite::from_prefix("model.layers.0.self_attn.q_proj")
                .unwrap()
                .kind,
            LinearKind::Q
        );
        for bad in [
            "lm_head",
            "model.layers.x.mlp.up_proj",
            "model.layers.1.mlp.fc1",
            "model.layers.1",
        ] {
            assert_eq!(LinearSite::from_prefix(bad), None, "{bad}");
        }
    }
}
