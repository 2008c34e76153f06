//! How the weights are laid out in memory: the bottom of the crate, which
//! imports no other module of it.
//!
//! - packed sign bits and the one reader of a row-major packed sign
//!   ([`row_major_sign`]);
//! - [`TiledSigns`], the signs re-tiled for the CPU kernels, with
//!   [`TiledSigns::sign`] and [`tiled_row`] to read them;
//! - the blocks of a linear, borrowed ([`BlockRef`], [`StackRef`], what the
//!   kernels take) and owned ([`OwnedBlock`], [`OwnedStack`]);
//! - the grid planes after a linear's blocks, borrowed ([`GridRef`]) and
//!   owned ([`OwnedGrid`]);
//! - which rows of a candle input one call multiplies (crate-internal).

mod bits;
mod grid;
mod rows;
mod stack;
mod tiled;

pub(crate) use bits::{nibble_sign, SIGN_MASKS};
pub use bits::{packed_sign, row_major_sign};
pub use grid::{plane_weight, GridRef, GridValues, GridValuesRef, OwnedGrid, MAX_GROUP};
pub(crate) use rows::{rows_of, Rows};
pub use stack::{BlockRef, OwnedBlock, OwnedStack, StackRef};
pub use tiled::{tiled_row, TiledSigns, TILE_ROWS};
