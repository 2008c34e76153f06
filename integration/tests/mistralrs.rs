//! mistral.rs with BitStack layers, end to end on the real
//! SmolLM2-135M-Instruct (fetched and pinned by `bitstack-assets`, then
//! compressed once into the assets folder): logits equal our runner's at
//! several levels, a server under a memory budget lends weight memory to
//! the KV cache of concurrent requests and takes it back, and bad input
//! fails at start-up with a clear error.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bitstack_mistralrs::register;
use bitstack_quant::{BitStackHandle, Budget, Checkpoint};
use candle_core::{DType, Device, Tensor};
use mistralrs::{ModelDType, TextModelBuilder};

use common::checkpoint;

mod common;

fn cpu() -> Device {
    Device::Cpu
}

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// The plugin's registration and the count of opened checkpoints are per
/// process: the tests that build a mistral.rs model in this process take
/// turns, so a plain `cargo test` runs them side by side safely.
fn one_model_at_a_time() -> MutexGuard<'static, ()> {
    IN_PROCESS.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn an_engine_step_runs_on_one_snapshot_while_other_threads_resize() {
    use bitstack_mistralrs::{BitStackLinear, ElasticBitStack, LinearSite, StepSnapshot};
    use bitstack_quant::LinearKind;
    use mistralrs_core::weight_arbiter::ElasticWeights;
    use mistralrs_quant::QuantMethod;

    let handle = BitStackHandle::open(checkpoint(), None, &cpu()).unwrap();
    let max = handle.max_level();
    let step = StepSnapshot::default();
    let elastic = ElasticBitStack::new(handle.clone(), step.clone());
    let site = LinearSite {
        layer: 3,
        kind: LinearKind::Down,
    };
    let (m, n) = {
        let snapshot = handle.snapshot();
        let linear = snapshot.layers[3].linear(LinearKind::Down);
        match &linear.weight {
            bitstack_quant::runtime::linear::LinearWeight::BitStack(s) => (s.m, s.n),
            dense => panic!("down_proj of layer 3 is not a stack: {dense:?}"),
        }
    };
    let linear =
        BitStackLinear::new(handle.clone(), step.clone(), site, (n, m), DType::F32, true).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, n), &cpu()).unwrap();
    let full = linear.forward(&x).unwrap();

    elastic.begin_step();
    // Another thread shrinks the model in the middle of the step.
    let other = handle.clone();
    std::thread::spawn(move || other.set_level(0).unwrap())
        .join()
        .unwrap();
    assert_eq!(handle.level(), 0);
    assert_eq!(step.get(&handle).level, max, "the step keeps its snapshot");
    let during = linear.forward(&x).unwrap();
    assert_eq!(max_abs_diff(&during, &full), 0.0);
    elastic.end_step();

    // The next step (and anything outside a step) sees the shrink.
    assert_eq!(step.get(&handle).level, 0);
    let after = linear.forward(&x).unwrap();
    assert!(max_abs_diff(&after, &full) > 0.0);

    // What a shrink reports is what that resize freed.
    handle.set_level(max).unwrap();
    let freed = elastic.shrink_by(1);
    assert!(freed > 0);
    assert_eq!(
        freed as u64,
        handle.bytes_at_level(max) - handle.resident_bytes()
    );
    // Below the floor: down to the floor, and that is what is reported.
    let freed = elastic.shrink_by(usize::MAX / 2);
    assert_eq!(handle.level(), 0);
    assert_eq!(
        freed as u64,
        handle.bytes_at_level(max - 1) - handle.bytes_at_level(0)
    );
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn logits_equal_our_runner_at_several_levels() {
    logits_equal_our_runner(checkpoint()).await;
}

/// The same for the default layout, grid planes with 8-bit grid numbers
/// and prefix scales on rotated inputs.
#[tokio::test(flavor = "multi_thread")]
async fn grid_plane_logits_equal_our_runner_at_several_levels() {
    let dir = common::grid_checkpoint();
    let stored = Checkpoint::open(dir).unwrap();
    assert_eq!(
        stored.quantization().format_version,
        5,
        "the default format"
    );
    logits_equal_our_runner(dir).await;
}

