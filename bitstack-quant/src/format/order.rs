//! The global block order and the memory ladder it defines.
//!
//! Every linear keeps its first block (the floor); the order lists every
//! further block, best first, and a linear's blocks always appear in their
//! own order. Level `ℓ` of the ladder holds the floor plus the first `ℓ`
//! blocks of the order. We store the order in `bitstack_order.json`, and also
//! read and write the reference's `compression_config.json` (one entry per
//! rung: total memory and blocks per linear).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use bitstack_assets::atomic::write_file;
use serde::{Deserialize, Serialize};

use crate::format::architecture::{dense_tensors, linear_shape, LinearKind};
use crate::format::block::{bits_per_weight, BlockShape};
use crate::format::checkpoint::BlockCounts;
use crate::format::config::ModelConfig;
use crate::format::dense::DenseDtype;
use crate::format::grid::GridConfig;
use crate::format::store::TensorStore;

pub const ORDER_FILE: &str = "bitstack_order.json";
pub const REFERENCE_FILE: &str = "compression_config.json";

/// One compressed linear's geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearSlot {
    /// `model.layers.{i}.{self_attn|mlp}.{name}`.
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Blocks stored in the checkpoint: AVD blocks, then grid planes.
    pub stored: usize,
    /// The layout of the grid planes that end the stored blocks.
    pub grid: Option<GridConfig>,
}

impl LinearSlot {
    /// The shape of the AVD blocks.
    pub fn shape(&self) -> BlockShape {
        BlockShape::new(self.m, self.n, self.k)
    }

    /// AVD blocks stored (the blocks before the grid planes).
    pub fn avd_blocks(&self) -> usize {
        self.stored - self.grid.map_or(0, |g| g.planes)
    }

    /// What block `b` is: an AVD block, or grid plane `b − avd_blocks`.
    pub fn part(&self, b: usize) -> Part {
        match b.checked_sub(self.avd_blocks()) {
            None => Part::Avd(b),
            Some(plane) => Part::Plane(plane),
        }
    }

    /// Whether block 0 is a grid plane (no AVD block before the planes):
    /// then a single resident block is one bit per weight.
    pub fn starts_with_plane(&self) -> bool {
        matches!(self.part(0), Part::Plane(_))
    }

    /// Bytes block `b` adds when it becomes resident: an AVD block's signs
    /// and factors, a plane's signs, and the grid with the first plane.
    pub fn block_bytes(&self, b: usize) -> usize {
        match (self.part(b), self.grid) {
            (Part::Avd(_), _) => self.shape().resident_bytes(),
            (Part::Plane(p), Some(grid)) => {
                bitstack_kernels::TiledSigns::bytes_for(self.m, self.n)
                    + if p == 0 {
                        grid.grid_resident_bytes(self.m, self.n)
                    } else {
                        0
                    }
            }
            (Part::Plane(_), None) => unreachable!("planes come with a grid"),
        }
    }

    /// Bytes resident with the first `count` blocks.
    pub fn prefix_bytes(&self, count: usize) -> usize {
        (0..count).map(|b| self.block_bytes(b)).sum()
    }
}

/// What one stored block of a linear is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// AVD block `i`.
    Avd(usize),
    /// Grid plane `b`.
    Plane(usize),
}

/// All compressed linears of a checkpoint, with the bytes outside them.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub linears: Vec<LinearSlot>,
    /// Bytes of everything that is not a BitStack block, as the runner
    /// holds it (each dense tensor in its stored type).
    pub dense_bytes: usize,
    /// Decoder linear weights (the denominator of bits per weight).
    pub linear_weights: usize,
    /// Parameters of the whole model (for percentage budgets).
    pub parameters: usize,
}

