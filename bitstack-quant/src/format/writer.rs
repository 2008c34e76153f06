//! The one writer of the checkpoint layout.
//!
//! A checkpoint of `L` decoder layers is `L + 1` safetensors shards: shard
//! `l + 1` holds layer `l` (every block of its linears, with their CRC-32s
//! in the file metadata, plus the layer's biases and norms), and the last
//! shard the dense parts (embeddings, final norm, an untied lm_head). One
//! layer at a time is all a writer holds. The directory is built beside its
//! destination and renamed into place by [`CheckpointWriter::finish`], so a
//! failure or an interrupt never leaves a half-written checkpoint.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use bitstack_assets::atomic::AtomicDir;
use candle_core::Tensor;
use half::f16;
use safetensors::{Dtype, View};

use crate::format::block::{names, Block, BlockShape};
use crate::format::config::{ModelConfig, QuantizationConfig};

/// A tensor owned in memory, ready to be serialized.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    pub fn u8(data: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape: vec![data.len()],
            data,
        }
    }
    pub fn f16(values: &[f16], shape: &[usize]) -> Self {
        let data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self {
            dtype: Dtype::F16,
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn f32(values: &[f32], shape: &[usize]) -> Self {
        let data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data,
        }
    }
    /// Copies a candle tensor (stored as f32).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self::f32(&v, t.dims()))
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The blocks of one linear, as a layer hands them to the writer.
pub struct LinearBlocks<'a> {
    /// `model.layers.{l}.{self_attn|mlp}.{name}`.
    pub path: String,
    pub shape: BlockShape,
    pub blocks: &'a [Block],
}

/// Writes a checkpoint: [`write_layer`](Self::write_layer) for every
/// decoder layer in order, [`write_dense`](Self::write_dense) once, any
/// extra files, then [`finish`](Self::finish).
pub struct CheckpointWriter {
    dir: AtomicDir,
    config: serde_json::Value,
    layers: usize,
    shards_written: usize,
    weight_map: BTreeMap<String, String>,
}

impl CheckpointWriter {
    /// Starts the checkpoint that will be `out` (which must not exist, or be
    /// empty) of the model whose `config.json` is `config`, compressed as
    /// `quantization` says. Every other field of `config` is kept.
    pub fn create(
        out: &Path,
        mut config: serde_json::Value,
        quantization: &QuantizationConfig,
    ) -> Result<Self> {
        config["quantization_config"] = serde_json::to_value(quantization)?;
        let parsed: ModelConfig = serde_json::from_value(config.clone())
            .context("the config to write is not a Llama-family config")?;
        Ok(Self {
            dir: AtomicDir::create(out)?,
            config,
            layers: parsed.num_hidden_layers,
            shards_written: 0,
            weight_map: BTreeMap::new(),
        })
    }

    /// Writes decoder layer `layer` (layers come in order): the blocks of
    /// its linears with their checksums, and its dense tensors (biases,
    /// norms).
    pub fn write_layer(
        &mut self,
        layer: usize,
        linears: &[LinearBlocks],
        dense: Vec<(String, OwnedTensor)>,
    ) -> Result<()> {
        ensure!(
            layer == self.shards_written && layer < self.layers,
            "internal: layer {layer} written out of order ({} of {} written)",
            self.shards_written,
            self.layers
        );
        let mut tensors = Vec::new();
        let mut checksums = HashMap::new();
        for l in linears {
            let BlockShape { m, n, k } = l.shape;
            for (i, b) in l.blocks.iter().enumerate() {
                ensure!(
                    b.signs.len() == l.shape.sign_bytes()
                        && b.u.len() == m * k
                        && b.vt.len() == k * n,
                    "internal: block {i} of {} does not have the shape {m}×{n}, rank {k}",
                    l.path
                );
                tensors.push((names::qweight(&l.path, i), OwnedTensor::u8(b.signs.clone())));
                tensors.push((names::u(&l.path, i), OwnedTensor::f16(&b.u, &[m, k])));
                tensors.push((names::vt(&l.path, i), OwnedTensor::f16(&b.vt, &[k, n])));
                checksums.insert(names::checksum(&l.path, i), format!("{:08x}", b.checksum()));
            }
        }
        tensors.extend(dense);
        self.write_shard(&tensors, checksums)
    }

    /// Writes the parts outside the decoder layers (embeddings, final
    /// norm, an untied lm_head), after the last layer.
    pub fn write_dense(&mut self, tensors: Vec<(String, OwnedTensor)>) -> Result<()> {
        ensure!(
            self.shards_written == self.layers,
            "internal: dense parts written after {} of {} layers",
            self.shards_written,
            self.layers
        );
        self.write_shard(&tensors, HashMap::new())
    }

    /// Writes a small file (tokenizer, generation config, …) into the
    /// checkpoint.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        self.dir.write(name, contents)
    }

    fn write_shard(
        &mut self,
        tensors: &[(String, OwnedTensor)],
        checksums: HashMap<String, String>,
    ) -> Result<()> {
        let total = self.layers + 1;
        self.shards_written += 1;
        let name = if total == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{total:05}.safetensors", self.shards_written)
        };
        let path = self.dir.path().join(&name);
        let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
        let metadata = (!checksums.is_empty()).then_some(checksums);
        safetensors::serialize_to_file(views, metadata, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        sort_header_keys(&path).with_context(|| format!("cannot write {}", path.display()))?;
        for (n, _) in tensors {
            self.weight_map.insert(n.clone(), name.clone());
        }
        Ok(())
    }

    /// Writes `config.json` and the shard index, then moves the finished
    /// directory to its place.
    pub fn finish(self) -> Result<PathBuf> {
        if self.shards_written != self.layers + 1 {
            bail!(
                "internal: wrote {} of {} shards",
                self.shards_written,
                self.layers + 1
            );
        }
        self.write_file(
            "config.json",
            serde_json::to_string_pretty(&self.config)?.as_bytes(),
        )?;
        if self.layers > 0 {
            let index = serde_json::json!({ "metadata": {}, "weight_map": self.weight_map });
            self.write_file(
                "model.safetensors.index.json",
                serde_json::to_string_pretty(&index)?.as_bytes(),
            )?;
        }
        self.dir.commit()
    }
}

/// Rewrites the JSON header of the safetensors file at `path` with its keys
/// sorted. The crate writes the metadata in hash-map order, which changes
/// from run to run; sorted, the same compression gives the same bytes.
fn sort_header_keys(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len))?;
    let mut header = vec![0u8; len];
    file.read_exact(&mut header)?;
    // serde_json's map is ordered by key, so a round trip sorts the keys.
    let value: serde_json::Value = serde_json::from_slice(&header)?;
    let mut sorted = serde_json::to_vec(&value)?;
    ensure!(
        sorted.len() <= len,
        "internal: sorted header is longer than the original"
    );
    sorted.resize(len, b' ');
    if sorted != header {
        file.seek(SeekFrom::Start(8))?;
        file.write_all(&sorted)?;
    }
    Ok(())
}
