//! The checkpoint format: what is on disk and the one type that reads it.
//!
//! A checkpoint is a Hugging Face model dir whose `config.json` carries a
//! `quantization_config` ([`config`]) and whose safetensors files
//! ([`store`]) hold every block of every linear under the reference's names
//! ([`block`], signs packed as in [`pack`]), plus the global block order
//! and its memory ladder ([`order`]). [`checkpoint::Checkpoint`] opens all
//! of it once ([`model_dir::ModelDir`] a dir that may be dense);
//! [`writer::CheckpointWriter`] is the one writer of the layout, used by
//! compression and by [`synthetic`] checkpoints. [`architecture`] names
//! the linears of a layer and their shapes, [`budget`] parses a memory
//! budget, [`dense`] is the type of the dense parts, [`rotation`] the
//! rotation of the linears' inputs of format version 4.

pub mod architecture;
pub mod block;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod dense;
pub mod grid;
pub mod model_dir;
pub mod order;
pub mod pack;
pub mod rotation;
pub mod shard;
pub mod store;
pub mod synthetic;
pub mod writer;
