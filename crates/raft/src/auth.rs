//! Who may speak the node-to-node API: only members of the cluster, proven by
//! the shared cluster secret in every request's metadata. The server refuses a
//! request without it, or with another, as UNAUTHENTICATED before any handler
//! runs, so a refused request changes nothing. The same metadata carries the
//! node-to-node protocol version ([`PROTOCOL_VERSION`]); a request of another
//! version is refused FAILED_PRECONDITION naming both, so builds that cannot
//! understand each other never exchange messages during a rolling upgrade.
//!
//! With TLS on ([`crate::tls`]) the secret travels inside mutual TLS, and the
//! certificate, not the secret, proves which member is speaking. With
//! `tls = false` it travels in the clear and `from` is taken on trust from any
//! holder of the secret: keep that listener on a private network.

use std::sync::Arc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// The metadata key that carries the secret.
pub const SECRET_HEADER: &str = "x-sovra-cluster-secret";
/// The metadata key that carries the sender's protocol version.
pub const PROTOCOL_HEADER: &str = "x-sovra-protocol";
/// The node-to-node protocol this build speaks: the envelope (sovra.raft.v1)
/// and the postcard payloads in it. Bumped when either changes incompatibly
/// (2: group kinds, and forwarded writes answer the group's response whole;
/// 3: the Leaf service, confirmed metadata fetches, API key scopes).
pub const PROTOCOL_VERSION: u32 = 3;

/// A shorter secret is refused at start: it could be guessed.
pub const MIN_SECRET_BYTES: usize = 16;

/// The cluster's shared secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the cluster secret is {0} bytes: use at least {MIN_SECRET_BYTES}")]
    TooShort(usize),
    #[error("the cluster secret must be printable ASCII without spaces (it travels as gRPC metadata)")]
    NotAscii,
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort(secret.len()));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::NotAscii);
        }
        Ok(Self(secret.into()))
    }

    /// A random secret, for a node that is a cluster of one: nobody else can
    /// speak to its cluster listener.
    pub fn random() -> Self {
        let hex: String = (0..4).map(|_| format!("{:016x}", rand::random::<u64>())).collect();
        Self(hex.into())
    }

    /// The secret's bytes, to derive keys from (never to send or log).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Constant-time comparison, so the time a refusal takes says nothing
    /// about how much of a guess was right.
    fn matches(&self, offered: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != offered.len() {
            return false;
        }
        mine.iter().zip(offered).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Server side: refuses requests that do not carry the secret.
#[derive(Clone, Debug)]
pub struct RequireSecret(pub ClusterSecret);

impl tonic::service::Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(SECRET_HEADER) {
            None => Err(Status::unauthenticated(format!(
                "the cluster API is for members of the cluster only: {SECRET_HEADER} is missing"
            ))),
            Some(v) if self.0.matches(v.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the cluster secret does not match this cluster's: the request was refused",
            )),
        }?;
        match req.metadata().get(PROTOCOL_HEADER).map(|v| v.to_str().map(str::parse::<u32>)) {
            Some(Ok(Ok(PROTOCOL_VERSION))) => Ok(req),
            Some(Ok(Ok(v))) => Err(Status::failed_precondition(format!(
                "the sender speaks node-to-node protocol version {v}; this node speaks {PROTOCOL_VERSION}: run builds that share a version"
            ))),
            _ => Err(Status::failed_precondition(format!(
                "{PROTOCOL_HEADER} is missing or unreadable (a build older than protocol versioning?); this node speaks {PROTOCOL_VERSION}"
            ))),
        }
    }
}

/// Client side: attaches the secret to every request.
#[derive(Clone, Debug)]
pub struct AttachSecret(pub ClusterSecret);

impl tonic::service::Interceptor for AttachSecret {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let v = MetadataValue::try_from(&*self.0.0).map_err(|_| Status::internal("cluster secret is not valid metadata"))?;
        req.metadata_mut().insert(SECRET_HEADER, v);
        req.metadata_mut().insert(PROTOCOL_HEADER, MetadataValue::from(PROTOCOL_VERSION));
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn only_the_same_secret_passes() {
        let s = ClusterSecret::new("0123456789abcdef").unwrap();
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new("with a space in it!").is_err());
        let mut attach = AttachSecret(s.clone());
        let mut require = RequireSecret(s);
        let req = attach.call(Request::new(())).unwrap();
        assert!(require.call(req).is_ok());
        assert_eq!(require.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let other = AttachSecret(ClusterSecret::new("0123456789abcdeF").unwrap())
            .call(Request::new(()))
            .unwrap();
        assert_eq!(require.call(other).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(!format!("{:?}", require).contains("0123"));

        // The right secret, another protocol version: refused, naming both.
        let s = ClusterSecret::new("0123456789abcdef").unwrap();
        let mut req = AttachSecret(s.clone()).call(Request::new(())).unwrap();
        req.metadata_mut()
            .insert(PROTOCOL_HEADER, MetadataValue::from(PROTOCOL_VERSION + 1));
        let st = require.call(req).unwrap_err();
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(
            st.message().contains(&format!("version {}", PROTOCOL_VERSION + 1)),
            "{}",
            st.message()
        );
        let mut req = AttachSecret(s).call(Request::new(())).unwrap();
        req.metadata_mut().remove(PROTOCOL_HEADER);
        assert_eq!(require.call(req).unwrap_err().code(), tonic::Code::FailedPrecondition);
    }
}
