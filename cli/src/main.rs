//! `runyard`: parses the command line, sets up logging, runs one subcommand and turns a failure
//! into exactly one `error: <reason>` line on stderr and a non-zero exit code.
//!
//! - `args`: the clap command-line surface (its doc comments are `--help`).
//! - `commands`: the subcommands and their shared error type.
//! - `client`: the HTTP API client used by the client commands.
//! - `output`: tables and `key: value` text; safe stdout writes.
//! - `progress`: the progress bar kept at the bottom of the terminal while following logs.
//! - `shutdown`: SIGINT/SIGTERM to a root cancellation token for the server commands.

mod args;
mod client;
mod commands;
mod output;
mod progress;
mod shutdown;
mod snapshot;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use tracing_subscriber::EnvFilter;

use crate::args::Cli;

/// Exit code of a usage error (clap's convention).
const USAGE_EXIT_CODE: u8 = 2;
/// Exit code when the reader closed stdout (128 + SIGPIPE, as if killed by it).
const BROKEN_PIPE_EXIT_CODE: u8 = 141;
/// Exit code after Ctrl-C (128 + SIGINT, as if killed by it).
const INTERRUPTED_EXIT_CODE: u8 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let server = commands::is_server(&cli.command);
    init_logging(if server { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(commands::run(cli.command));
    // Server commands have stopped their tasks; don't wait for stray blocking work.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.is_broken_pipe() => ExitCode::from(BROKEN_PIPE_EXIT_CODE),
        Err(e) if e.is_interrupted() => ExitCode::from(INTERRUPTED_EXIT_CODE),
        Err(e) => {
            eprintln!("error: {}", client::one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// `--help` and `--version` print as clap renders them; a real usage error becomes one line.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            // clap's message is the first paragraph; tips and usage follow a blank line.
            let text = e.render().to_string();
            let message = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect::<Vec<_>>()
                .join(" ");
            let first = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("error: {first} (see --help)");
            ExitCode::from(USAGE_EXIT_CODE)
        }
    }
}

/// Logs to stderr (colours only on a terminal), filtered by `RUST_LOG`, else at `default`.
fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
}
