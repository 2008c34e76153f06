//! The activations' side: which rows of a candle input one call multiplies.

use candle_core::{Layout, Shape};

/// The rows of `x` one call multiplies: elements `start..end` of the
/// storage, `rows` rows of `n` features, giving `out_shape` (`x`'s shape
/// with `m` last).
pub(crate) struct Rows {
    pub start: usize,
    pub end: usize,
    pub rows: usize,
    pub out_shape: Shape,
}

/// Checks that `x` (laid out as `layout`) is contiguous with `n` features.
pub(crate) fn rows_of(layout: &Layout, m: usize, n: usize) -> candle_core::Result<Rows> {
    let dims = layout.shape().dims();
    let features = dims.last().copied().unwrap_or(0);
    if features != n {
        candle_core::bail!("bitstack-matmul: input has {features} features, the weight takes {n}");
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("bitstack-matmul: the input must be contiguous");
    };
    let mut out_shape = dims.to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = m;
    }
    Ok(Rows {
        start,
        end,
        rows: (end - start).checked_div(n).unwrap_or(0),
        out_shape: Shape::from(out_shape),
    })
}
