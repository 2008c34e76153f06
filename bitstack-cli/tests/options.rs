//! Every flag with a fixed set of values, given a misspelt one, makes the
//! real binary exit with status 2 (a usage error, before any work) and list
//! the values it accepts. (That each accepted value reaches the library as
//! the intended variant is tested next to the mapping, in `src/options.rs`.)

use std::process::{Command, Output};

fn bitstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .expect("the bitstack binary runs")
}

/// Runs `args` and returns stderr, after checking that it failed as a usage error.
fn usage_error(args: &[&str]) -> String {
    let out = bitstack(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "bitstack {args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "bitstack {args:?} printed to stdout");
    stderr
}

/// The values of clap's `[possible values: a, b, c]` line.
fn possible_values(stderr: &str) -> Vec<String> {
    let start = stderr
        .find("[possible values: ")
        .unwrap_or_else(|| panic!("no list of possible values in: {stderr}"))
        + "[possible values: ".len();
    let end = start + stderr[start..].find(']').expect("the list ends");
    stderr[start..end].split(", ").map(str::to_string).collect()
}

#[test]
fn misspelt_enum_values_are_refused_with_the_accepted_ones() {
    // (command line with the misspelt value, every accepted value in clap's order)
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["import-gguf", "a.gguf", "out", "--dtype", "f64"],
            &["f32", "f16", "bf16"],
        ),
        (
            &["compress", "model", "out", "--svd", "randomised"],
            &["exact", "randomized"],
        ),
        (
            &["compress", "model", "out", "--signs", "feedbak"],
            &["avd", "feedback"],
        ),
        (
            &["compress", "model", "out", "--refit", "weighed"],
            &["none", "svd", "weighted"],
        ),
        (
            &["sort", "dir", "--method", "fastest"],
            &["fast", "exact", "local"],
        ),
    ];
    for (args, accepted) in cases {
        let stderr = usage_error(args);
        let bad = args.last().unwrap();
        assert!(
            stderr.contains(&format!("invalid value '{bad}'")),
            "{stderr}"
        );
        assert_eq!(possible_values(&stderr), *accepted, "bitstack {args:?}");
    }
}

#[test]
fn a_misspelt_linear_in_k_for_lists_the_linears() {
    let stderr = usage_error(&["compress", "model", "out", "--k-for", "kproj=8"]);
    assert!(stderr.contains("`kproj` is not a linear"), "{stderr}");
    for kind in [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ] {
        assert!(stderr.contains(kind), "{kind} missing from: {stderr}");
    }
}

/// `--device` is one flag group, flattened into every command that runs the model.
#[test]
fn a_misspelt_device_is_refused_by_every_command_that_takes_one() {
    for args in [
        &["compress", "model", "out"][..],
        &["eval", "model"],
        &["sort", "dir"],
        &["generate", "model", "--prompt", "hi"],
        &["demo"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--device", "gpu"]);
        let stderr = usage_error(&args);
        assert!(
            stderr.contains("`gpu`: expected cpu, cuda or cuda:N"),
            "bitstack {args:?}: {stderr}"
        );
    }
}
