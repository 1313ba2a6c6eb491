//! TLS and mutual TLS: callers named by their client certificates, with a CA and
//! certificates generated per test run; and the `pdvault keys`, `accounts` and `purge`
//! clients (the real binary) reaching a vault that requires client certificates, and one
//! that serves plain HTTP/2, with the shared connection flags anywhere on the line.

use crate::support::cli::cli;
use crate::support::fixtures::reason;
use crate::support::{ANALYTICS, Backend, CLAIMS, SECURITY, TestApp, authed};
use pdvault::config::Config;
use pdvault::policy::CallerConfig;
use pdvault::proto::vault_client::VaultClient;
use pdvault::proto::{CreateRecordRequest, GetRecordRequest, Identity};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity};

struct Pki {
    ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and key.
struct Issued {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    fn issue(&self, dns: &[&str], uri: Option<&str>, cn: &str) -> Issued {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if dns.contains(&"localhost") {
            params
                .subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

struct Setup {
    app: TestApp,
    ca: Pki,
    _files: tempfile::TempDir,
}

/// A vault with TLS, asking for client certificates from `ca` (optional when
/// `optional_client_auth`), and callers mapped to certificates: claims by SPIFFE URI,
/// analytics by CN.
async fn spawn(client_auth: bool, optional_client_auth: bool) -> Setup {
    let ca = Pki::new("pdvault test CA");
    let server = ca.issue(&["localhost"], None, "pdvault");
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name);
    std::fs::write(path("server.pem"), &server.cert).unwrap();
    std::fs::write(path("server.key"), &server.key).unwrap();
    std::fs::write(path("ca.pem"), &ca.ca_pem).unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, |config: &mut Config| {
        config.tls.cert_path = Some(path("server.pem"));
        config.tls.key_path = Some(path("server.key"));
        if client_auth {
            config.tls.client_ca_path = Some(path("ca.pem"));
            config.tls.client_auth_optional = optional_client_auth;
        }
        let map = |caller: &mut CallerConfig| match caller.name.as_str() {
            "claims" => caller.certificate_uri = Some("spiffe://pdvault.test/claims".into()),
            "analytics" => caller.certificate_cn = Some("analytics-job".into()),
            _ => {}
        };
        config.callers.iter_mut().for_each(map);
    })
    .await
    .unwrap();
    Setup {
        app,
        ca,
        _files: files,
    }
}

async fn connect(
    setup: &Setup,
    client: Option<&Issued>,
) -> Result<VaultClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&setup.ca.ca_pem))
        .domain_name("localhost");
    if let Some(issued) = client {
        tls = tls.identity(TlsIdentity::from_pem(&issued.cert, &issued.key));
    }
    // Bounded, so a handshake the server drops cannot hang the test.
    let channel = Channel::from_shared(format!("https://{}", setup.app.addr))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(20))
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(VaultClient::new(channel))
}

