//! The BitStack checkpoint: reference tensor names, validated reading, and
//! atomic writing.
//!
//! Every compressed linear `P` stores, for i = 0…niter−1, `P.qweight_{i}`
//! (u8 `[⌈m·n/8⌉]`), `P.u_{i}` (f16 `[m, k]`) and `P.vt_{i}` (f16 `[k, n]`);
//! everything else stays dense under its usual name.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use half::f16;
use safetensors::{Dtype, View};

use crate::block::Block;
use crate::config::ModelConfig;
use crate::linear::LinearWeight;
use crate::pack::packed_len;
use crate::stack::{StackBlock, WeightStack};
use crate::store::TensorStore;
use bitstack_kernels::TiledSigns;

pub fn qweight_name(path: &str, i: usize) -> String {
    format!("{path}.qweight_{i}")
}
pub fn u_name(path: &str, i: usize) -> String {
    format!("{path}.u_{i}")
}
pub fn vt_name(path: &str, i: usize) -> String {
    format!("{path}.vt_{i}")
}

/// How many blocks each BitStack linear loads.
#[derive(Clone, Debug, Default)]
pub struct BlockCounts {
    /// Blocks for every linear not in `per_linear`; `None` = all stored blocks.
    pub uniform: Option<usize>,
    /// Per linear path (`model.layers.0.self_attn.q_proj`).
    pub per_linear: HashMap<String, usize>,
}

impl BlockCounts {
    pub fn all() -> Self {
        Self::default()
    }

    pub fn uniform(n: usize) -> Self {
        Self {
            uniform: Some(n),
            per_linear: HashMap::new(),
        }
    }

    pub fn for_linear(&self, path: &str, stored: usize) -> usize {
        self.per_linear
            .get(path)
            .copied()
            .or(self.uniform)
            .unwrap_or(stored)
    }
}

