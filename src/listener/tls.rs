//! Builds the rustls server configuration of a `tls` / `wss` listener from PEM files.
//!
//! Always uses the ring provider explicitly (never the process default, never
//! aws-lc). Every error names the file it concerns.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::{ListenerConfig, ListenerError};

/// The rustls configuration for `cfg` (which must have `cert_file` and `key_file`).
pub(super) fn server_config(cfg: &ListenerConfig) -> Result<Arc<ServerConfig>, ListenerError> {
    let missing = |key: &'static str| ListenerError::MissingSetting { listener: cfg.name.clone(), key };
    let cert_file = cfg.cert_file.as_deref().ok_or_else(|| missing("cert_file"))?;
    let key_file = cfg.key_file.as_deref().ok_or_else(|| missing("key_file"))?;
    let chain = load_certs(cert_file)?;
    let key = load_key(key_file)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| ListenerError::Tls { listener: cfg.name.clone(), source })?;

    let builder = match &cfg.client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca_file)? {
                roots.add(cert).map_err(|source| ListenerError::BadCertificate {
                    path: ca_file.clone(),
                    reason: source.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if cfg.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|source| ListenerError::BadCertificate {
                path: ca_file.clone(),
                reason: source.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None if cfg.require_client_cert => return Err(missing("client_ca_file")),
        None => builder.with_no_client_auth(),
    };

    let config = builder.with_single_cert(chain, key).map_err(|source| ListenerError::BadCertificate {
        path: cert_file.to_path_buf(),
        reason: format!("certificate and key {} do not form a usable pair: {source}", key_file.display()),
    })?;
    Ok(Arc::new(config))
}

fn open(path: &Path) -> Result<BufReader<File>, ListenerError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| ListenerError::ReadFile { path: path.to_path_buf(), source })
}

/// Every certificate of a PEM file; a file without any is an error.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ListenerError> {
    let mut reader = open(path)?;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ListenerError::ReadFile { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(ListenerError::BadCertificate {
            path: path.to_path_buf(),
            reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of a PEM file.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ListenerError> {
    let mut reader = open(path)?;
    match rustls_pemfile::private_key(&mut reader) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(ListenerError::BadCertificate {
            path: path.to_path_buf(),
            reason: "no PEM private key (PKCS#8, RSA or EC) found".into(),
        }),
        Err(source) => Err(ListenerError::ReadFile { path: path.to_path_buf(), source }),
    }
}
