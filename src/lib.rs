//! BitStack-rs: any-size LLM weight compression for Rust inference engines.
//!
//! Every decoder linear of a model becomes a stack of ~1-bit residual
//! blocks, sorted by importance, so one checkpoint loads at whatever memory
//! there is and resizes while it runs. This package is the front door: it
//! re-exports the library ([`Checkpoint`], [`BitStackHandle`], [`compress`],
//! …) and holds the project's end-to-end examples, tests and benches.
//!
//! The work is done by four crates, each with one job:
//!
//! - `bitstack-quant` (re-exported here): the method, the checkpoint
//!   format, the runtime and evaluation.
//! - `bitstack-kernels` ([`kernels`]): the CPU and CUDA kernels that run a
//!   stack without rebuilding its weight, as a candle op.
//! - `bitstack-assets` ([`assets`]): the pinned test model and texts, and
//!   GGUF import.
//! - `bitstack-cli`: the `bitstack` command-line tool.
//!
//! The mistral.rs plugin (`integration/`) is a workspace of its own.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use bitstack::{BitStackHandle, Budget, Checkpoint};
//! let checkpoint = Checkpoint::open("smollm2-bitstack".as_ref())?;
//! let plan = checkpoint.plan("4bpw".parse::<Budget>()?)?;
//! let handle = BitStackHandle::from_checkpoint(checkpoint, &plan, &candle_core::Device::Cpu)?;
//! let freed = handle.shrink_by(20 << 20)?; // hand this to the KV cache
//! handle.grow_by(freed.bytes_freed())?; // and take it back later
//! # Ok(()) }
//! ```

pub use bitstack_assets as assets;
pub use bitstack_kernels as kernels;
pub use bitstack_quant::*;
