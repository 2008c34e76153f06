//! The server under load and under fault, in this process (so a thread can
//! move the memory budget and read the handle while it serves): 32
//! concurrent streaming clients with long prompts, some asking for several
//! choices, some asking for more tokens than the cap, some hanging up
//! mid-stream, while a thread moves the budget at random and shrinks the
//! weights from the host's side; meanwhile malformed, mistyped, oversized,
//! slow, cross-origin and admin requests. Loopback only, bounded in count
//! and time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitstack_mistralrs::guard::Policy;
use bitstack_mistralrs::{register, server};
use bitstack_quant::{BitStackHandle, Budget};
use candle_core::{DType, Device};
use mistralrs::{ModelDType, TextModelBuilder};
use mistralrs_core::weight_arbiter;

mod common;

const CLIENTS: usize = 32;
const MAX_TOKENS_CAP: usize = 40;
const MAX_SEQS: usize = 16;
/// Tokens of the longest prompt with its chat template, at most (the
/// longest below is about 330).
const PROMPT_TOKENS: usize = 400;

/// A small seeded generator (splitmix64), enough to move budgets at random.
struct SplitMix(u64);

impl SplitMix {
    /// A number in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        lo + z % (hi - lo + 1)
    }
}

/// How one streaming client's request ended.
#[derive(Debug)]
enum Outcome {
    /// Every choice finished with this reason ("stop" or "length").
    Finished(Vec<String>),
    /// Refused with a 4xx status.
    Refused(u16),
    /// The client hung up after a few chunks, on purpose.
    HungUp,
}

/// Streams a chat completion; hangs up after `hang_up_after` chunks if given.
fn stream(
    addr: &str,
    prompt: &str,
    max_tokens: usize,
    n: usize,
    hang_up_after: Option<usize>,
) -> Outcome {
    let body = serde_json::json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "n": n,
        "temperature": 0.0,
        "stream": true,
    });
    let response = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(900))
        .send()
        .expect("the request was sent");
    let status = response.status().as_u16();
    if (400..500).contains(&status) {
        return Outcome::Refused(status);
    }
    assert_eq!(status, 200, "{}", response.text().unwrap_or_default());
    let mut finish: BTreeMap<u64, String> = BTreeMap::new();
    let mut chunks = 0;
    for line in BufReader::new(response).lines() {
        let line = line.expect("the stream broke");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        chunks += 1;
        if hang_up_after.is_some_and(|after| chunks >= after) {
            // Dropping the reader closes the connection mid-stream.
            return Outcome::HungUp;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).expect("a JSON chunk");
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish.insert(choice["index"].as_u64().unwrap_or(0), reason.to_string());
            }
        }
    }
    assert_eq!(
        finish.len(),
        n,
        "not every choice finished: {finish:?} (n = {n})"
    );
    Outcome::Finished(finish.into_values().collect())
}

/// A request with the given method, path, headers and body: its status.
fn status(
    addr: &str,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> u16 {
    let mut req = reqwest::blocking::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(300));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    req.send().expect("the request was sent").status().as_u16()
}

/// A client that sends its body in two halves, `pause` apart; the status
/// line it gets back.
fn slow_client(addr: &str, pause: Duration) -> String {
    let body = serde_json::json!({
        "model": "default",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0.0,
    })
    .to_string();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(600)))
        .unwrap();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    tcp.write_all(first).unwrap();
    tcp.flush().unwrap();
    std::thread::sleep(pause);
    // A stalled client may find the connection already answered and closed.
    let _ = tcp.write_all(rest);
    let mut line = String::new();
    BufReader::new(&mut tcp).read_line(&mut line).unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    line.trim().to_string()
}

