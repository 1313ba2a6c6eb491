//! The `pdvault` binary: the library's `cli` parses and runs every command, and hands
//! `pdvault bench` to the load generator, a module of this binary only (`bench/`), so the
//! server library does not carry it.

mod bench;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pdvault::cli::run(bench::command).await
}