impl Geometry {
    /// Geometry of a BitStack checkpoint from its config (all linears compressed).
    pub fn from_config(cfg: &ModelConfig) -> Result<Self> {
        let q = cfg
            .quantization_config
            .as_ref()
            .context("not a BitStack checkpoint (config.json has no quantization_config)")?;
        let mut linears = Vec::new();
        let mut linear_weights = 0;
        for l in 0..cfg.num_hidden_layers {
            for kind in LinearKind::ALL {
                let (m, n) = linear_shape(cfg, kind);
                let name = kind.path(l);
                let k = q.k_of(&name);
                if k == 0 || k > m.min(n) {
                    bail!(
                        "linear `{name}`: k = {k} is out of range for its {m}×{n} weight (1…{})",
                        m.min(n)
                    );
                }
                linears.push(LinearSlot {
                    name,
                    m,
                    n,
                    k,
                    stored: q.niter,
                    grid: q.grid,
                });
                linear_weights += m * n;
            }
        }
        let dense = dense_tensors(cfg);
        let dense_params: usize = dense.iter().map(|(_, n)| n).sum();
        // Written by our writer, `torch_dtype` is the dense parts' type;
        // f32 is what checkpoints were before it said so.
        let size = cfg.dense_dtype().unwrap_or(DenseDtype::F32).size_in_bytes();
        Ok(Self {
            linears,
            dense_bytes: size * dense_params,
            linear_weights,
            parameters: dense_params + linear_weights,
        })
    }

    /// As [`Geometry::from_config`], with the dense bytes of the tensors as
    /// `store` holds them (each in its stored type, as the runner keeps it):
    /// what a checkpoint really needs, whatever `torch_dtype` says.
    pub fn from_store(cfg: &ModelConfig, store: &TensorStore) -> Result<Self> {
        // Before a loop over the layers config.json claims: a tiny file
        // must not make us count to 10^10.
        let last = format!(
            "model.layers.{}.input_layernorm.weight",
            cfg.num_hidden_layers - 1
        );
        if !store.contains(&last) {
            bail!(
                "config.json says num_hidden_layers = {}, but the tensors hold no `{last}`",
                cfg.num_hidden_layers
            );
        }
        let mut geometry = Self::from_config(cfg)?;
        geometry.dense_bytes = dense_tensors(cfg)
            .iter()
            .map(|(name, count)| Ok(count * store.dense_dtype(name)?.size_in_bytes()))
            .sum::<Result<usize>>()?;
        Ok(geometry)
    }

    pub fn index(&self) -> HashMap<&str, usize> {
        self.linears
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.as_str(), i))
            .collect()
    }

    /// Bytes of one block in every linear.
    pub fn floor_linear_bytes(&self) -> usize {
        self.linears.iter().map(|l| l.block_bytes(0)).sum()
    }
}

/// The global order of the blocks beyond the floor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockOrder {
    pub format_version: u32,
    /// How it was made (`fast`, `exact`, `reference`, `round-robin`).
    pub method: String,
    /// `(linear name, block index)`, block index ≥ 1, best first.
    pub order: Vec<(String, usize)>,
    /// Perplexities measured at some levels (`bitstack eval --budget … --record`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<Measurement>,
    /// The dense model's perplexity, the reference the ladder is plotted
    /// against (`bitstack eval DIR --record-dense MODEL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<DenseMeasurement>,
}

/// A perplexity measured at one level of the order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub level: usize,
    /// Finite: an older build wrote a non-finite one as `null`, which
    /// reads as NaN and is dropped when the order is loaded.
    #[serde(deserialize_with = "null_as_nan")]
    pub ppl: f64,
    pub windows: usize,
    /// The scored text's file name.
    pub text: String,
}

/// The perplexity of the dense model a checkpoint was compressed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseMeasurement {
    /// The dense model as it was named on the command line.
    pub model: String,
    #[serde(deserialize_with = "null_as_nan")]
    pub ppl: f64,
    pub windows: usize,
    /// The scored text's file name.
    pub text: String,
}

/// Whether `ppl` is a perplexity worth recording: finite and positive.
pub fn is_measurement(ppl: f64) -> bool {
    ppl.is_finite() && ppl > 0.0
}

/// A perplexity, with JSON's `null` (how serde_json writes NaN) read as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One rung of the memory ladder.
#[derive(Clone, Debug, Serialize)]
pub struct Rung {
    /// Blocks of the order that are resident beyond the floor.
    pub level: usize,
    pub linear_bytes: usize,
    pub total_bytes: usize,
    pub bits_per_linear_weight: f64,
    /// Measured perplexity at this level, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
}

