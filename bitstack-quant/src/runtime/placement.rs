//! Where a model's weights go: the memory that holds its blocks
//! ([`Residence`]) and, under tensor parallelism, the slice of each linear
//! this process holds ([`TensorParallel`]).

use anyhow::Result;
use candle_core::Device;

use crate::format::architecture::LinearKind;
use crate::format::config::ModelConfig;
use crate::format::order::Geometry;
use crate::format::shard::{LinearShard, TensorParallel};
use crate::runtime::residence::Residence;

#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub residence: Residence,
    /// This rank, when the model is split over several; every linear whole
    /// when `None`.
    pub tensor_parallel: Option<TensorParallel>,
    pub dense_parts: DenseParts,
}

/// Who holds a model's dense parts: embeddings, norms and output head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenseParts {
    /// The model does, and runs on its own.
    #[default]
    Held,
    /// An engine that runs the model's linears does (mistral.rs holds its
    /// own copies), so they are not held twice: the model holds its
    /// linears, and its own forward refuses to run.
    Elsewhere,
}

impl Placement {
    /// Whole linears, their blocks where `device` runs them.
    pub fn of(device: &Device) -> Self {
        Self {
            residence: Residence::of(device),
            ..Self::default()
        }
    }

    /// This placement with the dense parts held by the engine instead.
    pub fn linears_only(self) -> Self {
        Self {
            dense_parts: DenseParts::Elsewhere,
            ..self
        }
    }

    /// This placement holding rank `tp`'s slices.
    pub fn with_tensor_parallel(self, tp: TensorParallel) -> Self {
        Self {
            tensor_parallel: Some(tp),
            ..self
        }
    }

    /// The part of a linear of `kind` held here (`None`: all of it).
    pub fn shard(&self, kind: LinearKind) -> Option<LinearShard> {
        self.tensor_parallel.map(|tp| tp.shard(kind))
    }

    /// Errs unless the model of `cfg` splits over the ranks.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        self.tensor_parallel.map_or(Ok(()), |tp| tp.check(cfg))
    }

    /// The geometry of what is held here.
    pub fn geometry(&self, geometry: &Geometry) -> Geometry {
        match self.tensor_parallel {
            Some(tp) => tp.geometry(geometry),
            None => geometry.clone(),
        }
    }
}
