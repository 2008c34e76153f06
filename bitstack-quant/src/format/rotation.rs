//! Incoherence processing: a rotation of every linear's input columns
//! (format version 4).
//!
//! A weight's rows hold a few large values that set each grid group's
//! range and so waste the grid's levels on the rest. Rotating the input
//! dimension by an orthonormal transform `R` spreads them out: the planes
//! are fitted to `W·R`, and since `x·Wᵀ = (x·R)·(W·R)ᵀ`, a runtime that
//! rotates each linear's input the same way computes the same product.
//!
//! `R = D·H` per block of `block` columns: `D` flips the sign of random
//! columns, `H` is the orthonormal Walsh–Hadamard matrix of the block. Its
//! cost at run time is `n·log2(block)` additions per input row. The signs
//! depend on the checkpoint's seed and the column index only, so every
//! linear of a width shares them and a tensor-parallel shard of columns
//! takes its slice.

use serde::{Deserialize, Serialize};

/// Largest rotation block: a bigger Hadamard transform spreads outliers
/// further, but must divide every width and every shard of one.
pub const MAX_BLOCK: usize = 4096;

/// How a checkpoint rotates its linears' inputs (`quantization_config.rotation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationConfig {
    /// Columns per Hadamard block: a power of two dividing every width.
    pub block: usize,
    /// Seed of the columns' random signs ([`RotationConfig::signs`]).
    pub seed: u64,
}

/// Which way [`rotate_rows`] turns a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `W·D·H`: what the planes are fitted to, and what inputs become.
    Forward,
    /// `W·H·D`, the inverse (`H` is symmetric and its own inverse): the
    /// weight a rotated stack stands for.
    Inverse,
}

impl RotationConfig {
    /// Blocks of 64 with the default seed; 64 divides the widths of every
    /// Llama-family model we know.
    pub fn new(block: usize) -> Self {
        Self { block, seed: 1 }
    }

    /// Checks the block before any work: a power of two, 2…[`MAX_BLOCK`].
    pub fn check(&self) -> Result<(), String> {
        if !self.block.is_power_of_two() || !(2..=MAX_BLOCK).contains(&self.block) {
            return Err(format!(
                "rotation block {} must be a power of two from 2 to {MAX_BLOCK}",
                self.block
            ));
        }
        Ok(())
    }

    /// Errs unless the block divides a width of `n` columns (`what` names it).
    pub fn check_width(&self, n: usize, what: &str) -> Result<(), String> {
        if !n.is_multiple_of(self.block) {
            return Err(format!(
                "rotation block {} does not divide {what}'s {n} input columns",
                self.block
            ));
        }
        Ok(())
    }

    /// The sign (±1) of columns `cols`: bit `j mod 64` of
    /// `splitmix64(seed + ⌊j/64⌋)`, so it depends on the column alone.
    pub fn signs(&self, cols: std::ops::Range<usize>) -> Vec<f32> {
        cols.map(|j| {
            let word = splitmix64(self.seed.wrapping_add((j / 64) as u64));
            if (word >> (j % 64)) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
    }
}

/// SplitMix64's output for state `x` (Steele, Lea and Flood, 2014): a
/// well-mixed 64-bit word, written out here so that the signs of a
/// checkpoint never depend on a library's generator.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rotates each row of the row-major `w` (rows of `signs.len()` columns)
/// in blocks of `block`, rows in parallel.
pub fn rotate_rows<T: Sample>(w: &mut [T], block: usize, signs: &[f32], direction: Direction) {
    use rayon::prelude::*;
    let n = signs.len();
    assert!(
        n > 0 && n.is_multiple_of(block) && w.len().is_multiple_of(n),
        "rotate_rows: {} values are not rows of {n} in blocks of {block}",
        w.len()
    );
    w.par_chunks_mut(n)
        .for_each(|row| rotate_row(row, block, signs, direction));
}

/// A number the transform runs on: f32 for weights and inputs, f64 for
/// the Gram matrices of [`crate::method::plane_feedback`].
pub trait Sample:
    Copy
    + Send
    + From<f32>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
}

impl Sample for f32 {}
impl Sample for f64 {}

/// One row of [`rotate_rows`].
pub fn rotate_row<T: Sample>(row: &mut [T], block: usize, signs: &[f32], direction: Direction) {
    let norm = T::from(1.0 / (block as f32).sqrt());
    for (blk, d) in row.chunks_exact_mut(block).zip(signs.chunks_exact(block)) {
        if direction == Direction::Forward {
            blk.iter_mut()
                .zip(d)
                .for_each(|(x, &s)| *x = *x * T::from(s));
        }
        walsh_hadamard(blk);
        match direction {
            Direction::Forward => blk.iter_mut().for_each(|x| *x = *x * norm),
            Direction::Inverse => blk
                .iter_mut()
                .zip(d)
                .for_each(|(x, &s)| *x = *x * T::from(s) * norm),
        }
    }
}

/// The unnormalized fast Walsh–Hadamard transform of `v` in place
/// (`v.len()` a power of two).
fn walsh_hadamard<T: Sample>(v: &mut [T]) {
    let len = v.len();
    let mut h = 1;
    while h < len {
        for i in (0..len).step_by(2 * h) {
            let (lo, hi) = v[i..i + 2 * h].split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                (*a, *b) = (*a + *b, *a - *b);
            }
        }
        h *= 2;
    }
}