impl BlockOrder {
    /// Level by level, every linear in checkpoint order: the order a
    /// checkpoint has before it is sorted.
    pub fn round_robin(geometry: &Geometry) -> Self {
        let max = geometry.linears.iter().map(|l| l.stored).max().unwrap_or(0);
        let order = (1..max)
            .flat_map(|b| {
                geometry
                    .linears
                    .iter()
                    .filter(move |l| b < l.stored)
                    .map(move |l| (l.name.clone(), b))
            })
            .collect();
        Self {
            format_version: 1,
            method: "round-robin".into(),
            order,
            measured: Vec::new(),
            dense: None,
        }
    }

    /// Checks that the order lists every stored block beyond the floor exactly
    /// once, each linear's blocks in increasing order.
    pub fn validate(&self, geometry: &Geometry) -> Result<()> {
        let index = geometry.index();
        let mut next = vec![1usize; geometry.linears.len()];
        for (pos, (name, block)) in self.order.iter().enumerate() {
            let i = *index.get(name.as_str()).with_context(|| {
                format!("block order entry {pos} names unknown linear `{name}`")
            })?;
            if *block != next[i] {
                bail!(
                    "block order entry {pos}: `{name}` block {block} comes before block {}",
                    next[i]
                );
            }
            next[i] += 1;
        }
        for (l, n) in geometry.linears.iter().zip(&next) {
            if *n != l.stored {
                bail!(
                    "block order lists {} of {} blocks of `{}`",
                    n,
                    l.stored,
                    l.name
                );
            }
        }
        Ok(())
    }

    /// The lowest level where no linear holds a grid plane alone: one past
    /// the entry that gives the last such linear its second block (0 when
    /// every linear starts with an AVD block, the top when one stores a
    /// single plane).
    pub fn two_plane_level(&self, geometry: &Geometry) -> usize {
        let mut lone = HashSet::new();
        for l in geometry.linears.iter().filter(|l| l.starts_with_plane()) {
            if l.stored < 2 {
                return self.order.len();
            }
            lone.insert(l.name.as_str());
        }
        self.order
            .iter()
            .rposition(|(name, block)| *block == 1 && lone.contains(name.as_str()))
            .map_or(0, |pos| pos + 1)
    }

    /// Blocks per linear at `level`.
    pub fn counts_at(&self, geometry: &Geometry, level: usize) -> BlockCounts {
        let mut per_linear: HashMap<String, usize> = geometry
            .linears
            .iter()
            .map(|l| (l.name.clone(), 1))
            .collect();
        for (name, _) in &self.order[..level.min(self.order.len())] {
            *per_linear.get_mut(name).expect("validated order") += 1;
        }
        BlockCounts {
            uniform: None,
            per_linear,
        }
    }

    /// Every rung, from the floor (level 0) to all blocks.
    pub fn ladder(&self, geometry: &Geometry) -> Vec<Rung> {
        let index = geometry.index();
        let mut linear_bytes = geometry.floor_linear_bytes();
        let rung = |level, linear_bytes| Rung {
            level,
            linear_bytes,
            total_bytes: linear_bytes + geometry.dense_bytes,
            bits_per_linear_weight: bits_per_weight(linear_bytes, geometry.linear_weights),
            ppl: self
                .measured
                .iter()
                .rev()
                .find(|m| m.level == level)
                .map(|m| m.ppl),
        };
        let mut rungs = vec![rung(0, linear_bytes)];
        for (level, (name, b)) in self.order.iter().enumerate() {
            linear_bytes += geometry.linears[index[name.as_str()]].block_bytes(*b);
            rungs.push(rung(level + 1, linear_bytes));
        }
        rungs
    }

