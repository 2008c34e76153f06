//! BitStack layers under mistral.rs's tensor parallelism, two ranks on
//! loopback over its `ring` backend: rank 0 in this process, rank 1 a
//! `mistralrs-bitstack serve` child.
//!
//! The model is a random Llama (4 heads, 2 key/value heads: splittable over
//! two ranks, unlike SmolLM2's 9 and 3) with SmolLM2's tokenizer. The ring's
//! channel is set up once per process, so the whole two-rank run is one
//! test, and this file holds no other test that loads a model.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitstack_mistralrs::{register, register_rank, Registration};
use bitstack_quant::format::shard::TensorParallel;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::BitStackHandle;
use candle_core::{DType, Device};
use mistralrs::{
    Model, ModelDType, RequestBuilder, SamplingParams, TextMessageRole, TextMessages,
    TextModelBuilder,
};

const PROMPT: &str = "Name three rivers of Europe.";

/// The random checkpoint, with SmolLM2's tokenizer and chat template.
fn checkpoint(root: &Path) -> PathBuf {
    let dir = root.join("tp-llama");
    let spec = SyntheticSpec {
        vocab: 49152,
        hidden: 128,
        intermediate: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        // The ranks must run one dtype: rank 1 takes the dense parts' type,
        // as the binary does, so f32 for both.
        dense_dtype: bitstack_quant::DenseDtype::F32,
        ..Default::default()
    };
    spec.write_bitstack(&dir, 4, 8).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(common::dense().join(file), dir.join(file)).unwrap();
    }
    dir
}

/// A port free on every interface, below Linux's ephemeral range (32768 and
/// up). A port the OS hands out for `:0` can meanwhile become the source
/// port of an outgoing connection (the ranks connect to each other), and
/// mistral.rs binds its replicator on 0.0.0.0 again for every request.
fn free_port(taken: &[u16]) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
        ^ std::process::id() as usize;
    (0..12000)
        .map(|i| 20000 + ((seed + i * 7919) % 12000) as u16)
        .find(|p| !taken.contains(p) && TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .expect("a free port in 20000..32000")
}

/// The two ranks' ring configs, on free loopback ports.
fn ring_configs(root: &Path) -> [PathBuf; 2] {
    let master = free_port(&[]);
    let p0 = free_port(&[master]);
    let p1 = free_port(&[master, p0]);
    let configs = [
        serde_json::json!({"master_port": master, "port": p0, "right_ip": "127.0.0.1",
            "right_port": p1, "rank": 0, "world_size": 2}),
        serde_json::json!({"master_ip": "127.0.0.1", "master_port": master, "port": p1,
            "right_ip": "127.0.0.1", "right_port": p0, "rank": 1, "world_size": 2}),
    ];
    [0, 1].map(|r| {
        let path = root.join(format!("ring-{r}.json"));
        std::fs::write(&path, configs[r].to_string()).unwrap();
        path
    })
}

/// Rank 1: `mistralrs-bitstack serve` with its ring config; it follows rank
/// 0 and never listens. Killed when dropped.
struct Follower {
    child: Child,
    log: PathBuf,
}

