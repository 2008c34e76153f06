//! The GGUF architectures the importer converts, and what differs between
//! them: metadata prefix, Hugging Face class, q/k row order and biases.

use anyhow::{bail, Result};

/// A `general.architecture` the importer understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Llama, Arch::Qwen2];

    /// The architecture `general.architecture` names, or an error that
    /// lists the supported ones.
    pub fn from_gguf(name: &str) -> Result<Self> {
        match Arch::ALL.into_iter().find(|a| a.name() == name) {
            Some(a) => Ok(a),
            None => {
                let names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
                bail!(
                    "unsupported architecture {name} (supported: {})",
                    names.join(", ")
                )
            }
        }
    }

    /// The GGUF name, which is also the metadata key prefix and the Hugging
    /// Face `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// `{name}.{suffix}`: a key of this architecture's hyperparameters.
    pub fn key(self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name())
    }

    /// The `transformers` class that loads the imported dir.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// llama.cpp interleaves q/k rows for its RoPE only when converting
    /// Llama; Qwen2 keeps the Hugging Face (rotate-half) order.
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }

    /// q, k and v carry a bias (Qwen2 always).
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }

    /// Tensors per decoder block: 2 norms, 7 linears, and the biases.
    pub fn tensors_per_block(self) -> usize {
        if self.qkv_bias() {
            12
        } else {
            9
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_lists_the_supported() {
        assert_eq!(Arch::from_gguf("qwen2").unwrap(), Arch::Qwen2);
        let e = Arch::from_gguf("gemma2").unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported architecture gemma2 (supported: llama, qwen2)"
        );
    }
}
