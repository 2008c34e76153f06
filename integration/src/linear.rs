//! `BitStackLinear`: one linear of a BitStack checkpoint as a mistral.rs
//! `QuantMethod`.
//!
//! It holds no weights of its own: each forward runs the linear of the
//! handle's current snapshot, so a resize through the [`BitStackHandle`]
//! reaches every layer of the mistral.rs model at once, and the blocks a
//! shrink drops are freed when the last forward using them ends.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bitstack_quant::runtime::linear::{stack_tensor, LinearWeight};
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

/// One BitStack linear of the model behind a [`BitStackHandle`].
pub struct BitStackLinear {
    handle: BitStackHandle,
    site: LinearSite,
    /// The dtype mistral.rs runs the model in: outputs come back in it.
    dtype: DType,
}

impl BitStackLinear {
    /// The linear at `site`; fails unless the handle's model has it, with
    /// `in_dim` inputs and `out_dim` outputs.
    pub fn new(
        handle: BitStackHandle,
        site: LinearSite,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
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
            site,
            dtype,
        })
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
        let snapshot = self.handle.snapshot();
        let linear = snapshot.layers[self.site.layer].linear(self.site.kind);
        match &linear.weight {
            LinearWeight::BitStack(s) => stack_tensor(s, &snapshot.device, self.dtype),
            LinearWeight::Dense(w) => w.to_dtype(self.dtype),
        }
    }

    fn forward(&self, a: &Tensor) -> Result<Tensor> {
        let snapshot = self.handle.snapshot();
        let y = snapshot.layers[self.site.layer]
            .linear(self.site.kind)
            .forward(a)?;
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
