//! The `datagate` binary: parse the command line, run it, report errors in one line.

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = datagate::cli::Cli::parse();
    match datagate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datagate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
