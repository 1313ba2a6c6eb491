//! TLS and mutual TLS: callers named by their client certificates, with a CA and
//! certificates generated per test run.

mod support;

use pdvault::config::Config;
use pdvault::policy::CallerConfig;
use pdvault::proto::vault_client::VaultClient;
use pdvault::proto::{CreateRecordRequest, GetRecordRequest, Identity};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use support::fixtures::reason;
use support::{ANALYTICS, Backend, CLAIMS, TestApp, authed};
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
    CreateRecordRequest {
        identity: Some(Identity {
            name: "陈七".into(),
            ..Identity::default()
        }),
        request_id: String::new(),
        ..Default::default()
    }
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
