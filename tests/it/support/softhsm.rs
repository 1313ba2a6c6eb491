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
pub fn destroy_deployment_objects(config: &Pkcs11Config) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let module = Pkcs11::new(&config.module).unwrap();
    // The vault in this process initialised the library already.
    let _ = module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| module.get_token_info(*slot).unwrap().label().trim_end() == config.token_label)
        .expect("the test token");
    let session = module.open_rw_session(slot).unwrap();
    // Already logged in when another vault of this process holds a session.
    let _ = session.login(UserType::User, Some(&AuthPin::from("1234".to_owned())));
    let prefix = config.key_label_prefix.as_bytes();
    for object in session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap()
    {
        let ours = session
            .get_attributes(object, &[AttributeType::Label])
            .unwrap_or_default()
            .into_iter()
            .any(|attribute| matches!(attribute, Attribute::Label(label) if label.starts_with(prefix)));
        if ours {
            // Another process-wide search may have raced it away; nothing else destroys ours.
            let _ = session.destroy_object(object);
        }
    }
}
