//! With the `cuda` feature, compiles `src/cuda/bitstack.cu` to PTX for
//! compute capabilities 8.0 and 9.0 with `nvcc` (from `$NVCC`,
//! `$CUDA_HOME/bin` or `PATH`); the crate embeds both and loads the newest
//! one the device runs.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "src/cuda/bitstack.cu";
const ARCHS: [&str; 2] = ["80", "90"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={SOURCE}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    for arch in ARCHS {
        let ptx = out_dir.join(format!("bitstack_sm{arch}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(SOURCE)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): the `cuda` feature needs nvcc 13.0 \
                     (set NVCC or CUDA_HOME, or see scripts/build-cuda.sh)",
                    nvcc.display()
                )
            });
        assert!(
            status.success(),
            "nvcc failed on {SOURCE} for compute_{arch}"
        );
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
