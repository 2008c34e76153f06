//! Small random Llama-family model dirs, for tests and benchmarks.
//!
//! The weights are random but the files are real: a `config.json`, a
//! safetensors file and a byte-level BPE `tokenizer.json`, loadable by
//! anything that loads a Hugging Face model dir. [`SyntheticSpec::write_bitstack`]
//! writes a BitStack checkpoint of random blocks directly, for resize
//! benchmarks at shapes too large to decompose here.

use std::path::Path;

use anyhow::{ensure, Result};
use half::f16;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

use bitstack_assets::atomic::AtomicDir;

use crate::format::architecture::{linear_shape, LinearKind};
use crate::format::block::{Block, BlockShape};
use crate::format::config::{ModelConfig, QuantizationConfig};
use crate::format::dense::DenseDtype;
use crate::format::pack::packed_len;
use crate::format::writer::{CheckpointWriter, LinearBlocks, OwnedTensor};

/// Shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub model_type: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub seed: u64,
    /// Storage type of the dense parts of [`SyntheticSpec::write_bitstack`]
    /// checkpoints (the dense model of [`SyntheticSpec::write`] is f32).
    pub dense_dtype: DenseDtype,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            model_type: "llama",
            hidden: 48,
            intermediate: 104,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 300,
            tied: true,
            seed: 1,
            dense_dtype: DenseDtype::default(),
        }
    }
}

impl SyntheticSpec {
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": [match self.model_type { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "torch_dtype": "float32"
        })
    }

    /// Writes the model dir (which must not exist yet or be empty).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let out = AtomicDir::create(dir)?;
        let json = self.config_json();
        out.write(
            "config.json",
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        let cfg: ModelConfig = serde_json::from_value(json)?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut normal = |shape: &[usize], scale: f32| -> OwnedTensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                .collect();
            OwnedTensor::f32(&v, shape)
        };
        let d = self.hidden;
        let mut tensors = vec![
            (
                "model.embed_tokens.weight".to_string(),
                normal(&[self.vocab, d], 0.15),
            ),
            (
                "model.norm.weight".to_string(),
                norm_weight(d, &mut StdRng::seed_from_u64(self.seed + 1)),
            ),
        ];
        if !self.tied {
            tensors.push(("lm_head.weight".to_string(), normal(&[self.vocab, d], 0.2)));
        }
        for l in 0..self.layers {
            for kind in LinearKind::ALL {
                let (m, n) = linear_shape(&cfg, kind);
                tensors.push((
                    format!("{}.weight", kind.path(l)),
                    normal(&[m, n], 1.0 / (n as f32).sqrt()),
                ));
                if cfg.qkv_bias() && matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V) {
                    tensors.push((format!("{}.bias", kind.path(l)), normal(&[m], 0.1)));
                }
            }
            let mut r = StdRng::seed_from_u64(self.seed + 10 + l as u64);
            tensors.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                norm_weight(d, &mut r),
            ));
            tensors.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                norm_weight(d, &mut r),
            ));
        }
        let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
        safetensors::serialize_to_file(views, None, &out.path().join("model.safetensors"))?;
        out.write(
            "tokenizer.json",
            byte_tokenizer_json(self.vocab)?.as_bytes(),
        )?;
        out.commit()?;
        Ok(())
    }

    /// Writes a BitStack checkpoint of this shape to `dir` (which must not
    /// exist yet or be empty): `blocks_per_linear` random blocks of rank `k`
    /// in every decoder linear, with their checksums, and random dense parts
    /// stored as `self.dense_dtype`.
    ///
    /// No dense model is made and nothing is decomposed, so shapes far too
    /// large for that (Llama-3-8B) can be written to measure loading and
    /// resizing. Layers are made and written one shard at a time, so memory
    /// stays about one layer's blocks; the embedding comes last, in its own
    /// shard. The blocks' magnitudes halve block by block, as a
    /// decomposition's would, so forwards stay finite.
    pub fn write_bitstack(&self, dir: &Path, blocks_per_linear: usize, k: usize) -> Result<()> {
        ensure!(
            blocks_per_linear >= 1 && k >= 1,
            "a BitStack checkpoint needs at least one block of rank at least 1"
        );
        let json = self.config_json();
        let cfg: ModelConfig = serde_json::from_value(json.clone())?;
        let quantization = QuantizationConfig::new(k, blocks_per_linear, Default::default());
        let mut writer = CheckpointWriter::create(dir, json, &quantization, self.dense_dtype)?;
        let d = self.hidden;
        for l in 0..self.layers {
            // A seed per layer: a layer's contents do not depend on the others.
            let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(1000 + l as u64));
            let mut blocks = Vec::new();
            let mut dense = Vec::new();
            for kind in LinearKind::ALL {
                let (m, n) = linear_shape(&cfg, kind);
                let path = kind.path(l);
                let stack: Vec<Block> = (0..blocks_per_linear)
                    .map(|i| random_block(m, n, k, 0.5f32.powi(i as i32), &mut rng))
                    .collect();
                blocks.push((path.clone(), BlockShape::new(m, n, k), stack));
                if cfg.qkv_bias() && matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V) {
                    dense.push((format!("{path}.bias"), uniform_f32(&[m], 0.1, &mut rng)));
                }
            }
            dense.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                norm_weight(d, &mut rng),
            ));
            dense.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                norm_weight(d, &mut rng),
            ));
            let linears: Vec<LinearBlocks> = blocks
                .iter()
                .map(|(path, shape, stack)| LinearBlocks {
                    path: path.clone(),
                    shape: *shape,
                    blocks: stack,
                    grid: None,
                })
                .collect();
            writer.write_layer(l, &linears, dense)?;
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut dense = vec![
            (
                "model.embed_tokens.weight".to_string(),
                uniform_f32(&[self.vocab, d], 0.15, &mut rng),
            ),
            ("model.norm.weight".to_string(), norm_weight(d, &mut rng)),
        ];
        if !self.tied {
            dense.push((
                "lm_head.weight".to_string(),
                uniform_f32(&[self.vocab, d], 0.2, &mut rng),
            ));
        }
        writer.write_dense(dense)?;
        writer.write_file(
            "tokenizer.json",
            byte_tokenizer_json(self.vocab)?.as_bytes(),
        )?;
        writer.finish()?;
        Ok(())
    }
}