    /// Reads `bitstack_order.json`, else the reference's `compression_config.json`,
    /// else the round-robin order.
    pub fn load(dir: &Path, geometry: &Geometry) -> Result<Self> {
        let ours = dir.join(ORDER_FILE);
        let theirs = dir.join(REFERENCE_FILE);
        let mut order: Self = if ours.exists() {
            let text = std::fs::read_to_string(&ours)
                .with_context(|| format!("cannot read {}", ours.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is malformed", ours.display()))?
        } else if theirs.exists() {
            Self::from_reference(&theirs, geometry)?
        } else {
            return Ok(Self::round_robin(geometry));
        };
        order
            .validate(geometry)
            .with_context(|| format!("invalid block order in {}", dir.display()))?;
        order.drop_unmeasured();
        Ok(order)
    }

    /// Forgets recorded perplexities that are not finite positive numbers
    /// (`null` in files an older build wrote): "not measured".
    fn drop_unmeasured(&mut self) {
        self.measured.retain(|m| is_measurement(m.ppl));
        if self.dense.as_ref().is_some_and(|d| !is_measurement(d.ppl)) {
            self.dense = None;
        }
    }

    /// Writes our order file and the reference's `compression_config.json`, atomically.
    pub fn save(&self, dir: &Path, geometry: &Geometry) -> Result<()> {
        self.validate(geometry)?;
        write_file(&dir.join(ORDER_FILE), &serde_json::to_vec(self)?)?;
        write_file(
            &dir.join(REFERENCE_FILE),
            &serde_json::to_vec(&self.to_reference(geometry))?,
        )
    }

    /// The reference's format: one entry per rung with the total memory and
    /// the blocks of every linear (named `layer.{i}.{module}`).
    pub fn to_reference(&self, geometry: &Geometry) -> Vec<ReferenceRung> {
        let mut layers: std::collections::BTreeMap<String, usize> = geometry
            .linears
            .iter()
            .map(|l| (reference_name(&l.name), 1))
            .collect();
        let ladder = self.ladder(geometry);
        let mut out = vec![ReferenceRung {
            memory: ladder[0].total_bytes,
            layers: layers.clone(),
        }];
        for ((name, _), rung) in self.order.iter().zip(&ladder[1..]) {
            *layers.get_mut(&reference_name(name)).expect("known linear") += 1;
            out.push(ReferenceRung {
                memory: rung.total_bytes,
                layers: layers.clone(),
            });
        }
        out
    }

    /// Recovers the order from a reference `compression_config.json`: each
    /// rung adds blocks to the previous one.
    pub fn from_reference(path: &Path, geometry: &Geometry) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut rungs: Vec<ReferenceRung> = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed", path.display()))?;
        rungs.sort_by_key(|r| r.memory);
        let index = geometry.index();
        let mut current: HashMap<String, usize> = geometry
            .linears
            .iter()
            .map(|l| (l.name.clone(), 1))
            .collect();
        let mut order = Vec::new();
        for (r, rung) in rungs.iter().enumerate() {
            for (name, &blocks) in &rung.layers {
                let ours = our_name(name).with_context(|| {
                    format!("{}: rung {r} names unknown layer `{name}`", path.display())
                })?;
                if !index.contains_key(ours.as_str()) {
                    bail!(
                        "{}: rung {r} names `{name}`, which this checkpoint does not have",
                        path.display()
                    );
                }
                let have = current[&ours];
                let stored = geometry.linears[index[ours.as_str()]].stored;
                if blocks > stored {
                    bail!("{}: rung {r} gives `{name}` {blocks} blocks, but the checkpoint stores {stored}", path.display());
                }
                if blocks < have {
                    bail!("{}: rung {r} gives `{name}` {blocks} blocks, fewer than the rung below ({have})", path.display());
                }
                for b in have..blocks {
                    order.push((ours.clone(), b));
                }
                current.insert(ours, blocks);
            }
        }
        Ok(Self {
            format_version: 1,
            method: "reference".into(),
            order,
            measured: Vec::new(),
            dense: None,
        })
    }
}

/// A rung of the reference's `compression_config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReferenceRung {
    pub memory: usize,
    pub layers: std::collections::BTreeMap<String, usize>,
}

/// `model.layers.3.mlp.up_proj` → `layer.3.mlp.up_proj`.
pub fn reference_name(ours: &str) -> String {
    ours.replacen("model.layers.", "layer.", 1)
}

