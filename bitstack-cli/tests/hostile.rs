//! Hostile and unlucky input through the real binary: every case exits with
//! status 1 and a message naming what is wrong (never a panic's 101, never a
//! signal, never a hang), and a command that refuses to run leaves the
//! checkpoint it was pointed at as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitstack_quant::format::synthetic::SyntheticSpec;

/// How long one refusal may take: they all happen before any real work.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs the binary with `args`; returns its exit code and stderr, killing
/// it past [`LIMIT`] (no code then).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bitstack binary runs");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            child.kill().ok();
            child.wait().ok();
            return (
                None,
                format!("killed after running for more than {LIMIT:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap())
}

/// The fixtures: a small dense model, a BitStack checkpoint of it, a text.
struct Fixtures {
    _root: tempfile::TempDir,
    root: PathBuf,
    dense: PathBuf,
    packed: PathBuf,
    text: PathBuf,
}

impl Fixtures {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dense = root.path().join("dense");
        let packed = root.path().join("packed");
        let spec = SyntheticSpec::default();
        spec.write(&dense).unwrap();
        spec.write_bitstack(&packed, 3, 4).unwrap();
        let text = root.path().join("text.txt");
        let words = "the quick brown fox jumps over a lazy dog while seven bakers sing ";
        std::fs::write(&text, words.repeat(40)).unwrap();
        Self {
            root: root.path().to_path_buf(),
            _root: root,
            dense,
            packed,
            text,
        }
    }

    /// A copy of the checkpoint named `name` whose config.json `edit` changed.
    fn edited(&self, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&self.packed).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        dir
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file of `dir` with its bytes, to see that nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

/// (command line, exit code, a phrase stderr must contain). Code 2 is
/// clap's usage error: a flag value refused before any work starts; code 1
/// is everything found later (in files, or in how flags combine).
type Case = (Vec<String>, i32, &'static str);

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

#[test]
fn hostile_flags_and_files_exit_with_status_1_and_a_message() {
    let f = Fixtures::new();
    let (dense, packed, text) = (s(&f.dense), s(&f.packed), s(&f.text));
    let out = f.root.join("out");
    let out = s(&out);
    let huge_k = f.edited("huge-k", |c| c["quantization_config"]["k"] = 100_000.into());
    let zero_k = f.edited("zero-k", |c| c["quantization_config"]["k"] = 0.into());
    let huge_niter = f.edited("huge-niter", |c| {
        c["quantization_config"]["niter"] = (1u64 << 40).into()
    });
    let many_layers = f.edited("many-layers", |c| {
        c["num_hidden_layers"] = 10_000_000_000u64.into()
    });
    let huge_sizes = f.edited("huge-sizes", |c| c["vocab_size"] = (1u64 << 62).into());
    let yarn = f.edited("rope-yarn", |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    let huge_rung = f.edited("huge-rung", |_| {});
    let rung = serde_json::json!([{"memory": 1, "layers": {"layer.0.mlp.up_proj": 1u64 << 40}}]);
    std::fs::write(
        huge_rung.join("compression_config.json"),
        serde_json::to_vec(&rung).unwrap(),
    )
    .unwrap();
    let eval = |dir: &Path| {
        args(&[
            "eval",
            s(dir),
            "--text",
            text,
            "--windows",
            "2",
            "--seq-len",
            "16",
        ])
    };

    let cases: Vec<Case> = vec![
        (
            args(&["eval", dense, "--text", text, "--seq-len", "0"]),
            2,
            "--seq-len",
        ),
        (
            args(&["eval", dense, "--text", text, "--seq-len", "1"]),
            2,
            "--seq-len",
        ),
        (
            args(&["eval", dense, "--text", text, "--batch", "0"]),
            2,
            "--batch",
        ),
        (
            args(&["eval", dense, "--text", text, "--windows", "0"]),
            2,
            "--windows",
        ),
        (
            args(&["eval", dense, "--text", text, "--rtn", "4", "--group", "0"]),
            2,
            "--group",
        ),
        (
            args(&[
                "eval",
                dense,
                "--text",
                text,
                "--rtn",
                "4",
                "--rtn-group",
                "0",
            ]),
            2,
            "--group",
        ),
        (
            args(&[
                "eval", dense, "--text", text, "--gptq", "4", "--group", "0", "--calib", text,
            ]),
            2,
            "--group",
        ),
        (
            args(&["compress", dense, out, "--calib", text, "--seq-len", "0"]),
            2,
            "--seq-len",
        ),
        (
            args(&["compress", dense, out, "--calib", text, "--k", "0"]),
            2,
            "--k",
        ),
        (
            args(&[
                "compress", dense, out, "--calib", text, "--layout", "blocks", "--k", "100000",
            ]),
            1,
            "--k 100000",
        ),
        (
            args(&[
                "compress", dense, out, "--calib", text, "--layout", "blocks", "--niter", "0",
            ]),
            1,
            "--niter 0 stores no AVD blocks",
        ),
        (
            args(&["compress", dense, out, "--calib", text, "--batch", "0"]),
            2,
            "--batch",
        ),
        (
            args(&[
                "compress",
                dense,
                out,
                "--calib",
                text,
                "--calib-windows",
                "0",
            ]),
            2,
            "--calib-windows",
        ),
        (
            args(&["sort", packed, "--calib", text, "--seq-len", "1"]),
            2,
            "--seq-len",
        ),
        (
            args(&["sort", packed, "--calib", text, "--seq-len", "0"]),
            2,
            "--seq-len",
        ),
        (
            args(&["sort", packed, "--calib", text, "--sort-windows", "0"]),
            2,
            "--sort-windows",
        ),
        (args(&["eval", packed, "--budget", "nanbpw"]), 2, "budget"),
        (args(&["eval", packed, "--budget=-3bpw"]), 2, "budget"),
        (args(&["eval", packed, "--budget", "1e400MiB"]), 2, "budget"),
        (args(&["eval", packed, "--budget", "infGB"]), 2, "budget"),
        (
            args(&["eval", packed, "--text", text, "--budget", "0.01bpw"]),
            1,
            "floor",
        ),
        (eval(&huge_k), 1, "k = 100000"),
        (eval(&zero_k), 1, "k = 0"),
        (eval(&huge_niter), 1, "qweight_3"),
        (args(&["ladder", s(&huge_niter)]), 1, "qweight_3"),
        (eval(&many_layers), 1, "num_hidden_layers"),
        (args(&["ladder", s(&many_layers)]), 1, "num_hidden_layers"),
        (eval(&huge_sizes), 1, "vocab_size"),
        (eval(&yarn), 1, "yarn"),
        (args(&["ladder", s(&huge_rung)]), 1, "stores 3"),
        (
            args(&["ladder", packed, "--plot", out, "--dense-ppl", "1e308"]),
            2,
            "--dense-ppl",
        ),
        (
            args(&["ladder", packed, "--plot", out, "--dense-ppl", "nan"]),
            2,
            "--dense-ppl",
        ),
    ];
    let before = snapshot(&f.packed);
    let mut failures = Vec::new();
    for (args, want, says) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run(&argv);
        if code != Some(*want) || !stderr.contains(says) || stderr.contains("panicked") {
            failures.push(format!(
                "{args:?}: exit {code:?}, wanted {want} and {says:?}: {stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        snapshot(&f.packed) == before,
        "a refused command changed the checkpoint"
    );
    assert!(!Path::new(out).exists(), "a refused command left {out}");
}

/// `bitstack` killed with SIGKILL at spread-out moments of `compress` and
/// `sort`: the output is absent or whole (a checkpoint that opens, an order
/// that loads), and the next run in the same dir removes the partial dirs
/// the killed runs left.
#[test]
fn killed_runs_leave_nothing_half_written() {
    use bitstack_quant::format::checkpoint::Checkpoint;
    let f = Fixtures::new();
    let runs = f.root.join("runs");
    std::fs::create_dir(&runs).unwrap();
    let compress = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .args(["compress", s(&f.dense), s(out), "--calib", s(&f.text)])
            .args(["--calib-windows", "4", "--seq-len", "32"])
            .args(["--layout", "blocks", "--niter", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long a whole run takes, to spread the kills over it.
    let start = Instant::now();
    let done = runs.join("whole");
    assert!(compress(&done).wait().unwrap().success());
    let whole = start.elapsed();
    for i in 0..6u32 {
        let out = runs.join(format!("killed-{i}"));
        let mut child = compress(&out);
        std::thread::sleep(whole * i / 6);
        child.kill().unwrap();
        child.wait().unwrap();
        if out.exists() {
            Checkpoint::open(&out).unwrap_or_else(|e| panic!("kill {i}: {e:#}"));
        }
    }
    // The killed runs died long ago, as far as the sweep can tell.
    age_leftovers(&runs);
    let last = runs.join("after");
    assert!(compress(&last).wait().unwrap().success());
    assert_eq!(
        leftovers(&runs),
        Vec::<PathBuf>::new(),
        "leftovers were not swept"
    );

    // Sort, killed: the order file is the old one or the new one.
    for i in 0..4u32 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .args(["sort", s(&done), "--calib", s(&f.text), "--seq-len", "32"])
            .args(["--sort-windows", "1", "--skip-windows", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 * u64::from(i)));
        child.kill().unwrap();
        child.wait().unwrap();
        Checkpoint::open(&done).unwrap_or_else(|e| panic!("sort kill {i}: {e:#}"));
    }
}

/// The `.bitstack-*` temporaries in `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".bitstack-")
        })
        .collect()
}

/// Makes the leftovers of `dir` look long dead to the sweep.
fn age_leftovers(dir: &Path) {
    for p in leftovers(dir) {
        let f = std::fs::File::open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }
}

/// `import-gguf` (of the real SmolLM2 GGUF) and `eval --record` killed with
/// SIGKILL at spread-out moments: the import is absent or a model that
/// opens, the order file is the old one or the new one, and the next run
/// sweeps what the killed ones left.
#[test]
fn killed_imports_and_records_leave_nothing_half_written() {
    use bitstack_quant::format::checkpoint::Checkpoint;
    use bitstack_quant::format::config::ModelConfig;
    use bitstack_quant::format::store::TensorStore;

    let f = Fixtures::new();
    let assets = bitstack_assets::fetch_assets(None).expect("fetch-assets");
    let runs = f.root.join("imports");
    std::fs::create_dir(&runs).unwrap();
    let import = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .args(["import-gguf", s(&assets.gguf), s(out), "--dtype", "f16"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let start = Instant::now();
    assert!(import(&runs.join("whole")).wait().unwrap().success());
    let whole = start.elapsed();
    for i in 0..5u32 {
        let out = runs.join(format!("killed-{i}"));
        let mut child = import(&out);
        std::thread::sleep(whole * i / 5);
        child.kill().unwrap();
        child.wait().unwrap();
        if out.exists() {
            ModelConfig::from_dir(&out).unwrap_or_else(|e| panic!("import kill {i}: {e:#}"));
            TensorStore::open_dir(&out).unwrap_or_else(|e| panic!("import kill {i}: {e:#}"));
        }
    }
    age_leftovers(&runs);
    assert!(import(&runs.join("after")).wait().unwrap().success());
    assert_eq!(
        leftovers(&runs),
        Vec::<PathBuf>::new(),
        "leftovers were not swept"
    );

    // eval --record: each run adds one measurement to the order file.
    let dir = f.edited("recorded", |_| {});
    let record = || {
        Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .args(["eval", s(&dir), "--text", s(&f.text), "--windows", "2"])
            .args(["--seq-len", "32", "--budget", "100%", "--record"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let start = Instant::now();
    assert!(record().wait().unwrap().success());
    let whole = start.elapsed();
    let measured = || Checkpoint::open(&dir).unwrap().order().measured.len();
    assert_eq!(measured(), 1);
    for i in 0..6u32 {
        let before = measured();
        let mut child = record();
        std::thread::sleep(whole * i / 6);
        child.kill().unwrap();
        child.wait().unwrap();
        let after = Checkpoint::open(&dir)
            .unwrap_or_else(|e| panic!("record kill {i}: {e:#}"))
            .order()
            .measured
            .len();
        assert!(
            after == before || after == before + 1,
            "kill {i}: {before} → {after}"
        );
    }
    age_leftovers(&dir);
    let before = measured();
    assert!(record().wait().unwrap().success());
    assert_eq!(measured(), before + 1);
    assert_eq!(
        leftovers(&dir),
        Vec::<PathBuf>::new(),
        "leftovers were not swept"
    );
}
