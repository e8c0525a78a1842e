//! TLS of the gRPC servers (coordinator and worker: `--tls-cert`, `--tls-key`) and of every
//! gRPC client this process opens (`--tls-ca`, a global flag: the CA that signed the servers'
//! certificates). The all-to-all transport between workers is plain TCP inside the cluster
//! network.

use std::path::PathBuf;
use std::sync::OnceLock;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// Why TLS could not be set up (the message names the flag and file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {source}")]
    Read { flag: &'static str, path: String, #[source] source: std::io::Error },
    #[error("TLS server configuration (is --tls-key the key of --tls-cert, both PEM?): {0}")]
    Config(#[source] tonic::transport::Error),
}

static CLIENT_TLS: OnceLock<Option<ClientTlsConfig>> = OnceLock::new();

/// Server certificate and key (PEM); both or neither.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServerTls {
    /// PEM certificate (chain) of this gRPC server; with --tls-key, the server speaks TLS only.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ServerTls {
    /// A server builder, with TLS when a certificate is configured.
    pub fn server(&self) -> Result<Server, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(Server::builder()) };
        let c = read("--tls-cert", cert)?;
        let k = read("--tls-key", key)?;
        Server::builder().tls_config(ServerTlsConfig::new().identity(Identity::from_pem(c, k))).map_err(TlsError::Config)
    }
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.display().to_string(), source })
}

/// Sets the client TLS of this process: `Some(ca)` verifies servers against that CA (PEM).
pub fn init_client(ca: Option<&std::path::Path>) -> Result<(), TlsError> {
    let cfg = match ca {
        None => None,
        Some(p) => {
            let pem = read("--tls-ca", p)?;
            Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        }
    };
    let _ = CLIENT_TLS.set(cfg);
    Ok(())
}

/// Whether this process's gRPC clients speak TLS.
pub fn client_enabled() -> bool {
    client_tls().is_some()
}

fn client_tls() -> Option<&'static ClientTlsConfig> {
    CLIENT_TLS.get().and_then(Option::as_ref)
}

/// `host:port` or a URL → the URL to dial (https when client TLS is on).
pub fn url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        return addr.to_string();
    }
    if client_tls().is_some() { format!("https://{addr}") } else { format!("http://{addr}") }
}

/// An endpoint for `addr`, with the process's client TLS applied.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let e = Endpoint::from_shared(url(addr))?;
    match client_tls() {
        Some(t) => e.tls_config(t.clone()),
        None => Ok(e),
    }
}
