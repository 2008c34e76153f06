//! Budgets resolve to ladder rungs, and what is loaded is exactly what the rung says.

mod common;

use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::{compress, Budget, Checkpoint, Llama};
use candle_core::Device;

#[test]
fn budget_bytes_match_what_is_resident() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec {
        model_type: "qwen2",
        tied: false,
        ..Default::default()
    }
    .write(&dense)
    .unwrap();
    let calib = root.path().join("calib.txt");
    std::fs::write(
        &calib,
        "some calibration text for the budget test. ".repeat(40),
    )
    .unwrap();
    let out = root.path().join("packed");
    let opts = common::small_options(calib, 3, 4);
    compress(&dense, &out, &opts).unwrap();

    let checkpoint = Checkpoint::open(&out).unwrap();
    let geometry = checkpoint.geometry();
    let ladder = checkpoint.ladder();
    assert_eq!(ladder.len(), 1 + 14 * 3);
    assert!(ladder
        .windows(2)
        .all(|w| w[1].total_bytes > w[0].total_bytes
            && w[1].bits_per_linear_weight > w[0].bits_per_linear_weight));

    for rung in [&ladder[0], &ladder[5], &ladder[ladder.len() - 1]] {
        for budget in [
            Budget::Bytes(rung.total_bytes as u64),
            Budget::Bytes(rung.total_bytes as u64 + 1),
        ] {
            let plan = checkpoint.plan(budget).unwrap();
            assert_eq!(plan.rung.level, rung.level, "{budget}");
            let model = Llama::from_checkpoint(&checkpoint, &plan.counts, &Device::Cpu).unwrap();
            assert_eq!(model.stack_bytes(), plan.rung.linear_bytes);
            assert_eq!(model.resident_bytes(), plan.rung.total_bytes);
        }
    }
    let bpw = Budget::BitsPerWeight(ladder[7].bits_per_linear_weight);
    assert_eq!(checkpoint.plan(bpw).unwrap().rung.level, 7);
    // percent of the model at 16 bits per parameter
    let pct = 100.0 * ladder[10].total_bytes as f64 / (2.0 * geometry.parameters as f64);
    assert_eq!(
        checkpoint
            .plan(Budget::Percent(pct + 1e-9))
            .unwrap()
            .rung
            .level,
        10
    );

    let e = checkpoint
        .plan(Budget::Bytes(ladder[0].total_bytes as u64 - 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("below the floor") && e.contains(&ladder[0].total_bytes.to_string()),
        "{e}"
    );
}
