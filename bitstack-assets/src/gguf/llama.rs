//! Llama hyperparameters from GGUF metadata, and the matching Hugging Face
//! `config.json`.

use super::meta;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::DType;
use serde_json::{json, Value};

/// What `LlamaForCausalLM` needs to know.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LlamaParams {
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
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let hidden = meta::usize_key(c, "llama.embedding_length")?;
        let heads = meta::usize_key(c, "llama.attention.head_count")?;
        let kv_heads = match meta::opt(c, "llama.attention.head_count_kv") {
            Some(v) => meta::as_u64(v, "llama.attention.head_count_kv")? as usize,
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
        let head_dim = match meta::opt(c, "llama.attention.key_length") {
            Some(v) => meta::as_u64(v, "llama.attention.key_length")? as usize,
            None => hidden / heads,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head dim {head_dim} must be even and non-zero");
        }
        if heads.checked_mul(head_dim).is_none() {
            bail!("{heads} heads of dim {head_dim} overflow");
        }
        if let Some(v) = meta::opt(c, "llama.attention.value_length") {
            let value_dim = meta::as_u64(v, "llama.attention.value_length")? as usize;
            if value_dim != head_dim {
                bail!("value length {value_dim} differs from key length {head_dim}; unsupported");
            }
        }
        let vocab_size = match meta::opt_str_array(c, "tokenizer.ggml.tokens")? {
            Some(tokens) => tokens.len(),
            None => meta::usize_key(c, "llama.vocab_size")
                .context("no `tokenizer.ggml.tokens` to take the vocabulary size from")?,
        };
        let rms_norm_eps = meta::opt_f64(c, "llama.attention.layer_norm_rms_epsilon")?
            .context("missing GGUF metadata key `llama.attention.layer_norm_rms_epsilon`")?;
        Ok(Self {
            block_count: meta::usize_key(c, "llama.block_count")?,
            hidden,
            intermediate: meta::usize_key(c, "llama.feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            rope_theta: meta::opt_f64(c, "llama.rope.freq_base")?.unwrap_or(10_000.0),
            rms_norm_eps,
            context_length: meta::usize_key(c, "llama.context_length")?,
            vocab_size,
            bos_token_id: meta::opt_u32(c, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: meta::opt_u32(c, "tokenizer.ggml.eos_token_id")?,
            rope_scaling: rope_scaling(c)?,
        })
    }

    /// `config.json` for `LlamaForCausalLM`.
    pub fn config_json(&self, tied: bool, dtype: DType) -> Result<Value> {
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.block_count,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tied,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": torch_dtype(dtype)?,
        });
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

/// `rope_scaling` from `llama.rope.scaling.*`. Linear scaling maps directly;
/// anything else would silently change the model, so it is an error.
fn rope_scaling(c: &Content) -> Result<Option<Value>> {
    let kind = meta::opt_str(c, "llama.rope.scaling.type")?;
    match kind {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = meta::opt_f64(c, "llama.rope.scaling.factor")?.context(
                "`llama.rope.scaling.type` is linear but `llama.rope.scaling.factor` is missing",
            )?;
            Ok(Some(json!({ "rope_type": "linear", "factor": factor })))
        }
        Some(other) => bail!("unsupported rope scaling `{other}` (supported: linear)"),
    }
}
