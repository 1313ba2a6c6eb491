//! Generates the gRPC code from `proto/` with protox, so building needs no system `protoc`.
//! The encoded descriptor set is kept in OUT_DIR for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/pdvault/v1/vault.proto",
        "proto/pdvault/v1/audit.proto",
        "proto/pdvault/v1/account.proto",
        "proto/pdvault/v1/admin.proto",
        "proto/pdvault/v1/keys.proto",
    ];
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("pdvault_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Decode failures are the sender's error (INVALID_ARGUMENT), not INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::StrictCodec")
        // Per-item errors of the batch calls are `google.rpc.Status`: tonic-types' own.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations; a new one must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    // Worktrees sharing one target dir share this build script's output directory (cargo
    // hashes path packages by their workspace-relative path); a change of working tree must
    // regenerate the code.
    println!("cargo:rerun-if-env-changed=PWD");
    Ok(())
}
