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

use crate::layout::{TiledSigns, TILE_ROWS as CPU_TILE_ROWS};

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

/// Byte `x`'s eight columns as they land in four lanes' words: lane `j`
/// gets column `2j` (most significant bit first) in bit 0 and column
/// `2j + 1` in bit 16; shifted by a register's bit, these are its halves.
const SPREAD: [[u32; 4]; 256] = {
    let mut table = [[0u32; 4]; 256];
    let mut x = 0;
    while x < 256 {
        let mut j = 0;
        while j < 4 {
            let low = (x >> (7 - 2 * j)) & 1;
            let high = (x >> (6 - 2 * j)) & 1;
            table[x][j] = (low | high << 16) as u32;
            j += 1;
        }
        x += 1;
    }
    table
};

/// The signs of `signs` in the decode kernel's layout.
///
/// Word by word, from whole bytes: the four words of lanes `4r..4r + 4` in
/// one `16×64` piece hold rows `r` and `r + 8` of it, and each byte of
/// those rows (8 columns, all in one 16-column step and one half of it)
/// spreads over the four lanes through [`SPREAD`]. Each word is built in a
/// register and written once.
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
    let data = signs.as_bytes();
    // Byte `q` of row `i` in the CPU tiling (see `TiledSigns`); a set bit is +1.
    let byte = |i: usize, q: usize| {
        data[((i / CPU_TILE_ROWS) * row_bytes + q) * CPU_TILE_ROWS + i % CPU_TILE_ROWS]
    };
    let mut words = vec![0u32; words_for(m, n)];
    if words.is_empty() {
        return words;
    }
    words
        .par_chunks_mut(chunks * 32)
        .enumerate()
        .for_each(|(tile, words)| {
            for (chunk, piece) in words.chunks_exact_mut(32).enumerate() {
                for r in 0..TILE_ROWS / 2 {
                    let mut lanes = [0u32; 4];
                    for half in 0..2 {
                        let i = tile * TILE_ROWS + r + 8 * half;
                        if i >= m {
                            break;
                        }
                        for b in 0..8 {
                            let q = chunk * 8 + b;
                            if q >= row_bytes {
                                break;
                            }
                            let mut negative = !byte(i, q);
                            if q + 1 == row_bytes {
                                negative &= tail;
                            }
                            let bit = (b / 2) * 4 + half + 2 * (b % 2);
                            for (lane, spread) in lanes.iter_mut().zip(SPREAD[negative as usize]) {
                                *lane |= spread << bit;
                            }
                        }
                    }
                    piece[4 * r..4 * r + 4].copy_from_slice(&lanes);
                }
            }
        });
    words
}
