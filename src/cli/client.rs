//! The connection every client command shares (`keys`, `accounts`, `purge`, `export`,
//! `bench --addr`): where the vault is, who is calling, and how the connection is secured.
//! One set of flags, declared `global` on the top-level command so that they are accepted
//! anywhere on the line (`pdvault keys rotate --addr X` as well as
//! `pdvault --addr X keys rotate`), and one way of
//! turning them into a channel, so that every client reaches a vault that serves TLS or
//! requires client certificates (the production setup) the same way.
//!
//! Secrets are read as the server reads its own: a token file or client key that group or
//! others can read is refused ([`crate::keys::read_secret_file`]). A token given as a flag
//! shows in the process list, so the environment and files are preferred.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::keys::{SecretFileError, read_secret_file};

/// Where a client command looks for the vault when neither --addr nor `PDVAULT_ADDR` says.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// The token file `bench --addr` reads when neither a token nor a client certificate is
/// given: a local vault's admin token ([`ClientArgs::or_token_file`]).
pub const BENCH_TOKEN_FILE: &str = "pdvault-data/admin.token";

/// The environment variables these flags read. The server's configuration loader ignores
/// them (`config.rs`), so exporting them never breaks `pdvault serve`.
pub const ENVIRONMENT: [&str; 7] = [
    "PDVAULT_ADDR",
    "PDVAULT_TOKEN",
    "PDVAULT_TOKEN_FILE",
    "PDVAULT_CA_CERT",
    "PDVAULT_CLIENT_CERT",
    "PDVAULT_CLIENT_KEY",
    "PDVAULT_TLS_SERVER_NAME",
];

/// Tokens and PEM files are small; anything larger is not what the flag meant.
const MAX_TOKEN_BYTES: u64 = 4096;
const MAX_PEM_BYTES: u64 = 1 << 20;

/// How long a connection (TCP and TLS handshake) may take: a scheduler wants an exit code,
/// not a hang on a server that drops the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client connection flags, the same for every client command. `Debug` is written out
/// below so that the bearer token never reaches a log line or a panic message.
#[derive(Clone, Default, Args)]
pub struct ClientArgs {
    /// Address of a running vault: `https://host:port`, `http://host:port`, or `host:port`
    /// (https when --ca is given, else http). Default: http://127.0.0.1:50051.
    #[arg(
        long,
        global = true,
        env = "PDVAULT_ADDR",
        value_name = "URL",
        help_heading = "Connection (client commands)"
    )]
    pub addr: Option<String>,
    /// Bearer token of the caller. Prefer PDVAULT_TOKEN or --token-file: a flag shows in the
    /// process list. Order: --token, --token-file, PDVAULT_TOKEN, PDVAULT_TOKEN_FILE.
    #[arg(
        long,
        global = true,
        conflicts_with = "token_file",
        value_name = "TOKEN",
        help_heading = "Connection (client commands)"
    )]
    pub token: Option<String>,
    /// File holding the token (e.g. the data directory's admin.token); refused when group or
    /// others can read it. Also PDVAULT_TOKEN_FILE.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Connection (client commands)"
    )]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed the vault's certificate; turns TLS on.
    #[arg(
        long,
        global = true,
        env = "PDVAULT_CA_CERT",
        value_name = "PEM",
        help_heading = "Connection (client commands)"
    )]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a vault that requires one (mTLS); needs --key.
    #[arg(
        long,
        global = true,
        env = "PDVAULT_CLIENT_CERT",
        value_name = "PEM",
        help_heading = "Connection (client commands)"
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert; refused when group or others can read it.
    #[arg(
        long,
        global = true,
        env = "PDVAULT_CLIENT_KEY",
        value_name = "PEM",
        help_heading = "Connection (client commands)"
    )]
    pub key: Option<PathBuf>,
    /// Name to verify the vault's certificate against, when it is not the --addr host.
    #[arg(
        long,
        global = true,
        env = "PDVAULT_TLS_SERVER_NAME",
        value_name = "NAME",
        help_heading = "Connection (client commands)"
    )]
    pub tls_server_name: Option<String>,
}

