//! Llama-family hyperparameters from GGUF metadata (`llama.*` or `qwen2.*`
//! keys), and the matching Hugging Face `config.json`.

use super::arch::Arch;
use super::meta;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::DType;
use serde_json::{json, Value};

/// What `LlamaForCausalLM` or `Qwen2ForCausalLM` needs to know.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LlamaParams {
    pub arch: Arch,
    pub block_count: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub rope_scaling: Option<Value>,
}

impl LlamaParams {
    pub fn from_gguf(c: &Content, arch: Arch) -> Result<Self> {
        let key = |suffix: &str| arch.key(suffix);
        let hidden = meta::usize_key(c, &key("embedding_length"))?;
        let heads = meta::usize_key(c, &key("attention.head_count"))?;
        let kv_heads = match meta::opt(c, &key("attention.head_count_kv")) {
            Some(v) => meta::as_u64(v, &key("attention.head_count_kv"))? as usize,
            None => heads,
        };
        if heads == 0
            || kv_heads == 0
            || !hidden.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
        {
            bail!(
                "inconsistent attention shape: hidden {hidden}, {heads} heads, {kv_heads} kv heads"
            );
        }
        let head_dim = match meta::opt(c, &key("attention.key_length")) {
            Some(v) => meta::as_u64(v, &key("attention.key_length"))? as usize,
            None => hidden / heads,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head dim {head_dim} must be even and non-zero");
        }
        if heads.checked_mul(head_dim).is_none() {
            bail!("{heads} heads of dim {head_dim} overflow");
        }
        if let Some(v) = meta::opt(c, &key("attention.value_length")) {
            let value_dim = meta::as_u64(v, &key("attention.value_length"))? as usize;
            if value_dim != head_dim {
                bail!("value length {value_dim} differs from key length {head_dim}; unsupported");
            }
        }
        let vocab_size = match meta::opt_str_array(c, "tokenizer.ggml.tokens")? {
            Some(tokens) => tokens.len(),
            None => meta::usize_key(c, &key("vocab_size"))
                .context("no `tokenizer.ggml.tokens` to take the vocabulary size from")?,
        };
        let rms_norm_eps = meta::opt_f64(c, &key("attention.layer_norm_rms_epsilon"))?
            .with_context(|| {
                format!(
                    "missing GGUF metadata key `{}`",
                    key("attention.layer_norm_rms_epsilon")
                )
            })?;
        if arch == Arch::Qwen2 && head_dim * heads != hidden {
            bail!("head dim {head_dim} × {heads} heads ≠ hidden {hidden}; Qwen2ForCausalLM cannot express that");
        }
        Ok(Self {
            arch,
            block_count: meta::usize_key(c, &key("block_count"))?,
            hidden,
            intermediate: meta::usize_key(c, &key("feed_forward_length"))?,
            heads,
            kv_heads,
            head_dim,
            rope_theta: meta::opt_f64(c, &key("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps,
            context_length: meta::usize_key(c, &key("context_length"))?,
            vocab_size,
            bos_token_id: meta::opt_u32(c, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: meta::opt_u32(c, "tokenizer.ggml.eos_token_id")?,
            rope_scaling: rope_scaling(c, arch)?,
        })
    }

    /// `config.json` for the architecture's `transformers` class.
    pub fn config_json(&self, tied: bool, dtype: DType) -> Result<Value> {
        let mut config = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.block_count,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tied,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype(dtype)?,
        });
        match self.arch {
            Arch::Llama => {
                config["head_dim"] = self.head_dim.into();
                config["attention_bias"] = false.into();
                config["mlp_bias"] = false.into();
            }
            // q/k/v biases are implied by the class. GGUF has no
            // sliding-window keys and llama.cpp attends over the full
            // context, so the import says so.
            Arch::Qwen2 => {
                config["use_sliding_window"] = false.into();
                config["sliding_window"] = self.context_length.into();
                config["max_window_layers"] = self.block_count.into();
                config["attention_dropout"] = 0.0.into();
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            config["rope_scaling"] = scaling.clone();
        }
        Ok(config)
    }

    /// `generation_config.json`: just the special token ids.
    pub fn generation_config_json(&self) -> Value {
        json!({
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        })
    }
}

/// The name PyTorch uses for `dtype`; only the float types we write.
pub(crate) fn torch_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => bail!("unsupported output dtype {other:?} (supported: f32, f16, bf16)"),
    })
}

/// `rope_scaling` from `{arch}.rope.scaling.*`. Linear scaling maps directly;
/// anything else would silently change the model, so it is an error.
fn rope_scaling(c: &Content, arch: Arch) -> Result<Option<Value>> {
    let (type_key, factor_key) = (
        arch.key("rope.scaling.type"),
        arch.key("rope.scaling.factor"),
    );
    let kind = meta::opt_str(c, &type_key)?;
    match kind {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = meta::opt_f64(c, &factor_key)?
                .with_context(|| format!("`{type_key}` is linear but `{factor_key}` is missing"))?;
            Ok(Some(json!({ "rope_type": "linear", "factor": factor })))
        }
        Some(other) => bail!("unsupported rope scaling `{other}` (supported: linear)"),
    }
}