/// mistral.rs, its linears replaced by the plugin's, at the floor, middle
/// and top of `dir`'s ladder, against our runner at the same level.
// The guard only orders this test's thread against the others; each
// `tokio::test` drives its body on its own thread.
#[allow(clippy::await_holding_lock)]
async fn logits_equal_our_runner(dir: &Path) {
    let _turn = one_model_at_a_time();
    // Our runner (the plugin's handle holds the linears only).
    let reference = BitStackHandle::open(dir, None, &cpu()).unwrap();
    let max = reference.max_level();
    let levels = [0, max / 2, max];
    let bytes: Vec<u64> = levels
        .iter()
        .map(|&l| reference.bytes_at_level(l))
        .collect();
    for (&level, &bytes) in levels.iter().zip(&bytes) {
        let opened = Checkpoint::opened_count();
        let reg = register(
            dir,
            Some(Budget::Bytes(bytes)),
            None,
            &cpu(),
            Some(DType::F32),
        )
        .unwrap();
        // One read of the checkpoint serves the budget, the handle and the factory.
        assert_eq!(Checkpoint::opened_count(), opened + 1);
        assert_eq!(reg.handle.level(), level);
        let model = TextModelBuilder::new(dir.to_str().unwrap())
            .with_force_cpu()
            .with_dtype(ModelDType::F32)
            .build()
            .await
            .unwrap();
        let (theirs, tokens) = common::raw_logits(&model, "What is the capital of France?").await;
        reference.set_level(level).unwrap();
        let ours = common::our_logits(&reference, &tokens);
        // Both end with the logits of the last prompt position.
        let vocab = 49152;
        assert!(theirs.len() >= vocab && ours.len() >= vocab);
        let theirs = &theirs[theirs.len() - vocab..];
        let ours = &ours[ours.len() - vocab..];
        let (worst, scale) = common::gap(theirs, ours);
        println!(
            "level {level}: {} prompt tokens, max |Δ logit| {worst:.2e} of {scale:.2}",
            tokens.len()
        );
        assert!(
            worst <= 1e-3 * scale,
            "level {level}: logits differ by {worst} (scale {scale})"
        );
        assert_eq!(
            common::argmax(theirs),
            common::argmax(ours),
            "level {level}: greedy tokens differ"
        );
    }
}

/// A random Qwen2 checkpoint (biases on q, k and v) with SmolLM2's
/// tokenizer: mistral.rs's column-parallel layers add those biases
/// themselves, so the BitStack linears under them must not add them again.
#[tokio::test(flavor = "multi_thread")]
#[allow(clippy::await_holding_lock)]
async fn biases_are_added_once() {
    let _turn = one_model_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("qwen2-biases");
    let spec = bitstack_quant::format::synthetic::SyntheticSpec {
        model_type: "qwen2",
        vocab: 49152,
        hidden: 128,
        intermediate: 256,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    };
    spec.write_bitstack(&dir, 3, 8).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    // What mistral.rs's Qwen2 config asks for besides.
    config["sliding_window"] = 512.into();
    config["use_sliding_window"] = false.into();
    config["max_window_layers"] = 2.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(common::dense().join(file), dir.join(file)).unwrap();
    }
    let reg = register(&dir, None, None, &cpu(), Some(DType::F32)).unwrap();
    let model = TextModelBuilder::new(dir.to_str().unwrap())
        .with_force_cpu()
        .with_dtype(ModelDType::F32)
        .build()
        .await
        .unwrap();
    let (theirs, tokens) = common::raw_logits(&model, "Hello.").await;
    let reference = BitStackHandle::open(&dir, None, &cpu()).unwrap();
    assert_eq!(reference.level(), reg.handle.level());
    let ours = common::our_logits(&reference, &tokens);
    let (worst, scale) = common::gap(&theirs[theirs.len() - 49152..], &ours[ours.len() - 49152..]);
    assert!(
        worst <= 1e-3 * scale,
        "logits differ by {worst} (scale {scale})"
    );
}

