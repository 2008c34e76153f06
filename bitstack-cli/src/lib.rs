//! The `bitstack` command-line tool, as a library so that its tests and the
//! criterion bench reach the same code the binary runs.
//!
//! [`cli`] declares the commands; each command's module holds its flags and
//! the code that runs it; [`args`] the flag groups several commands share;
//! [`options`] the flags with a fixed set of values and their mapping to the
//! library's types.

pub mod args;
pub mod assets;
pub mod bench;
pub mod cli;
pub mod compress;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod options;
pub mod order;
pub mod plot;

use anyhow::Result;

use cli::{Cli, Command};

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::FetchAssets(args) => assets::fetch(&args),
        Command::ImportGguf(args) => assets::import(&args),
        Command::Compress(args) => compress::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Sort(args) => order::sort(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Ladder(args) => order::ladder(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Demo(args) => demo::run(&args),
    }
}
