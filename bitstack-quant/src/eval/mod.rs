//! Evaluation: calibration data, perplexity and the block sort.
//!
//! [`calibrate`] windows a text and records a layer's inputs, [`perplexity`]
//! scores a model as the quality protocol asks, [`sort`] orders the blocks
//! of a checkpoint by how much each one helps and [`inspect`] summarises a
//! checkpoint.

pub mod calibrate;
pub mod inspect;
pub mod perplexity;
pub mod sort;
