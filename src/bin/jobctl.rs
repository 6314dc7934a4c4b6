//! `jobctl`: the client. All logic lives in `jobd::cli`.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    jobd::cli::run(jobd::cli::Cli::parse()).await
}