/// The server, its stdout's address line read, stderr collected in a file.
struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn start(args: &[&str], log: &Path) -> Result<Self, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mistralrs-bitstack"))
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("listening on http://") => Ok(Self {
                addr: line.trim_start_matches("listening on http://").to_string(),
                child,
                log: log.to_path_buf(),
            }),
            _ => {
                let status = child.wait().unwrap();
                Err(format!(
                    "{status}: {}",
                    std::fs::read_to_string(log).unwrap()
                ))
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Streams one chat completion; returns its finish reason and text.
fn stream_chat(addr: &str, prompt: &str, max_tokens: usize) -> (String, String) {
    let body = serde_json::json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
    });
    let mut response = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(600))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let mut sse = String::new();
    response.read_to_string(&mut sse).unwrap();
    let (mut text, mut finish) = (String::new(), String::new());
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data.trim() == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (finish, text)
}

#[test]
fn a_server_under_a_memory_budget_lends_weights_to_the_kv_cache_and_takes_them_back() {
    let dir = checkpoint();
    let probe = BitStackHandle::open(dir, None, &cpu()).unwrap();
    // KV cache per token in f32: layers × (K and V) × KV heads × head dim × 4.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let field = |k: &str| config[k].as_u64().unwrap();
    let kv_per_token =
        field("num_hidden_layers") * 2 * field("num_key_value_heads") * field("head_dim") * 4;
    // Four requests of about 600 tokens each: the floor and their KV cache
    // (with the arbiter's headroom) fit, the full weights and their KV cache
    // do not.
    let kv_peak = 4 * 720 * kv_per_token;
    let budget = probe.floor_bytes() + kv_peak;
    let (floor, max_bytes, max_level) = (probe.floor_bytes(), probe.max_bytes(), probe.max_level());
    assert!(
        max_bytes + 3 * kv_peak / 4 > budget,
        "the budget holds everything: no test"
    );
    drop(probe);
    let log = std::env::temp_dir().join(format!(
        "mistralrs-bitstack-serve-{}.log",
        std::process::id()
    ));
    let budget_arg = format!("{budget}B");
    let server = Server::start(
        &[
            "-m",
            dir.to_str().unwrap(),
            "--quant",
            "bitstack",
            "--memory-budget",
            &budget_arg,
            "--port",
            "0",
        ],
        &log,
    )
    .unwrap();

    let topic = ["rivers", "mountains", "libraries", "trains"];
    let threads: Vec<_> = topic
        .iter()
        .map(|t| {
            let addr = server.addr.clone();
            let prompt = format!(
                "{} Summarize the text above about {t} in one sentence.",
                format!("This is a long note about {t}, written to fill the context. ").repeat(40)
            );
            std::thread::spawn(move || stream_chat(&addr, &prompt, 24))
        })
        .collect();
    let results: Vec<(String, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, (finish, text)) in results.iter().enumerate() {
        assert!(
            finish == "stop" || finish == "length",
            "request {i} ended with {finish:?}: {text:?}"
        );
        assert!(!text.is_empty(), "request {i} produced nothing");
    }

    // Idle again: the weights grow back to the whole budget's room.
    let deadline = Instant::now() + Duration::from_secs(60);
    let log_text = loop {
        let text = server.log();
        let gave = text.rfind("gave back");
        let grew = text.rfind("grew by");
        if matches!((gave, grew), (Some(g), Some(r)) if r > g) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        log_text.contains("gave back"),
        "the weights never shrank:\n{log_text}"
    );
    let (gave, grew) = (
        log_text.rfind("gave back").unwrap(),
        log_text.rfind("grew by"),
    );
    assert!(
        matches!(grew, Some(r) if r > gave),
        "the weights did not grow back:\n{log_text}"
    );
    assert!(
        !log_text.to_lowercase().contains("preempt"),
        "a sequence was preempted:\n{log_text}"
    );
    assert!(
        !log_text.contains("exceed the budget"),
        "weights and KV cache went over the budget:\n{log_text}"
    );
    // The levels the weights visited: down part of the way, then back up.
    let levels: Vec<usize> = log_text
        .lines()
        .filter_map(|l| l.split("bitstack resize: level ").nth(1))
        .filter_map(|l| l.split(" → ").nth(1)?.split(',').next()?.parse().ok())
        .collect();
    println!(
        "budget {:.1} MiB (floor {:.1}, full {:.1}, KV per token {kv_per_token} B); levels visited {levels:?} of {max_level}",
        budget as f64 / 1048576.0,
        floor as f64 / 1048576.0,
        max_bytes as f64 / 1048576.0
    );
    let lowest = *levels.iter().min().expect("no resize was logged");
    assert!(lowest < max_level, "the weights never shrank: {levels:?}");
    // The floor was not needed: the arbiter shrank only as far as it had to.
    assert!(lowest > 0, "the weights shrank to the floor: {levels:?}");
    assert_eq!(
        *levels.last().unwrap(),
        max_level,
        "the weights did not grow back: {levels:?}"
    );
}