fn create_request() -> CreateRecordRequest {
    let identity = Identity {
        name: "陈七".into(),
        ..Identity::default()
    };
    crate::support::fixtures::create_request(identity, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_certificates_authenticate_without_a_token() {
    let setup = spawn(true, false).await;
    let claims_cert = setup
        .ca
        .issue(&[], Some("spiffe://pdvault.test/claims"), "ignored");
    let mut claims = connect(&setup, Some(&claims_cert)).await.unwrap();
    let record = claims
        .create_record(create_request())
        .await
        .expect("the certificate alone authenticates claims")
        .into_inner();
    let audited = setup
        .app
        .count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE caller = 'claims' AND record_ids LIKE '%{}%'",
            record.record_id
        ))
        .await;
    assert_eq!(audited, 1);

    // By CN: the analytics job may read but not create, so it is analytics that called.
    let analytics_cert = setup.ca.issue(&[], None, "analytics-job");
    let mut analytics = connect(&setup, Some(&analytics_cert)).await.unwrap();
    let status = analytics.create_record(create_request()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
    let released = analytics
        .get_record(GetRecordRequest {
            record_id: record.record_id.clone(),
            purpose: "audit-research".into(),
            ..GetRecordRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.fields.contains_key("name"));

    // A token for the same caller is fine; a token for another caller is refused.
    claims
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap();
    let status = claims
        .create_record(authed(ANALYTICS.token, create_request()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "CALLER_MISMATCH");
    setup.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_certificates_are_refused() {
    let setup = spawn(true, false).await;
    // Signed by another CA: the handshake fails.
    let stranger = Pki::new("another CA").issue(&[], Some("spiffe://pdvault.test/claims"), "x");
    let refused = match connect(&setup, Some(&stranger)).await {
        Err(_) => true,
        Ok(mut client) => client.create_record(create_request()).await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA was accepted");
    // No certificate at all, while one is required: refused too.
    let refused = match connect(&setup, None).await {
        Err(_) => true,
        Ok(mut client) => client
            .create_record(authed(CLAIMS.token, create_request()))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was accepted");

    // Signed by the trusted CA but mapped to no caller: UNAUTHENTICATED without a token,
    // and the token decides with one.
    let unmapped = setup
        .ca
        .issue(&[], Some("spiffe://pdvault.test/unknown"), "nobody");
    let mut client = connect(&setup, Some(&unmapped)).await.unwrap();
    let status = client.create_record(create_request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    client
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap();
    let count = setup
        .app
        .count("SELECT COUNT(*) FROM audit_events WHERE rpc = 'CreateRecord'")
        .await;
    assert_eq!(count, 1, "only the token-authenticated create happened");
    setup.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_with_tokens_and_optional_client_certificates() {
    let setup = spawn(true, true).await;
    let mut client = connect(&setup, None).await.unwrap();
    client
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap();
    let status = client.create_record(create_request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    setup.app.stop().await;

    let setup = spawn(false, false).await;
    let mut client = connect(&setup, None).await.unwrap();
    client
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap();
    // A plaintext client cannot talk to the TLS listener.
    let plain = Channel::from_shared(format!("http://{}", setup.app.addr))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(20))
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => VaultClient::new(channel)
            .create_record(authed(CLAIMS.token, create_request()))
            .await
            .is_err(),
    };
    assert!(refused);
    setup.app.stop().await;
}

/// Writes `text` to `path` with `mode` (token and key files must be private).
fn write_file(path: &std::path::Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs the `pdvault` binary with the words of `line` as arguments and, of the environment,
/// only `env` among the PDVAULT_* variables; returns whether it succeeded, and its output.
async fn pdvault(line: &str, env: &[(&str, &str)]) -> (bool, String) {
    let ran = env
        .iter()
        .fold(cli(line), |command, (key, value)| command.env(key, value))
        .run()
        .await;
    (ran.ok, ran.text())
}

/// Issue 13: `pdvault keys`, `accounts` and `purge` reach a vault that requires client
/// certificates, with the connection flags before, between or after the subcommands, or
/// from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_reach_a_vault_that_requires_client_certificates() {
    let setup = spawn(true, false).await;
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str| files.path().join(name).display().to_string();
    // Mapped to no caller: the token names who calls, the certificate lets it connect.
    let operator = setup.ca.issue(&[], None, "operator");
    let stranger = Pki::new("another CA");
    for (name, text, mode) in [
        ("ca.pem", setup.ca.ca_pem.as_str(), 0o644),
        ("stranger.pem", stranger.ca_pem.as_str(), 0o644),
        ("client.pem", operator.cert.as_str(), 0o644),
        ("client.key", operator.key.as_str(), 0o600),
        ("exposed.key", operator.key.as_str(), 0o644),
        ("admin.token", setup.app.admin_token.as_str(), 0o600),
        ("security.token", SECURITY.token, 0o600),
        ("claims.token", CLAIMS.token, 0o600),
        ("analytics.token", ANALYTICS.token, 0o600),
    ] {
        write_file(&files.path().join(name), text, mode);
    }
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let (admin, security) = (file("admin.token"), file("security.token"));
    let addr = format!("https://{}", setup.app.addr);
    let tls = format!("--ca {ca} --cert {cert} --key {key}");

    let mut vault = connect(&setup, Some(&operator)).await.unwrap();
    let record = vault
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap()
        .into_inner()
        .record_id;

    // Every flag after the subcommand.
    let line = format!("keys status --addr {addr} {tls} --token-file {admin}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok && out.contains("ACTIVE"), "{out}");
    // `keys rotate --addr X`, the flags spread over the line.
    let line = format!(
        "--ca {ca} keys --cert {cert} rotate --addr {addr} --key {key} --token-file {admin} \
         --expect-active 1"
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok && out.contains("KEK version 2 is active"), "{out}");
    let line = format!("purge --limit 5 --addr {addr} {tls} --token-file {admin}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok && out.contains("purged 0 records"), "{out}");

    // `accounts --token-file F ...`, the rest after the record id.
    let line = format!(
        "accounts --token-file {security} suspend {record} --reason other --addr {addr} {tls}"
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok && out.contains("is now"), "{out}");
    // The TLS files and the address from the environment; a bare host:port is https when
    // a CA bundle is given, and the certificate is checked against --tls-server-name.
    let tls_env = [
        ("PDVAULT_ADDR", setup.app.addr.to_string()),
        ("PDVAULT_CA_CERT", ca.clone()),
        ("PDVAULT_CLIENT_CERT", cert.clone()),
        ("PDVAULT_CLIENT_KEY", key.clone()),
    ];
    let tls_env: Vec<(&str, &str)> = tls_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let history = format!("accounts --token-file {security} history {record}");
    let (ok, out) = pdvault(&format!("{history} --tls-server-name localhost"), &tls_env).await;
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .any(|line| line.contains("SUSPENDED") && line.contains("by security")),
        "{out}"
    );
    // The name is verified: a certificate for localhost is not one for another host.
    let line = format!("{history} --tls-server-name vault.example");
    let (ok, out) = pdvault(&line, &tls_env).await;
    assert!(!ok && out.contains("not valid for name"), "{out}");

    // A certificate the vault maps to a caller needs no token: claims is named by it, and
    // refused the grant (not UNAUTHENTICATED, and not the client's own "token required").
    let claims = setup
        .ca
        .issue(&[], Some("spiffe://pdvault.test/claims"), "claims");
    write_file(&files.path().join("claims.pem"), &claims.cert, 0o644);
    write_file(&files.path().join("claims.key"), &claims.key, 0o600);
    let line = format!(
        "accounts history {record} --addr {addr} --ca {ca} --cert {} --key {}",
        file("claims.pem"),
        file("claims.key")
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(!ok && out.contains("PermissionDenied"), "{out}");
    let line = format!("accounts history {record} --addr {addr} --ca {ca}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(!ok && out.contains("a token is required"), "{out}");

    // `bench --addr` opens its connections from the same flags: a short run over mTLS, one
    // seeded record read back, every call accepted.
    let line = format!(
        "bench --addr {addr} --duration 1 --warmup 0 {tls} --seed 1 --mix get --connections 2 \
         --in-flight 2 --json --token-file {}",
        file("claims.token")
    );
    let ran = cli(&line).run().await;
    assert!(ran.ok, "{}", ran.text());
    let report: serde_json::Value = serde_json::from_str(&ran.stdout).expect("a JSON report");
    assert_eq!(report["target"]["kind"], "external", "{report}");
    assert_eq!(report["seed"]["created"], 1, "{report}");
    let get = &report["phases"][0]["rpcs"][0]["vault"];
    assert!(get["requests"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(get["failures"], serde_json::json!({}), "{report}");
    // Without a client certificate the vault refuses the connection, and bench says so
    // rather than reporting a run of failed calls.
    let line = format!(
        "bench --seed 1 --mix get --duration 1 --warmup 0 --addr {addr} --ca {ca} \
         --token-file {}",
        file("claims.token")
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(
        !ok && out.contains("no call reached the vault")
            && out.contains("no client certificate was given (--cert, --key)"),
        "{out}"
    );
    // `export` too: the CSV is written, header first.
    let csv = file("export.csv");
    let line = format!(
        "export --purpose business-analytics --out {csv} --addr {addr} {tls} --token-file {}",
        file("analytics.token")
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok, "{out}");
    let written = std::fs::read_to_string(&csv).unwrap();
    assert!(
        written.starts_with("row_key,name,gender,id_type,id_number,"),
        "{written}"
    );

    // Refusals exit non-zero: no client certificate, where one is required; a CA that did
    // not sign the vault's certificate; a client key others can read; plaintext to TLS.
    let line = format!("keys status --addr {addr} --ca {ca} --token-file {admin}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(
        !ok && out.contains("no client certificate was given (--cert, --key)"),
        "{out}"
    );
    let line = format!(
        "keys status --addr {addr} --ca {} --cert {cert} --key {key} --token-file {admin}",
        file("stranger.pem")
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(!ok && out.contains("UnknownIssuer"), "{out}");
    let line = format!(
        "keys status --addr {addr} --ca {ca} --cert {cert} --key {} --token-file {admin}",
        file("exposed.key")
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(
        !ok && out.contains("--key") && out.contains("chmod 600"),
        "{out}"
    );
    let line = format!(
        "keys status --addr http://{} --token-file {admin}",
        setup.app.addr
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(!ok, "{out}");

    // Of all these, only the one rotation changed a key.
    assert_eq!(
        setup
            .app
            .count("SELECT COUNT(*) FROM audit_events WHERE rpc = 'RotateKeyEncryptionKey'")
            .await,
        1
    );
    setup.app.stop().await;
}

/// The same clients over plain HTTP/2 (a loopback vault without TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_reach_a_plaintext_vault() {
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let security = files.path().join("security.token");
    write_file(&security, SECURITY.token, 0o600);
    let security = security.display().to_string();
    let record = app
        .client()
        .await
        .create_record(authed(CLAIMS.token, create_request()))
        .await
        .unwrap()
        .into_inner()
        .record_id;
    let addr = app.addr;
    let line = format!(
        "accounts suspend {record} --reason legal-order --addr {addr} --token-file {security}"
    );
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok, "{out}");
    let line = format!("accounts --token-file {security} history {record} --addr http://{addr}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("SUSPENDED") && out.contains("LEGAL_ORDER"),
        "{out}"
    );
    // The token from the environment, the address before the subcommand.
    let env = [("PDVAULT_TOKEN", app.admin_token.as_str())];
    let (ok, out) = pdvault(&format!("--addr {addr} keys status"), &env).await;
    assert!(ok && out.contains("ACTIVE"), "{out}");
    // The security team may not administer keys: the token decided, not the flags.
    let line = format!("keys status --addr {addr} --token-file {security}");
    let (ok, out) = pdvault(&line, &[]).await;
    assert!(!ok && out.contains("PermissionDenied"), "{out}");
    app.stop().await;
}