impl std::fmt::Debug for ClientArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

/// Why a client could not be set up or could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--addr {addr:?} is not a URL")]
    Addr {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("--addr {0}: plaintext http:// with --ca, --cert or --key; use https://")]
    PlaintextWithTls(String),
    #[error("--addr {0}: https:// needs --ca, the CA bundle that signed the vault's certificate")]
    HttpsWithoutCa(String),
    #[error("--addr {0}: the scheme must be http:// or https://")]
    Scheme(String),
    #[error("--cert and --key go together: {0} is missing")]
    HalfIdentity(&'static str),
    #[error("{flag} {}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag}")]
    Secret {
        flag: &'static str,
        #[source]
        source: SecretFileError,
    },
    #[error(
        "a token is required: --token-file, PDVAULT_TOKEN or PDVAULT_TOKEN_FILE (or a client \
         certificate the vault maps to a caller)"
    )]
    NoToken,
    #[error(
        "no token given (--token, --token-file, PDVAULT_TOKEN or PDVAULT_TOKEN_FILE), and the \
         default token file {} is not usable",
        path.display()
    )]
    DefaultToken {
        path: PathBuf,
        #[source]
        source: SecretFileError,
    },
    #[error("the token is not a valid header value")]
    BadToken,
    #[error("--ca, --cert or --key: not usable for TLS")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A connected client: the channel, and the caller's credentials for each request.
pub struct Client {
    pub channel: Channel,
    bearer: Option<MetadataValue<Ascii>>,
}

impl Client {
    /// `message` as a request carrying the caller's token, when there is one (a client
    /// certificate alone may name the caller).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
    }
}

/// The token-bearing inputs, in the order they are tried.
struct TokenSources<'a> {
    flag: Option<&'a str>,
    file: Option<&'a Path>,
    env: Option<String>,
    env_file: Option<PathBuf>,
}

impl TokenSources<'_> {
    /// An explicit flag beats the environment: `--token-file F` with `PDVAULT_TOKEN`
    /// exported reads F.
    fn resolve(self) -> Result<Option<Zeroizing<String>>, ClientError> {
        let from_file = |path: &Path| {
            read_secret_file(path, MAX_TOKEN_BYTES).map_err(|source| ClientError::Secret {
                flag: "--token-file",
                source,
            })
        };
        if let Some(token) = self.flag {
            return Ok(Some(Zeroizing::new(token.trim().to_owned())));
        }
        if let Some(path) = self.file {
            return from_file(path).map(Some);
        }
        if let Some(token) = self.env {
            return Ok(Some(Zeroizing::new(token.trim().to_owned())));
        }
        if let Some(path) = self.env_file {
            return from_file(&path).map(Some);
        }
        Ok(None)
    }
}

impl ClientArgs {
    fn uses_tls(&self) -> bool {
        self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.tls_server_name.is_some()
    }

