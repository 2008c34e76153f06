//! `config.json` of a Hugging Face Llama-family model, plus our quantization block.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::format::architecture::{checked_linear_shape, LinearKind};
use crate::format::dense::DenseDtype;
use crate::format::grid::{GridCoding, GridConfig};
use crate::format::rotation::RotationConfig;

/// Architectures the runner implements (all share the Llama block).
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

/// The RoPE scalings the runner implements. Any other `rope_type` is an
/// error when the config is read: running a model with its scaling ignored
/// gives wrong logits without a word.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    /// No scaling (Hugging Face writes it for some models).
    Default,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear,
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept.
    Llama3,
}

/// RoPE frequency scaling (`rope_scaling` of config.json).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: RopeType,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "max_pos")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn max_pos() -> usize {
    8192
}

/// The `quant_method` of BitStack checkpoints, in `config.json` and as the
/// name mistral.rs's registry knows the method by.
pub const QUANT_METHOD: &str = "bitstack";
/// The layout of checkpoints with AVD blocks only (the reference's).
pub const FORMAT_VERSION: u32 = 1;
/// The layout of checkpoints whose linears end in grid planes with f16
/// numbers ([`crate::format::grid`]); AVD-only checkpoints are still
/// written as 1.
pub const FORMAT_VERSION_GRID: u32 = 2;
/// Grid planes with 8-bit codes ([`GridCoding::Int8`]), what compress
/// writes now.
pub const FORMAT_VERSION_GRID_INT8: u32 = 3;
/// Version 3 with every linear's input rotated ([`RotationConfig`]).
pub const FORMAT_VERSION_ROTATED: u32 = 4;
/// 8-bit grid planes with prefix scales ([`GridCoding::Int8Scaled`]),
/// rotated or not.
pub const FORMAT_VERSION_PREFIX_SCALED: u32 = 5;

/// The format version of checkpoints whose linears end in grid planes
/// coded as `coding`.
pub fn grid_format_version(coding: GridCoding) -> u32 {
    match coding {
        GridCoding::F16 => FORMAT_VERSION_GRID,
        GridCoding::Int8 => FORMAT_VERSION_GRID_INT8,
        GridCoding::Int8Scaled => FORMAT_VERSION_PREFIX_SCALED,
    }
}

/// The `quantization_config` block of a BitStack checkpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: String,
    /// Default rank of the blocks (a linear may override it, see `k_per_linear`).
    pub k: usize,
    /// Blocks stored per linear: AVD blocks, then grid planes.
    pub niter: usize,
    #[serde(default = "format_v1")]
    pub format_version: u32,
    /// Rank per linear name (`model.layers.0.self_attn.q_proj`) when it differs from `k`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub k_per_linear: std::collections::BTreeMap<String, usize>,
    /// The last `grid.planes` of the `niter` blocks are grid planes
    /// (format version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<GridConfig>,
    /// The exponent of the activation scales compress folded in (a
    /// record of how the checkpoint was made; absent means the
    /// reference's 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_power: Option<f32>,
    /// Every linear's blocks stand for `W·R`, `R` this rotation of its
    /// input columns (format version 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationConfig>,
}

fn format_v1() -> u32 {
    FORMAT_VERSION
}

impl QuantizationConfig {
    /// The block of a checkpoint written now: rank `k` (`k_per_linear`
    /// where a linear differs) and `niter` blocks per linear.
    pub fn new(
        k: usize,
        niter: usize,
        k_per_linear: std::collections::BTreeMap<String, usize>,
    ) -> Self {
        Self {
            quant_method: QUANT_METHOD.into(),
            k,
            niter,
            format_version: FORMAT_VERSION,
            k_per_linear,
            grid: None,
            scale_power: None,
            rotation: None,
        }
    }

    /// This layout with its last `grid.planes` blocks as grid planes.
    pub fn with_grid(mut self, grid: GridConfig) -> Self {
        self.format_version = grid_format_version(grid.coding);
        self.grid = Some(grid);
        self
    }

