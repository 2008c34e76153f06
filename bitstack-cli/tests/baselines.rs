//! `eval --rtn` and `eval --gptq`, the fixed-precision baselines, through the
//! command line on a small synthetic model.

use std::path::Path;
use std::process::Command;

use bitstack_quant::format::synthetic::SyntheticSpec;

fn eval(dense: &Path, text: &Path, extra: &[&str]) -> serde_json::Value {
    let run = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .arg("eval")
        .arg(dense)
        .arg("--text")
        .arg(text)
        .args([
            "--windows",
            "2",
            "--seq-len",
            "24",
            "--batch",
            "2",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "eval {extra:?} failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

#[test]
fn gptq_and_rtn_report_their_bits_and_differ_from_dense() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let text = root.path().join("text.txt");
    let words = "the quick brown fox jumps over a lazy dog while seven bakers sing ";
    std::fs::write(&text, words.repeat(40)).unwrap();

    let ppl = |v: &serde_json::Value| v["ppl"].as_f64().unwrap();
    let bits = |v: &serde_json::Value| v["bits_per_linear_weight"].as_f64().unwrap();
    let full = eval(&dense, &text, &[]);
    let rtn = eval(&dense, &text, &["--rtn", "3", "--group", "16"]);
    let calib = ["--calib", text.to_str().unwrap(), "--calib-windows", "4"];
    let gptq = eval(
        &dense,
        &text,
        &[&["--gptq", "3", "--group", "16"], &calib[..]].concat(),
    );
    let act = eval(
        &dense,
        &text,
        &[&["--gptq", "3", "--group", "16", "--act-order"], &calib[..]].concat(),
    );
    // 3 bits and an f16 scale and zero per 16 weights.
    for (name, r) in [("rtn", &rtn), ("gptq", &gptq), ("act-order", &act)] {
        assert!((bits(r) - 5.0).abs() < 1e-9, "{name}: {r}");
        assert!(ppl(r).is_finite() && ppl(r) != ppl(&full), "{name}: {r}");
    }
    assert!(ppl(&gptq) != ppl(&act), "act-order changed nothing");
    // The old spelling of --group still works.
    let old = eval(&dense, &text, &["--rtn", "3", "--rtn-group", "16"]);
    assert_eq!(ppl(&old), ppl(&rtn));
}

#[test]
fn baselines_refuse_what_they_cannot_do() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let text = root.path().join("text.txt");
    std::fs::write(&text, "a few words ".repeat(20)).unwrap();
    for (args, says) in [
        (vec!["--gptq", "9"], "1…8 bits"),
        (vec!["--gptq", "4", "--calib-windows", "500"], "windows"),
        (vec!["--gptq", "4", "--rtn", "4"], "cannot be used with"),
        (vec!["--act-order"], "--gptq"),
    ] {
        let run = Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .arg("eval")
            .arg(&dense)
            .arg("--text")
            .arg(&text)
            .args(["--calib", text.to_str().unwrap()])
            .args(["--windows", "1", "--seq-len", "16"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
