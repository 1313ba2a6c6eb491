//! pdvault: the one place where identity data lives and the one gate through which it
//! leaves. See ARCHITECTURE.md for the bird's-eye view and the invariants.

// Nothing in the vault needs unsafe code (the PKCS#11 binding is safe), so none may appear;
// `forbid`, unlike Cargo.toml's `deny`, cannot be allowed again further down. The unit-test
// build keeps `deny`: it includes the suite's machine check, which runs before `main`
// through `ctor` (tests/it/support/environment.rs).
#![cfg_attr(not(test), forbid(unsafe_code))]

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod grpc;
pub mod keys;
pub mod policy;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod vault;

/// The test suite's check of the machine (PostgreSQL, SoftHSM2, Python's grpcio), in this
/// unit-test binary too because `cargo test` runs it first.
#[cfg(test)]
mod test_environment;

/// Code generated from `proto/pdvault/v1` at build time.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pdvault.v1");

    /// Encoded descriptors of every pdvault service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pdvault_descriptor.bin"));
}
