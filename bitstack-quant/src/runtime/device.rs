//! Where the model work runs: `--device cpu|cuda|cuda:N`.
//!
//! CUDA needs a binary built with the `cuda` feature; without it, naming a
//! GPU is refused when the arguments are parsed, before any work starts.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// What a binary without the `cuda` feature says when asked for a GPU.
pub const NO_CUDA: &str = "this binary was built without CUDA; rebuild with --features cuda";

/// A device as the command line names it; [`DeviceSpec::open`] opens it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let spec = match s.trim() {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => return Err(format!("`{s}`: expected cpu, cuda or cuda:N")),
            },
        };
        if matches!(spec, Self::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(NO_CUDA.into());
        }
        Ok(spec)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The candle device (a CUDA context is created here).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => bail!(NO_CUDA),
            Self::Cuda(n) => {
                Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))
            }
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens that device.
pub fn parse_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>().map_err(anyhow::Error::msg)?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn cuda_needs_the_feature() {
        for (s, n) in [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)] {
            let parsed = s.parse::<DeviceSpec>();
            if cfg!(feature = "cuda") {
                assert_eq!(parsed, Ok(DeviceSpec::Cuda(n)));
                assert_eq!(parsed.unwrap().to_string(), format!("cuda:{n}"));
            } else {
                assert_eq!(parsed, Err(NO_CUDA.to_string()));
                let e = DeviceSpec::Cuda(n).open().unwrap_err().to_string();
                assert_eq!(e, NO_CUDA);
            }
        }
    }
}
