//! `mistralrs-bitstack`: mistral.rs with BitStack weights.
//!
//! The published mistral.rs crates (with the patches of
//! `integration/upstream/`) do the serving; this binary registers the
//! BitStack quantization method over an elastic handle and starts them.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitstack_mistralrs::{guard, register_rank, server, Registration};
use bitstack_quant::format::shard::TensorParallel;
use bitstack_quant::Budget;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mistralrs::{
    IsqType, MemoryGpuConfig, MistralRs, Model, ModelDType, PagedAttentionMetaBuilder,
    RequestBuilder, SamplingParams, TextMessageRole, TextMessages, TextModelBuilder,
};

#[derive(Parser)]
#[command(
    name = "mistralrs-bitstack",
    version,
    about = "mistral.rs with BitStack weights: any memory size, resized while serving",
    long_about = "mistral.rs with BitStack weights: any memory size, resized while serving.\n\n\
        A BitStack checkpoint (made with `bitstack compress` and `bitstack sort`) loads at \
        whatever size --weight-budget allows. With --memory-budget (weights and KV cache \
        together) the weights give memory to the KV cache under load, block by block in \
        the checkpoint's order, and take it back when the load falls.",
    after_help = "Examples:\n  \
        mistralrs-bitstack run -m smollm2-bitstack --quant bitstack --weight-budget 4bpw --prompt 'What is the capital of France?' --max-tokens 32 --temperature 0\n  \
        mistralrs-bitstack serve -m smollm2-bitstack --quant bitstack --memory-budget 120MiB --port 8080\n  \
        mistralrs-bitstack serve -m qwen-bitstack --quant bitstack --device cuda --memory-budget 1.5GiB --port 8080\n  \
        mistralrs-bitstack bench -m smollm2-bitstack --quant bitstack --weight-budget 3bpw,4bpw,6bpw --dense SmolLM2-135M-Instruct"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with the model: one prompt with --prompt, else line by line from stdin.
    Run(RunArgs),
    /// Serve the OpenAI-compatible HTTP API of mistral.rs.
    Serve(ServeArgs),
    /// Tokens per second at several weight budgets, and of mistral.rs's own
    /// unquantized and ISQ Q4K models, in one run.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Quant {
    /// A BitStack checkpoint (`quant_method: bitstack`).
    Bitstack,
    /// A dense model, as mistral.rs loads it.
    None,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// The model directory (a BitStack checkpoint for --quant bitstack).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// How the weights are stored.
    #[arg(long, value_enum, default_value = "bitstack")]
    quant: Quant,
    /// Weights at load time: bytes (900MiB), bits per linear weight (3.5bpw)
    /// or a percent of the 16-bit model (30%); all blocks when left out.
    #[arg(long, value_name = "SPEC")]
    weight_budget: Option<Budget>,
    /// Weights plus KV cache, in bytes (1.2GiB) or a percent of the 16-bit
    /// model: makes the weights elastic under load.
    #[arg(long, value_name = "SPEC")]
    memory_budget: Option<Budget>,
    /// Quantize a dense model (--quant none) as it loads, with mistral.rs's
    /// in-situ quantization: the baselines BitStack is compared with.
    #[arg(long, value_enum)]
    isq: Option<IsqArg>,
    /// Sequences run together at most.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Run as one rank of mistral.rs's tensor parallelism over its `ring`
    /// backend (TCP between processes, CPU): a JSON file with this
    /// process's `rank` and `world_size` (a power of two), the `port` it
    /// listens on for its left neighbour, `right_ip`/`right_port` of its
    /// right one, and `master_ip`/`master_port` of rank 0. Every rank loads
    /// its slice of each linear; rank 0 answers, the others follow it (they
    /// never return). See scripts/tp-loopback.sh.
    #[arg(long, env = "RING_CONFIG", value_name = "FILE")]
    ring_config: Option<PathBuf>,
    #[command(flatten)]
    target: TargetArgs,
}

/// Where and in what the model runs.
#[derive(Args, Clone)]
struct TargetArgs {
    /// Where the model runs: cpu, cuda (the first GPU) or cuda:N. CUDA needs
    /// a binary built with `scripts/build-mistralrs-bitstack.sh --cuda`.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceArg,
    /// The dtype mistral.rs runs the model in. By default a BitStack
    /// checkpoint's stored dtype (what its weight budgets count), and for a
    /// dense model f32 on the CPU, bf16 on a GPU.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// mistral.rs's paged attention (its KV cache in a pool of blocks):
    /// auto is on for a GPU, as in mistral.rs; the CPU has none.
    #[arg(long, value_enum, default_value = "auto")]
    paged_attn: PagedAttn,
    /// Tokens the paged KV pool holds at start-up. With --memory-budget it
    /// is the pool's smallest size: the pool grows past it when the weights
    /// shrink under load, and comes back to it when they grow.
    #[arg(long, default_value_t = 4096, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    paged_kv_tokens: u64,
}

