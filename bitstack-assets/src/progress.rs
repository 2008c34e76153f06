//! Terminal progress: indicatif hides itself when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A spinner for work of unknown length (a pip download).
pub(crate) fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A byte counter for hashing and extraction.
pub(crate) fn bytes(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb
}

/// A counter of discrete items (tensors); the message names the current one.
pub(crate) fn items(len: u64, prefix: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{prefix} {bar:40} {pos}/{len} {msg}") {
        pb.set_style(style);
    }
    pb.set_prefix(prefix);
    pb
}
