//! Small random Llama-family model dirs, for tests and benchmarks.
//!
//! The weights are random but the files are real: a `config.json`, a
//! safetensors file and a byte-level BPE `tokenizer.json`, loadable by
//! anything that loads a Hugging Face model dir.

use std::path::Path;

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::checkpoint::OwnedTensor;
use crate::config::ModelConfig;
use crate::model::{linear_shape, LinearKind};

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
        std::fs::create_dir_all(dir)?;
        let json = self.config_json();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&json)?,
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
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
        write_byte_tokenizer(&dir.join("tokenizer.json"), self.vocab)?;
        Ok(())
    }
}

fn norm_weight(d: usize, rng: &mut StdRng) -> OwnedTensor {
    // Uneven norms make channel scales matter, like trained models.
    let v: Vec<f32> = (0..d).map(|_| 0.5 + rng.random::<f32>() * 1.5).collect();
    OwnedTensor::f32(&v, &[d])
}

/// A byte-level BPE tokenizer with 256 byte tokens and no merges (`vocab ≥ 256`).
fn write_byte_tokenizer(path: &Path, vocab: usize) -> Result<()> {
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
    tok.save(path, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
