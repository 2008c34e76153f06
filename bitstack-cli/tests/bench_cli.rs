//! `bitstack bench` end to end: the built binary on tiny shapes.

use std::process::Command;

use serde_json::Value;

fn bitstack(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .expect("the bitstack binary runs")
}

#[test]
fn json_has_one_entry_per_combination() {
    let out = bitstack(&[
        "bench",
        "--shapes",
        "64x256,33x40",
        "--blocks",
        "1,2",
        "--k",
        "4",
        "--planes",
        "2,3",
        "--rows",
        "1,3",
        "--min-time-ms",
        "1",
        "--threads",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    // Nothing but the JSON on stdout.
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("stdout is one JSON list");
    assert_eq!(rows.len(), 2 * 2 * (2 + 2), "{rows:#?}");
    let mut seen = Vec::new();
    for r in &rows {
        let int = |key: &str| r[key].as_u64().unwrap_or_else(|| panic!("{key} in {r}"));
        let (m, n, blocks, rows) = (int("m"), int("n"), int("blocks"), int("rows"));
        let layout = r["layout"].as_str().expect("layout").to_string();
        seen.push((layout.clone(), m, n, blocks, rows));
        let bpw = r["bpw"].as_f64().expect("bpw");
        // Resident bytes: signs in 32-row tiles of whole bytes, then u and
        // vt for blocks, the grid for planes.
        let signs = m.div_ceil(32) * 32 * n.div_ceil(8);
        match layout.as_str() {
            "blocks" => {
                assert_eq!(int("k"), 4);
                let want = blocks as f64 * (signs + 2 * 4 * (m + n)) as f64 * 8.0 / (m * n) as f64;
                assert!((bpw - want).abs() < 1e-9, "bpw {bpw} vs {want}");
            }
            "planes" => {
                assert!(r["k"].is_null(), "{r}");
                let bare = blocks as f64 * signs as f64 * 8.0 / (m * n) as f64;
                assert!(bpw > bare, "bpw {bpw} holds no grid over {bare}");
            }
            other => panic!("layout {other}"),
        }
        for key in ["ours_ms", "dense_f32_ms", "dense_f16_ms"] {
            let t = r[key].as_f64().unwrap_or_else(|| panic!("{key} in {r}"));
            assert!(t.is_finite() && t > 0.0, "{key} = {t}");
        }
        if n % 256 == 0 {
            let t = r["q4k_ms"].as_f64().expect("a Q4K time where n % 256 == 0");
            assert!(t.is_finite() && t > 0.0, "q4k_ms = {t}");
        } else {
            assert!(r["q4k_ms"].is_null(), "{r}");
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 16, "every combination once: {seen:?}");
}

#[test]
fn a_bad_shape_is_refused_with_a_clear_message() {
    let out = bitstack(&["bench", "--shapes", "12", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`12` is not a shape") && stderr.contains("MxN"),
        "{stderr}"
    );
}

#[test]
fn a_rank_above_the_shape_is_refused() {
    let out = bitstack(&["bench", "--shapes", "8x40", "--k", "16"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("min(m, n) = 8"), "{stderr}");
}

#[test]
fn an_empty_block_list_times_the_planes_alone() {
    let out = bitstack(&[
        "bench",
        "--shapes",
        "8x40",
        "--blocks",
        "",
        "--planes",
        "2",
        "--rows",
        "1",
        "--min-time-ms",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("stdout is one JSON list");
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["layout"], "planes");
}

#[test]
fn zero_blocks_are_refused() {
    let out = bitstack(&["bench", "--shapes", "8x40", "--k", "2", "--blocks", "0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--blocks 0"), "{stderr}");
}