/// A random `m×n` block of rank `k`: random signs (padding bits 0, as the
/// format asks) and `u·vt` entries of about `scale / (3·√n)`.
pub fn random_block(m: usize, n: usize, k: usize, scale: f32, rng: &mut StdRng) -> Block {
    let mut signs = vec![0u8; packed_len(m * n)];
    rng.fill_bytes(&mut signs);
    let used = (m * n) % 8;
    if used != 0 {
        let last = signs.len() - 1;
        signs[last] &= 0xffu8 << (8 - used);
    }
    let mut factor = |len: usize, bound: f32| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * bound))
            .collect()
    };
    let u = factor(m * k, 1.0 / (k as f32).sqrt());
    let vt = factor(k * n, scale / (n as f32).sqrt());
    Block { signs, u, vt }
}

/// Uniform values in `[-scale, scale)` as an f32 tensor.
fn uniform_f32(shape: &[usize], scale: f32, rng: &mut StdRng) -> OwnedTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    OwnedTensor::f32(&v, shape)
}

fn norm_weight(d: usize, rng: &mut StdRng) -> OwnedTensor {
    // Uneven norms make channel scales matter, like trained models.
    let v: Vec<f32> = (0..d).map(|_| 0.5 + rng.random::<f32>() * 1.5).collect();
    OwnedTensor::f32(&v, &[d])
}

/// A byte-level BPE tokenizer with 256 byte tokens and no merges (`vocab ≥ 256`),
/// as `tokenizer.json` text.
fn byte_tokenizer_json(vocab: usize) -> Result<String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let alphabet = ByteLevel::alphabet();
    let mut chars: Vec<char> = alphabet.into_iter().collect();
    chars.sort();
    let mut map: tokenizers::models::bpe::Vocab = Default::default();
    for (i, c) in chars.iter().enumerate() {
        map.insert(c.to_string(), i as u32);
    }
    for i in chars.len()..vocab.max(chars.len()) {
        map.insert(format!("<extra_{i}>"), i as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(map, vec![])
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))
}
