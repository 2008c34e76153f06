//! A Llama-family decoder (Llama, Mistral, Qwen2) on candle, with every
//! decoder linear pluggable: dense or BitStack.
//!
//! The forward runs whole windows (no KV cache) and can report the inputs of
//! every linear to a [`Taps`] observer, which is how calibration collects its
//! statistics one layer at a time.
//!
//! Dense parts (embeddings, norms, biases, lm_head) are held in the type
//! they are stored in — a 16-bit checkpoint keeps them in 16 bits — while
//! activations and accumulation are always f32 ([`ACTIVATIONS`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use crate::format::architecture::has_bias;
pub use crate::format::architecture::{linear_shape, linear_weight_count, LinearKind, TapPoint};
use crate::format::block::names;
use crate::format::checkpoint::{stored_blocks, BlockCounts, Checkpoint};
use crate::format::config::{ModelConfig, RopeScaling, RopeType};
use crate::format::grid;
use crate::format::model_dir::ModelDir;
use crate::format::order::LinearSlot;
use crate::format::store::TensorStore;
use crate::runtime::linear::LinearWeight;
use crate::runtime::linear::{tensor_bytes, Linear};
use crate::runtime::placement::{DenseParts, Placement};
use crate::runtime::rotation::InputRotation;
use crate::runtime::stack::{StackPart, WeightStack};

/// The type of the activations, whatever the dense parts are stored in.
pub const ACTIVATIONS: DType = DType::F32;

/// Rows of a 16-bit lm_head widened to f32 at a time by [`Llama::logits`]:
/// 1.2–4 MiB of f32 for hidden sizes 576–2048, so no f32 copy of the whole
/// head is ever held, while each piece is still a good-sized product.
const HEAD_ROWS_PER_CHUNK: usize = 512;

/// Observes the input of each linear during a forward.
pub trait Taps {
    fn record(&mut self, point: TapPoint, x: &Tensor) -> candle_core::Result<()>;
}

/// Observes nothing.
pub struct NoTaps;

impl Taps for NoTaps {
    fn record(&mut self, _: TapPoint, _: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl DecoderLayer {
    pub fn linear(&self, kind: LinearKind) -> &Linear {
        match kind {
            LinearKind::Q => &self.q,
            LinearKind::K => &self.k,
            LinearKind::V => &self.v,
            LinearKind::O => &self.o,
            LinearKind::Gate => &self.gate,
            LinearKind::Up => &self.up,
            LinearKind::Down => &self.down,
        }
    }

    pub fn linear_mut(&mut self, kind: LinearKind) -> &mut Linear {
        match kind {
            LinearKind::Q => &mut self.q,
            LinearKind::K => &mut self.k,
            LinearKind::V => &mut self.v,
            LinearKind::O => &mut self.o,
            LinearKind::Gate => &mut self.gate,
            LinearKind::Up => &mut self.up,
            LinearKind::Down => &mut self.down,
        }
    }

    /// Decoder layer `l` of the model in `store`, each linear dense or with
    /// `blocks` of its BitStack blocks, placed by `placement`.
    pub fn load(
        store: &TensorStore,
        cfg: &ModelConfig,
        l: usize,
        blocks: &BlockCounts,
        device: &Device,
        placement: &Placement,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let norm = |name: &str| dense_part(store, name, &[d], device, placement.dense_parts);
        let lin = |kind: LinearKind| -> Result<Linear> {
            let m = linear_shape(cfg, kind).0;
            let path = kind.path(l);
            // Biases belong to the linears: held whoever holds the rest.
            let bias = if has_bias(cfg, kind) {
                Some(stored_tensor(store, &format!("{path}.bias"), &[m], device)?)
            } else {
                None
            };
            let weight = load_linear_weight(store, cfg, l, kind, blocks, device, placement)?;
            Ok(Linear { weight, bias })
        };
        Ok(Self {
            input_layernorm: norm(&format!("model.layers.{l}.input_layernorm.weight"))?,
            post_attention_layernorm: norm(&format!(
                "model.layers.{l}.post_attention_layernorm.weight"
            ))?,
            q: lin(LinearKind::Q)?,
            k: lin(LinearKind::K)?,
            v: lin(LinearKind::V)?,
            o: lin(LinearKind::O)?,
            gate: lin(LinearKind::Gate)?,
            up: lin(LinearKind::Up)?,
            down: lin(LinearKind::Down)?,
        })
    }

    /// The layer's forward on `x` (`[B, L, d]`), reporting linear inputs to
    /// `taps` and continuing the sequence held in `cache` when given.
    pub fn forward(
        &self,
        ctx: &DecoderContext,
        x: &Tensor,
        taps: &mut dyn Taps,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let cfg = ctx.cfg;
        let (b, l, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());

        let h = ctx.rms_norm(&x.contiguous()?, &self.input_layernorm)?;
        taps.record(TapPoint::AttnInput, &h)?;
        let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, l, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q.forward(&h)?, heads)?;
        let k = split(self.k.forward(&h)?, kv_heads)?;
        let v = split(self.v.forward(&h)?, kv_heads)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + l > ctx.rope.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                offset + l,
                ctx.rope.cos.dim(0)?
            );
        }
        let cos = ctx.rope.cos.narrow(0, offset, l)?;
        let sin = ctx.rope.sin.narrow(0, offset, l)?;
        let rope = if ctx.differentiable {
            candle_nn::rotary_emb::rope_slow
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let (k, v) = (
            repeat_kv(k, heads / kv_heads)?,
            repeat_kv(v, heads / kv_heads)?,
        );
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.broadcast_add(&causal_mask(l, offset, x.device())?)?;
        let probs = if ctx.differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let mixed = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, heads * hd))?;
        taps.record(TapPoint::OInput, &mixed)?;
        let x = (x + self.o.forward(&mixed)?)?;

        let h = ctx.rms_norm(&x, &self.post_attention_layernorm)?;
        taps.record(TapPoint::MlpInput, &h)?;
        let act = (candle_nn::ops::silu(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        taps.record(TapPoint::DownInput, &act)?;
        x + self.down.forward(&act)?
    }
}

