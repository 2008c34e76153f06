//! Round-to-nearest group quantization: the baseline BitStack must beat.
//!
//! Asymmetric, groups of `group` weights along the input dimension, scale and
//! zero point stored in f16, so it costs `bits + 32/group` bits per weight.
//! Used as a plain dense-dequantized comparison (`bitstack eval --rtn 3`).

use half::f16;

/// Bits per weight of RTN with `bits` and `group` (f16 scale + f16 zero).
pub fn rtn_bits_per_weight(bits: u32, group: usize) -> f64 {
    bits as f64 + 32.0 / group as f64
}

/// The f16 scale and zero point whose `max_q + 1` levels span `values`.
pub(crate) fn fit_grid(values: impl Iterator<Item = f32>, max_q: f32) -> (f32, f32) {
    let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let scale = f16::from_f32(((hi - lo) / max_q).max(1e-5)).to_f32();
    (scale, f16::from_f32((-lo / scale).round()).to_f32())
}

/// The level of the grid `(scale, zero)` nearest to `x`.
pub(crate) fn round_to_grid(x: f32, (scale, zero): (f32, f32), max_q: f32) -> f32 {
    scale * (((x / scale).round() + zero).clamp(0.0, max_q) - zero)
}

/// Quantizes and dequantizes the row-major `m×n` matrix `w` in place.
pub fn rtn_in_place(w: &mut [f32], n: usize, bits: u32, group: usize) {
    let max_q = ((1u32 << bits) - 1) as f32;
    for row in w.chunks_mut(n) {
        for g in row.chunks_mut(group) {
            let grid = fit_grid(g.iter().copied(), max_q);
            for x in g.iter_mut() {
                *x = round_to_grid(*x, grid, max_q);
            }
        }
    }
}

/// Applies RTN to every dense decoder linear of `model`; returns the bytes
/// the quantized linears would occupy.
pub fn apply_rtn(
    model: &mut crate::runtime::model::Llama,
    bits: u32,
    group: usize,
) -> anyhow::Result<usize> {
    use crate::runtime::linear::LinearWeight;
    if !(1..=8).contains(&bits) {
        anyhow::bail!("--rtn takes 1…8 bits, got {bits}");
    }
    if group == 0 {
        anyhow::bail!("--group must be at least 1");
    }
    let mut bytes = 0f64;
    for layer in &mut model.layers {
        for kind in crate::runtime::model::LinearKind::ALL {
            let lin = layer.linear_mut(kind);
            let LinearWeight::Dense(w) = &lin.weight else {
                anyhow::bail!("--rtn needs a dense model ({} is BitStack)", kind.name());
            };
            let (m, n) = w.dims2()?;
            let mut v = w.flatten_all()?.to_vec1::<f32>()?;
            rtn_in_place(&mut v, n, bits, group);
            lin.weight = LinearWeight::Dense(candle_core::Tensor::from_vec(v, (m, n), w.device())?);
            bytes += (m * n) as f64 * rtn_bits_per_weight(bits, group) / 8.0;
        }
    }
    Ok(bytes.round() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_on_grid_values_and_bounded_error() {
        // values already on a 2-bit grid are reproduced exactly
        let mut w = vec![0.0, 0.5, 1.0, 1.5, 1.5, 0.0];
        rtn_in_place(&mut w, 6, 2, 6);
        assert_eq!(w, vec![0.0, 0.5, 1.0, 1.5, 1.5, 0.0]);
        // error ≤ half a step per group, groups and rows independent
        let orig: Vec<f32> = (0..3 * 130)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q = orig.clone();
        rtn_in_place(&mut q, 130, 3, 128);
        for (r, (a, b)) in orig.chunks(130).zip(q.chunks(130)).enumerate() {
            for (ga, gb) in a.chunks(128).zip(b.chunks(128)) {
                let (lo, hi) = ga
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                let step = (hi - lo) / 7.0;
                for (x, y) in ga.iter().zip(gb) {
                    assert!(
                        (x - y).abs() <= step * 0.5 + 1e-3 * step.max(1.0),
                        "row {r}: {x} → {y}"
                    );
                }
            }
        }
        assert_eq!(rtn_bits_per_weight(4, 128), 4.25);
    }
}
