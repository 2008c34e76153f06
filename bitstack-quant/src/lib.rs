//! BitStack: any-size LLM weight compression.
//!
//! Each decoder linear becomes a stack of ~1-bit residual blocks
//! (`S ⊙ (u·vt)`, see [`decompose`]), so one checkpoint loads at any memory
//! size, block by block. This crate holds the method (packing, scaling,
//! decomposition), the checkpoint format, the runtime stacks and a
//! Llama-family runner on candle used for calibration and perplexity, and
//! the runtime control handle that resizes a running model
//! ([`elastic::BitStackHandle`]).

pub mod block;
pub mod budget;
pub mod calibrate;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod decompose;
pub mod device;
pub mod device_copy;
pub mod elastic;
pub mod feedback;
pub mod generate;
pub mod hub;
pub mod inspect;
pub mod linear;
pub mod model;
pub mod order;
pub mod pack;
pub mod perplexity;
pub mod progress;
pub mod rtn;
pub mod scale;
pub mod sort;
pub mod stack;
pub mod store;
pub mod svd;
pub mod synthetic;
