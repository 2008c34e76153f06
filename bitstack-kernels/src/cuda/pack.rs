//! The sign layout of the CUDA kernels, made on the host. Plain Rust,
//! compiled with or without the `cuda` feature.
//!
//! An `m16n8k16` tensor-core product takes its `16×16` A operand as four
//! 32-bit registers per lane, each two halves of one row. Packing the signs
//! by those registers lets each lane of a warp read, with one 32-bit load,
//! exactly the 64 signs it needs for four such products over a `16×64`
//! piece of `W`, and turn each pair into two ±1 halves with a shift and a
//! mask. Rows are taken in tiles of [`TILE_ROWS`], columns in chunks of
//! [`CHUNK_COLS`]; word `(tile·chunks + chunk)·32 + lane` belongs to that
//! lane. A set bit means −1 (the sign bit of a half), padding bits are 0.

use rayon::prelude::*;

use crate::layout::TiledSigns;

/// Rows of `W` per tile: the M of one tensor-core product.
pub const TILE_ROWS: usize = 16;
/// Columns of `W` per 32-bit word of each lane: four products' K of 16.
pub const CHUNK_COLS: usize = 64;

/// Words [`mma_sign_words`] makes for an `m×n` matrix.
pub fn words_for(m: usize, n: usize) -> usize {
    m.div_ceil(TILE_ROWS) * n.div_ceil(CHUNK_COLS) * 32
}

/// Lane and bit holding the sign of `(row, col)` of a `16×64` piece.
///
/// In a tensor-core A fragment lane `l` holds rows `l/4` and `l/4 + 8` and,
/// in each 16-column step, columns `2(l%4)`, `+1`, `+8` and `+9`; register
/// `reg` (0..4) is (row `+8` if `reg` is odd, column `+8` if `reg ≥ 2`).
/// Step `s`'s register `reg` is bits `4s + reg` (its lower column) and
/// `4s + reg + 16` (its upper one).
pub fn position(row: usize, col: usize) -> (usize, u32) {
    debug_assert!(row < TILE_ROWS && col < CHUNK_COLS);
    let step = col / 16;
    let c = col % 16;
    let lane = (row % 8) * 4 + (c % 8) / 2;
    let reg = row / 8 + 2 * (c / 8);
    let bit = step * 4 + reg + 16 * (c % 2);
    (lane, bit as u32)
}

/// The signs of `signs` in the decode kernel's layout.
pub fn mma_sign_words(signs: &TiledSigns) -> Vec<u32> {
    let (m, n) = (signs.m(), signs.n());
    let chunks = n.div_ceil(CHUNK_COLS);
    let mut words = vec![0u32; words_for(m, n)];
    if words.is_empty() {
        return words;
    }
    words
        .par_chunks_mut(chunks * 32)
        .enumerate()
        .for_each(|(tile, words)| {
            for row in 0..TILE_ROWS.min(m - tile * TILE_ROWS) {
                let i = tile * TILE_ROWS + row;
                for c in 0..n {
                    if !signs.sign(i, c) {
                        let (lane, bit) = position(row, c % CHUNK_COLS);
                        words[(c / CHUNK_COLS) * 32 + lane] |= 1 << bit;
                    }
                }
            }
        });
    words
}
