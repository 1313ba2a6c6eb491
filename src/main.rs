//! The `pdvault` binary: everything it does lives in the library's `cli` module.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pdvault::cli::run().await
}
