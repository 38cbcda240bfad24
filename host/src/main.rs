//! The `jobhost` binary: a thin shell over [`jobhost::cli`].

use std::process::ExitCode;

use clap::Parser;
use jobhost::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A worker process runs jobs on its main thread and needs no runtime.
    if let Command::Worker(args) = &cli.command {
        return jobhost::worker::serve(args);
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(jobhost::cli::main(cli)),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
