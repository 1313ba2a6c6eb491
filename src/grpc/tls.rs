//! Transport security: the server's TLS (rustls through tonic), optional client-certificate
//! authentication, and what a verified client certificate says about its holder.
//!
//! Plaintext gRPC is allowed only on loopback unless the operator says `allow_insecure`,
//! because identity data and bearer tokens cross this connection. Certificate *verification*
//! is rustls's (chain to `client_ca_path`); this module only reads the names out of the leaf
//! the handshake already verified, for the policy to map to a caller.
//!
//! In `grpc/` rather than `app/` because authentication (`grpc/mod.rs`) reads the client
//! certificate's identity here, and the gRPC layer never imports `app`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::TlsConfig;
use crate::policy::CertificateIdentity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "refusing plaintext gRPC on non-loopback address {0}: set tls.cert_path and \
         tls.key_path, or tls.allow_insecure = true behind a trusted proxy"
    )]
    InsecureListen(SocketAddr),
    #[error("{0}: set tls.cert_path and tls.key_path together")]
    Incomplete(&'static str),
    #[error("tls.client_ca_path needs tls.cert_path and tls.key_path")]
    ClientCaWithoutTls,
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Refuses a plaintext listener anywhere but loopback, unless explicitly allowed.
pub fn check_listen(listen: SocketAddr, tls: &TlsConfig) -> Result<(), TlsError> {
    if tls.cert_path.is_none() && !tls.allow_insecure && !listen.ip().is_loopback() {
        return Err(TlsError::InsecureListen(listen));
    }
    Ok(())
}

/// The tonic TLS configuration `tls` describes, or `None` for plaintext.
pub fn server_tls_config(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (cert, key) = match (&tls.cert_path, &tls.key_path) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) if tls.client_ca_path.is_some() => return Err(TlsError::ClientCaWithoutTls),
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(TlsError::Incomplete("tls.key_path is missing")),
        (None, Some(_)) => return Err(TlsError::Incomplete("tls.cert_path is missing")),
    };
    // The key is read into memory once; tonic hands it to rustls, which owns it from there.
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_path {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(tls.client_auth_optional);
    }
    Ok(Some(config))
}

/// The URI SANs and subject CN of a DER certificate the handshake verified. `None` when it
/// cannot be parsed, which rustls would already have refused.
pub fn certificate_identity(der: &[u8]) -> Option<CertificateIdentity> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let uris = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let common_name = certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Some(CertificateIdentity { uris, common_name })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_on_loopback_unless_allowed() {
        let plain = TlsConfig::default();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:50051".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(check_listen(loopback, &plain).is_ok());
        assert!(check_listen(loopback6, &plain).is_ok());
        let err = check_listen(public, &plain).unwrap_err();
        assert!(err.to_string().contains("tls.allow_insecure"), "{err}");
        let allowed = TlsConfig {
            allow_insecure: true,
            ..TlsConfig::default()
        };
        assert!(check_listen(public, &allowed).is_ok());
        let with_tls = TlsConfig {
            cert_path: Some("cert.pem".into()),
            key_path: Some("key.pem".into()),
            ..TlsConfig::default()
        };
        assert!(check_listen(public, &with_tls).is_ok());
    }

    #[test]
    fn half_configured_tls_is_refused() {
        let only_cert = TlsConfig {
            cert_path: Some("cert.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(
            server_tls_config(&only_cert),
            Err(TlsError::Incomplete(_))
        ));
        let only_ca = TlsConfig {
            client_ca_path: Some("ca.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(
            server_tls_config(&only_ca),
            Err(TlsError::ClientCaWithoutTls)
        ));
    }
}
