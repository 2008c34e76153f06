//! Reading members out of a (hash-verified) wheel, which is a zip archive.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Read;
use std::path::Path;

fn open_member<'a>(
    archive: &'a mut zip::ZipArchive<File>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, File>> {
    archive
        .by_name(member)
        .with_context(|| format!("member {member} not found in {}", wheel.display()))
}

fn open_archive(wheel: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    zip::ZipArchive::new(file).with_context(|| format!("reading zip {}", wheel.display()))
}

/// Uncompressed size of `member`, for progress bars.
pub(crate) fn member_size(wheel: &Path, member: &str) -> Result<u64> {
    let mut archive = open_archive(wheel)?;
    let entry = open_member(&mut archive, wheel, member)?;
    Ok(entry.size())
}

/// Feeds `member` to `sink` in pieces, without holding it in memory.
pub(crate) fn stream_member(
    wheel: &Path,
    member: &str,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut archive = open_archive(wheel)?;
    let mut entry = open_member(&mut archive, wheel, member)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .with_context(|| format!("extracting {member} from {}", wheel.display()))?;
        if n == 0 {
            return Ok(());
        }
        sink(&buf[..n])?;
    }
}

/// Reads `member` into memory.
pub(crate) fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let mut archive = open_archive(wheel)?;
    let mut entry = open_member(&mut archive, wheel, member)?;
    let mut bytes = Vec::with_capacity(entry.size().min(1 << 28) as usize);
    entry
        .read_to_end(&mut bytes)
        .with_context(|| format!("extracting {member} from {}", wheel.display()))?;
    Ok(bytes)
}
