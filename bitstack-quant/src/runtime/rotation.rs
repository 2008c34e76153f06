//! The input rotation of one linear at run time (format version 4; see
//! [`crate::format::rotation`]).
//!
//! A rotated stack stores `W·R`. Its forward rotates the input, `x·R`,
//! before the kernels run; whatever rebuilds the weight turns it back,
//! `(W·R)·Rᵀ`, so that callers of [`crate::WeightStack::dense`] see `W`.

use std::fmt;
use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use parking_lot::Mutex;

use crate::format::rotation::{hadamard, rotate_row, rotate_rows, Direction, RotationConfig};

/// The rotation of a linear's local input columns.
pub struct InputRotation {
    block: usize,
    /// The signs of the columns this linear holds (a shard's slice).
    signs: Vec<f32>,
    /// The signs and `H` as tensors on the last device and dtype that
    /// asked, for [`InputRotation::rotate_input_by_matmul`].
    tensors: Mutex<Option<RotationTensors>>,
}

struct RotationTensors {
    device: Device,
    dtype: DType,
    signs: Tensor,
    hadamard: Tensor,
}

impl fmt::Debug for InputRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "InputRotation {{ block: {}, columns: {} }}",
            self.block,
            self.signs.len()
        )
    }
}

impl InputRotation {
    /// The rotation of input columns `cols` of a checkpoint rotated as
    /// `cfg` (checked: the block divides the range and starts it).
    pub fn new(cfg: RotationConfig, cols: Range<usize>) -> anyhow::Result<Self> {
        cfg.check().map_err(anyhow::Error::msg)?;
        if !cols.start.is_multiple_of(cfg.block) || !cols.len().is_multiple_of(cfg.block) {
            anyhow::bail!(
                "input columns {cols:?} do not fall on whole rotation blocks of {}",
                cfg.block
            );
        }
        Ok(Self {
            block: cfg.block,
            signs: cfg.signs(cols),
            tensors: Mutex::new(None),
        })
    }

    /// Input columns.
    pub fn n(&self) -> usize {
        self.signs.len()
    }

    /// `x·R` for `x` of shape `[.., n]`, in `x`'s dtype: the transform on
    /// the host (in f32) for a CPU tensor, as a product with `H` elsewhere.
    pub fn rotate_input(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.rotate_input_by_matmul(x);
        }
        let (shape, dtype) = (x.shape().clone(), x.dtype());
        self.check_width(x)?;
        let mut v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        rotate_rows(&mut v, self.block, &self.signs, Direction::Forward);
        Tensor::from_vec(v, shape, x.device())?.to_dtype(dtype)
    }

    /// `x·R` as `(x ⊙ d)` times the block-diagonal `H`: one product of
    /// `[rows·n/block, block]` by `[block, block]`, for any device.
    pub fn rotate_input_by_matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.check_width(x)?;
        let shape = x.shape().clone();
        let (signs, h) = self.tensors(x.device(), x.dtype())?;
        x.reshape(((), self.n()))?
            .broadcast_mul(&signs)?
            .reshape(((), self.block))?
            .matmul(&h)?
            .reshape(shape)
    }

    /// Turns the host rows of a rotated weight (rows of `n`) back: `W_r·Rᵀ`.
    pub fn unrotate_row(&self, row: &mut [f32]) {
        rotate_row(row, self.block, &self.signs, Direction::Inverse);
    }

    /// Turns an `m×n` rotated weight tensor back, on its device.
    pub fn unrotate_weight(&self, w: &Tensor) -> Result<Tensor> {
        let (m, n) = w.dims2()?;
        if n != self.n() {
            candle_core::bail!(
                "a rotation of {} columns cannot turn back a {m}×{n} weight",
                self.n()
            );
        }
        let (signs, h) = self.tensors(w.device(), w.dtype())?;
        w.reshape(((), self.block))?
            .matmul(&h)?
            .reshape((m, n))?
            .broadcast_mul(&signs)
    }

    fn check_width(&self, x: &Tensor) -> Result<()> {
        if x.dims().last() != Some(&self.n()) {
            candle_core::bail!(
                "an input of shape {:?} does not end in this linear's {} columns",
                x.dims(),
                self.n()
            );
        }
        Ok(())
    }

    /// The signs (`[1, n]`) and `H` on `device` as `dtype`, made once per
    /// device and dtype in a row.
    fn tensors(&self, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let mut slot = self.tensors.lock();
        if let Some(t) = &*slot {
            if t.device.same_device(device) && t.dtype == dtype {
                return Ok((t.signs.clone(), t.hadamard.clone()));
            }
        }
        let signs = Tensor::from_slice(&self.signs, (1, self.n()), device)?.to_dtype(dtype)?;
        let hadamard = Tensor::from_vec(hadamard(self.block), (self.block, self.block), device)?
            .to_dtype(dtype)?;
        *slot = Some(RotationTensors {
            device: device.clone(),
            dtype,
            signs: signs.clone(),
            hadamard: hadamard.clone(),
        });
        Ok((signs, hadamard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_transform_and_the_product_with_h_agree() {
        let cfg = RotationConfig::new(16);
        let rot = InputRotation::new(cfg, 32..80).unwrap();
        // Three leading dims, 48 columns.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48), &Device::Cpu).unwrap();
        let host = rot.rotate_input(&x).unwrap();
        let by_matmul = rot.rotate_input_by_matmul(&x).unwrap();
        assert_eq!(host.dims(), &[2, 3, 48]);
        let diff = (host - by_matmul)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn a_rotated_product_equals_the_plain_one() {
        // (x·R)·(W·R)ᵀ = x·Wᵀ, and unrotating W·R gives W back.
        let (m, n) = (5, 64);
        let cfg = RotationConfig::new(32);
        let rot = InputRotation::new(cfg, 0..n).unwrap();
        let w = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, n), &Device::Cpu).unwrap();
        let mut wr = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        rotate_rows(&mut wr, cfg.block, &cfg.signs(0..n), Direction::Forward);
        let wr = Tensor::from_vec(wr, (m, n), &Device::Cpu).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        let rotated = rot
            .rotate_input(&x)
            .unwrap()
            .matmul(&wr.t().unwrap())
            .unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max((plain - rotated).unwrap()) < 1e-4);
        assert!(max((rot.unrotate_weight(&wr).unwrap() - w).unwrap()) < 1e-5);
    }

    #[test]
    fn columns_off_the_blocks_are_refused() {
        let cfg = RotationConfig::new(64);
        assert!(InputRotation::new(cfg, 32..96).is_err());
        assert!(InputRotation::new(cfg, 0..96).is_err());
        let rot = InputRotation::new(cfg, 64..192).unwrap();
        let x = Tensor::zeros((2, 100), DType::F32, &Device::Cpu).unwrap();
        assert!(rot.rotate_input(&x).is_err());
    }
}
