//! `inspect`: what a checkpoint holds, linear by linear.

use std::path::PathBuf;

use anyhow::Result;
use bitstack_quant::eval::inspect::inspect;
use clap::Args;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A BitStack checkpoint dir.
    pub dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let i = inspect(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    println!(
        "{}: {} layers, k = {}, blocks per linear = {}",
        i.architecture,
        i.layers,
        i.k.map_or("-".into(), |k| k.to_string()),
        i.niter.map_or("dense".into(), |n| n.to_string())
    );
    println!(
        "{:<40} {:>11} {:>4} {:>6} {:>6} {:>12} {:>12}",
        "linear", "shape", "k", "blocks", "planes", "bytes/block", "bytes"
    );
    for l in &i.linears {
        println!(
            "{:<40} {:>11} {:>4} {:>6} {:>6} {:>12} {:>12}",
            l.name,
            format!("{}x{}", l.m, l.n),
            l.k.map_or("-".into(), |k| k.to_string()),
            l.blocks,
            l.planes,
            l.bytes_per_block,
            l.bytes
        );
    }
    println!(
        "total: {} bytes of linear weights ({:.3} bits per linear weight over {} weights), {} bytes on disk",
        i.linear_bytes, i.max_bits_per_linear_weight, i.linear_weights, i.file_bytes
    );
    println!(
        "dense parts: {} bytes in {}{}",
        i.dense_bytes,
        i.dense_dtype,
        i.floor_bytes.map_or(String::new(), |f| format!(
            "; floor (one block in every linear plus the dense parts): {f} bytes ({:.2} MiB)",
            f as f64 / 1048576.0
        ))
    );
    Ok(())
}
