//! The one writer of the checkpoint layout.
//!
//! A checkpoint of `L` decoder layers is `L + 1` safetensors shards: shard
//! `l + 1` holds layer `l` (every block of its linears, with their CRC-32s
//! in the file metadata, plus the layer's biases and norms), and the last
//! shard the dense parts (embeddings, final norm, an untied lm_head). One
//! layer at a time is all a writer holds. Every dense tensor is stored in
//! the writer's [`DenseDtype`], recorded as `torch_dtype` in `config.json`. The directory is built beside its
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
use crate::format::dense::DenseDtype;
use crate::format::grid::{self, GridConfig, GridPlanes, GridValues};

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
    pub fn i8(values: &[i8], shape: &[usize]) -> Self {
        Self {
            dtype: Dtype::I8,
            shape: shape.to_vec(),
            data: values.iter().map(|&x| x as u8).collect(),
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

    /// The values as f32 (from f32, f16 or bf16).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!("a {other:?} tensor is not a float tensor"),
        })
    }

    /// This float tensor stored as `dtype` (rounded to nearest even); a
    /// value out of `dtype`'s range is an error naming `name`.
    pub fn to_dense(self, dtype: DenseDtype, name: &str) -> Result<Self> {
        if self.dtype == dtype.safetensors() {
            return Ok(self);
        }
        let values = self
            .to_f32_vec()
            .with_context(|| format!("dense tensor `{name}`"))?;
        Ok(Self {
            dtype: dtype.safetensors(),
            data: dtype.encode(&values, name)?,
            shape: self.shape,
        })
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
    /// The AVD blocks.
    pub blocks: &'a [Block],
    /// The grid planes after them, when the checkpoint has a grid.
    pub grid: Option<(GridConfig, &'a GridPlanes)>,
}

/// Writes a checkpoint: [`write_layer`](Self::write_layer) for every
/// decoder layer in order, [`write_dense`](Self::write_dense) once, any
/// extra files, then [`finish`](Self::finish).
pub struct CheckpointWriter {
    dir: AtomicDir,
    config: serde_json::Value,
    layers: usize,
    dense_dtype: DenseDtype,
    shards_written: usize,
    weight_map: BTreeMap<String, String>,
}

impl CheckpointWriter {
    /// Starts the checkpoint that will be `out` (which must not exist, or be
    /// empty) of the model whose `config.json` is `config`, compressed as
    /// `quantization` says, its dense parts stored as `dense_dtype`. Every
    /// other field of `config` is kept; `torch_dtype` says `dense_dtype`
    /// (the blocks' own types are fixed by the format).
    pub fn create(
        out: &Path,
        mut config: serde_json::Value,
        quantization: &QuantizationConfig,
        dense_dtype: DenseDtype,
    ) -> Result<Self> {
        config["quantization_config"] = serde_json::to_value(quantization)?;
        config["torch_dtype"] = dense_dtype.torch_name().into();
        let parsed: ModelConfig = serde_json::from_value(config.clone())
            .context("the config to write is not a Llama-family config")?;
        Ok(Self {
            dir: AtomicDir::create(out)?,
            config,
            layers: parsed.num_hidden_layers,
            dense_dtype,
            shards_written: 0,
            weight_map: BTreeMap::new(),
        })
    }

    /// The type every dense tensor is stored as.
    pub fn dense_dtype(&self) -> DenseDtype {
        self.dense_dtype
    }

    /// Writes decoder layer `layer` (layers come in order): the blocks of
    /// its linears with their checksums, and its dense tensors (biases,
    /// norms) as the dense dtype.
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
            if let Some((cfg, gp)) = l.grid {
                let (groups, o) = (cfg.groups(n), cfg.outliers);
                gp.grid
                    .check(m, n, &cfg)
                    .map_err(|e| anyhow::anyhow!("internal: the grid of {}: {e}", l.path))?;
                ensure!(
                    gp.planes.len() == cfg.planes
                        && gp.planes.iter().all(|p| p.len() == l.shape.sign_bytes()),
                    "internal: the planes of {} do not have the shape {m}×{n}",
                    l.path
                );
                let g = &gp.grid;
                let path = l.path.as_str();
                if !g.prefix_scale.is_empty() {
                    tensors.push((
                        grid::names::prefix_scale(path),
                        OwnedTensor::f32(&g.prefix_scale, &[g.prefix_scale.len()]),
                    ));
                }
                match &g.values {
                    GridValues::F16 {
                        center,
                        half,
                        outlier,
                    } => {
                        tensors.push((
                            grid::names::center(path),
                            OwnedTensor::f16(center, &[m, groups]),
                        ));
                        tensors.push((
                            grid::names::scale(path),
                            OwnedTensor::f16(half, &[m, groups]),
                        ));
                        tensors.push((
                            grid::names::outlier_value(path),
                            OwnedTensor::f16(outlier, &[m, groups, o]),
                        ));
                    }
                    GridValues::Int8 {
                        center_code,
                        half_code,
                        outlier_code,
                        center_step,
                        half_step,
                        outlier_step,
                    } => {
                        tensors.push((
                            grid::names::outlier_code(path),
                            OwnedTensor::i8(outlier_code, &[m, groups, o]),
                        ));
                        tensors.push((
                            grid::names::outlier_step(path),
                            OwnedTensor::f16(outlier_step, &[m]),
                        ));
                        tensors.push((
                            grid::names::center_code(path),
                            OwnedTensor::i8(center_code, &[m, groups]),
                        ));
                        let mut half = OwnedTensor::u8(half_code.clone());
                        half.shape = vec![m, groups];
                        tensors.push((grid::names::half_code(path), half));
                        tensors.push((
                            grid::names::center_step(path),
                            OwnedTensor::f16(center_step, &[m]),
                        ));
                        tensors.push((
                            grid::names::half_step(path),
                            OwnedTensor::f16(half_step, &[m]),
                        ));
                    }
                }
                let mut cols = OwnedTensor::u8(g.outlier_col.clone());
                cols.shape = vec![m, groups, o];
                tensors.push((grid::names::outlier_col(path), cols));
                checksums.insert(
                    grid::names::grid_checksum(path),
                    format!("{:08x}", g.checksum()),
                );
                for (b, signs) in gp.planes.iter().enumerate() {
                    tensors.push((grid::names::plane(path, b), OwnedTensor::u8(signs.clone())));
                    checksums.insert(
                        grid::names::plane_checksum(path, b),
                        format!("{:08x}", grid::plane_checksum(signs)),
                    );
                }
            }
        }
        tensors.extend(self.converted(dense)?);
        self.write_shard(&tensors, checksums)
    }

    /// Writes the parts outside the decoder layers (embeddings, final
    /// norm, an untied lm_head) as the dense dtype, after the last layer.
    pub fn write_dense(&mut self, tensors: Vec<(String, OwnedTensor)>) -> Result<()> {
        ensure!(
            self.shards_written == self.layers,
            "internal: dense parts written after {} of {} layers",
            self.shards_written,
            self.layers
        );
        let tensors = self.converted(tensors)?;
        self.write_shard(&tensors, HashMap::new())
    }

    fn converted(&self, tensors: Vec<(String, OwnedTensor)>) -> Result<Vec<(String, OwnedTensor)>> {
        tensors
            .into_iter()
            .map(|(name, t)| {
                let t = t.to_dense(self.dense_dtype, &name)?;
                Ok((name, t))
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::store::TensorStore;
    use crate::format::synthetic::SyntheticSpec;

    /// Values that no 16-bit type holds exactly, and some that every one does.
    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 4 {
                0 => 1.0 / 3.0 + i as f32 * 1e-3,
                1 => -0.1 * i as f32,
                2 => 0.5,
                _ => -2.0f32.powi(i as i32 % 9),
            })
            .collect()
    }

    #[test]
    fn dense_tensors_round_trip_in_the_writers_dtype() {
        let spec = SyntheticSpec {
            layers: 1,
            ..Default::default()
        };
        let d = spec.hidden;
        let v = values(d);
        let root = tempfile::tempdir().unwrap();
        for dtype in DenseDtype::ALL {
            let q = QuantizationConfig::new(1, 1, Default::default());
            let out = root.path().join(dtype.to_string());
            let mut w = CheckpointWriter::create(&out, spec.config_json(), &q, dtype).unwrap();
            assert_eq!(w.dense_dtype(), dtype);
            let norm = "model.layers.0.input_layernorm.weight";
            w.write_layer(0, &[], vec![(norm.into(), OwnedTensor::f32(&v, &[d]))])
                .unwrap();
            // A 16-bit input is converted too.
            let halves: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            w.write_dense(vec![(
                "model.norm.weight".into(),
                OwnedTensor::f16(&halves, &[d]),
            )])
            .unwrap();
            let out = w.finish().unwrap();

            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            assert_eq!(config["torch_dtype"], dtype.torch_name());
            let store = TensorStore::open_dir(&out).unwrap();
            for (name, source) in [
                (norm, v.clone()),
                (
                    "model.norm.weight",
                    halves.iter().map(|x| x.to_f32()).collect(),
                ),
            ] {
                assert_eq!(store.dense_dtype(name).unwrap(), dtype, "{name}");
                let back = store.f32_shaped(name, &[d]).unwrap();
                // Round to nearest: within half a unit in the last place.
                let eps = match dtype {
                    DenseDtype::F32 => 0.0,
                    DenseDtype::F16 => 2f32.powi(-11),
                    DenseDtype::Bf16 => 2f32.powi(-8),
                };
                for (b, s) in back.iter().zip(&source) {
                    assert!((b - s).abs() <= eps * s.abs(), "{dtype} {name}: {s} → {b}");
                }
                if dtype == DenseDtype::F16 && name == norm {
                    let exact: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                    assert_eq!(back, exact);
                }
                if dtype != DenseDtype::F32 && name == norm {
                    assert_ne!(back, v, "{dtype} rounds");
                }
            }
        }
    }

    #[test]
    fn a_value_out_of_range_fails_the_write_and_names_the_tensor() {
        let spec = SyntheticSpec {
            layers: 0,
            ..Default::default()
        };
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("ck");
        let q = QuantizationConfig::new(1, 1, Default::default());
        let mut w =
            CheckpointWriter::create(&out, spec.config_json(), &q, DenseDtype::F16).unwrap();
        let e = w
            .write_dense(vec![(
                "model.embed_tokens.weight".into(),
                OwnedTensor::f32(&[1.0, 1e6], &[2]),
            )])
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("`model.embed_tokens.weight`"),
            "{e:#}"
        );
        drop(w);
        assert!(!out.exists(), "nothing is left behind");
    }
}