/// What every decoder layer's forward shares besides its own weights, so a
/// layer can run without the rest of the model (streaming compression).
#[derive(Clone, Copy)]
pub struct DecoderContext<'a> {
    pub cfg: &'a ModelConfig,
    pub rope: &'a Rope,
    /// Only ops with a backward pass; see [`Llama::differentiable`].
    pub differentiable: bool,
}

impl DecoderContext<'_> {
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        // A 16-bit norm weight is `d` values: widening it per call is free.
        let weight = &weight.to_dtype(x.dtype())?;
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, weight, eps)
        } else {
            candle_nn::ops::rms_norm(x, weight, eps)
        }
    }
}

/// Precomputed RoPE tables.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_len: usize, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .map(|f| match &cfg.rope_scaling {
                Some(s) if s.rope_type == RopeType::Llama3 => llama3_scale(f, s),
                Some(s) if s.rope_type == RopeType::Linear => f / s.factor,
                _ => f,
            })
            .map(|f| f as f32)
            .collect();
        let inv = Tensor::from_vec(inv_freq, (1, hd / 2), device)?;
        let pos = Tensor::arange(0u32, max_len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }
}

/// Llama-3 frequency scaling: long wavelengths are divided by `factor`,
/// short ones kept, and the band between smoothly interpolated.
fn llama3_scale(freq: f64, s: &RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// A loaded model.
///
/// Cloning is cheap: tensors and stacks are shared, not copied, which is how
/// a resize builds the next snapshot of a running model.
#[derive(Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    /// In its stored type, as are `norm`, `lm_head` and the layers' norms
    /// and biases.
    pub embed: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub device: Device,
    /// Use only ops with a backward pass (slower), so that gradients of the
    /// loss reach the linear weights.
    pub differentiable: bool,
    /// Whether `embed`, `norm`, `lm_head` and the layers' norms are held
    /// (else they are empty and forwards refuse to run).
    pub dense_parts: DenseParts,
    rope: Rope,
}

impl Llama {
    /// Loads a dense or BitStack model dir. `blocks` picks how many blocks
    /// each BitStack linear keeps (ignored for dense linears).
    pub fn load(dir: &Path, blocks: &BlockCounts, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let store = TensorStore::open_dir(dir)?;
        Self::from_store(cfg, &store, blocks, device, &Placement::of(device))
    }

