//! BitStack: any-size LLM weight compression.
//!
//! Each decoder linear becomes a stack of ~1-bit residual blocks
//! (`S ⊙ (u·vt)`), sorted by importance, so one checkpoint loads at any
//! memory size, block by block, and resizes while it runs.
//!
//! The crate is four layers, each using only the ones above it in this list:
//!
//! - [`format`]: the checkpoint on disk. [`Checkpoint`] opens one (config,
//!   geometry, block order, tensor headers, validated together) and
//!   turns a [`Budget`] into a [`Plan`]; [`CheckpointWriter`] writes one.
//! - [`runtime`]: a Llama-family model whose linears are stacks
//!   ([`Llama`], [`WeightStack`]), the control handle that resizes it while
//!   it runs ([`BitStackHandle`]) and generation.
//! - [`eval`]: calibration windows, perplexity as the quality protocol
//!   defines it, the block sort and checkpoint inspection.
//! - [`method`]: activation-aware scaling, the residual decomposition, and
//!   [`compress`], the pipeline that turns a
//!   dense model dir into a checkpoint.
//!
//! [`hub`] resolves a model argument (a local dir or a Hub id). The kernels
//! that run the stacks live in `bitstack-kernels`; the `bitstack` binary in
//! `bitstack-cli`.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use bitstack_quant::{BitStackHandle, Budget, Checkpoint};
//! let checkpoint = Checkpoint::open("smollm2-bitstack".as_ref())?;
//! let plan = checkpoint.plan("3.5bpw".parse::<Budget>()?)?;
//! let handle = BitStackHandle::from_checkpoint(checkpoint, &plan, &candle_core::Device::Cpu)?;
//! handle.shrink_by(20 << 20)?; // the KV cache needs 20 MiB
//! # Ok(()) }
//! ```

pub mod eval;
pub mod format;
pub mod hub;
pub mod memory;
pub mod method;
pub mod progress;
pub mod runtime;

pub use format::block::{bits_per_weight, Block, BlockShape};
pub use format::budget::Budget;
pub use format::checkpoint::{BlockCounts, Checkpoint, Plan};
pub use format::config::{ModelConfig, QuantizationConfig, FORMAT_VERSION, QUANT_METHOD};
pub use format::dense::DenseDtype;
pub use format::model_dir::{ModelDir, Selection};
pub use format::order::{BlockOrder, Geometry, Rung};
pub use format::writer::CheckpointWriter;
pub use method::compress::{compress, CompressOptions, Rotation};
pub use runtime::elastic::{BitStackHandle, Resize, ResizeError, Snapshot};
pub use runtime::model::{LinearKind, Llama};
pub use runtime::stack::WeightStack;
