//! Generates the gRPC code from `proto/` with protox, so building needs no system `protoc`.
//! The encoded descriptor set is kept in OUT_DIR for server reflection. Lists the SQLite
//! migrations for `store/sqlite/migrate.rs` to embed.

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
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    sqlite_migrations(&out_dir)?;
    // The migrations are embedded (sqlx::migrate! for PostgreSQL, the list below for
    // SQLite); a new one must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    // Worktrees sharing one target dir share this build script's output directory (cargo
    // hashes path packages by their workspace-relative path); a change of working tree must
    // regenerate the code.
    println!("cargo:rerun-if-env-changed=PWD");
    Ok(())
}

/// Writes `sqlite_migrations.rs`: `&[(version, description, SQL)]` of every file of
/// `migrations/sqlite`, in version order, named as sqlx names them (`<version>_<words>.sql`).
fn sqlite_migrations(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("migrations/sqlite");
    let mut migrations = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let Some(stem) = name.strip_suffix(".sql") else {
            continue;
        };
        let (version, words) = stem
            .split_once('_')
            .ok_or_else(|| format!("migration {name}: no <version>_<description>"))?;
        let version: i64 = version.parse()?;
        migrations.push((version, words.replace('_', " "), path));
    }
    migrations.sort_by_key(|(version, _, _)| *version);
    let mut code = String::from("&[\n");
    for (version, description, path) in migrations {
        code.push_str(&format!(
            "    ({version}, {description:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("]\n");
    fs::write(out_dir.join("sqlite_migrations.rs"), code)?;
    Ok(())
}
