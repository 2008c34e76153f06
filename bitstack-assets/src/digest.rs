//! SHA-256 checks: every pinned input and derived output is verified.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file whose content is not the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("sha256 mismatch for {}: expected {expected}, got {actual}", path.display())]
pub(crate) struct HashMismatch {
    pub path: PathBuf,
    pub expected: String,
    pub actual: String,
}

/// Lowercase hex sha256 of `bytes`.
pub(crate) fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex sha256 of everything `reader` yields.
pub(crate) fn sha256_reader(reader: &mut impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex sha256 of the file at `path`, with a progress bar.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let pb = crate::progress::bytes(len, format!("hashing {name}"));
    let hash = sha256_reader(&mut pb.wrap_read(file))
        .with_context(|| format!("reading {}", path.display()))?;
    pb.finish_and_clear();
    Ok(hash)
}

/// Checks `path` against `expected`; a mismatching file is deleted so that
/// the next run fetches it again instead of trusting it.
pub(crate) fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual == expected {
        return Ok(());
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("could not remove {}: {e}", path.display());
    }
    Err(HashMismatch {
        path: path.to_path_buf(),
        expected: expected.to_string(),
        actual,
    }
    .into())
}

/// Whether `path` exists and already has the pinned content.
pub(crate) fn is_verified(path: &Path, expected: &str) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    Ok(sha256_file(path)? == expected)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn mismatch_removes_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        std::fs::write(&path, b"abc").unwrap();
        let err = verify_file(&path, "00").unwrap_err().to_string();
        assert!(err.contains("x.bin"), "{err}");
        assert!(err.contains("expected 00"), "{err}");
        assert!(err.contains("ba7816bf"), "{err}");
        assert!(!path.exists());
    }
}