/// Reads block `i` of linear `path`, checking dtypes, shapes, finiteness
/// and, when the checkpoint carries one, the block's checksum.
pub fn read_block(
    store: &TensorStore,
    path: &str,
    i: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Block> {
    let checked = CheckedBlock::read(store, path, i, m, n, k)?;
    Ok(Block {
        signs: checked.signs.to_vec(),
        u: checked.u,
        vt: checked.vt,
    })
}

/// As [`read_block`], with the signs re-tiled for the kernels straight out
/// of the memory map: the grow path of a resize, which copies each sign
/// byte once.
pub fn read_stack_block(
    store: &TensorStore,
    path: &str,
    i: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Result<StackBlock> {
    let checked = CheckedBlock::read(store, path, i, m, n, k)?;
    Ok(StackBlock {
        signs: TiledSigns::from_row_major(checked.signs, m, n),
        u: checked.u,
        vt: checked.vt,
        device: Default::default(),
    })
}

/// A block whose bytes passed every check: the signs still in the map, the
/// factors copied out.
struct CheckedBlock<'a> {
    signs: &'a [u8],
    u: Vec<f16>,
    vt: Vec<f16>,
}

impl<'a> CheckedBlock<'a> {
    fn read(
        store: &'a TensorStore,
        path: &str,
        i: usize,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Self> {
        let signs = store.bytes(&qweight_name(path, i), Dtype::U8, &[packed_len(m * n)])?;
        let u_raw = store.bytes(&u_name(path, i), Dtype::F16, &[m, k])?;
        let vt_raw = store.bytes(&vt_name(path, i), Dtype::F16, &[k, n])?;
        let u = finite_f16(u_raw, || store.location(&u_name(path, i)))?;
        let vt = finite_f16(vt_raw, || store.location(&vt_name(path, i)))?;
        // Checkpoints written by the reference carry no checksums.
        if let Some(stored) = store.meta(&checksum_key(path, i)) {
            let computed = format!("{:08x}", checksum(signs, &u, &vt));
            if stored != computed {
                let file = store
                    .file_of(&qweight_name(path, i))
                    .map_or_else(String::new, |f| format!(" in {}", f.display()));
                bail!(
                    "block {i} of {path}{file} fails its checksum (stored {stored}, computed {computed}): the file is corrupted"
                );
            }
        }
        Ok(Self { signs, u, vt })
    }
}

/// The bytes of `values` as stored (little-endian), without a copy where
/// the machine is little-endian.
fn as_le_bytes(values: &[f16]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Little-endian f16 bytes as values; a NaN or infinity is an error that
/// names the tensor and the index.
///
/// A grow reads u and vt of every block: on a little-endian machine the
/// bytes already are the values, and copying them beats decoding them pair
/// by pair (by about 15%, allocation included, on Llama-3-8B shapes).
fn finite_f16(raw: &[u8], location: impl Fn() -> String) -> Result<Vec<f16>> {
    let mut values = vec![f16::ZERO; raw.len() / 2];
    let len = 2 * values.len();
    bytemuck::cast_slice_mut::<f16, u8>(&mut values).copy_from_slice(&raw[..len]);
    if cfg!(target_endian = "big") {
        for x in &mut values {
            *x = f16::from_bits(u16::from_le(x.to_bits()));
        }
    }
    // All-ones exponent: infinity or NaN.
    let bad = values
        .iter()
        .fold(false, |acc, x| acc | (x.to_bits() & 0x7c00 == 0x7c00));
    if bad {
        let i = values.iter().position(|x| !x.is_finite()).unwrap_or(0);
        bail!(
            "{}: non-finite value {} at flat index {i}",
            location(),
            values[i]
        );
    }
    Ok(values)
}

/// The metadata key of the CRC-32 of block `i` of linear `path`.
pub fn checksum_key(path: &str, i: usize) -> String {
    format!("{path}.crc32_{i}")
}

/// CRC-32 of a block's bytes as stored: signs, then u and vt as
/// little-endian f16.
pub fn block_checksum(block: &Block) -> u32 {
    checksum(&block.signs, &block.u, &block.vt)
}

fn checksum(signs: &[u8], u: &[f16], vt: &[f16]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(signs);
    h.update(&as_le_bytes(u));
    h.update(&as_le_bytes(vt));
    h.finalize()
}

/// Number of blocks stored for `path` (0 when it is dense).
pub fn stored_blocks(store: &TensorStore, path: &str) -> usize {
    (0..)
        .take_while(|&i| store.contains(&qweight_name(path, i)))
        .count()
}

/// The weight of linear `path`: dense if `path.weight` exists, else the
/// first `blocks.for_linear(..)` BitStack blocks.
pub fn load_linear_weight(
    store: &TensorStore,
    cfg: &ModelConfig,
    path: &str,
    m: usize,
    n: usize,
    blocks: &BlockCounts,
    device: &Device,
) -> Result<LinearWeight> {
    let dense = format!("{path}.weight");
    if store.contains(&dense) {
        let v = store.f32_shaped(&dense, &[m, n])?;
        return Ok(LinearWeight::Dense(Tensor::from_vec(v, (m, n), device)?));
    }
    if !store.contains(&qweight_name(path, 0)) {
        bail!(
            "linear `{path}` has neither `{dense}` nor BitStack blocks (`{}`)",
            qweight_name(path, 0)
        );
    }
    let q = cfg.quantization_config.as_ref().with_context(|| {
        format!("`{path}` holds BitStack blocks but config.json has no quantization_config")
    })?;
    let k = q.k_of(path);
    let stored = stored_blocks(store, path);
    if stored < q.niter {
        bail!(
            "linear `{path}`: config says {} blocks, but `{}` is missing",
            q.niter,
            qweight_name(path, stored)
        );
    }
    let count = blocks.for_linear(path, q.niter);
    if count == 0 || count > q.niter {
        bail!(
            "linear `{path}`: cannot load {count} blocks (the checkpoint stores 1…{})",
            q.niter
        );
    }
    let blocks = (0..count)
        .map(|i| read_stack_block(store, path, i, m, n, k).map(std::sync::Arc::new))
        .collect::<Result<Vec<_>>>()?;
    Ok(LinearWeight::BitStack(std::sync::Arc::new(
        WeightStack::new(m, n, k, blocks),
    )))
}

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

/// The tensors of one block under the reference names.
pub fn block_tensors(
    path: &str,
    i: usize,
    b: &Block,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<(String, OwnedTensor)> {
    vec![
        (qweight_name(path, i), OwnedTensor::u8(b.signs.clone())),
        (u_name(path, i), OwnedTensor::f16(&b.u, &[m, k])),
        (vt_name(path, i), OwnedTensor::f16(&b.vt, &[k, n])),
    ]
}

/// Writes a model dir shard by shard into a temporary sibling directory and
/// renames it into place only when everything is written, so a failure or
/// an interrupt never leaves a half-written checkpoint at `out`.
pub struct CheckpointWriter {
    tmp: tempfile::TempDir,
    out: PathBuf,
    total_shards: usize,
    written: usize,
    weight_map: BTreeMap<String, String>,
}

impl CheckpointWriter {
    pub fn new(out: &Path, total_shards: usize) -> Result<Self> {
        if out.exists()
            && std::fs::read_dir(out)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "output dir {} already exists and is not empty; remove it or choose another",
                out.display()
            );
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".bitstack-partial-")
            .tempdir_in(&parent)
            .with_context(|| format!("output dir {} is not writable", parent.display()))?;
        Ok(Self {
            tmp,
            out: out.to_path_buf(),
            total_shards,
            written: 0,
            weight_map: BTreeMap::new(),
        })
    }

    /// Writes the next shard, with the checksums of the blocks it holds
    /// (`checksums`: path, block index, CRC-32) in its metadata.
    pub fn write_shard(
        &mut self,
        tensors: &[(String, OwnedTensor)],
        checksums: &[(String, usize, u32)],
    ) -> Result<()> {
        self.written += 1;
        let name = if self.total_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!(
                "model-{:05}-of-{:05}.safetensors",
                self.written, self.total_shards
            )
        };
        let path = self.tmp.path().join(&name);
        let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
        let metadata: HashMap<String, String> = checksums
            .iter()
            .map(|(p, i, crc)| (checksum_key(p, *i), format!("{crc:08x}")))
            .collect();
        let metadata = (!metadata.is_empty()).then_some(metadata);
        safetensors::serialize_to_file(views, metadata, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for (n, _) in tensors {
            self.weight_map.insert(n.clone(), name.clone());
        }
        Ok(())
    }

    /// Writes a small file (config, tokenizer, …) into the checkpoint.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes the shard index and moves the finished dir to `out`.
    pub fn finish(self) -> Result<PathBuf> {
        if self.written != self.total_shards {
            bail!(
                "internal: wrote {} of {} shards",
                self.written,
                self.total_shards
            );
        }
        if self.total_shards > 1 {
            let index = serde_json::json!({ "metadata": {}, "weight_map": self.weight_map });
            self.write_file(
                "model.safetensors.index.json",
                serde_json::to_string_pretty(&index)?.as_bytes(),
            )?;
        }
        if self.out.exists() {
            // An empty dir that the user created for us.
            std::fs::remove_dir(&self.out)
                .with_context(|| format!("cannot replace empty dir {}", self.out.display()))?;
        }
        let tmp = self.tmp.keep();
        // Temporary dirs are private; the checkpoint should not be.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::rename(&tmp, &self.out)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), self.out.display()))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_f16_decodes_little_endian_and_names_the_first_bad_value() {
        // Every finite bit pattern, as stored.
        let bits: Vec<u16> = (0..=u16::MAX).filter(|b| b & 0x7c00 != 0x7c00).collect();
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let values = finite_f16(&raw, || "t".into()).unwrap();
        assert!(values.iter().map(|x| x.to_bits()).eq(bits.iter().copied()));
        assert_eq!(as_le_bytes(&values), raw);

        for bad in [0x7c00u16, 0xfc00, 0x7e00, 0x7c01] {
            let mut raw = raw[..20].to_vec();
            raw[14..16].copy_from_slice(&bad.to_le_bytes());
            let e = finite_f16(&raw, || "tensor `x`".into()).unwrap_err();
            assert!(
                e.to_string().contains("tensor `x`: non-finite value"),
                "{e}"
            );
            assert!(e.to_string().contains("at flat index 7"), "{e}");
        }
    }
}
