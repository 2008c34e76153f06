//! The method: how a dense linear becomes a stack of residual blocks.
//!
//! [`scale`] makes the weights activation-aware, [`decompose`] peels off
//! one `S ⊙ (u·vt)` block per iteration (with [`svd`] for the factors and
//! [`feedback`] for error-feedback signs; [`plane_feedback`] chooses grid
//! planes with it; [`prefix_scale`] fits format 5's prefix scales to a
//! linear's outputs), and [`compress`] runs the whole
//! pipeline over a model, layer by layer. [`rtn`] (round-to-nearest) and
//! [`gptq`] are the fixed-precision baselines the method is measured against.

pub mod compress;
pub mod decompose;
pub mod feedback;
pub mod gptq;
pub mod plane_feedback;
pub mod prefix_scale;
pub mod rtn;
pub mod scale;
pub mod svd;