/// `layer.3.mlp.up_proj` → `model.layers.3.mlp.up_proj`.
pub fn our_name(reference: &str) -> Option<String> {
    reference
        .strip_prefix("layer.")
        .map(|rest| format!("model.layers.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        let slot = |name: &str, m, n, k| LinearSlot {
            name: name.into(),
            m,
            n,
            k,
            stored: 3,
            grid: None,
        };
        Geometry {
            linears: vec![
                slot("model.layers.0.self_attn.q_proj", 8, 16, 2),
                slot("model.layers.0.mlp.up_proj", 24, 16, 4),
            ],
            dense_bytes: 1000,
            linear_weights: 8 * 16 + 24 * 16,
            parameters: 1000,
        }
    }

    #[test]
    fn ladder_is_monotone_and_counts_follow_the_order() {
        let g = geometry();
        let order = BlockOrder {
            format_version: 1,
            method: "test".into(),
            measured: vec![],
            dense: None,
            order: vec![
                ("model.layers.0.mlp.up_proj".into(), 1),
                ("model.layers.0.self_attn.q_proj".into(), 1),
                ("model.layers.0.mlp.up_proj".into(), 2),
                ("model.layers.0.self_attn.q_proj".into(), 2),
            ],
        };
        order.validate(&g).unwrap();
        let ladder = order.ladder(&g);
        assert_eq!(ladder.len(), 5);
        assert!(ladder
            .windows(2)
            .all(|w| w[1].total_bytes > w[0].total_bytes));
        assert_eq!(ladder[0].linear_bytes, g.floor_linear_bytes());
        assert_eq!(ladder[4].linear_bytes, 3 * g.floor_linear_bytes());
        let c = order.counts_at(&g, 3);
        assert_eq!(c.per_linear["model.layers.0.mlp.up_proj"], 3);
        assert_eq!(c.per_linear["model.layers.0.self_attn.q_proj"], 2);
    }

    #[test]
    fn invalid_orders_are_refused() {
        let g = geometry();
        let skip = BlockOrder {
            format_version: 1,
            method: "t".into(),
            order: vec![("model.layers.0.mlp.up_proj".into(), 2)],
            measured: vec![],
            dense: None,
        };
        assert!(skip
            .validate(&g)
            .unwrap_err()
            .to_string()
            .contains("block 2 comes before block 1"));
        let short = BlockOrder::round_robin(&g);
        let mut s = short.clone();
        s.order.pop();
        assert!(s
            .validate(&g)
            .unwrap_err()
            .to_string()
            .contains("lists 2 of 3 blocks"));
        short.validate(&g).unwrap();
    }

    #[test]
    fn order_files_without_a_dense_measurement_still_read() {
        let g = geometry();
        let mut order = BlockOrder::round_robin(&g);
        let old = serde_json::to_string(&order).unwrap();
        assert!(!old.contains("dense"));
        assert_eq!(serde_json::from_str::<BlockOrder>(&old).unwrap(), order);
        order.dense = Some(DenseMeasurement {
            model: "smollm2".into(),
            ppl: 14.917,
            windows: 64,
            text: "wiki-eval.txt".into(),
        });
        let new = serde_json::to_string(&order).unwrap();
        assert_eq!(serde_json::from_str::<BlockOrder>(&new).unwrap(), order);
    }

    #[test]
    fn reads_a_hand_written_reference_config() {
        let g = geometry();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(REFERENCE_FILE);
        std::fs::write(
            &p,
            r#"[{"memory": 100, "layers": {"layer.0.self_attn.q_proj": 1, "layer.0.mlp.up_proj": 1}},
                {"memory": 300, "layers": {"layer.0.self_attn.q_proj": 2, "layer.0.mlp.up_proj": 2}},
                {"memory": 200, "layers": {"layer.0.self_attn.q_proj": 1, "layer.0.mlp.up_proj": 2}},
                {"memory": 400, "layers": {"layer.0.self_attn.q_proj": 3, "layer.0.mlp.up_proj": 3}}]"#,
        )
        .unwrap();
        let order = BlockOrder::load(dir.path(), &g).unwrap();
        assert_eq!(order.method, "reference");
        assert_eq!(
            order.order[0],
            ("model.layers.0.mlp.up_proj".to_string(), 1)
        );
        assert_eq!(
            order.order[1],
            ("model.layers.0.self_attn.q_proj".to_string(), 1)
        );
        assert_eq!(order.order.len(), 4);
        // and our writer produces a file the reader turns back into the same order
        order.save(dir.path(), &g).unwrap();
        std::fs::remove_file(dir.path().join(ORDER_FILE)).unwrap();
        let again = BlockOrder::load(dir.path(), &g).unwrap();
        assert_eq!(again.order, order.order);
    }
}