    /// The vault's URI: --addr with its scheme, or with https (TLS flags given) or http.
    pub fn uri(&self) -> Result<String, ClientError> {
        let addr = self.addr.as_deref().unwrap_or(DEFAULT_ADDR).trim();
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else if self.uses_tls() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let scheme = uri
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("http") if self.uses_tls() => Err(ClientError::PlaintextWithTls(uri)),
            Some("https") if self.ca.is_none() => Err(ClientError::HttpsWithoutCa(uri)),
            Some("http" | "https") => Ok(uri),
            _ => Err(ClientError::Scheme(uri)),
        }
    }

    /// The token from the flags or the environment, `None` when none is given.
    pub fn token(&self) -> Result<Option<Zeroizing<String>>, ClientError> {
        TokenSources {
            flag: self.token.as_deref(),
            file: self.token_file.as_deref(),
            env: std::env::var("PDVAULT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            env_file: std::env::var_os("PDVAULT_TOKEN_FILE")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        }
        .resolve()
    }

    /// Why a vault may close a connection it accepted, as far as these flags tell: a TLS 1.3
    /// server checks the client certificate only after the client's side of the handshake
    /// is done, so a missing one shows as a broken first call, not as a refused connection.
    pub fn closed_connection_hint(&self) -> Option<&'static str> {
        (self.ca.is_some() && self.cert.is_none()).then_some(
            "no client certificate was given (--cert, --key), and a vault that requires one \
             (mTLS) closes the connection",
        )
    }

    /// These flags, with `--token-file path` added when they give no token (flag or
    /// environment) and no client certificate: a command's own default credential, read and
    /// checked like any other token file.
    pub fn or_token_file(&self, path: &Path) -> Result<ClientArgs, ClientError> {
        let mut args = self.clone();
        if self.cert.is_none() && self.token()?.is_none() {
            // Checked here, so that the error says which file was tried, and why.
            read_secret_file(path, MAX_TOKEN_BYTES).map_err(|source| {
                ClientError::DefaultToken {
                    path: path.to_owned(),
                    source,
                }
            })?;
            args.token_file = Some(path.to_owned());
        }
        Ok(args)
    }

    /// The endpoint --addr and the TLS flags describe, not yet connected.
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let uri = self.uri()?;
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| ClientError::Addr { addr: uri, source })?
            .connect_timeout(CONNECT_TIMEOUT);
        match self.tls()? {
            Some(tls) => endpoint.tls_config(tls).map_err(ClientError::Tls),
            None => Ok(endpoint),
        }
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>, ClientError> {
        let Some(ca) = &self.ca else {
            // uri() has refused TLS flags without a CA bundle already.
            return Ok(None);
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--ca", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                // rustls copies the key out of this buffer; ours is wiped on drop.
                let key =
                    read_secret_file(key, MAX_PEM_BYTES).map_err(|source| ClientError::Secret {
                        flag: "--key",
                        source,
                    })?;
                tls = tls.identity(Identity::from_pem(
                    read_pem("--cert", cert)?,
                    key.as_bytes(),
                ));
            }
            (Some(_), None) => return Err(ClientError::HalfIdentity("--key")),
            (None, Some(_)) => return Err(ClientError::HalfIdentity("--cert")),
            (None, None) => {}
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(Some(tls))
    }

    /// The caller's credentials as the `authorization` value each request carries: `None`
    /// when a client certificate alone is to name the caller. A token is required unless a
    /// client certificate is given (the vault may map it to a caller).
    pub fn bearer(&self) -> Result<Option<MetadataValue<Ascii>>, ClientError> {
        let token = self.token()?;
        if token.is_none() && self.cert.is_none() {
            return Err(ClientError::NoToken);
        }
        token
            .map(|token| {
                let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.as_str())
                    .parse()
                    .map_err(|_| ClientError::BadToken)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()
    }

    /// Connects to the vault with the caller's credentials.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let bearer = self.bearer()?;
        let channel = open(&self.endpoint()?).await?;
        Ok(Client { channel, bearer })
    }
}

/// One connection (TCP, and the TLS handshake when the endpoint has TLS) to `endpoint`.
async fn open(endpoint: &Endpoint) -> Result<Channel, ClientError> {
    endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: endpoint.uri().to_string(),
            source,
        })
}

fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| ClientError::Read {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_BYTES)
        .read_to_end(&mut pem)
        .map_err(|source| ClientError::Read {
            flag,
            path: path.to_owned(),
            source,
        })?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_the_token() {
        let args = ClientArgs {
            addr: Some("http://127.0.0.1:1".into()),
            token: Some("s3cr3t-bearer-token".into()),
            ..ClientArgs::default()
        };
        let shown = format!("{args:?} {args:#?}");
        assert!(!shown.contains("s3cr3t-bearer-token"), "{shown}");
        assert!(shown.contains("<redacted>") && shown.contains("127.0.0.1:1"));
    }

    fn args() -> ClientArgs {
        ClientArgs::default()
    }

    #[test]
    fn the_scheme_follows_the_tls_flags_and_contradictions_are_refused() {
        assert_eq!(args().uri().unwrap(), DEFAULT_ADDR);
        let bare = ClientArgs {
            addr: Some("vault:50051".into()),
            ..args()
        };
        assert_eq!(bare.uri().unwrap(), "http://vault:50051");
        let tls = ClientArgs {
            ca: Some("ca.pem".into()),
            ..bare.clone()
        };
        assert_eq!(tls.uri().unwrap(), "https://vault:50051");
        let plain_with_ca = ClientArgs {
            addr: Some("http://vault:50051".into()),
            ..tls.clone()
        };
        assert!(matches!(
            plain_with_ca.uri(),
            Err(ClientError::PlaintextWithTls(_))
        ));
        let shouting = ClientArgs {
            addr: Some("HTTP://vault:50051".into()),
            ..tls.clone()
        };
        assert!(matches!(
            shouting.uri(),
            Err(ClientError::PlaintextWithTls(_))
        ));
        let unknown = ClientArgs {
            addr: Some("grpc://vault:50051".into()),
            ..args()
        };
        assert!(matches!(unknown.uri(), Err(ClientError::Scheme(_))));
        let https_without_ca = ClientArgs {
            addr: Some("https://vault:50051".into()),
            ..args()
        };
        assert!(matches!(
            https_without_ca.uri(),
            Err(ClientError::HttpsWithoutCa(_))
        ));
        // A client certificate alone cannot verify the server: refused, not plaintext.
        let cert_only = ClientArgs {
            addr: Some("vault:50051".into()),
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..args()
        };
        assert!(matches!(
            cert_only.uri(),
            Err(ClientError::HttpsWithoutCa(_))
        ));
    }

    #[test]
    fn flags_beat_the_environment_and_exposed_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private.token");
        let exposed = dir.path().join("exposed.token");
        write_mode(&private, "from-file\n", 0o600);
        write_mode(&exposed, "leaked\n", 0o644);
        let resolve = |flag, file: Option<&Path>, env: Option<&str>, env_file: Option<&Path>| {
            TokenSources {
                flag,
                file,
                env: env.map(str::to_owned),
                env_file: env_file.map(Path::to_owned),
            }
            .resolve()
            .map(|token| token.map(|t| t.as_str().to_owned()))
        };
        assert_eq!(
            resolve(Some("flag"), None, Some("env"), None).unwrap(),
            Some("flag".into())
        );
        assert_eq!(
            resolve(None, Some(&private), Some("env"), None).unwrap(),
            Some("from-file".into())
        );
        assert_eq!(
            resolve(None, None, Some("env"), Some(&exposed)).unwrap(),
            Some("env".into())
        );
        assert_eq!(
            resolve(None, None, None, Some(&private)).unwrap(),
            Some("from-file".into())
        );
        assert_eq!(resolve(None, None, None, None).unwrap(), None);
        let refused = resolve(None, Some(&exposed), None, None).unwrap_err();
        assert!(
            crate::cli::CliError::from(refused)
                .report()
                .contains("chmod 600"),
            "an exposed token file is refused with the fix"
        );
    }

    #[test]
    fn a_half_identity_and_an_exposed_client_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = dir.path().join("client.key");
        write_mode(&ca, "-----BEGIN CERTIFICATE-----\n", 0o644);
        write_mode(&key, "-----BEGIN PRIVATE KEY-----\n", 0o644);
        let half = ClientArgs {
            addr: Some("vault:1".into()),
            ca: Some(ca.clone()),
            cert: Some(ca.clone()),
            ..args()
        };
        assert!(matches!(
            half.endpoint(),
            Err(ClientError::HalfIdentity("--key"))
        ));
        let exposed = ClientArgs {
            key: Some(key),
            ..half
        };
        let error = crate::cli::CliError::from(exposed.endpoint().unwrap_err()).report();
        assert!(
            error.starts_with("--key: ") && error.contains("chmod 600"),
            "{error}"
        );
    }

    fn write_mode(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}
