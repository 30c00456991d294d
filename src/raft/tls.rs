//! Mutual TLS between cluster nodes (rustls, ring provider explicitly, never
//! the process default and never aws-lc). Every node presents a certificate
//! signed by the cluster CA and accepts only peers that do: the server
//! requires a client certificate verified against the CA
//! (`WebPkiClientVerifier`), the client verifies the server against the CA.
//! A node certificate therefore needs both the serverAuth and clientAuth
//! extended key usages, and a subject alternative name matching the host of
//! its `cluster_addr` (or `server_name` when set).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// `[cluster.tls]`: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: the only issuer whose node certificates are accepted.
    pub ca_file: PathBuf,
    /// This node's certificate chain (leaf first).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Name checked in every peer's certificate; default: the host part of
    /// the peer's `cluster_addr`.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// Both sides of the cluster's TLS, built once at start-up.
#[derive(Clone)]
pub struct ClusterTls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl ClusterTls {
    pub fn load(cfg: &TlsConfig) -> Result<ClusterTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in load_certs(&cfg.ca_file)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Bad { path: cfg.ca_file.clone(), reason: e.to_string() })?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs(&cfg.cert_file)?;
        let key = load_key(&cfg.key_file)?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Bad { path: cfg.ca_file.clone(), reason: e.to_string() })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        let server_name = match &cfg.server_name {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?),
            None => None,
        };
        Ok(ClusterTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// The name to verify in the certificate of the peer at `addr` (`host:port`).
    pub(crate) fn name_for(&self, addr: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
    }
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path).map(BufReader::new).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Bad { path: path.to_path_buf(), reason: "no PEM certificate found".into() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    match rustls_pemfile::private_key(&mut open(path)?) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => {
            Err(TlsError::Bad { path: path.to_path_buf(), reason: "no PEM private key found".into() })
        }
        Err(source) => Err(TlsError::Read { path: path.to_path_buf(), source }),
    }
}
