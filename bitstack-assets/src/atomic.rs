//! Atomic output: readers never see a half-written file or directory.
//!
//! Every file and directory the project writes goes through here: the data
//! goes to a temporary sibling in the same directory (so the final rename
//! cannot cross file systems), is flushed to disk with the directory entry
//! that names it, and only then is renamed into place. On any error the
//! temporary is removed and the destination is untouched.
//!
//! A process killed before the rename (kill -9, a power cut) cannot remove
//! its temporary. Each one holds an advisory lock while it is being
//! written, so the next run in the same directory can tell the leftovers of
//! a dead process from the work of a live one, and [`sweep_leftovers`]
//! removes them.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name prefix of the directories [`AtomicDir`] builds.
const PARTIAL_DIR: &str = ".bitstack-partial-";
/// Name prefix and suffix of the files [`write_file_with`] writes.
const PARTIAL_FILE: (&str, &str) = (".bitstack-", ".partial");
/// The file inside a partial directory whose lock says its writer is alive.
const OWNER_LOCK: &str = ".bitstack-owner";
/// A temporary whose lock is free is left alone for this long after its
/// last change: its writer may have made it and not yet locked it. One
/// without a lock file (written by an older build) waits an hour.
const UNLOCKED_GRACE: Duration = Duration::from_secs(10);
const LEGACY_GRACE: Duration = Duration::from_secs(3600);

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
    sweep_leftovers(parent);
    let mut tmp = tempfile::Builder::new()
        .prefix(PARTIAL_FILE.0)
        .suffix(PARTIAL_FILE.1)
        .tempfile_in(parent)
        .with_context(|| format!("creating a temp file in {}", parent.display()))?;
    // Held until the file is renamed or removed: it is being written.
    let _ = tmp.as_file().try_lock();
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
    /// Locked while this process builds the directory.
    owner: File,
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
        sweep_leftovers(parent);
        let tmp = tempfile::Builder::new()
            .prefix(PARTIAL_DIR)
            .tempdir_in(parent)
            .with_context(|| format!("output dir {} is not writable", parent.display()))?;
        let lock = tmp.path().join(OWNER_LOCK);
        let owner =
            File::create(&lock).with_context(|| format!("cannot create {}", lock.display()))?;
        owner
            .try_lock()
            .with_context(|| format!("cannot lock {}", lock.display()))?;
        Ok(Self {
            tmp,
            owner,
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
        // The lock file stays until the rename is done: killed before it,
        // the directory is still recognisably a dead writer's.
        for entry in std::fs::read_dir(self.tmp.path())? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n == OWNER_LOCK) {
                continue;
            }
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
        // The lock file is ours, not the output's.
        let lock = self.out.join(OWNER_LOCK);
        std::fs::remove_file(&lock).with_context(|| format!("cannot remove {}", lock.display()))?;
        drop(self.owner);
        Ok(self.out)
    }
}

/// Removes from `dir` the temporaries of runs that died before their
/// rename: partial directories and files whose writer no longer holds its
/// lock. Returns what it removed. Best effort: what cannot be read or
/// removed is left, and a live writer's temporary is never touched.
pub fn sweep_leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let stale = if meta.is_dir() && name.starts_with(PARTIAL_DIR) {
            match File::open(path.join(OWNER_LOCK)) {
                Ok(lock) => lock.try_lock().is_ok() && age > UNLOCKED_GRACE,
                Err(_) => age > LEGACY_GRACE,
            }
        } else if meta.is_file()
            && name.starts_with(PARTIAL_FILE.0)
            && name.ends_with(PARTIAL_FILE.1)
        {
            File::open(&path).is_ok_and(|f| f.try_lock().is_ok()) && age > UNLOCKED_GRACE
        } else {
            false
        };
        if !stale {
            continue;
        }
        let gone = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            tracing::info!("removed {}, left by an interrupted run", path.display());
            removed.push(path);
        }
    }
    removed
}

/// An exclusive lock on directory `dir`, held until the returned file is
/// dropped: read-modify-write of a file in it (the block order that
/// `eval --record` appends to) by several processes at once. Blocks while
/// another process holds it.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let d = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    d.lock()
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    Ok(d)
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

    /// Sets the modification time of `path` to `ago` before now.
    fn age(path: &Path, ago: Duration) {
        let f = File::options()
            .write(path.is_file())
            .read(true)
            .open(path)
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn leftovers_of_dead_writers_are_swept_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let old = Duration::from_secs(60);
        // A live writer (this test) holds its lock.
        let live = AtomicDir::create(&d.path().join("live-out")).unwrap();
        live.write("x", b"1").unwrap();
        age(live.path(), old);
        // A dead writer's directory: its lock file is there, nobody holds it.
        let dead = d.path().join(".bitstack-partial-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("model.safetensors"), b"half").unwrap();
        File::create(dead.join(OWNER_LOCK)).unwrap();
        age(&dead, old);
        // A dead writer's file, and one an older build left without a lock
        // file, too recent to be sure of.
        let dead_file = d.path().join(".bitstack-abc.partial");
        std::fs::write(&dead_file, b"half").unwrap();
        age(&dead_file, old);
        let legacy = d.path().join(".bitstack-partial-legacy");
        std::fs::create_dir(&legacy).unwrap();
        // Not ours at all.
        let other = d.path().join(".bitstack-notes");
        std::fs::write(&other, b"keep").unwrap();
        age(&other, old);

        let mut removed = sweep_leftovers(d.path());
        removed.sort();
        assert_eq!(removed, [dead_file.clone(), dead.clone()]);
        assert!(live.path().exists() && legacy.exists() && other.exists());
        // Old enough, the legacy one goes too; the live one commits.
        age(&legacy, LEGACY_GRACE + old);
        assert_eq!(sweep_leftovers(d.path()), [legacy]);
        let out = live.commit().unwrap();
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            1,
            "only x, no lock file"
        );
    }
}
