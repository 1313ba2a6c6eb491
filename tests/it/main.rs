//! The integration tests: one test binary, one module per area (the former `tests/*.rs`
//! files), sharing the harness in `support/`.
//!
//! One binary rather than one per file because every integration-test binary links the
//! whole server library and its dependencies again: on a two-core machine that linking was
//! most of the time `cargo test` spent before the first test ran. Tests are named by their
//! module (`api::sqlite::create_then_get_releases_plaintext_for_a_granted_purpose`), so
//! `cargo test --test it api::` runs one area, as `--test api` did.
//!
//! Sharing a process means sharing what a process has once: the machine check
//! (`support::environment`) runs once before the harness, one SoftHSM2 token serves every
//! test (`support::softhsm`), one tracing subscriber and one metrics recorder collect from
//! every app. The few tests whose assertions are about process-wide state run in a process
//! of their own (`support::own_process`).

// A test crate stops at the first broken expectation: unwrapping is how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod support;

mod accounts;
mod api;
mod audit;
mod bench;
mod bulk;
mod golden;
mod hostile;
mod hsm;
mod index_keys;
mod instances;
mod interop;
mod keys;
mod keys_process;
mod ops;
mod process;
mod shutdown;
mod tls;
mod transport;
mod witness;
