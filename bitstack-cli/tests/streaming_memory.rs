//! `compress` streams: it holds one decoder layer at a time, so its peak
//! resident memory does not grow with the layer count. Measured on a
//! synthetic model with Llama-3-8B layer shapes (hidden 4096, MLP 14336,
//! 32 heads, 8 KV heads), where one layer's dense weights are 872 MB.

use std::path::Path;
use std::process::Command;

use bitstack_quant::format::synthetic::SyntheticSpec;

const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 14336;

/// f32 bytes of one decoder layer's linears.
fn layer_bytes() -> u64 {
    let kv = HIDDEN / 4;
    let params = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTERMEDIATE;
    4 * params as u64
}

/// Peak resident bytes of `bitstack compress` on a model of `layers` layers.
fn compress_peak(root: &Path, layers: usize, text: &Path) -> u64 {
    let dense = root.join(format!("dense-{layers}"));
    SyntheticSpec {
        hidden: HIDDEN,
        intermediate: INTERMEDIATE,
        layers,
        heads: 32,
        kv_heads: 8,
        vocab: 512,
        ..Default::default()
    }
    .write(&dense)
    .unwrap();
    let out = root.join(format!("packed-{layers}"));
    let run = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(["compress", dense.to_str().unwrap(), out.to_str().unwrap()])
        .args([
            "--layout", "blocks", "--signs", "avd", "--k", "1", "--niter", "1",
        ])
        .args(["--calib", text.to_str().unwrap()])
        .args(["--calib-windows", "1", "--seq-len", "16", "--batch", "1"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "compress failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The dense source is no longer needed: keep the disk footprint small.
    std::fs::remove_dir_all(&dense).unwrap();
    let mib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak resident memory "))
        .and_then(|rest| rest.strip_suffix(" MiB"))
        .unwrap_or_else(|| panic!("no peak memory line in {stdout}"))
        .parse()
        .unwrap();
    mib << 20
}

#[cfg(target_os = "linux")]
#[test]
fn peak_memory_of_compress_is_flat_in_the_layer_count() {
    let root = tempfile::tempdir().unwrap();
    let text = root.path().join("calib.txt");
    std::fs::write(
        &text,
        "streaming compression, one layer at a time. ".repeat(4),
    )
    .unwrap();
    let one = compress_peak(root.path(), 1, &text);
    let three = compress_peak(root.path(), 3, &text);
    eprintln!(
        "peak resident: 1 layer {} MiB, 3 layers {} MiB (one layer's weights: {} MiB)",
        one >> 20,
        three >> 20,
        layer_bytes() >> 20
    );
    // Holding every layer would add two layers' weights (1.7 GB).
    assert!(
        three < one + layer_bytes() / 2,
        "3 layers peaked at {} MiB against {} MiB for 1",
        three >> 20,
        one >> 20
    );
}