/// A device given as `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("{s:?} is not a device: give cpu, cuda or cuda:N (N = 0, 1, ...)")
                }),
        }
    }
}

impl DeviceArg {
    fn candle(self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device cuda:{n}: this binary was built without CUDA (build it with scripts/build-mistralrs-bitstack.sh --cuda)"
                    );
                }
                candle_core::Device::new_cuda(n)
                    .with_context(|| format!("opening GPU {n} (--device cuda:{n})"))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IsqArg {
    /// 4.5 bits per weight (llama.cpp's Q4_K).
    Q4k,
    /// 8.5 bits per weight (llama.cpp's Q8_0).
    Q8_0,
}

impl IsqArg {
    fn mistralrs(self) -> IsqType {
        match self {
            Self::Q4k => IsqType::Q4K,
            Self::Q8_0 => IsqType::Q8_0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F16,
    Bf16,
    F32,
}

impl DTypeArg {
    fn candle(self) -> candle_core::DType {
        match self {
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F32 => candle_core::DType::F32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PagedAttn {
    /// On for a GPU, off for the CPU.
    Auto,
    On,
    Off,
}

impl TargetArgs {
    /// The dtype a dense model runs in: --dtype, else f32 on the CPU and
    /// bf16 on a GPU.
    fn dense_dtype(&self, device: &candle_core::Device) -> DTypeArg {
        match self.dtype {
            Some(d) => d,
            None if device.is_cpu() => DTypeArg::F32,
            None => DTypeArg::Bf16,
        }
    }

    /// Whether the model runs with paged attention on `device`.
    fn paged(&self, device: &candle_core::Device) -> Result<bool> {
        Ok(match (self.paged_attn, device.is_cpu()) {
            (PagedAttn::On, true) => {
                bail!("--paged-attn on needs a GPU: mistral.rs has no paged attention on the CPU")
            }
            (PagedAttn::Off, _) | (PagedAttn::Auto, true) => false,
            (PagedAttn::On | PagedAttn::Auto, false) => true,
        })
    }

    /// `builder` set to run on this device, in `dtype`, with or without paged attention.
    fn apply(
        &self,
        builder: TextModelBuilder,
        device: &candle_core::Device,
        dtype: ModelDType,
    ) -> Result<TextModelBuilder> {
        let paged = self.paged(device)?;
        let mut builder = match device {
            candle_core::Device::Cpu => builder.with_force_cpu(),
            other => builder.with_device(other.clone()),
        }
        .with_dtype(dtype);
        if paged {
            builder = builder.with_paged_attn(
                PagedAttentionMetaBuilder::default()
                    .with_gpu_memory(MemoryGpuConfig::ContextSize(self.paged_kv_tokens as usize))
                    .build()?,
            );
        }
        Ok(builder)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user message; without it, each line of stdin is one.
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Beyond the loopback interface (0.0.0.0, a LAN
    /// address) --api-key is required.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start-up).
    #[arg(short, long, default_value_t = 8080)]
    port: u16,
    /// Clients must send `Authorization: Bearer KEY` (all routes but
    /// /health). Also read from MISTRALRS_BITSTACK_API_KEY, which keeps it
    /// out of the process list.
    #[arg(long, env = "MISTRALRS_BITSTACK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A web origin allowed to call the server from a browser
    /// (`https://app.example.com`), besides pages served from localhost;
    /// repeat for several.
    #[arg(long, value_name = "ORIGIN")]
    allow_origin: Vec<String>,
    /// Largest `max_tokens` a request may ask for; requests without one get it.
    #[arg(long, default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Largest `n` (choices per request).
    #[arg(long, default_value_t = 4)]
    max_n: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds a completion request's body may take to arrive; a client
    /// that stalls longer gets a 408.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// The BitStack checkpoint.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Must be bitstack (kept for symmetry with run and serve).
    #[arg(long, value_enum, default_value = "bitstack")]
    quant: Quant,
    /// Weight budgets to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3bpw,4bpw,6bpw")]
    weight_budget: Vec<Budget>,
    /// The dense model the checkpoint was made from: also timed unquantized
    /// and with mistral.rs's ISQ Q4K.
    #[arg(long)]
    dense: Option<PathBuf>,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Runs per model (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    target: TargetArgs,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,mistralrs_core=warn,mistralrs_core::weight_arbiter=info,mistralrs_core::paged_attention=info".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Bench(args) => bench(args).await,
        }
    })
}

/// Registers the checkpoint (for --quant bitstack) and loads the model.
async fn load(args: &ModelArgs) -> Result<(Arc<MistralRs>, Option<Registration>)> {
    let dir = args.model.to_str().context("the model path is not UTF-8")?;
    let tensor_parallel = match &args.ring_config {
        Some(file) => Some(ring_rank(file)?),
        None => None,
    };
    let device = args.target.device.candle()?;
    args.target.paged(&device)?;
    let registration = match args.quant {
        Quant::Bitstack if args.isq.is_some() => {
            bail!("--isq quantizes a dense model: a BitStack checkpoint is already quantized (use --quant none)")
        }
        Quant::Bitstack => Some(register_rank(
            &args.model,
            args.weight_budget,
            args.memory_budget,
            &device,
            // By default the checkpoint's dense dtype: mistral.rs keeps the
            // embeddings, norms and lm_head in it, as the weight budget
            // counts them.
            args.target.dtype.map(DTypeArg::candle),
            tensor_parallel,
        )?),
        Quant::None => {
            if args.weight_budget.is_some() || args.memory_budget.is_some() {
                bail!("--weight-budget and --memory-budget need --quant bitstack");
            }
            None
        }
    };
    if let Some(r) = &registration {
        tracing::info!(
            "bitstack: level {}/{} ({:.1} MiB of weights{})",
            r.handle.level(),
            r.handle.max_level(),
            r.handle.resident_bytes() as f64 / 1048576.0,
            r.memory_budget.map_or(String::new(), |b| format!(
                ", memory budget {:.1} MiB for weights and KV cache",
                b as f64 / 1048576.0
            ))
        );
    }
    let dtype = match &registration {
        Some(r) => mistralrs_dtype(r.dtype)?,
        None => mistralrs_dtype(args.target.dense_dtype(&device).candle())?,
    };
    let mut builder = args
        .target
        .apply(TextModelBuilder::new(dir), &device, dtype)?
        .with_max_num_seqs(args.max_seqs);
    if let Some(isq) = args.isq {
        builder = builder.with_isq(isq.mistralrs());
    }
    let runner = server::engine(builder)
        .await
        .with_context(|| format!("loading {dir}"))?;
    Ok((runner, registration))
}

/// This process's rank in the ring config `file`, which mistral.rs then
/// reads through `RING_CONFIG`.
fn ring_rank(file: &std::path::Path) -> Result<TensorParallel> {
    let text = std::fs::read(file)
        .with_context(|| format!("reading the ring config {}", file.display()))?;
    let config: mistralrs_quant::RingConfig = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a ring config", file.display()))?;
    if !config.world_size.is_power_of_two() || config.world_size < 2 {
        bail!(
            "{}: world_size {} must be a power of two, at least 2 (the ring backend's rule)",
            file.display(),
            config.world_size
        );
    }
    let tp = TensorParallel::new(config.rank, config.world_size)
        .with_context(|| format!("in {}", file.display()))?;
    // mistral.rs reads the file itself when it loads the model.
    std::env::set_var("RING_CONFIG", file);
    tracing::info!(
        "tensor parallelism: rank {} of {}{}",
        tp.rank(),
        tp.world(),
        if tp.rank() == 0 {
            ""
        } else {
            " (follows rank 0: this process serves rank 0's requests and does not return)"
        }
    );
    Ok(tp)
}

/// mistral.rs's name for `dtype`.
fn mistralrs_dtype(dtype: candle_core::DType) -> Result<ModelDType> {
    Ok(match dtype {
        candle_core::DType::F32 => ModelDType::F32,
        candle_core::DType::F16 => ModelDType::F16,
        candle_core::DType::BF16 => ModelDType::BF16,
        other => bail!("mistral.rs cannot run a model in {other:?}"),
    })
}

async fn run(args: RunArgs) -> Result<()> {
    let (runner, _registration) = load(&args.model).await?;
    let model = Model::new(runner);
    let ask = |prompt: String| {
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(args.max_tokens);
        if args.temperature > 0.0 {
            sampling.top_k = None;
            sampling.temperature = Some(args.temperature);
        }
        let request =
            RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, prompt))
                .set_sampling(sampling);
        let model = &model;
        async move { model.send_chat_request(request).await }
    };
    match args.prompt {
        Some(prompt) => {
            let response = ask(prompt).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = response.choices[0]
                .message
                .content
                .clone()
                .unwrap_or_default();
            println!("{text}");
            tracing::info!(
                "{} prompt tokens, {} generated at {:.1} tokens/s",
                response.usage.prompt_tokens,
                response.usage.completion_tokens,
                response.usage.avg_compl_tok_per_sec
            );
        }
        None => {
            let stdin = std::io::stdin();
            eprint!("> ");
            for line in stdin.lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    let response = ask(line).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!(
                        "{}",
                        response.choices[0]
                            .message
                            .content
                            .clone()
                            .unwrap_or_default()
                    );
                }
                eprint!("> ");
                std::io::stderr().flush()?;
            }
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let api_key = args.api_key.filter(|k| !k.is_empty());
    if api_key.is_none() && !guard::is_loopback_host(&args.host) {
        bail!(
            "--host {} is reachable from other machines: give --api-key KEY (or set MISTRALRS_BITSTACK_API_KEY)",
            args.host
        );
    }
    for origin in &args.allow_origin {
        if origin.parse::<axum::http::HeaderValue>().is_err() || !origin.contains("://") {
            bail!("--allow-origin {origin:?} is not an origin like https://app.example.com");
        }
    }
    let policy = Arc::new(guard::Policy {
        api_key,
        allowed_origins: args.allow_origin.clone(),
        max_body_bytes: args.max_body_bytes,
        max_tokens: args.max_tokens_cap,
        max_n: args.max_n,
        body_timeout: std::time::Duration::from_secs(args.body_timeout),
    });
    let (runner, _registration) = load(&args.model).await?;
    let router = server::router(runner, policy).await?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    // Tests and scripts read the address from this line.
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn bench(args: BenchArgs) -> Result<()> {
    if args.quant != Quant::Bitstack {
        bail!("bench times a BitStack checkpoint: use --quant bitstack (and --dense for the baselines)");
    }
    let prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle.";
    let mut rows = Vec::new();
    for budget in &args.weight_budget {
        let model_args = ModelArgs {
            model: args.model.clone(),
            quant: Quant::Bitstack,
            weight_budget: Some(*budget),
            memory_budget: None,
            isq: None,
            max_seqs: 1,
            ring_config: None,
            target: args.target.clone(),
        };
        let (runner, registration) = load(&model_args).await?;
        let model = Model::new(runner);
        let bytes = registration.as_ref().map(|r| r.handle.resident_bytes());
        rows.push((
            format!("bitstack {budget}"),
            bytes,
            time(&model, prompt, &args).await?,
        ));
    }
    if let Some(dense) = &args.dense {
        let dir = dense.to_str().context("the dense path is not UTF-8")?;
        let device = args.target.device.candle()?;
        let dtype = args.target.dense_dtype(&device);
        let unquantized = format!("unquantized {dtype:?}").to_lowercase();
        for (name, isq) in [
            (unquantized.as_str(), None),
            ("ISQ Q4K", Some(IsqType::Q4K)),
        ] {
            let mut builder = args
                .target
                .apply(
                    TextModelBuilder::new(dir),
                    &device,
                    mistralrs_dtype(dtype.candle())?,
                )?
                .with_max_num_seqs(1);
            if let Some(isq) = isq {
                builder = builder.with_isq(isq);
            }
            let model = Model::new(
                server::engine(builder)
                    .await
                    .with_context(|| format!("loading {dir}"))?,
            );
            rows.push((name.to_string(), None, time(&model, prompt, &args).await?));
        }
    }
    println!("| model | weights MiB | decode tokens/s | prompt tokens/s |");
    println!("|---|---|---|---|");
    for (name, bytes, (decode, prompt)) in rows {
        let bytes = bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
        println!("| {name} | {bytes} | {decode:.1} | {prompt:.1} |");
    }
    Ok(())
}

/// Median decode and prompt tokens/s over `args.repeats` greedy runs.
async fn time(model: &Model, prompt: &str, args: &BenchArgs) -> Result<(f64, f64)> {
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for _ in 0..args.repeats.max(1) {
        // Greedy, at most `gen_tokens` tokens.
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(args.gen_tokens);
        let request =
            RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, prompt))
                .set_sampling(sampling);
        let start = Instant::now();
        let response = model
            .send_chat_request(request)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::debug!("run took {:?}", start.elapsed());
        decode.push(response.usage.avg_compl_tok_per_sec as f64);
        prefill.push(response.usage.avg_prompt_tok_per_sec as f64);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(decode), median(prefill)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_as_cpu_cuda_or_cuda_n() {
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "metal"] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("is not a device"), "{bad}: {err}");
        }
    }

    #[test]
    fn paged_attention_is_on_for_a_gpu_and_refused_on_the_cpu() {
        let target = |paged_attn| TargetArgs {
            device: DeviceArg::Cpu,
            dtype: None,
            paged_attn,
            paged_kv_tokens: 4096,
        };
        let cpu = candle_core::Device::Cpu;
        assert!(!target(PagedAttn::Auto).paged(&cpu).unwrap());
        assert!(!target(PagedAttn::Off).paged(&cpu).unwrap());
        let err = target(PagedAttn::On).paged(&cpu).unwrap_err().to_string();
        assert!(err.contains("needs a GPU"), "{err}");
    }
}
