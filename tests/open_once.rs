//! Every command that works on a BitStack checkpoint opens it once: the
//! config, geometry, order and tensors are read by one `Checkpoint::open`
//! and passed on, never read again behind its back.
//!
//! One test in its own binary, so no other test opens checkpoints while the
//! process-wide count is read.

use std::path::Path;

use bitstack::format::synthetic::SyntheticSpec;
use bitstack::{BitStackHandle, Checkpoint};
use bitstack_cli::cli::Cli;
use clap::Parser;

/// Checkpoints opened while `bitstack ARGS` runs in this process.
fn opens_during(args: &[&str]) -> usize {
    let cli = Cli::try_parse_from(std::iter::once("bitstack").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("bitstack {args:?}: {e}"));
    let before = Checkpoint::opened_count();
    bitstack_cli::run(cli).unwrap_or_else(|e| panic!("bitstack {args:?}: {e:#}"));
    Checkpoint::opened_count() - before
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn each_command_opens_its_checkpoint_once() {
    let root = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::default();
    let (packed, dense) = (root.path().join("packed"), root.path().join("dense"));
    spec.write_bitstack(&packed, 3, 2).unwrap();
    spec.write(&dense).unwrap();
    let text = root.path().join("text.txt");
    std::fs::write(
        &text,
        "text to score and to sort the blocks on. ".repeat(20),
    )
    .unwrap();
    let (packed, dense, text) = (path(&packed), path(&dense), path(&text));
    let window = ["--windows", "2", "--seq-len", "16", "--batch", "2"];

    let sort = [
        "sort",
        packed,
        "--calib",
        text,
        "--sort-windows",
        "1",
        "--skip-windows",
        "0",
        "--seq-len",
        "16",
    ];
    assert_eq!(opens_during(&sort), 1, "sort");

    let eval = [
        &[
            "eval", packed, "--text", text, "--budget", "5bpw", "--record",
        ][..],
        &window,
    ]
    .concat();
    assert_eq!(opens_during(&eval), 1, "eval --budget --record");
    let dense_eval = [
        &["eval", packed, "--text", text, "--record-dense", dense][..],
        &window,
    ]
    .concat();
    assert_eq!(opens_during(&dense_eval), 1, "eval --record-dense");

    let generate = [
        "generate",
        packed,
        "--prompt",
        "ab",
        "--budget",
        "5bpw",
        "--max-tokens",
        "2",
    ];
    assert_eq!(opens_during(&generate), 1, "generate --budget");
    assert_eq!(opens_during(&["ladder", packed, "--json"]), 1, "ladder");
    // A dense model is no checkpoint.
    let dense_eval = [&["eval", dense, "--text", text][..], &window].concat();
    assert_eq!(opens_during(&dense_eval), 0, "eval of a dense model");

    // What the commands recorded went through that one checkpoint.
    let checkpoint = Checkpoint::open(packed.as_ref()).unwrap();
    let order = checkpoint.order();
    assert_eq!(order.measured.len(), 1);
    assert!(order.dense.is_some());

    // The control handle takes the checkpoint it is given.
    let before = Checkpoint::opened_count();
    let plan = checkpoint.plan("5bpw".parse().unwrap()).unwrap();
    let handle =
        BitStackHandle::from_checkpoint(checkpoint, &plan, &candle_core::Device::Cpu).unwrap();
    handle.set_level(0).unwrap();
    handle.set_level(handle.max_level()).unwrap();
    assert_eq!(Checkpoint::opened_count(), before);
}
