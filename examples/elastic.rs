//! Generate text while another thread resizes the model under it.
//!
//! ```text
//! cargo run --release --example elastic -- MODEL_DIR [--prompt TEXT] [--every 4]
//! ```
//!
//! `MODEL_DIR` is a BitStack checkpoint (`bitstack compress`, then `bitstack
//! sort`). Every `--every` tokens a second thread moves the budget between
//! the floor and the whole model, as a serving engine would when its KV
//! cache needs room; each resize is printed on its own line starting
//! `resize:`, between the streamed pieces of text.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use anyhow::Result;
use clap::Parser;

use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::runtime::generate::{
    eos_token_ids, generate_elastic, SamplingOptions, TextStream,
};
use bitstack_quant::runtime::model::load_tokenizer;

#[derive(Parser)]
#[command(about = "Generate text while another thread moves the budget between floor and full")]
struct Args {
    /// A BitStack checkpoint dir.
    model: PathBuf,
    #[arg(
        long,
        default_value = "The three most useful things to know about memory are"
    )]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 40)]
    max_tokens: usize,
    /// Resize after every N generated tokens.
    #[arg(long, default_value_t = 4)]
    every: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let handle = BitStackHandle::open(&args.model, None, &candle_core::Device::Cpu)?;
    let tokenizer = load_tokenizer(&args.model)?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "loaded {}: levels 0..={}, floor {:.2} MiB, full {:.2} MiB",
        args.model.display(),
        handle.max_level(),
        mib(handle.floor_bytes()),
        mib(handle.max_bytes())
    );

    // Resize lines and text share stdout: a resize starts a fresh line.
    let mid_line = Arc::new(parking_lot::Mutex::new(false));
    {
        let mid_line = mid_line.clone();
        handle.subscribe(move |r| {
            let mut mid = mid_line.lock();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{}resize: level {} ({:.2} MiB resident, {} blocks {}) in {:.2} ms",
                if *mid { "\n" } else { "" },
                r.to_level,
                mib(r.bytes_after),
                r.blocks_added.max(r.blocks_dropped),
                if r.blocks_added > 0 {
                    "read and verified"
                } else {
                    "dropped"
                },
                r.elapsed.as_secs_f64() * 1e3
            );
            *mid = false;
        });
    }

    // The "serving engine": told how many tokens are out, it flips the
    // budget between the floor and everything.
    let (tokens_out, resize_requests) = mpsc::channel::<usize>();
    let resizer = {
        let handle = handle.clone();
        let every = args.every.max(1);
        std::thread::spawn(move || -> Result<()> {
            for n in resize_requests {
                if n % every == 0 {
                    let to_floor = (n / every) % 2 == 1;
                    let budget = if to_floor {
                        handle.floor_bytes()
                    } else {
                        handle.max_bytes()
                    };
                    handle.set_budget(budget)?;
                }
            }
            Ok(())
        })
    };

    let ids = tokenizer
        .encode(args.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let opts = SamplingOptions {
        max_tokens: args.max_tokens,
        temperature: 0.0,
        seed: 0,
    };
    print!("{}", args.prompt);
    *mid_line.lock() = true;
    let mut stream = TextStream::new(&tokenizer);
    let mut produced = 0;
    let g = generate_elastic(&handle, &ids, &eos_token_ids(&args.model), &opts, |id| {
        let piece = stream.push(id)?;
        {
            let mut mid = mid_line.lock();
            let mut out = std::io::stdout().lock();
            write!(out, "{piece}")?;
            out.flush()?;
            if !piece.is_empty() {
                *mid = !piece.ends_with('\n');
            }
        }
        produced += 1;
        // The resizer may be gone after an error; generation goes on.
        let _ = tokens_out.send(produced);
        Ok(())
    })?;
    drop(tokens_out);
    resizer.join().expect("the resizer thread panicked")?;
    println!();
    println!(
        "{} tokens at {:.2} tokens/s; now at level {} ({:.2} MiB)",
        g.tokens.len(),
        g.decode_tokens_per_second(),
        handle.level(),
        mib(handle.resident_bytes())
    );
    Ok(())
}
