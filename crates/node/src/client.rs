//! How the `sovra` tools (`ctl`, `health`, `dev`) reach a node's public port:
//! over TLS trusting the cluster CA when given one (`--ca`, `SOVRA_CA`),
//! plaintext otherwise (a node with `tls = false`).

use anyhow::Context;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// An endpoint for `addr` (host:port, or a URI): `https` checking the node's
/// certificate against the CA in `ca` when given, else `http`.
pub fn endpoint(addr: &str, ca: Option<&Path>) -> anyhow::Result<Endpoint> {
    let host = sovra_raft::network::host_of(addr);
    match ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
            Endpoint::from_shared(format!("https://{host}"))
                .with_context(|| format!("{addr} is not an address"))?
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .context("setting up TLS")
        }
        None => {
            anyhow::ensure!(
                !addr.starts_with("https://"),
                "{addr} is https: pass the cluster CA certificate with --ca (or SOVRA_CA)"
            );
            Endpoint::from_shared(format!("http://{host}")).with_context(|| format!("{addr} is not an address"))
        }
    }
}

/// A connected channel to `addr`, failing after `within`.
pub async fn connect(addr: &str, ca: Option<&Path>, within: Duration) -> anyhow::Result<Channel> {
    let e = endpoint(addr, ca)?.connect_timeout(within);
    match tokio::time::timeout(within, e.connect()).await {
        Err(_) => anyhow::bail!("{addr}: no connection within {within:?}"),
        Ok(Err(err)) => {
            // tonic's Display stops at "transport error"; the cause (refused,
            // certificate not trusted, wrong name) is further down the chain.
            let mut why = err.to_string();
            let mut src = std::error::Error::source(&err);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            anyhow::bail!("connecting to {addr}: {why}")
        }
        Ok(Ok(c)) => Ok(c),
    }
}