#[test]
fn a_loaded_server_finishes_or_refuses_every_request_while_budgets_move() {
    let started = Instant::now();
    let dir = common::checkpoint();
    let log_path: PathBuf =
        std::env::temp_dir().join(format!("bitstack-server-load-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_writer(Mutex::new(log_file))
        .with_ansi(false)
        .with_env_filter("info")
        .try_init();

    // Sizes: KV per token in f32 is layers × (K and V) × KV heads × head dim × 4.
    let probe = BitStackHandle::open(dir, None, &Device::Cpu).unwrap();
    let (floor, max_bytes, max_level) = (probe.floor_bytes(), probe.max_bytes(), probe.max_level());
    drop(probe);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let field = |k: &str| config[k].as_u64().unwrap();
    let kv_per_token =
        field("num_hidden_layers") * 2 * field("num_key_value_heads") * field("head_dim") * 4;
    // The most KV cache the engine can hold at once, with the arbiter's headroom.
    let kv_peak =
        (MAX_SEQS * (PROMPT_TOKENS + MAX_TOKENS_CAP + 1 + weight_arbiter::HEADROOM_TOKENS)) as u64
            * kv_per_token;
    // Budgets that always hold the floor and the peak KV cache, up to ones
    // that hold everything: the weights must move, and never need go below
    // the floor.
    let (low, high) = (floor + kv_peak, max_bytes + kv_peak);

    let registration = register(dir, None, Some(Budget::Bytes(high)), &Device::Cpu, None).unwrap();
    assert_eq!(
        registration.dtype,
        DType::F32,
        "the shared checkpoint is f32"
    );
    let handle = registration.handle.clone();
    let resizes = Arc::new(AtomicU64::new(0));
    let levels = Arc::new(Mutex::new(vec![handle.level()]));
    {
        let (resizes, levels) = (resizes.clone(), levels.clone());
        handle.subscribe(move |r| {
            resizes.fetch_add(1, Ordering::Relaxed);
            levels.lock().unwrap().push(r.to_level);
        });
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let policy = Arc::new(Policy {
        api_key: None,
        allowed_origins: vec![],
        max_body_bytes: 64 << 10,
        max_tokens: MAX_TOKENS_CAP,
        max_n: 2,
        body_timeout: Duration::from_secs(5),
    });
    let addr = runtime.block_on(async {
        let builder = TextModelBuilder::new(dir.to_str().unwrap())
            .with_force_cpu()
            .with_dtype(ModelDType::F32)
            .with_max_num_seqs(MAX_SEQS);
        let runner = server::engine(builder).await.unwrap();
        let router = server::router(runner, policy).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });

    // A thread moves the memory budget at random and, now and then, shrinks
    // the weights itself, as a host's control handle may; another checks
    // health and samples what the weights hold against the budget.
    let done = Arc::new(AtomicBool::new(false));
    let mover = {
        let (done, handle) = (done.clone(), handle.clone());
        std::thread::spawn(move || {
            let mut rng = SplitMix(7);
            let mut moves = 0;
            while !done.load(Ordering::Relaxed) {
                let budget = rng.between(low, high);
                weight_arbiter::set_memory_budget(Some(budget as usize)).unwrap();
                if moves % 5 == 4 {
                    let level = rng.between(0, handle.level() as u64) as usize;
                    handle.set_level(level).unwrap();
                }
                moves += 1;
                std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
            }
            weight_arbiter::set_memory_budget(Some(high as usize)).unwrap();
            moves
        })
    };
    let watcher = {
        let (done, handle, addr) = (done.clone(), handle.clone(), addr.clone());
        std::thread::spawn(move || {
            let (mut checks, mut worst) = (0, Duration::ZERO);
            let mut peak = 0u64;
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(
                    status(&addr, reqwest::Method::GET, "/health", &[], None),
                    200
                );
                worst = worst.max(t.elapsed());
                peak = peak.max(handle.resident_bytes());
                checks += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            (checks, worst, peak)
        })
    };

    // The load: 32 streaming clients with long prompts.
    let topics = [
        "rivers",
        "mountains",
        "libraries",
        "trains",
        "gardens",
        "bridges",
        "storms",
        "markets",
    ];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = addr.clone();
            let topic = topics[i % topics.len()];
            let repeat = 6 + 2 * (i % 8);
            let prompt = format!(
                "{} Summarize the note above about {topic} in one sentence.",
                format!("This is note {i}, about {topic}, written to fill the context. ")
                    .repeat(repeat)
            );
            let n = if i % 4 == 1 { 2 } else { 1 };
            // One in eight asks for more than the cap; one in four hangs up.
            let max_tokens = if i % 8 == 7 { 100_000 } else { MAX_TOKENS_CAP };
            let hang_up = (i % 4 == 2).then_some(3);
            std::thread::spawn(move || (i, stream(&addr, &prompt, max_tokens, n, hang_up)))
        })
        .collect();

    // Faults, while the load runs.
    let post =
        |path: &str, body: Vec<u8>| status(&addr, reqwest::Method::POST, path, &[], Some(body));
    let json = |body: serde_json::Value| body.to_string().into_bytes();
    let chat = "/v1/chat/completions";
    let hi = serde_json::json!([{"role": "user", "content": "hi"}]);
    let faults: Vec<(&str, u16)> = vec![
        ("malformed JSON", post(chat, b"{\"messages\": [".to_vec())),
        (
            "messages of the wrong type",
            post(
                chat,
                json(serde_json::json!({"model": "default", "messages": 5})),
            ),
        ),
        (
            "max_tokens of the wrong type",
            post(
                chat,
                json(serde_json::json!({"model": "default", "messages": hi, "max_tokens": "lots"})),
            ),
        ),
        (
            "n above the cap",
            post(
                chat,
                json(serde_json::json!({"model": "default", "messages": hi, "n": 64})),
            ),
        ),
        ("a body over the limit", post(chat, vec![b' '; 100 << 10])),
        (
            "a cross-origin preflight",
            status(
                &addr,
                reqwest::Method::OPTIONS,
                chat,
                &[
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "POST"),
                ],
                None,
            ),
        ),
        (
            "the unload route",
            post(
                "/v1/models/unload",
                json(serde_json::json!({"model_id": "default"})),
            ),
        ),
        (
            "the reload route",
            post(
                "/v1/models/reload",
                json(serde_json::json!({"model_id": "default"})),
            ),
        ),
        (
            "the re-ISQ route",
            post("/re_isq", json(serde_json::json!({"ggml_type": "Q4K"}))),
        ),
    ];
    // A client that sends half its body, pauses, then the rest, and one
    // that never sends the rest: the first is served, the second timed out,
    // and neither holds up the others (health is checked meanwhile).
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || slow_client(&addr, Duration::from_secs(2)))
    };
    let stalled = {
        let addr = addr.clone();
        std::thread::spawn(move || slow_client(&addr, Duration::from_secs(20)))
    };

    let outcomes: Vec<(usize, Outcome)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let slow = slow.join().unwrap();
    let stalled = stalled.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let moves = mover.join().unwrap();
    let (checks, worst_health, peak) = watcher.join().unwrap();

    // Idle with the largest budget: the weights grow back to full size.
    let deadline = Instant::now() + Duration::from_secs(120);
    while handle.level() != max_level && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (gave_back, grew) = (
        log.matches("gave back").count(),
        log.matches("grew by").count(),
    );
    let levels = levels.lock().unwrap().clone();
    let (mut finished, mut hung_up, mut refused) = (0, 0, BTreeMap::new());
    for (i, outcome) in &outcomes {
        match outcome {
            Outcome::Finished(reasons) => {
                assert!(
                    reasons.iter().all(|r| r == "stop" || r == "length"),
                    "client {i}: {reasons:?}"
                );
                finished += 1;
            }
            Outcome::HungUp => hung_up += 1,
            Outcome::Refused(code) => {
                assert!(i % 8 == 7, "client {i} was refused with {code}");
                *refused.entry(*code).or_insert(0) += 1;
            }
        }
    }
    println!(
        "{CLIENTS} streaming clients: {finished} finished, {hung_up} hung up, refused {refused:?}; \
         faults {faults:?}; slow client {slow:?}, stalled client {stalled:?}; \
         {moves} budget moves, {} resizes ({gave_back} arbiter shrinks, {grew} grows), \
         levels {}..={} of {max_level}; \
         peak weights {:.1} MiB (floor {:.1}, full {:.1}), budgets {:.1}..{:.1} MiB; \
         {checks} health checks, slowest {:.2} s; {:.0} s in all",
        resizes.load(Ordering::Relaxed),
        levels.iter().min().unwrap(),
        levels.iter().max().unwrap(),
        peak as f64 / 1048576.0,
        floor as f64 / 1048576.0,
        max_bytes as f64 / 1048576.0,
        low as f64 / 1048576.0,
        high as f64 / 1048576.0,
        worst_health.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    // Every client that did not hang up or ask too much finished.
    assert_eq!(hung_up, CLIENTS / 4);
    assert_eq!(refused.get(&400), Some(&(CLIENTS / 8)), "{refused:?}");
    assert_eq!(finished, CLIENTS - CLIENTS / 4 - CLIENTS / 8);
    for (what, code) in &faults {
        let expected = match *what {
            "a body over the limit" => 413..=413,
            "a cross-origin preflight" => 403..=403,
            w if w.ends_with("route") => 404..=404,
            _ => 400..=422,
        };
        assert!(expected.contains(code), "{what}: {code}");
    }
    assert!(slow.contains(" 200 "), "the slow client got {slow:?}");
    assert!(
        stalled.contains(" 408 "),
        "the stalled client got {stalled:?}"
    );
    assert!(checks > 0);
    // Weights within the budget: they never held more than the full model,
    // and the arbiter never found weights and KV cache over the budget.
    assert!(peak <= max_bytes);
    assert!(
        !log.contains("exceed the budget"),
        "over the budget:\n{log}"
    );
    assert!(
        !log.to_lowercase().contains("preempt"),
        "a sequence was preempted:\n{log}"
    );
    assert!(
        levels
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 3,
        "the weights did not move: {levels:?}"
    );
    assert_eq!(
        handle.level(),
        max_level,
        "the weights did not grow back when idle"
    );
    let _ = std::fs::remove_file(&log_path);
}