impl Follower {
    fn start(model: &Path, ring: &Path, log: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_mistralrs-bitstack"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .arg("--ring-config")
            .arg(ring)
            .env_remove("RING_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// CPU time the process has used (Linux: user + system ticks of
    /// `/proc/PID/stat`, 100 to the second).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name's closing parenthesis; utime and
        // stime are the 14th and 15th of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The logits of the last prompt position.
async fn last_logits(model: &Model) -> Vec<f32> {
    let (all, _) = common::raw_logits(model, PROMPT).await;
    all[all.len() - 49152..].to_vec()
}

/// The greedy tokens of up to `tokens` steps (as the tokenizer spells
/// them: a random model favours special tokens, which the text leaves out),
/// and how long they took.
async fn greedy(model: &Model, tokens: usize) -> Result<(Vec<String>, Duration), String> {
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(tokens);
    let request =
        RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, PROMPT))
            .set_sampling(sampling)
            .return_logprobs(true);
    let start = Instant::now();
    let response = model
        .send_chat_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let steps = response.choices[0]
        .logprobs
        .as_ref()
        .and_then(|l| l.content.as_ref())
        .ok_or("no logprobs in the response")?;
    Ok((
        steps.iter().map(|s| s.token.clone()).collect(),
        start.elapsed(),
    ))
}

async fn build(dir: &Path) -> Model {
    TextModelBuilder::new(dir.to_str().unwrap())
        .with_force_cpu()
        .with_dtype(ModelDType::F32)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ranks_on_loopback_compute_what_one_process_does() {
    let root = tempfile::tempdir().unwrap();
    let dir = checkpoint(root.path());
    let probe = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    let top = probe.max_level();
    let levels = [0, top / 2, top];
    let whole_bytes = probe.snapshot().stack_bytes();
    drop(probe);
    const TOKENS: usize = 24;

    // One process (RING_CONFIG unset): the reference.
    assert!(std::env::var_os("RING_CONFIG").is_none());
    let single: Registration = register(&dir, None, None, &Device::Cpu, Some(DType::F32)).unwrap();
    let model = build(&dir).await;
    let mut want = Vec::new();
    for level in levels {
        single.handle.set_level(level).unwrap();
        want.push(last_logits(&model).await);
    }
    let (text, single_time) = greedy(&model, TOKENS).await.unwrap();
    assert_eq!(text.len(), TOKENS);
    drop(model);

    // Two ranks.
    let [ring0, ring1] = ring_configs(root.path());
    let follower = Follower::start(&dir, &ring1, &root.path().join("rank1.log"));
    std::env::set_var("RING_CONFIG", &ring0);
    let tp = TensorParallel::new(0, 2).unwrap();
    let reg = register_rank(&dir, None, None, &Device::Cpu, Some(DType::F32), Some(tp)).unwrap();
    let rank_bytes = reg.handle.snapshot().stack_bytes();
    let model = build(&dir).await;

    for (level, want) in levels.iter().zip(&want) {
        reg.handle.set_level(*level).unwrap();
        let got = last_logits(&model).await;
        let (worst, scale) = common::gap(&got, want);
        println!("level {level}: max |Δ logit| {worst:.2e} of {scale:.2}");
        assert!(
            worst <= 1e-4 * scale,
            "level {level}: two ranks' logits differ from one process's by {worst} (scale {scale})\n{}",
            follower.log()
        );
        assert_eq!(common::argmax(&got), common::argmax(want), "level {level}");
    }
    // Rank 1 followed rank 0 to each level.
    let log = follower.log();
    for level in &levels[..2] {
        assert!(
            log.contains(&format!("-> {level}, rank 0's")),
            "rank 1 never moved to level {level}:\n{log}"
        );
    }

    // An idle follower waits for rank 0 without spinning a core.
    let busy = follower.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let busy = follower.cpu_seconds() - busy;
    assert!(busy < 0.25, "an idle rank 1 used {busy:.2} s of CPU in 1 s");

    let (tp_text, tp_time) = greedy(&model, TOKENS).await.unwrap();
    assert_eq!(tp_text, text, "greedy tokens of two ranks");
    println!(
        "{TOKENS} tokens: one process {:.2} s, two ranks {:.2} s; blocks per rank {} of {} bytes",
        single_time.as_secs_f64(),
        tp_time.as_secs_f64(),
        rank_bytes,
        whole_bytes
    );

    // A shrink and a grow in the middle of a generation, then the same text.
    let handle = reg.handle.clone();
    let mover = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle.set_level(0).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        handle.set_level(top).unwrap();
    });
    greedy(&model, 4 * TOKENS).await.unwrap();
    mover.join().unwrap();
    assert_eq!(
        greedy(&model, TOKENS).await.unwrap().0,
        text,
        "after a shrink and a grow"
    );

    // Killing rank 1 ends rank 0's request with an error, not a hang.
    let mut follower = follower;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        follower.child.kill().unwrap();
        follower
    });
    let start = Instant::now();
    // Within the 512 positions of the model: generation outlasts the kill.
    let ended = tokio::time::timeout(Duration::from_secs(120), greedy(&model, 400)).await;
    let follower = killer.join().unwrap();
    let ended = ended.expect("rank 0 hung after rank 1 died");
    println!(
        "after rank 1 died, rank 0's request ended in {:.1} s: {:?}",
        start.elapsed().as_secs_f64(),
        ended.as_ref().map(|t| t.0.len())
    );
    assert!(ended.is_err(), "rank 0 went on without rank 1");
    drop(follower);
}

#[test]
fn a_world_that_does_not_divide_the_model_fails_at_start_up() {
    let root = tempfile::tempdir().unwrap();
    let [ring0, _] = ring_configs(root.path());
    let start = |model: &Path, ring: &Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mistralrs-bitstack"))
            .args(["run", "--prompt", "hi", "--model"])
            .arg(model)
            .arg("--ring-config")
            .arg(ring)
            .env_remove("RING_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    };
    // SmolLM2's 9 attention heads over 2 ranks: refused before loading,
    // so before any rank is waited for.
    let (status, err) = start(common::checkpoint(), &ring0);
    assert!(!status.success());
    assert!(
        err.contains("9 attention heads are not a multiple of 2"),
        "{err}"
    );
    // A world of 3 is not a ring world.
    let three = root.path().join("ring-3.json");
    std::fs::write(
        &three,
        r#"{"master_port": 1, "port": 2, "right_port": 3, "rank": 0, "world_size": 3}"#,
    )
    .unwrap();
    let (status, err) = start(common::checkpoint(), &three);
    assert!(!status.success());
    assert!(err.contains("must be a power of two"), "{err}");
    // Not a ring config at all.
    let (status, err) = start(common::checkpoint(), &root.path().join("missing.json"));
    assert!(!status.success());
    assert!(err.contains("reading the ring config"), "{err}");
}