    /// The model of checkpoint `ckpt` with `blocks` per linear.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        blocks: &BlockCounts,
        device: &Device,
    ) -> Result<Self> {
        Self::from_store(
            ckpt.config().clone(),
            ckpt.store(),
            blocks,
            device,
            &Placement::of(device),
        )
    }

    /// The model in `dir` (dense, or a checkpoint) with `blocks` per linear.
    pub fn from_model_dir(dir: &ModelDir, blocks: &BlockCounts, device: &Device) -> Result<Self> {
        let placement = Placement::of(device);
        Self::from_store(
            dir.config().clone(),
            dir.store(),
            blocks,
            device,
            &placement,
        )
    }

    /// The model in `store` on `device`, its linears placed by `placement`
    /// (the loaders above hold them whole, their blocks where the device
    /// runs them: [`Placement::of`]).
    ///
    /// A tensor-parallel placement holds this rank's slice of every linear
    /// (see [`crate::format::shard`]) and the dense parts whole: such a
    /// model holds the rank's weights for an engine that runs the ranks
    /// (its own forward, which runs whole heads, refuses the slices).
    pub fn from_store(
        cfg: ModelConfig,
        store: &TensorStore,
        blocks: &BlockCounts,
        device: &Device,
        placement: &Placement,
    ) -> Result<Self> {
        placement.check(&cfg)?;
        let d = cfg.hidden_size;
        let tensor = |name: &str, shape: &[usize]| {
            dense_part(store, name, shape, device, placement.dense_parts)
        };
        let embed = tensor("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let norm = tensor("model.norm.weight", &[d])?;
        let lm_head = if store.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            Some(tensor("lm_head.weight", &[cfg.vocab_size, d])?)
        } else if cfg.tie_word_embeddings {
            None
        } else {
            bail!("lm_head.weight is missing and tie_word_embeddings is false");
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(store, &cfg, l, blocks, device, placement))
            .collect::<Result<_>>()?;
        let rope = Rope::new(&cfg, cfg.max_position_embeddings.min(32768), device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            differentiable: false,
            dense_parts: placement.dense_parts,
            rope,
        })
    }

    /// The type of the activations (and of materialized weights).
    pub fn dtype(&self) -> DType {
        ACTIVATIONS
    }

    /// Token ids `[B, L]` → hidden states after the embedding (f32: only
    /// the rows looked up are widened).
    pub fn embed(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        self.check_runnable()?;
        let (b, l) = tokens.dims2()?;
        let flat = tokens.flatten_all()?;
        self.embed
            .index_select(&flat, 0)?
            .to_dtype(ACTIVATIONS)?
            .reshape((b, l, self.cfg.hidden_size))
    }

    /// Runs decoder layer `index` on `x` (`[B, L, d]`), reporting linear inputs to `taps`.
    pub fn layer_forward(
        &self,
        index: usize,
        x: &Tensor,
        taps: &mut dyn Taps,
    ) -> candle_core::Result<Tensor> {
        self.layer_forward_cached(index, x, taps, None)
    }

    /// As [`Llama::layer_forward`], continuing the sequence held in `cache`
    /// (its keys and values grow by `x`'s positions).
    pub fn layer_forward_cached(
        &self,
        index: usize,
        x: &Tensor,
        taps: &mut dyn Taps,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        self.check_runnable()?;
        self.layers[index].forward(&self.context(), x, taps, cache)
    }

    /// Errs when the dense parts are held elsewhere.
    fn check_runnable(&self) -> candle_core::Result<()> {
        match self.dense_parts {
            DenseParts::Held => Ok(()),
            DenseParts::Elsewhere => candle_core::bail!(
                "this model holds its linears only (the engine running it holds the embeddings, norms and head): it cannot run a forward itself"
            ),
        }
    }

    /// The parts every layer's forward shares.
    pub fn context(&self) -> DecoderContext<'_> {
        DecoderContext {
            cfg: &self.cfg,
            rope: &self.rope,
            differentiable: self.differentiable,
        }
    }

    /// Final hidden states `[B, L, d]` (after the last norm).
    pub fn forward_hidden(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_hidden_from(0, self.embed(tokens)?)
    }

    /// Final hidden states from `x`, the input of layer `from`.
    pub fn forward_hidden_from(&self, from: usize, mut x: Tensor) -> candle_core::Result<Tensor> {
        for i in from..self.layers.len() {
            x = self.layer_forward(i, &x, &mut NoTaps)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        self.context().rms_norm(x, weight)
    }

    /// Logits `[B, L, vocab]` of `tokens` (`[B, L]`) following the positions in `cache`.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.embed(tokens)?;
        for (i, c) in cache.layers.iter_mut().enumerate() {
            x = self.layer_forward_cached(i, &x, &mut NoTaps, Some(c))?;
        }
        self.logits(&self.rms_norm(&x, &self.norm)?)
    }

    /// Logits `[.., vocab]` of hidden states `[.., d]`, accumulated in the
    /// hidden states' type. A head stored in another type (16 bits) is
    /// widened [`HEAD_ROWS_PER_CHUNK`] rows at a time inside the product.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.check_runnable()?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let dims = hidden.dims().to_vec();
        let flat = hidden.reshape(((), dims[dims.len() - 1]))?;
        let out = if head.dtype() == flat.dtype() {
            flat.matmul(&head.t()?)?
        } else {
            let vocab = head.dim(0)?;
            let starts: Vec<usize> = (0..vocab).step_by(HEAD_ROWS_PER_CHUNK).collect();
            // Pieces in parallel: a decode step is one row of hidden states,
            // and one thread would leave the head's bandwidth unused.
            let pieces = starts
                .into_par_iter()
                .map(|start| {
                    let rows = HEAD_ROWS_PER_CHUNK.min(vocab - start);
                    let w = widen_rows(head, start, rows, flat.dtype())?;
                    flat.matmul(&w.t()?)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&pieces, 1)?
        };
        let mut shape = dims;
        *shape.last_mut().expect("hidden has a feature dim") = self.cfg.vocab_size;
        out.reshape(shape)
    }

    /// Logits `[B, L, vocab]`.
    pub fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        self.logits(&self.forward_hidden(tokens)?)
    }

    /// Turns every BitStack linear into its dense `W` on the model's device
    /// (in the model's dtype), built once: forwards then cost a matrix
    /// product instead of a rebuild per call, which on a GPU dominates.
    /// Dense weights take more memory than the blocks, and the byte counts
    /// below change with them: measure before materializing.
    pub fn materialize(&mut self) -> candle_core::Result<()> {
        let (device, dtype) = (self.device.clone(), self.dtype());
        for layer in &mut self.layers {
            for kind in LinearKind::ALL {
                layer.linear_mut(kind).materialize(&device, dtype)?;
            }
        }
        Ok(())
    }

    /// Bytes of all resident BitStack blocks.
    pub fn stack_bytes(&self) -> usize {
        self.linears().map(|(_, _, l)| l.stack_bytes()).sum()
    }

    /// Bytes of every resident weight (dense parts, in their stored types,
    /// and blocks).
    pub fn resident_bytes(&self) -> usize {
        let mut total = tensor_bytes(&self.embed) + tensor_bytes(&self.norm);
        total += self.lm_head.as_ref().map_or(0, tensor_bytes);
        for layer in &self.layers {
            total += tensor_bytes(&layer.input_layernorm)
                + tensor_bytes(&layer.post_attention_layernorm);
        }
        total
            + self
                .linears()
                .map(|(_, _, l)| l.resident_bytes())
                .sum::<usize>()
    }

    /// Every decoder linear with its layer index and kind.
    pub fn linears(&self) -> impl Iterator<Item = (usize, LinearKind, &Linear)> {
        self.layers.iter().enumerate().flat_map(|(i, layer)| {
            LinearKind::ALL
                .iter()
                .map(move |&k| (i, k, layer.linear(k)))
        })
    }

    /// Number of weights in all decoder linears (the denominator of bits/weight).
    pub fn linear_weight_count(&self) -> usize {
        linear_weight_count(&self.cfg)
    }
}

