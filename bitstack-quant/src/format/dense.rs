//! [`DenseDtype`]: the storage type of a checkpoint's dense parts.
//!
//! Everything that is not a BitStack block — embeddings, norms, biases, an
//! untied lm_head — is stored, and held by the runner, in one float type.
//! For a small model the embedding is most of the floor (SmolLM2-135M: 113
//! MB of 136 MB in f32), so 16 bits halve what the smallest model needs.

use std::fmt;

use anyhow::{bail, Result};
use candle_core::DType;
use safetensors::Dtype;

/// The float type of the dense parts of a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DenseDtype {
    /// IEEE half: 10 mantissa bits, range ±65504. The default: on SmolLM2
    /// it moves the perplexity less than bf16's 7 mantissa bits do (see
    /// docs/design.md, "Checkpoint format").
    #[default]
    F16,
    /// bfloat16: 7 mantissa bits, the range of f32; for models whose dense
    /// parts overflow f16.
    Bf16,
    /// Full precision, as checkpoints before 16-bit dense parts were.
    F32,
}

impl DenseDtype {
    pub const ALL: [DenseDtype; 3] = [DenseDtype::F16, DenseDtype::Bf16, DenseDtype::F32];

    /// Bytes per value.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DenseDtype::F16 | DenseDtype::Bf16 => 2,
            DenseDtype::F32 => 4,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            DenseDtype::F16 => Dtype::F16,
            DenseDtype::Bf16 => Dtype::BF16,
            DenseDtype::F32 => Dtype::F32,
        }
    }

    pub fn candle(self) -> DType {
        match self {
            DenseDtype::F16 => DType::F16,
            DenseDtype::Bf16 => DType::BF16,
            DenseDtype::F32 => DType::F32,
        }
    }

    /// The stored safetensors type as a dense dtype; `None` for a type the
    /// dense parts cannot have (integers, f64, 8-bit floats).
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F16 => Some(DenseDtype::F16),
            Dtype::BF16 => Some(DenseDtype::Bf16),
            Dtype::F32 => Some(DenseDtype::F32),
            _ => None,
        }
    }

    /// The name `config.json`'s `torch_dtype` gives it.
    pub fn torch_name(self) -> &'static str {
        match self {
            DenseDtype::F16 => "float16",
            DenseDtype::Bf16 => "bfloat16",
            DenseDtype::F32 => "float32",
        }
    }

    /// The dense dtype a `torch_dtype` names.
    pub fn from_torch_name(name: &str) -> Result<Self> {
        match name {
            "float16" => Ok(DenseDtype::F16),
            "bfloat16" => Ok(DenseDtype::Bf16),
            "float32" => Ok(DenseDtype::F32),
            other => bail!("torch_dtype `{other}` is not float16, bfloat16 or float32"),
        }
    }

    /// `values` as little-endian bytes of this type, rounded to nearest
    /// even. A value this type cannot hold (beyond f16's ±65504) is an
    /// error that names `tensor`, rather than a silent infinity.
    pub fn encode(self, values: &[f32], tensor: &str) -> Result<Vec<u8>> {
        let out: Vec<u8> = match self {
            DenseDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DenseDtype::F16 => values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            DenseDtype::Bf16 => values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        if self != DenseDtype::F32 {
            let bad = out
                .chunks_exact(2)
                .zip(values)
                .position(|(c, x)| x.is_finite() && !self.decode2([c[0], c[1]]).is_finite());
            if let Some(i) = bad {
                bail!(
                    "tensor `{tensor}`: value {} at flat index {i} does not fit in {self} (write the dense parts as bf16 or f32)",
                    values[i]
                );
            }
        }
        Ok(out)
    }

    fn decode2(self, b: [u8; 2]) -> f32 {
        match self {
            DenseDtype::Bf16 => half::bf16::from_le_bytes(b).to_f32(),
            _ => half::f16::from_le_bytes(b).to_f32(),
        }
    }
}

impl fmt::Display for DenseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenseDtype::F16 => "f16",
            DenseDtype::Bf16 => "bf16",
            DenseDtype::F32 => "f32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes_match_the_formats() {
        for d in DenseDtype::ALL {
            assert_eq!(DenseDtype::from_torch_name(d.torch_name()).unwrap(), d);
            assert_eq!(DenseDtype::from_safetensors(d.safetensors()), Some(d));
            assert_eq!(8 * d.size_in_bytes(), d.safetensors().bitsize());
            assert_eq!(d.size_in_bytes(), d.candle().size_in_bytes());
        }
        assert!(DenseDtype::from_torch_name("int8").is_err());
        assert_eq!(DenseDtype::from_safetensors(Dtype::U8), None);
    }

    #[test]
    fn an_overflow_is_named_not_stored_as_infinity() {
        let e = DenseDtype::F16
            .encode(&[1.0, 70000.0], "model.norm.weight")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`model.norm.weight`") && e.contains("index 1") && e.contains("f16"),
            "{e}"
        );
        // bf16 has f32's range.
        assert_eq!(DenseDtype::Bf16.encode(&[70000.0], "t").unwrap().len(), 2);
    }
}
