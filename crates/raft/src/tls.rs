//! TLS on both listeners, with a node identity in every certificate.
//!
//! A cluster CA signs one certificate per node. Its subject alternative names
//! carry the node's identity as DNS names: `node-<id>.sovra` (who it is),
//! `node-<id>.<region>.sovra` (who it is and where), and `cluster.sovra` (some
//! member, for a join seed known only by address), plus the host names and
//! addresses clients dial. The cluster listener requires a client certificate
//! from the CA (mutual TLS), and [`speaker_is`] lets a handler take a message
//! that says it is from node N only over a connection whose certificate names
//! node N. A node dialling a peer expects that peer's name, so a certificate
//! presented by the wrong node fails the handshake in both directions. The
//! public listener presents the same certificate and asks clients for none:
//! they prove themselves with their API key.
//!
//! The files are read again every `reload` interval; a changed, valid set
//! replaces the old for new connections (open ones keep theirs), and a bad one
//! is logged and counted while the old stays in use. Peers' channels are made
//! again when the generation moves ([`TlsState::generation`]).

use crate::types::NodeId;
use parking_lot::RwLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The name every member's certificate carries.
pub const CLUSTER_NAME: &str = "cluster.sovra";
/// The longest a TLS handshake may take before the connection is dropped (a
/// client that opens connections and says nothing holds no task for longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name that says "node `id`".
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.sovra")
}

/// The name that says "node `id`, of `region`".
pub fn node_region_name(id: NodeId, region: &str) -> String {
    format!("node-{id}.{region}.sovra")
}

/// Where a node's certificate, key and CA bundle are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the node's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM: the cluster CA certificate(s) every peer's chain must end in.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no {expected} (PEM)")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {path}: {reason}")]
    Bad { what: &'static str, path: PathBuf, reason: String },
    #[error(
        "tls_cert {path} is not node {id}'s of region {region}: {reason} (it must chain to tls_ca and name node-{id}.sovra and node-{id}.{region}.sovra; `sovra certs node` makes one)"
    )]
    NotMine {
        path: PathBuf,
        id: NodeId,
        region: String,
        reason: String,
    },
}

/// One consistent set of files, as rustls configurations.
struct Loaded {
    raw: (Vec<u8>, Vec<u8>, Vec<u8>),
    public: Arc<rustls::ServerConfig>,
    cluster: Arc<rustls::ServerConfig>,
}

/// A node's TLS material, reloadable.
pub struct TlsState {
    files: TlsFiles,
    me: NodeId,
    region: String,
    current: RwLock<Arc<Loaded>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .field("me", &self.me)
            .field("generation", &self.generation())
            .finish()
    }
}

// rustls 0.23.48 deprecates ring's provider for lacking post-quantum key
// exchange; the aws-lc provider that has it needs cmake and a C build this
// product's machines do not have (STACK.md).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs_of(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            what,
            path: path.to_path_buf(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(certs)
}