/// Rows `start..start + rows` of the matrix `w` as `dtype`. A 16-bit matrix
/// on the CPU is widened with `half`'s slice conversion (F16C where the
/// CPU has it): candle's `to_dtype` converts value by value in software,
/// which made a 16-bit lm_head cost a decode step 4× its f32 time.
fn widen_rows(w: &Tensor, start: usize, rows: usize, dtype: DType) -> candle_core::Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let fallback = || w.narrow(0, start, rows)?.to_dtype(dtype);
    if dtype != DType::F32 || !w.device().is_cpu() || !w.is_contiguous() {
        return fallback();
    }
    let d = w.dim(1)?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return fallback();
    };
    let range = layout.start_offset() + start * d..layout.start_offset() + (start + rows) * d;
    let mut out = vec![0f32; rows * d];
    match w.dtype() {
        DType::F16 => cpu.as_slice::<half::f16>()?[range].convert_to_f32_slice(&mut out),
        DType::BF16 => cpu.as_slice::<half::bf16>()?[range].convert_to_f32_slice(&mut out),
        _ => {
            drop(storage);
            return fallback();
        }
    }
    Tensor::from_vec(out, (rows, d), w.device())
}

/// Dense part `name` of `store` (see [`stored_tensor`]), or an empty
/// tensor when the dense parts are held elsewhere.
fn dense_part(
    store: &TensorStore,
    name: &str,
    shape: &[usize],
    device: &Device,
    parts: DenseParts,
) -> Result<Tensor> {
    match parts {
        DenseParts::Held => stored_tensor(store, name, shape, device),
        DenseParts::Elsewhere => Ok(Tensor::zeros(0, DType::F32, device)?),
    }
}

