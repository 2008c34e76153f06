//! `bitstack`: compress, evaluate and inspect BitStack checkpoints.
//!
//! Only process set-up lives here; the commands are in the `bitstack_cli`
//! library so that tests and benches reach them.

use bitstack_cli::cli::{Cli, Command};
use clap::Parser;

fn main() {
    // Behave like other Unix tools when the reader goes away (`bitstack ladder DIR | head`).
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE action before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Command::Bench(args) = &cli.command {
        // Candle's dense matmul takes its task count from RAYON_NUM_THREADS
        // on every call, so `bench --threads N` sets it, here, while this is
        // the only thread (the library only sizes rayon's pool).
        if let Some(n) = args.threads.filter(|&n| n > 0) {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = bitstack_cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
