//! Atomic output: readers never see a half-written file or directory.
//!
//! Every file and directory the project writes goes through here: the data
//! goes to a temporary sibling in the same directory (so the final rename
//! cannot cross file systems), is flushed to disk with the directory entry
//! that names it, and only then is renamed into place. On any error the
//! temporary is removed and the destination is untouched.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Parent directory of `path`, `.` for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a temp file next to `path`, lets `fill` write it, then renames it
/// into place. On error the temp file is removed and `path` is untouched.
pub fn write_file_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut File) -> Result<()>,
{
    let parent = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".bitstack-")
        .suffix(".partial")
        .tempfile_in(parent)
        .with_context(|| format!("creating a temp file in {}", parent.display()))?;
    fill(tmp.as_file_mut())?;
    // Temporary files are private; the result should read like any other file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.as_file_mut()
        .flush()
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("moving the temp file to {}", path.display()))?;
    sync_dir(parent);
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |f| {
        f.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// A directory built in a temporary sibling and renamed into place by
/// [`AtomicDir::commit`]; dropped uncommitted, it is removed.
pub struct AtomicDir {
    tmp: tempfile::TempDir,
    out: PathBuf,
    /// `out` exists and is empty: the user made it for us to fill.
    replace_empty: bool,
}

impl AtomicDir {
    /// Starts a directory that will become `out`. `out` must not exist, or
    /// be an empty directory; anything else is an error, so nothing of the
    /// user's is ever overwritten.
    pub fn create(out: &Path) -> Result<Self> {
        let replace_empty = match std::fs::read_dir(out) {
            Ok(mut entries) => match entries.next() {
                None => true,
                Some(_) => bail!(
                    "output dir {} already exists and is not empty; remove it or choose another",
                    out.display()
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot use {} as output", out.display()))
            }
        };
        let parent = parent_dir(out);
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".bitstack-partial-")
            .tempdir_in(parent)
            .with_context(|| format!("output dir {} is not writable", parent.display()))?;
        Ok(Self {
            tmp,
            out: out.to_path_buf(),
            replace_empty,
        })
    }

    /// Where files go until the commit.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes a small file into the directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Flushes every file and the directory to disk, then moves it to its
    /// final name.
    pub fn commit(self) -> Result<PathBuf> {
        for entry in std::fs::read_dir(self.tmp.path())? {
            let path = entry?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot flush {}", path.display()))?;
        }
        sync_dir(self.tmp.path());
        // Temporary dirs are private; the result should not be.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.tmp.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        if self.replace_empty {
            std::fs::remove_dir(&self.out)
                .with_context(|| format!("cannot replace empty dir {}", self.out.display()))?;
        }
        let kept = self.tmp.keep();
        if let Err(e) = std::fs::rename(&kept, &self.out) {
            let _ = std::fs::remove_dir_all(&kept);
            return Err(e).with_context(|| {
                format!("cannot move {} to {}", kept.display(), self.out.display())
            });
        }
        sync_dir(parent_dir(&self.out));
        Ok(self.out)
    }
}

/// Makes a rename or a new entry in `dir` durable. Best effort: some file
/// systems cannot sync a directory, and the data itself is already synced.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let e = write_file_with(&path, |f| {
            f.write_all(b"half")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        write_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_directory_appears_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ckpt");
        let dir = AtomicDir::create(&out).unwrap();
        dir.write("a.json", b"{}").unwrap();
        assert!(!out.exists());
        drop(dir);
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);

        let dir = AtomicDir::create(&out).unwrap();
        dir.write("a.json", b"{}").unwrap();
        assert_eq!(dir.commit().unwrap(), out);
        assert_eq!(std::fs::read(out.join("a.json")).unwrap(), b"{}");
        let e = AtomicDir::create(&out).err().unwrap().to_string();
        assert!(e.contains("not empty"), "{e}");
    }

    #[test]
    fn an_empty_destination_dir_is_filled() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("empty");
        std::fs::create_dir(&out).unwrap();
        let dir = AtomicDir::create(&out).unwrap();
        dir.write("x", b"1").unwrap();
        dir.commit().unwrap();
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"1");
    }
}
