//! llama.cpp's q/k row permutation.
//!
//! Hugging Face Llama applies RoPE to (first half, second half) of each head;
//! llama.cpp rotates adjacent pairs, so its converter interleaves the rows of
//! `q_proj`/`k_proj` per head. Import must undo that.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// llama.cpp's forward permutation (`convert_hf_to_gguf.py`), kept for tests
/// and for a future export.
pub fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp, hd) = split_dims(w, heads)?;
    Ok(w.reshape((heads, 2, hd / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// Inverse of [`permute`]: llama.cpp row order back to Hugging Face order.
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp, hd) = split_dims(w, heads)?;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// `(out, in, head_dim)`, checking that rows split into heads of even size.
fn split_dims(w: &Tensor, heads: usize) -> Result<(usize, usize, usize)> {
    let (out, inp) = w.dims2().context("q/k projection must be 2-D")?;
    if heads == 0 || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        bail!("cannot split {out} rows into {heads} heads of even size");
    }
    Ok((out, inp, out / heads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn unpermute_inverts_permute() -> Result<()> {
        let (heads, hd, inp) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * hd * inp) as f32, &Device::Cpu)?
            .reshape((heads * hd, inp))?;
        let p = permute(&w, heads)?;
        assert_ne!(p.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        let back = unpermute(&p, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn row_order_matches_llama_cpp() -> Result<()> {
        // One head of dim 4, one input: HF rows [a0, a1, b0, b1] (halves)
        // become llama.cpp rows [a0, b0, a1, b1] (pairs).
        let w = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu)?;
        let p = permute(&w, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(p, [0., 2., 1., 3.]);
        let u = unpermute(&w, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(u, [0., 2., 1., 3.]);
        Ok(())
    }

    #[test]
    fn rejects_odd_heads() {
        let w = Tensor::zeros((6, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(unpermute(&w, 4).is_err());
        assert!(unpermute(&w, 2).is_err()); // head dim 3 is odd
    }
}