/// Dense tensor `name` of `store` on `device`, in its stored dtype: a
/// 16-bit checkpoint stays 16-bit.
pub fn stored_tensor(
    store: &TensorStore,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let (dtype, raw) = store.dense_shaped(name, shape)?;
    Ok(Tensor::from_raw_buffer(
        &raw,
        dtype.candle(),
        shape,
        device,
    )?)
}

/// The weight of linear `kind` of layer `l`: dense if `{path}.weight`
/// exists, else the first `blocks.for_linear(..)` BitStack blocks; the
/// part `placement` holds.
fn load_linear_weight(
    store: &TensorStore,
    cfg: &ModelConfig,
    l: usize,
    kind: LinearKind,
    blocks: &BlockCounts,
    device: &Device,
    placement: &Placement,
) -> Result<LinearWeight> {
    let (m, n) = linear_shape(cfg, kind);
    let path = &kind.path(l);
    let shard = placement.shard(kind);
    let (lm, ln) = shard.map_or((m, n), |s| s.local(m, n));
    let dense = format!("{path}.weight");
    if store.contains(&dense) {
        let v = store.f32_shaped(&dense, &[m, n])?;
        let v = match shard {
            None => v,
            Some(s) => s.dense(&v, m, n),
        };
        return Ok(LinearWeight::Dense(Tensor::from_vec(v, (lm, ln), device)?));
    }
    let first = names::qweight(path, 0);
    let first_plane = grid::names::plane(path, 0);
    if !store.contains(&first) && !store.contains(&first_plane) {
        bail!("linear `{path}` has neither `{dense}` nor BitStack blocks (`{first}`)");
    }
    let q = cfg.quantization_config.as_ref().with_context(|| {
        format!("`{path}` holds BitStack blocks but config.json has no quantization_config")
    })?;
    let slot = LinearSlot {
        name: path.to_string(),
        m,
        n,
        k: q.k_of(path),
        stored: q.niter,
        grid: q.grid,
    };
    let stored = stored_blocks(store, path);
    if stored < slot.avd_blocks() {
        bail!(
            "linear `{path}`: config says {} blocks, but `{}` is missing",
            slot.avd_blocks(),
            names::qweight(path, stored)
        );
    }
    let count = blocks.for_linear(path, q.niter);
    if count == 0 || count > q.niter {
        bail!(
            "linear `{path}`: cannot load {count} blocks (the checkpoint stores 1…{})",
            q.niter
        );
    }
    let parts = (0..count)
        .map(|b| StackPart::read(store, &slot, b, &placement.residence, shard))
        .collect::<Result<Vec<_>>>()?;
    let rotation = match q.rotation {
        None => None,
        Some(r) => {
            let cols = shard.map_or(0..n, |s| s.input_columns(n));
            let rotation = InputRotation::new(r, cols)
                .with_context(|| format!("the input rotation of `{path}`"))?;
            Some(std::sync::Arc::new(rotation))
        }
    };
    Ok(LinearWeight::BitStack(std::sync::Arc::new(
        WeightStack::from_parts(lm, ln, slot.k, parts)?.with_rotation(rotation)?,
    )))
}

