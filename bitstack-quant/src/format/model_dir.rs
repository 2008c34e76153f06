//! [`ModelDir`]: a model directory as a command takes it, dense or BitStack.
//!
//! `bitstack eval MODEL` and `generate MODEL` run a dense Hugging Face
//! model and a BitStack checkpoint alike. Opening tells which it is from
//! `config.json` and opens it once: a checkpoint as a [`Checkpoint`] (with
//! everything that validates), a dense model as its config and tensors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::format::budget::Budget;
use crate::format::checkpoint::{BlockCounts, Checkpoint, Plan};
use crate::format::config::ModelConfig;
use crate::format::store::TensorStore;

/// An opened model directory.
pub enum ModelDir {
    /// A model without a `quantization_config`: every linear dense.
    Dense {
        dir: PathBuf,
        config: ModelConfig,
        store: TensorStore,
    },
    /// A BitStack checkpoint.
    BitStack(Checkpoint),
}

/// How many blocks a command loads: a memory budget (a rung of the
/// ladder), the same number in every linear, or everything stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    Budget(Budget),
    Blocks(usize),
    All,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        if config.quantization_config.is_some() {
            return Ok(Self::BitStack(Checkpoint::open(dir)?));
        }
        Ok(Self::Dense {
            dir: dir.to_path_buf(),
            store: TensorStore::open_dir(dir)?,
            config,
        })
    }

    pub fn dir(&self) -> &Path {
        match self {
            Self::Dense { dir, .. } => dir,
            Self::BitStack(c) => c.dir(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Self::Dense { config, .. } => config,
            Self::BitStack(c) => c.config(),
        }
    }

    pub fn store(&self) -> &TensorStore {
        match self {
            Self::Dense { store, .. } => store,
            Self::BitStack(c) => c.store(),
        }
    }

    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match self {
            Self::Dense { .. } => None,
            Self::BitStack(c) => Some(c),
        }
    }

    pub fn checkpoint_mut(&mut self) -> Option<&mut Checkpoint> {
        match self {
            Self::Dense { .. } => None,
            Self::BitStack(c) => Some(c),
        }
    }

    /// The blocks per linear `selection` loads, with the rung of the
    /// ladder when it is a budget. A budget on a dense model is an error:
    /// there is no ladder to climb (a block count loads it whole).
    pub fn select(&self, selection: Selection) -> Result<(BlockCounts, Option<Plan>)> {
        match (selection, self) {
            (Selection::All, _) => Ok((BlockCounts::all(), None)),
            (Selection::Blocks(n), _) => Ok((BlockCounts::uniform(n), None)),
            (Selection::Budget(_), Self::Dense { dir, .. }) => bail!(
                "{} is not a BitStack checkpoint (config.json has no quantization_config): --budget chooses blocks of one (make one with `bitstack compress`)",
                dir.display()
            ),
            (Selection::Budget(b), Self::BitStack(c)) => {
                let plan = c.plan(b)?;
                Ok((plan.counts.clone(), Some(plan)))
            }
        }
    }
}