/// `Rᵀ·G·R` for the row-major `n×n` Gram matrix `gram` of inputs `x`
/// (`n = signs.len()`): the Gram matrix of the rotated inputs `x·R`.
pub fn rotate_gram(gram: &mut [f64], block: usize, signs: &[f32]) {
    let n = signs.len();
    assert_eq!(gram.len(), n * n, "rotate_gram: not an n×n matrix");
    // Rows: G·R. Then the rows of its transpose, Rᵀ·G (G is symmetric),
    // times R: Rᵀ·G·R, which is symmetric again.
    rotate_rows(gram, block, signs, Direction::Forward);
    transpose_in_place(gram, n);
    rotate_rows(gram, block, signs, Direction::Forward);
}

fn transpose_in_place(a: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            a.swap(i * n + j, j * n + i);
        }
    }
}

/// The orthonormal `block×block` Walsh–Hadamard matrix, row-major:
/// `H[i, j] = (−1)^popcount(i & j) / √block`.
pub fn hadamard(block: usize) -> Vec<f32> {
    let norm = 1.0 / (block as f32).sqrt();
    (0..block * block)
        .map(|ij| {
            let (i, j) = (ij / block, ij % block);
            if (i & j).count_ones() % 2 == 0 {
                norm
            } else {
                -norm
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| (splitmix64(seed ^ (i << 20)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn the_fast_transform_is_the_matrix_product_with_the_signs() {
        // 3 rows of 3 blocks of 8 columns, against (w ⊙ d)·H block by block.
        let (m, block, n) = (3, 8, 24);
        let cfg = RotationConfig { block, seed: 7 };
        let signs = cfg.signs(0..n);
        let w = random(m * n, 1);
        let mut fast = w.clone();
        rotate_rows(&mut fast, block, &signs, Direction::Forward);
        let h = hadamard(block);
        for i in 0..m {
            for j in 0..n {
                let b0 = j / block * block;
                let want: f32 = (0..block)
                    .map(|t| w[i * n + b0 + t] * signs[b0 + t] * h[t * block + j - b0])
                    .sum();
                assert!((fast[i * n + j] - want).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    #[test]
    fn the_rotation_is_orthogonal_and_its_inverse_undoes_it() {
        // One row, an awkward row count (5), and the largest block of 64
        // that the models use.
        for (m, n, block) in [(1, 64, 64), (5, 192, 64), (7, 48, 16)] {
            let cfg = RotationConfig::new(block);
            let signs = cfg.signs(0..n);
            let w = random(m * n, n as u64);
            let mut r = w.clone();
            rotate_rows(&mut r, block, &signs, Direction::Forward);
            let moved = w
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(moved > 0.05, "the rotation left the weights in place");
            // Orthogonal: every block keeps its norm.
            for (a, b) in w.chunks(block).zip(r.chunks(block)) {
                let (na, nb) = (
                    a.iter().map(|x| x * x).sum::<f32>(),
                    b.iter().map(|x| x * x).sum::<f32>(),
                );
                assert!((na - nb).abs() < 1e-4 * na.max(1.0), "{na} → {nb}");
            }
            rotate_rows(&mut r, block, &signs, Direction::Inverse);
            for (a, b) in w.iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "{a} came back as {b}");
            }
        }
    }

    #[test]
    fn a_rotated_gram_is_the_gram_of_the_rotated_inputs() {
        // 5 rows of 48 inputs in blocks of 16: Rᵀ·(XᵀX)·R = (X·R)ᵀ(X·R),
        // in f64 from the same f32 inputs.
        let (rows, n, block) = (5, 48, 16);
        let cfg = RotationConfig { block, seed: 3 };
        let signs = cfg.signs(0..n);
        let x: Vec<f64> = random(rows * n, 9).into_iter().map(f64::from).collect();
        let gram_of = |x: &[f64]| -> Vec<f64> {
            (0..n * n)
                .map(|pq| {
                    (0..rows)
                        .map(|r| x[r * n + pq / n] * x[r * n + pq % n])
                        .sum()
                })
                .collect()
        };
        let mut rotated_gram = gram_of(&x);
        rotate_gram(&mut rotated_gram, block, &signs);
        let mut xr = x.clone();
        rotate_rows(&mut xr, block, &signs, Direction::Forward);
        let want = gram_of(&xr);
        for (pq, (a, b)) in rotated_gram.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-12,
                "({}, {}): {a} against {b}",
                pq / n,
                pq % n
            );
        }
        // The transform moved it: the Gram of unrotated inputs differs.
        let plain = gram_of(&x);
        assert!(plain.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn signs_depend_on_the_column_alone_and_are_balanced() {
        let cfg = RotationConfig::new(64);
        let all = cfg.signs(0..4096);
        // A shard of columns takes its slice of the whole row's signs.
        assert_eq!(cfg.signs(1000..1500), all[1000..1500]);
        let minus = all.iter().filter(|&&s| s < 0.0).count();
        assert!(
            (1800..2300).contains(&minus),
            "{minus} of 4096 signs are −1"
        );
        let other = RotationConfig { seed: 2, ..cfg }.signs(0..4096);
        assert_ne!(all, other, "the seed does not change the signs");
    }

    #[test]
    fn a_block_that_is_not_a_power_of_two_or_does_not_divide_is_refused() {
        assert!(RotationConfig::new(48).check().is_err());
        assert!(RotationConfig::new(1).check().is_err());
        assert!(RotationConfig::new(64).check().is_ok());
        let err = RotationConfig::new(64)
            .check_width(576 + 32, "q_proj")
            .unwrap_err();
        assert!(err.contains("q_proj") && err.contains("608"), "{err}");
    }
}