fn repeat_kv(x: Tensor, times: usize) -> candle_core::Result<Tensor> {
    if times == 1 {
        return Ok(x);
    }
    let (b, h, l, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, times, l, d))?
        .reshape((b, h * times, l, d))
}

/// `[l, offset + l]`: query i (at position offset + i) sees keys 0…offset + i.
fn causal_mask(l: usize, offset: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = offset + l;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (l, total), device)
}

/// Keys and values of one layer for the positions seen so far.
#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `[B, H, L, d]` keys and values; returns all of them.
    fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Bytes of the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.kv
            .as_ref()
            .map_or(0, |(k, v)| tensor_bytes(k) + tensor_bytes(v))
    }
}

/// The KV cache of a whole model for one batch of sequences.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: (0..model.layers.len())
                .map(|_| LayerCache::default())
                .collect(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

/// Mean NLL helper: log-probabilities of `targets` under `logits` (`[T, V]`).
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

/// Loads `tokenizer.json` from a model dir with a clear error when it is absent.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        bail!("missing tokenizer: {} does not exist", path.display());
    }
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot load {}", path.display()))
}

/// The token ids of the UTF-8 text file at `path`, with errors that name it.
pub fn tokenize_file(tokenizer: &tokenizers::Tokenizer, path: &Path) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize {}: {e}", path.display()))?
        .get_ids()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rope_scaling: serde_json::Value) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "vocab_size": 32, "rope_scaling": rope_scaling,
        }))
        .unwrap()
    }

    #[test]
    fn linear_rope_scaling_runs_positions_at_a_fraction() {
        let plain = Rope::new(&config(serde_json::Value::Null), 40, &Device::Cpu).unwrap();
        let scaled = config(serde_json::json!({"type": "linear", "factor": 2.0}));
        let scaled = Rope::new(&scaled, 40, &Device::Cpu).unwrap();
        // Position 2p with factor 2 is position p without scaling.
        for (table, plain_table) in [(&scaled.cos, &plain.cos), (&scaled.sin, &plain.sin)] {
            let even = table.to_vec2::<f32>().unwrap();
            let plain_rows = plain_table.to_vec2::<f32>().unwrap();
            for p in 0..20 {
                for (a, b) in even[2 * p].iter().zip(&plain_rows[p]) {
                    assert!((a - b).abs() < 1e-5, "position {p}: {a} vs {b}");
                }
            }
            assert_ne!(even[1], plain_rows[1]);
        }
    }

    #[test]
    fn rope_types_the_runner_does_not_implement_are_refused() {
        for scaling in [
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
        ] {
            let json = serde_json::json!({
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
                "vocab_size": 32, "rope_scaling": scaling,
            });
            let err = serde_json::from_value::<ModelConfig>(json).unwrap_err();
            assert!(err.to_string().contains("unknown variant"), "{err}");
        }
        let bad = config(serde_json::json!({"rope_type": "linear", "factor": 0.0}));
        assert!(bad.validate().is_err());
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // wavelength 100 < 8192/4: unchanged
        let high = 2.0 * std::f64::consts::PI / 100.0;
        assert_eq!(llama3_scale(high, &s), high);
        // wavelength 20000 > 8192: divided by the factor
        let low = 2.0 * std::f64::consts::PI / 20000.0;
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-15);
        // in between: strictly between the two, and continuous at both edges
        let mid = 2.0 * std::f64::consts::PI / 4000.0;
        let m = llama3_scale(mid, &s);
        assert!(m > mid / 8.0 && m < mid, "{m}");
        for edge in [8192.0 / 4.0, 8192.0] {
            let f = 2.0 * std::f64::consts::PI / edge;
            let (a, b) = (
                llama3_scale(f * 1.000001, &s),
                llama3_scale(f * 0.999999, &s),
            );
            assert!(
                (a - b).abs() / f < 1e-4,
                "jump at wavelength {edge}: {a} vs {b}"
            );
        }
    }
}
