//! The `jobhost` binary: a thin shell over [`jobhost::cli`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    jobhost::cli::main(jobhost::cli::Cli::parse()).await
}
