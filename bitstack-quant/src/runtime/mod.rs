//! The runtime: a model of stacks that runs and resizes.
//!
//! [`stack`] holds the resident blocks of one linear, [`linear`] the layer
//! that runs them through the kernels, [`model`] a Llama-family runner on
//! candle, [`elastic`] the control handle that resizes a running model and
//! [`generate`] text generation on it. [`device`] parses `--device`,
//! [`residence`] says where a model keeps its blocks (host memory, or a
//! CUDA device only), [`placement`] that and which slice of each linear a
//! tensor-parallel rank holds, [`device_copy`] keeps the uploads of
//! host blocks, and [`rotation`] turns a rotated linear's inputs.

pub mod device;
pub mod device_copy;
pub mod elastic;
pub mod generate;
pub mod linear;
pub mod model;
pub mod placement;
pub mod residence;
pub mod rotation;
pub mod stack;
