//! Memory budgets: `900MiB`, `3.2GB`, `3.5bpw`, `30%`.
//!
//! A budget resolves to the longest prefix of the block order that fits
//! ([`crate::format::checkpoint::Checkpoint::plan`]).
//! Bytes and percentages count everything resident (dense parts included);
//! bits per weight count only the decoder linears' blocks.

use std::fmt;
use std::str::FromStr;

use crate::format::order::{Geometry, Rung};

/// A memory budget as the user writes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Total resident bytes.
    Bytes(u64),
    /// Bits per decoder linear weight (blocks only).
    BitsPerWeight(f64),
    /// Percent of the model at 16 bits per parameter.
    Percent(f64),
}

/// Why a budget string is not one.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid budget `{0}`: use bytes with a unit (900MiB, 3.2GB, 123456B), bits per linear weight (3.5bpw) or a percent of the 16-bit model (30%)")]
pub struct BadBudget(pub String);

impl FromStr for Budget {
    type Err = BadBudget;

    fn from_str(s: &str) -> Result<Self, BadBudget> {
        let bad = || BadBudget(s.to_string());
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let number = |x: &str| -> Result<f64, BadBudget> {
            let v: f64 = x.trim().parse().map_err(|_| bad())?;
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(bad())
            }
        };
        if let Some(x) = lower.strip_suffix("bpw") {
            return Ok(Budget::BitsPerWeight(number(x)?));
        }
        if let Some(x) = lower.strip_suffix('%') {
            let p = number(x)?;
            return if p <= 100.0 {
                Ok(Budget::Percent(p))
            } else {
                Err(bad())
            };
        }
        const UNITS: &[(&str, f64)] = &[
            ("kib", 1024.0),
            ("mib", 1048576.0),
            ("gib", 1073741824.0),
            ("tib", 1099511627776.0),
            ("kb", 1e3),
            ("mb", 1e6),
            ("gb", 1e9),
            ("tb", 1e12),
            ("b", 1.0),
        ];
        for (unit, scale) in UNITS {
            if let Some(x) = lower.strip_suffix(unit) {
                // Less than one byte is no budget, as 0 is none: `0.5B`
                // would print as `0B`, which does not parse.
                let bytes = (number(x)? * scale).floor();
                return if bytes >= 1.0 {
                    Ok(Budget::Bytes(bytes as u64))
                } else {
                    Err(bad())
                };
            }
        }
        Err(bad())
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Bytes(b) => write!(f, "{b}B"),
            Budget::BitsPerWeight(b) => write!(f, "{b}bpw"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Budget {
    /// Total resident bytes the budget allows for a model of `parameters`
    /// parameters; `None` for bits per weight, which counts blocks only.
    pub fn total_bytes(self, parameters: usize) -> Option<u64> {
        match self {
            Budget::Bytes(b) => Some(b),
            Budget::Percent(p) => Some((p / 100.0 * 2.0 * parameters as f64).floor() as u64),
            Budget::BitsPerWeight(_) => None,
        }
    }

    /// Whether `rung` of a checkpoint of `geometry` fits this budget.
    pub fn fits(self, rung: &Rung, geometry: &Geometry) -> bool {
        match (self, self.total_bytes(geometry.parameters)) {
            (Budget::BitsPerWeight(bpw), _) => rung.bits_per_linear_weight <= bpw + 1e-9,
            (_, bytes) => Some(rung.total_bytes as u64) <= bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_bpw_and_percent() {
        assert_eq!("900MiB".parse(), Ok(Budget::Bytes(900 * 1048576)));
        assert_eq!("3.2GB".parse(), Ok(Budget::Bytes(3_200_000_000)));
        assert_eq!(" 12345b ".parse(), Ok(Budget::Bytes(12345)));
        assert_eq!("1.5kib".parse(), Ok(Budget::Bytes(1536)));
        assert_eq!("3.5bpw".parse(), Ok(Budget::BitsPerWeight(3.5)));
        assert_eq!("30%".parse(), Ok(Budget::Percent(30.0)));
    }

    #[test]
    fn junk_is_an_error() {
        for junk in [
            "", "900", "MiB", "-3GB", "0bpw", "abcbpw", "150%", "1e400GB", "3.5 bits", "NaNbpw",
            "0.5B", "5.4e-8b",
        ] {
            let e = junk.parse::<Budget>().unwrap_err();
            assert!(e.to_string().contains("invalid budget"), "{junk}");
        }
    }
}
