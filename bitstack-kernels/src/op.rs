//! The kernels as a candle custom op over f32, f16 and bf16 activations.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::dispatch::stack_matmul_t;
use crate::layout::{rows_of, OwnedStack, Rows, StackRef};

/// Anything that can lend its resident blocks as a [`StackRef`].
pub trait StackSource: Send + Sync {
    /// The blocks on the host, for the CPU kernels; an error when they live
    /// on a device only.
    fn stack(&self) -> candle_core::Result<StackRef<'_>>;

    /// The blocks on a CUDA device. This default uploads them on every
    /// call; a source that lives across calls should keep the upload.
    #[cfg(feature = "cuda")]
    fn cuda_stack(
        &self,
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> candle_core::Result<Arc<crate::cuda::CudaStack>> {
        crate::cuda::CudaStack::upload(device, &self.stack()?).map(Arc::new)
    }
}

impl StackSource for OwnedStack {
    fn stack(&self) -> candle_core::Result<StackRef<'_>> {
        Ok(self.stack_ref())
    }
}

/// `x·Wᵀ` for `x` of shape `[.., n]`, giving `[.., m]` in `x`'s dtype.
///
/// On the CPU the arithmetic is f32 whatever the activation dtype: f16 and
/// bf16 inputs are widened on the way in and rounded on the way out. On
/// CUDA the tensor cores take f16 operands (bf16 for bf16 activations) and
/// sum in f32.
pub struct BitStackMatmul {
    source: Arc<dyn StackSource>,
}

impl BitStackMatmul {
    pub fn new(source: Arc<dyn StackSource>) -> Self {
        Self { source }
    }
}

/// Applies [`BitStackMatmul`] to `x` (made contiguous first).
pub fn bitstack_matmul(x: &Tensor, source: Arc<dyn StackSource>) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&BitStackMatmul::new(source))
}

impl CustomOp1 for BitStackMatmul {
    fn name(&self) -> &'static str {
        "bitstack-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let stack = self.source.stack()?;
        let Rows {
            start,
            end,
            rows,
            out_shape,
        } = rows_of(layout, stack.m, stack.n)?;
        let mut out = vec![0f32; rows * stack.m];
        let widened;
        let x: &[f32] = match storage {
            CpuStorage::F32(v) => &v[start..end],
            CpuStorage::F16(v) => {
                widened = v[start..end].iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                &widened
            }
            CpuStorage::BF16(v) => {
                widened = v[start..end].iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                &widened
            }
            other => candle_core::bail!(
                "bitstack-matmul: activations must be f32, f16 or bf16, not {:?}",
                other.dtype()
            ),
        };
        stack_matmul_t(x, rows, &stack, &mut out);
        let out = match storage {
            CpuStorage::F16(_) => CpuStorage::F16(out.iter().map(|&y| f16::from_f32(y)).collect()),
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(out.iter().map(|&y| bf16::from_f32(y)).collect())
            }
            _ => CpuStorage::F32(out),
        };
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.source
            .cuda_stack(&storage.device)?
            .cuda_matmul_t(storage, layout)
    }
}

/// `W` of `source` as an `m×n` tensor in `like`'s dtype on `like`'s CUDA
/// device, rebuilt by the kernels from the blocks on the device: what a
/// stack whose blocks live on the device only has instead of a host copy.
/// On the CPU, rebuild from the host blocks instead (this op refuses).
pub fn bitstack_dense(like: &Tensor, source: Arc<dyn StackSource>) -> candle_core::Result<Tensor> {
    like.apply_op1_no_bwd(&BitStackDense { source })
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BitStackDense {
    source: Arc<dyn StackSource>,
}

impl CustomOp1 for BitStackDense {
    fn name(&self) -> &'static str {
        "bitstack-dense"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitstack-dense rebuilds a weight on a CUDA device only; on the CPU rebuild it from the host blocks")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let stack = self.source.cuda_stack(&storage.device)?;
        Ok((stack.dense(storage.dtype())?, Shape::from(stack.dims())))
    }
}
