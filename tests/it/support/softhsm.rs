//! A SoftHSM2 token for the tests, initialised once per test process in a temporary
//! directory: its own `softhsm2.conf`, token store, and user PIN file.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use pdvault::config::Pkcs11Config;

pub const MODULE: &str = super::environment::SOFTHSM2_MODULE;
const TOKEN_LABEL: &str = "pdvault-test";

struct Token {
    dir: PathBuf,
}

fn token() -> &'static Token {
    static TOKEN: OnceLock<Token> = OnceLock::new();
    TOKEN.get_or_init(|| {
        // Kept for the whole process: the module holds the token open until it exits.
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        let status = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--so-pin", "5678", "--pin", "1234"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs (apt-get install softhsm2)");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        // Private, as the vault insists for a PIN file.
        pdvault::keys::write_private_file(&dir.join("pin"), b"1234\n").unwrap();
        // SAFETY: set once, before the module is loaded, from the one initialiser; the
        // module reads it when the first provider initialises the library. SoftHSM2 reads
        // its configuration only from the environment, so this is the one way to point it
        // at the test token.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &conf)
        };
        Token { dir }
    })
}

/// Configuration for a provider on the test token. Instances of one deployment pass the
/// same `deployment` (the database URL) and so share KEK labels; others never see them.
pub fn config(deployment: &str) -> Pkcs11Config {
    let token = token();
    let digest = pdvault::policy::token_sha256_hex(deployment);
    Pkcs11Config {
        module: MODULE.into(),
        token_label: TOKEN_LABEL.into(),
        pin_file: token.dir.join("pin"),
        key_label_prefix: format!("pdvault-{}-kek-v", &digest[..16]),
        cache_max_entries: 1_000,
        cache_ttl_seconds: 300,
    }
}

/// Destroys every object of `config`'s deployment (its KEKs, by their label prefix) in the
/// test token, once the deployment is over. Every test of a process shares the token, and
/// SoftHSM2 looks through all of a token's objects on every search: left behind, a whole
/// pass's KEKs slow every later test's key operations.
///
/// Through a provider of the deployment's own, so the destruction takes its turn with every
/// other vault's module calls in this process (the provider serialises them): a session of
/// the test's own destroying objects in the middle of another vault's KEK listing made
/// SoftHSM2 answer that listing wrongly now and then (an object read failing, or a search
/// that missed a live KEK), which the vault cannot tell from a module fault.
pub fn destroy_deployment_objects(config: &Pkcs11Config) {
    use pdvault::keys::KekProvider;
    let provider = pdvault::keys::pkcs11::Pkcs11KekProvider::open(config)
        .expect("the test token opens for the clean-up");
    for version in provider
        .versions()
        .expect("the deployment's KEKs are listed")
    {
        provider
            .destroy(version)
            .expect("the deployment's KEK is destroyed");
    }
}