/// Whether `cert` (already verified against the CA) names `name`.
pub fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The check a cluster handler makes before it takes a message that says it is
/// from `from`: on a TLS listener the connection's certificate must name that
/// node. Without TLS (`tls = false`, explicitly) `from` is taken as sent.
pub fn speaker_is(certs: Option<&[CertificateDer<'static>]>, from: NodeId, tls: bool) -> Result<(), tonic::Status> {
    if !tls {
        return Ok(());
    }
    let certs = certs.ok_or_else(|| {
        tonic::Status::unauthenticated(
            "the cluster listener takes messages only over mutual TLS, and this connection presented no certificate",
        )
    })?;
    if shows(Some(certs), &node_name(from)) {
        return Ok(());
    }
    Err(tonic::Status::permission_denied(format!(
        "the message says it is from node {from}, but the connection's certificate does not name node {from} ({})",
        node_name(from)
    )))
}

/// Whether the connection's (first, leaf) certificate names `name`.
fn shows(certs: Option<&[CertificateDer<'static>]>, name: &str) -> bool {
    certs.and_then(|c| c.first()).is_some_and(|c| cert_names(c, name))
}

/// Over mutual TLS, refuses unless the connection's certificate names node
/// `id` in `region` (`node-<id>.<region>.sovra`): what a node says about its
/// own region must be what its certificate says.
pub fn speaker_in(certs: Option<&[CertificateDer<'static>]>, id: NodeId, region: &str, tls: bool) -> Result<(), tonic::Status> {
    if !tls {
        return Ok(());
    }
    let name = node_region_name(id, region);
    if shows(certs, &name) {
        return Ok(());
    }
    Err(tonic::Status::permission_denied(format!(
        "node {id} says it is in region {region}, but its certificate does not name {name}: a node's region is the one its certificate was made for"
    )))
}

impl TlsState {
    /// Reads and checks the files: the certificate must chain to the CA and
    /// name this node and its region, and the key must be the certificate's.
    pub fn load(files: TlsFiles, me: NodeId, region: &str) -> Result<Arc<Self>, TlsError> {
        let loaded = Self::build(&files, me, region, None)?.expect("no previous set to compare with");
        Ok(Arc::new(Self {
            files,
            me,
            region: region.to_string(),
            current: RwLock::new(Arc::new(loaded)),
            generation: AtomicU64::new(1),
        }))
    }

    /// Moves by one each time new material is taken.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the files again: `Ok(true)` when they changed and were taken,
    /// `Ok(false)` when unchanged; on error the old material stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let old = self.current.read().clone();
        match Self::build(&self.files, self.me, &self.region, Some(&old.raw))? {
            None => Ok(false),
            Some(l) => {
                *self.current.write() = Arc::new(l);
                self.generation.fetch_add(1, Ordering::AcqRel);
                Ok(true)
            }
        }
    }

    fn build(files: &TlsFiles, me: NodeId, region: &str, old: Option<&(Vec<u8>, Vec<u8>, Vec<u8>)>) -> Result<Option<Loaded>, TlsError> {
        let raw = (
            read("tls_cert", &files.cert)?,
            read("tls_key", &files.key)?,
            read("tls_ca", &files.ca)?,
        );
        if old == Some(&raw) {
            return Ok(None);
        }
        let chain = certs_of("tls_cert", &files.cert, &raw.0)?;
        let key = PrivateKeyDer::from_pem_slice(&raw.1).map_err(|e| TlsError::Bad {
            what: "tls_key",
            path: files.key.clone(),
            reason: format!("no private key: {e}"),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs_of("tls_ca", &files.ca, &raw.2)? {
            roots.add(c).map_err(|e| TlsError::Bad {
                what: "tls_ca",
                path: files.ca.clone(),
                reason: format!("not a CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let not_mine = |reason: String| TlsError::NotMine {
            path: files.cert.clone(),
            id: me,
            region: region.to_string(),
            reason,
        };
        // The node's own certificate must pass the check its peers will make.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| not_mine(e.to_string()))?;
        for name in [node_name(me), node_region_name(me, region)] {
            let server_name = ServerName::try_from(name.clone()).map_err(|e| not_mine(format!("{name} is not a DNS name: {e}")))?;
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], UnixTime::now())
                .map_err(|e| not_mine(format!("checked as {name}: {e}")))?;
        }
        let bad_key = |e: rustls::Error| TlsError::Bad {
            what: "tls_key",
            path: files.key.clone(),
            reason: format!("does not go with tls_cert: {e}"),
        };
        let h2 = vec![b"h2".to_vec()];
        let mut public = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad_key)?;
        public.alpn_protocols = h2.clone();
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Bad {
                what: "tls_ca",
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        let mut cluster = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad_key)?;
        cluster.alpn_protocols = h2.clone();
        Ok(Some(Loaded {
            raw,
            public: Arc::new(public),
            cluster: Arc::new(cluster),
        }))
    }

    /// The client side of a call to the node that `expect` names (a peer's
    /// [`node_name`], or [`CLUSTER_NAME`] for a seed known by address): this
    /// node's certificate, trusting the cluster CA only.
    pub fn client_tls(&self, expect: &str) -> tonic::transport::ClientTlsConfig {
        let l = self.current.read();
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&l.raw.2))
            .identity(tonic::transport::Identity::from_pem(&l.raw.0, &l.raw.1))
            .domain_name(expect)
    }

    /// Reads the files every `every` until `stop`; logs and counts what
    /// changed and what could not be taken.
    pub async fn reload_loop(self: Arc<Self>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let s = self.clone();
            match tokio::task::spawn_blocking(move || s.reload()).await {
                Ok(Ok(true)) => {
                    metrics::counter!("sovra_tls_reloads_total").increment(1);
                    tracing::info!(
                        generation = self.generation(),
                        "TLS certificate, key or CA changed on disk: new connections use them"
                    );
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    metrics::counter!("sovra_tls_reload_failures_total").increment(1);
                    tracing::error!(error = %e, "TLS files changed but cannot be used; the previous ones stay in use");
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }

    /// The TLS connections of a listener, handshaken off the accept loop so
    /// one slow client holds up nobody: `cluster` asks for (and requires) a
    /// client certificate from the CA. Each handshake takes the material
    /// current when the connection arrived.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        cluster: bool,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    // The server stopped taking connections.
                    _ = tx.closed() => return,
                };
                let (tcp, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let config = {
                    let l = me.current.read();
                    if cluster { l.cluster.clone() } else { l.public.clone() }
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                    };
                    metrics::counter!("sovra_tls_handshake_failures_total", "listener" => if cluster { "cluster" } else { "public" })
                        .increment(1);
                    tracing::debug!(error = %why, cluster, "TLS handshake refused");
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