/// The start-up error of `serve -m model --quant quant extra…`, which must fail.
fn start_error(model: &Path, quant: &str, extra: &[&str], log: &Path) -> String {
    let mut args = vec![
        "-m",
        model.to_str().unwrap(),
        "--quant",
        quant,
        "--port",
        "0",
    ];
    args.extend_from_slice(extra);
    match Server::start(&args, log) {
        Ok(_) => panic!("serve {args:?} started"),
        Err(e) => e,
    }
}

#[test]
fn bad_input_fails_at_start_up_with_a_clear_error() {
    let dir = checkpoint();
    let tmp = std::env::temp_dir().join(format!("mistralrs-bitstack-bad-{}", std::process::id()));
    let log = tmp.with_extension("log");
    std::fs::create_dir_all(&tmp).unwrap();

    let err = start_error(dir, "bitstack", &["--weight-budget", "1MiB"], &log);
    assert!(err.contains("below the floor"), "{err}");

    // Where and how to run: a CPU build asked for a GPU says how to get a
    // CUDA one; paged attention needs a GPU; ISQ is for dense models.
    if !cfg!(feature = "cuda") {
        let err = start_error(dir, "bitstack", &["--device", "cuda"], &log);
        assert!(
            err.contains("built without CUDA") && err.contains("--cuda"),
            "{err}"
        );
    }
    let err = start_error(dir, "bitstack", &["--device", "gpu0"], &log);
    assert!(err.contains("\"gpu0\" is not a device"), "{err}");
    let err = start_error(dir, "bitstack", &["--paged-attn", "on"], &log);
    assert!(err.contains("--paged-attn on needs a GPU"), "{err}");
    let err = start_error(dir, "bitstack", &["--isq", "q4k"], &log);
    assert!(err.contains("already quantized"), "{err}");

    // An unknown quant_method (not registered): mistral.rs names the ones it knows.
    let unknown = tmp.join("unknown");
    copy_dir(dir, &unknown);
    let config = std::fs::read_to_string(unknown.join("config.json")).unwrap();
    let config = config.replace("\"bitstack\"", "\"bitstack9\"");
    std::fs::write(unknown.join("config.json"), config).unwrap();
    let err = start_error(&unknown, "none", &[], &log);
    assert!(
        err.contains("Unknown quantization method: bitstack9"),
        "{err}"
    );
    let err = start_error(&unknown, "bitstack", &[], &log);
    assert!(err.contains("is not a BitStack checkpoint"), "{err}");

    // Missing tensors: the first shard (layer 0's blocks) is gone.
    let missing = tmp.join("missing");
    copy_dir(dir, &missing);
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&missing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    std::fs::remove_file(&shards[0]).unwrap();
    let err = start_error(&missing, "bitstack", &[], &log);
    let shard = shards[0].file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(shard) || err.contains("model.layers.0"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// One request to the server: status and body.
fn call(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, String) {
    let mut req = reqwest::blocking::Client::new()
        .request(method, url)
        .timeout(Duration::from_secs(300));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let response = req.send().unwrap();
    let status = response.status().as_u16();
    (status, response.text().unwrap_or_default())
}

#[test]
fn an_exposed_server_answers_only_its_clients() {
    let dir = checkpoint();
    let log = std::env::temp_dir().join(format!(
        "mistralrs-bitstack-guard-{}.log",
        std::process::id()
    ));
    let model = dir.to_str().unwrap();
    // Beyond loopback without a key: refused before loading.
    let err = start_error(dir, "bitstack", &["--host", "0.0.0.0"], &log);
    assert!(err.contains("--api-key"), "{err}");

    let server = Server::start(
        &[
            "-m",
            model,
            "--quant",
            "bitstack",
            "--port",
            "0",
            "--api-key",
            "k3y",
            "--max-tokens-cap",
            "16",
            "--max-n",
            "1",
            "--max-body-bytes",
            "20000",
        ],
        &log,
    )
    .unwrap();
    let base = format!("http://{}", server.addr);
    let chat = format!("{base}/v1/chat/completions");
    let auth = ("authorization", "Bearer k3y");
    let body = |extra: &str| {
        format!(
            r#"{{"model":"default","messages":[{{"role":"user","content":"Say hi."}}],"temperature":0{extra}}}"#
        )
    };
    use reqwest::Method;
    /// What it checks, method, url, headers, body, the status expected.
    type Case<'a> = (
        &'a str,
        Method,
        String,
        Vec<(&'a str, &'a str)>,
        Option<String>,
        u16,
    );
    let cases: Vec<Case> = vec![
        (
            "health needs no key",
            Method::GET,
            format!("{base}/health"),
            vec![],
            None,
            200,
        ),
        (
            "no key",
            Method::POST,
            chat.clone(),
            vec![],
            Some(body("")),
            401,
        ),
        (
            "wrong key",
            Method::POST,
            chat.clone(),
            vec![("authorization", "Bearer k3z")],
            Some(body("")),
            401,
        ),
        (
            "models with the key",
            Method::GET,
            format!("{base}/v1/models"),
            vec![auth],
            None,
            200,
        ),
        (
            "unload is not mounted",
            Method::POST,
            format!("{base}/v1/models/unload"),
            vec![auth],
            Some("{}".into()),
            404,
        ),
        (
            "reload is not mounted",
            Method::POST,
            format!("{base}/v1/models/reload"),
            vec![auth],
            Some("{}".into()),
            404,
        ),
        (
            "re-ISQ is not mounted",
            Method::POST,
            format!("{base}/re_isq"),
            vec![auth],
            Some("{}".into()),
            404,
        ),
        (
            "cross-origin preflight",
            Method::OPTIONS,
            chat.clone(),
            vec![
                ("origin", "http://evil.example"),
                ("access-control-request-method", "POST"),
            ],
            None,
            403,
        ),
        (
            "cross-origin post",
            Method::POST,
            chat.clone(),
            vec![auth, ("origin", "http://evil.example")],
            Some(body("")),
            403,
        ),
        (
            "max_tokens over the cap",
            Method::POST,
            chat.clone(),
            vec![auth],
            Some(body(r#","max_tokens":17"#)),
            400,
        ),
        (
            "n over the cap",
            Method::POST,
            chat.clone(),
            vec![auth],
            Some(body(r#","n":2"#)),
            400,
        ),
        (
            "malformed JSON",
            Method::POST,
            chat.clone(),
            vec![auth],
            Some("{\"model\":".into()),
            400,
        ),
        (
            "wrong type",
            Method::POST,
            chat.clone(),
            vec![auth],
            Some(body(r#","max_tokens":"many""#)),
            400,
        ),
        (
            "over-size body",
            Method::POST,
            chat.clone(),
            vec![auth],
            Some(body(&format!(r#","user":"{}""#, "x".repeat(30000)))),
            413,
        ),
        (
            "a local page, capped",
            Method::POST,
            chat.clone(),
            vec![auth, ("origin", "http://localhost:3000")],
            Some(body("")),
            200,
        ),
    ];
    for (what, method, url, headers, body, want) in cases {
        let (status, text) = call(method, &url, &headers, body);
        assert_eq!(status, want, "{what}: {text}");
        if what == "a local page, capped" {
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
            let tokens = reply["usage"]["completion_tokens"].as_u64().unwrap();
            assert!(tokens <= 16, "{what}: {tokens} tokens");
        }
    }
    // The model is still there and answers.
    let (status, _) = call(Method::POST, &chat, &[auth], Some(body("")));
    assert_eq!(status, 200, "{}", server.log());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}
