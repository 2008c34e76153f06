//! A decoder linear layer, dense or BitStack: the pluggable unit of the runner.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use crate::runtime::stack::WeightStack;

/// The weight of a linear `y = x·Wᵀ (+ b)`.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// `W` as an `m×n` tensor.
    Dense(Tensor),
    /// `W ≈ Σᵢ Sᵢ ⊙ (uᵢ·vtᵢ)` over the resident blocks.
    BitStack(Arc<WeightStack>),
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    /// Output features `m`.
    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[0],
            LinearWeight::BitStack(s) => s.m,
        }
    }

    /// `x` is `[.., n]`; the result is `[.., m]`.
    ///
    /// A BitStack weight runs the packed-sign kernels of `bitstack-kernels`
    /// on the CPU and, in a build with the `cuda` feature, on CUDA; elsewhere
    /// `W` is rebuilt for the call.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_weight(x)?;
        match &self.bias {
            // A bias stored in 16 bits is widened to the output's type.
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// `x·Wᵀ` without the bias, for an engine that adds the bias itself
    /// (mistral.rs's column- and row-parallel layers do).
    pub fn forward_weight(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => matmul_t(x, w)?,
            LinearWeight::BitStack(s) if x.device().is_cpu() || x.device().is_cuda() => {
                s.matmul(x)?
            }
            LinearWeight::BitStack(s) => matmul_t(x, &s.dense_tensor(x.device(), x.dtype())?)?,
        })
    }

    /// Replaces a BitStack weight by its dense `W` on `device` as `dtype`,
    /// built once, so forwards stop rebuilding it per call. The blocks are
    /// dropped: measure bytes first. Dense weights are left alone.
    pub fn materialize(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if let LinearWeight::BitStack(s) = &self.weight {
            self.weight = LinearWeight::Dense(s.dense_tensor(device, dtype)?);
        }
        Ok(())
    }

    /// Bytes of BitStack blocks resident in this layer (0 for dense).
    pub fn stack_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(_) => 0,
            LinearWeight::BitStack(s) => s.resident_bytes(),
        }
    }

    /// Bytes of the weight alone (blocks, or the dense matrix).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => tensor_bytes(w),
            LinearWeight::BitStack(s) => s.resident_bytes(),
        }
    }

    /// Bytes this layer's weight and bias occupy.
    pub fn resident_bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, tensor_bytes);
        bias + match &self.weight {
            LinearWeight::Dense(w) => tensor_bytes(w),
            LinearWeight::BitStack(s) => s.resident_bytes(),
        }
    }
}

/// `x·Wᵀ` for `x` of shape `[.., n]` as one 2-D product: broadcasting `W`
/// over the leading dims would copy it once per batch entry.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let n = shape.pop().unwrap_or(1);
    let y = x.reshape(((), n))?.matmul(&w.t()?)?;
    shape.push(w.dim(0)?);
    y.reshape(shape)
}

pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
