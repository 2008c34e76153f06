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

use crate::layout::{tiled_row, TiledSigns};

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
///
/// Byte by byte, not sign by sign: a row's byte `q` holds columns
/// `8q..8q + 8`, which all fall in one 16-column step and one half of it,
/// so they go to one register of four consecutive lanes, two adjacent
/// columns per lane (the lower in bit `base`, the upper in `base + 16`).
/// A 4096×4096 block is 2 M bytes to scatter rather than 16 M signs.
pub fn mma_sign_words(signs: &TiledSigns) -> Vec<u32> {
    let (m, n) = (signs.m(), signs.n());
    let chunks = n.div_ceil(CHUNK_COLS);
    let row_bytes = n.div_ceil(8);
    // Columns past `n` in a row's last byte are 0 (+1 in neither layout).
    let tail = if n.is_multiple_of(8) {
        0xff
    } else {
        0xffu8 << (8 - n % 8)
    };
    let mut words = vec![0u32; words_for(m, n)];
    if words.is_empty() {
        return words;
    }
    words
        .par_chunks_mut(chunks * 32)
        .enumerate()
        .for_each(|(tile, words)| {
            let mut row = vec![0u8; row_bytes];
            for r in 0..TILE_ROWS.min(m - tile * TILE_ROWS) {
                tiled_row(signs, tile * TILE_ROWS + r, 0, &mut row);
                // The four lanes of row `r` (see [`position`]).
                let lane = (r % 8) * 4;
                for (q, &byte) in row.iter().enumerate() {
                    // A set bit of `TiledSigns` is +1; the kernel's is −1.
                    let mut negative = !byte;
                    if q + 1 == row_bytes {
                        negative &= tail;
                    }
                    if negative == 0 {
                        continue;
                    }
                    let (chunk, b) = (q / 8, q % 8);
                    let base = (b / 2) * 4 + r / 8 + 2 * (b % 2);
                    let lanes = &mut words[chunk * 32 + lane..chunk * 32 + lane + 4];
                    for (j, word) in lanes.iter_mut().enumerate() {
                        // Columns 2j and 2j + 1 of the byte, most significant first.
                        let pair = u32::from(negative >> (6 - 2 * j)) & 0b11;
                        *word |= (pair >> 1) << base | (pair & 1) << (base + 16);
                    }
                }
            }
        });
    words
}
