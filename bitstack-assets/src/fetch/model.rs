//! The pinned models `fetch-assets` can fetch, each a value: its wheels, the
//! GGUF they make, its hash and its attribution.

use super::pin::{self, Wheel};
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// A pinned test model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Model {
    /// SmolLM2-135M-Instruct (llama, Q4_1), the default.
    #[default]
    SmolLm2,
    /// Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M).
    Qwen25Coder,
}

impl Model {
    /// Every model, default first.
    pub const ALL: [Model; 2] = [Model::SmolLm2, Model::Qwen25Coder];

    /// The short name on the command line (`--model`).
    pub fn id(self) -> &'static str {
        match self {
            Model::SmolLm2 => "smollm2-135m",
            Model::Qwen25Coder => "qwen2.5-coder-0.5b",
        }
    }

    /// The model's own name, also the name of its imported dense dir.
    pub fn name(self) -> &'static str {
        match self {
            Model::SmolLm2 => "SmolLM2-135M-Instruct",
            Model::Qwen25Coder => "Qwen2.5-Coder-0.5B-Instruct",
        }
    }

    /// File name of the verified GGUF in the assets dir.
    pub fn gguf_file(self) -> &'static str {
        self.asset().gguf_file
    }

    /// Pinned sha256 of that GGUF.
    pub fn gguf_sha256(self) -> &'static str {
        self.asset().gguf_sha256
    }

    pub(crate) fn asset(self) -> &'static ModelAsset {
        match self {
            Model::SmolLm2 => &pin::SMOLLM2_ASSET,
            Model::Qwen25Coder => &pin::QWEN25_CODER_ASSET,
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Model {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match Model::ALL.into_iter().find(|m| m.id() == s) {
            Some(m) => Ok(m),
            None => {
                let ids: Vec<&str> = Model::ALL.iter().map(|m| m.id()).collect();
                bail!("unknown model `{s}` (known: {})", ids.join(", "))
            }
        }
    }
}

/// Where a model's GGUF comes from and what it must hash to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelAsset {
    pub gguf_file: &'static str,
    pub gguf_sha256: &'static str,
    /// The GGUF is these wheel members concatenated in order (one for a
    /// GGUF that fits in a single wheel).
    pub chunks: &'static [Chunk],
    /// This model's section of `ATTRIBUTION.md`.
    pub attribution: &'static str,
}

/// One piece of a GGUF: a wheel's member and its own pinned sha256, so a bad
/// piece is named before the whole file is judged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    pub wheel: Wheel,
    pub sha256: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_is_listed() {
        for m in Model::ALL {
            assert_eq!(m.id().parse::<Model>().unwrap(), m);
        }
        assert_eq!(Model::default(), Model::SmolLm2);
        let e = "llama-7b".parse::<Model>().unwrap_err().to_string();
        assert!(
            e.contains("llama-7b") && e.contains("qwen2.5-coder-0.5b"),
            "{e}"
        );
    }

    /// A single-wheel model's one chunk is the GGUF itself.
    #[test]
    fn pins_are_consistent() {
        for m in Model::ALL {
            let a = m.asset();
            assert!(!a.chunks.is_empty(), "{m}");
            if let [only] = a.chunks {
                assert_eq!(only.sha256, a.gguf_sha256, "{m}");
            }
            for c in a.chunks {
                assert!(c.wheel.file.ends_with(".whl"), "{m}");
                assert_eq!(c.sha256.len(), 64, "{m}");
                assert_eq!(c.wheel.sha256.len(), 64, "{m}");
            }
            assert!(pin::attribution().contains(a.gguf_file), "{m}");
        }
    }
}