    /// This layout with every linear's input rotated (format version 4,
    /// or 5 with prefix scales; it goes with 8-bit grid planes,
    /// [`ModelConfig::validate`] checks).
    pub fn with_rotation(mut self, rotation: RotationConfig) -> Self {
        if self.format_version != FORMAT_VERSION_PREFIX_SCALED {
            self.format_version = FORMAT_VERSION_ROTATED;
        }
        self.rotation = Some(rotation);
        self
    }

    /// AVD blocks stored per linear (the blocks before the grid planes).
    pub fn avd_blocks(&self) -> usize {
        self.niter - self.grid.map_or(0, |g| g.planes)
    }

    /// Rank of the blocks of linear `name`.
    pub fn k_of(&self, name: &str) -> usize {
        self.k_per_linear.get(name).copied().unwrap_or(self.k)
    }
}

/// The parts of `config.json` the runner needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    /// The float type of the stored weights (of a checkpoint: its dense parts).
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn rope_theta() -> f64 {
    10000.0
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self::from_dir_with_json(dir)?.0)
    }

    /// As [`ModelConfig::from_dir`], with the whole file as JSON, for a
    /// writer that keeps the fields the runner does not read.
    pub fn from_dir_with_json(dir: &Path) -> Result<(Self, serde_json::Value)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let cfg: ModelConfig = serde_json::from_value(raw.clone())
            .with_context(|| format!("{}: not a Llama-family config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported model in {}", path.display()))?;
        Ok((cfg, raw))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let arch = self.architecture();
        if !SUPPORTED.contains(&arch.as_str()) {
            bail!(
                "unknown architecture `{arch}` (supported: {})",
                SUPPORTED.join(", ")
            );
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (only silu)");
            }
        }
        if self.num_attention_heads == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            );
        }
        for (name, size) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim()),
        ] {
            if size == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim {} must be even (RoPE rotates pairs)",
                self.head_dim()
            );
        }
        if self.checked_parameters().is_none() {
            bail!(
                "its sizes (hidden_size {}, intermediate_size {}, num_hidden_layers {}, vocab_size {}) describe more parameters than can be counted",
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.vocab_size
            );
        }
        if let Some(s) = &self.rope_scaling {
            let sane = |x: f64| x.is_finite() && x > 0.0;
            if !sane(s.factor) || !sane(s.low_freq_factor) || !sane(s.high_freq_factor) {
                bail!("rope_scaling {s:?}: its factors must be finite and positive");
            }
            if s.rope_type == RopeType::Llama3 && s.high_freq_factor <= s.low_freq_factor {
                bail!("rope_scaling {s:?}: high_freq_factor must exceed low_freq_factor");
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != QUANT_METHOD {
                bail!(
                    "quant_method `{}` is not supported (only {QUANT_METHOD})",
                    q.quant_method
                );
            }
            if q.niter == 0 {
                bail!(
                    "quantization_config.niter is 0: every linear stores at least one block (its floor)"
                );
            }
            // Version 4 is version 3 with a rotation: checked as 3, then
            // the rotation against every width. Version 5 may have one.
            let version = match (q.format_version, &q.rotation) {
                (v @ (FORMAT_VERSION_ROTATED | FORMAT_VERSION_PREFIX_SCALED), Some(rotation)) => {
                    rotation.check().map_err(anyhow::Error::msg)?;
                    for kind in LinearKind::ALL {
                        let (_, n) = checked_linear_shape(self, kind)
                            .context("the model's shapes overflow")?;
                        rotation
                            .check_width(n, kind.short_name())
                            .map_err(anyhow::Error::msg)?;
                    }
                    if v == FORMAT_VERSION_ROTATED {
                        FORMAT_VERSION_GRID_INT8
                    } else {
                        v
                    }
                }
                (FORMAT_VERSION_ROTATED, None) => {
                    bail!("BitStack format_version {FORMAT_VERSION_ROTATED} needs a `rotation` in quantization_config")
                }
                (v, Some(_)) => bail!(
                    "a `rotation` in quantization_config needs format_version {FORMAT_VERSION_ROTATED} or {FORMAT_VERSION_PREFIX_SCALED}, not {v}"
                ),
                (v, None) => v,
            };
            match (version, &q.grid) {
                (FORMAT_VERSION, None) => {}
                (
                    v @ (FORMAT_VERSION_GRID
                    | FORMAT_VERSION_GRID_INT8
                    | FORMAT_VERSION_PREFIX_SCALED),
                    Some(grid),
                ) => {
                    grid.check().map_err(anyhow::Error::msg)?;
                    if grid_format_version(grid.coding) != v {
                        bail!(
                            "BitStack format_version {} does not go with grid coding {:?} (format_version {} does)",
                            q.format_version,
                            grid.coding,
                            grid_format_version(grid.coding)
                        );
                    }
                    if grid.planes > q.niter {
                        bail!(
                            "the grid has {} planes but niter is {} (planes are part of niter)",
                            grid.planes,
                            q.niter
                        );
                    }
                }
                (
                    FORMAT_VERSION_GRID | FORMAT_VERSION_GRID_INT8 | FORMAT_VERSION_PREFIX_SCALED,
                    None,
                ) => {
                    bail!("BitStack format_version {} needs a `grid` in quantization_config", q.format_version)
                }
                (FORMAT_VERSION, Some(_)) => {
                    bail!("a `grid` in quantization_config needs format_version {FORMAT_VERSION_GRID} or {FORMAT_VERSION_GRID_INT8}")
                }
                (v, _) => bail!(
                    "BitStack format_version {v} is not supported (only {FORMAT_VERSION} to {FORMAT_VERSION_PREFIX_SCALED}): a newer bitstack wrote it"
                ),
            }
        }
        Ok(())
    }

    /// An upper bound of the parameter count, `None` when it overflows: once
    /// it fits, every size the geometry multiplies out fits too.
    fn checked_parameters(&self) -> Option<usize> {
        let d = self.hidden_size;
        let mut per_layer = d.checked_mul(4)?;
        for kind in LinearKind::ALL {
            let (m, n) = checked_linear_shape(self, kind)?;
            per_layer = per_layer.checked_add(m.checked_mul(n)?)?;
        }
        self.num_hidden_layers
            .checked_mul(per_layer)?
            .checked_add(self.vocab_size.checked_mul(d)?.checked_mul(2)?)
    }

    /// `llama`, `mistral` or `qwen2`, from `model_type` or `architectures`.
    pub fn architecture(&self) -> String {
        if let Some(t) = &self.model_type {
            return t.to_lowercase();
        }
        match self.architectures.first().map(String::as_str) {
            Some("LlamaForCausalLM") => "llama".into(),
            Some("MistralForCausalLM") => "mistral".into(),
            Some("Qwen2ForCausalLM") => "qwen2".into(),
            Some(other) => other.to_string(),
            None => "unknown".into(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// q, k, v carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.architecture() == "qwen2" || self.attention_bias
    }

    /// The dense parts' type `torch_dtype` names; `None` when it names none
    /// of f16, bf16, f32 or is absent.
    pub fn dense_dtype(&self) -> Option<DenseDtype> {
        self.torch_dtype
            .as_deref()
            .and_then(|t| DenseDtype::from_torch_name(t).ok())
    }

    /// o_proj carries a bias (Llama with `attention_bias`).
    pub fn o_bias(&self) -> bool {
        self.architecture() != "qwen2" && self.attention_bias
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) {
        std::fs::write(dir.join("config.json"), json).unwrap();
    }

    #[test]
    fn reads_llama_and_rejects_unknown_arch() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-5,"vocab_size":100,"tie_word_embeddings":true}"#,
        );
        let c = ModelConfig::from_dir(d.path()).unwrap();
        assert_eq!((c.head_dim(), c.kv_heads(), c.qkv_bias()), (16, 2, false));

        write(
            d.path(),
            r#"{"model_type":"gpt_neox","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"rms_norm_eps":1e-5,"vocab_size":100}"#,
        );
        let e = format!("{:#}", ModelConfig::from_dir(d.path()).unwrap_err());
        assert!(e.contains("unknown architecture `gpt_neox`"), "{e}");
    }

    #[test]
    fn rejects_other_quant_methods() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"rms_norm_eps":1e-5,"vocab_size":100,
            "quantization_config":{"quant_method":"gptq","k":16,"niter":16}}"#,
        );
        let e = format!("{:#}", ModelConfig::from_dir(d.path()).unwrap_err());
        assert!(e.contains("quant_method `gptq`"), "{e}");
    }
}
