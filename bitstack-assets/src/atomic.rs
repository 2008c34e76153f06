//! Atomic file creation: readers never see a half-written file.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Parent directory of `path`, `.` for a bare file name.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a temp file next to `path`, lets `fill` write it, then renames it
/// into place. On error the temp file is removed and `path` is untouched.
pub(crate) fn write_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut std::fs::File) -> Result<()>,
{
    let parent = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".bitstack-")
        .suffix(".partial")
        .tempfile_in(parent)
        .with_context(|| format!("creating a temp file in {}", parent.display()))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut()
        .flush()
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("moving the temp file to {}", path.display()))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| {
        f.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    })
}
