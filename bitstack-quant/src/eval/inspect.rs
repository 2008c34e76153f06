//! What a checkpoint holds, without loading its weights.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::format::architecture::dense_tensors;
use crate::format::block::{bits_per_weight, block_bytes};
use crate::format::checkpoint::stored_blocks;
use crate::format::config::ModelConfig;
use crate::format::grid;
use crate::format::order::{Geometry, LinearSlot};
use crate::format::store::TensorStore;
use crate::runtime::model::{linear_shape, linear_weight_count, LinearKind};

#[derive(Debug, Serialize)]
pub struct LinearInfo {
    pub name: String,
    pub m: usize,
    pub n: usize,
    /// `None` for a dense linear.
    pub k: Option<usize>,
    /// Stored blocks: AVD blocks and grid planes.
    pub blocks: usize,
    /// Of them, grid planes.
    pub planes: usize,
    /// Resident bytes of one AVD block.
    pub bytes_per_block: usize,
    /// Resident bytes of every stored block (the grid with the planes).
    pub bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub architecture: String,
    pub layers: usize,
    pub k: Option<usize>,
    pub niter: Option<usize>,
    pub linear_weights: usize,
    pub linears: Vec<LinearInfo>,
    /// Bytes of all stored blocks (or dense linear weights).
    pub linear_bytes: usize,
    /// Bytes of every tensor in the checkpoint.
    pub file_bytes: u64,
    /// Bits per linear weight with every stored block loaded.
    pub max_bits_per_linear_weight: f64,
    /// Stored type of the dense parts (of the embedding): `f16`, `bf16`, `f32`.
    pub dense_dtype: String,
    /// Bytes of the dense parts (embeddings, norms, biases, an untied
    /// lm_head) as stored and held.
    pub dense_bytes: usize,
    /// Of a checkpoint: bytes at the floor of the ladder, one block in
    /// every linear plus the dense parts.
    pub floor_bytes: Option<usize>,
}

pub fn inspect(dir: &Path) -> Result<Inspection> {
    let cfg = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_dir(dir)?;
    let q = cfg.quantization_config.as_ref();
    let mut linears = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for kind in LinearKind::ALL {
            let (m, n) = linear_shape(&cfg, kind);
            let name = kind.path(l);
            let avd = stored_blocks(&store, &name);
            let grid = q
                .and_then(|q| q.grid)
                .filter(|_| store.contains(&grid::names::plane(&name, 0)));
            let planes = grid.map_or(0, |g| g.planes);
            let blocks = avd + planes;
            let (k, per_block, total) = if blocks == 0 {
                let dense = store.shape(&format!("{name}.weight"))?;
                let bytes = if store.contains(&format!("{name}.weight")) {
                    4 * dense.iter().product::<usize>()
                } else {
                    0
                };
                (None, 0, bytes)
            } else {
                let k = q.map_or(0, |q| q.k_of(&name));
                let slot = LinearSlot {
                    name: name.clone(),
                    m,
                    n,
                    k,
                    stored: blocks,
                    grid,
                };
                (Some(k), block_bytes(m, n, k), slot.prefix_bytes(blocks))
            };
            linears.push(LinearInfo {
                name,
                m,
                n,
                k,
                blocks,
                planes,
                bytes_per_block: per_block,
                bytes: total,
            });
        }
    }
    let file_bytes = crate::format::store::safetensors_files(dir)?
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let linear_bytes: usize = linears.iter().map(|l| l.bytes).sum();
    let count = linear_weight_count(&cfg);
    let (dense_bytes, floor_bytes) = if q.is_some() {
        let geometry = Geometry::from_store(&cfg, &store)?;
        let floor = geometry.dense_bytes + geometry.floor_linear_bytes();
        (geometry.dense_bytes, Some(floor))
    } else {
        let bytes = dense_tensors(&cfg)
            .iter()
            .map(|(name, n)| Ok(n * store.dense_dtype(name)?.size_in_bytes()))
            .sum::<Result<usize>>()?;
        (bytes, None)
    };
    Ok(Inspection {
        dense_dtype: store.dense_dtype("model.embed_tokens.weight")?.to_string(),
        dense_bytes,
        floor_bytes,
        architecture: cfg.architecture(),
        layers: cfg.num_hidden_layers,
        k: q.map(|q| q.k),
        niter: q.map(|q| q.niter),
        linear_weights: count,
        linears,
        linear_bytes,
        file_bytes,
        max_bits_per_linear_weight: bits_per_weight(linear_bytes, count),
    })
}
