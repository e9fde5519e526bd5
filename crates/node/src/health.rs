//! `sovra health`: asks a node's public port for its gRPC health (the
//! standard `grpc.health.v1` service) and exits 0 only when it answers
//! SERVING. A container's health check and a Kubernetes exec probe use it:
//! a scratch image has no other probe binary.

use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The node's public gRPC address.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub addr: String,
    /// One service's health (e.g. `sovra.v1.Search`); empty: the node's.
    #[arg(long, default_value = "")]
    pub service: String,
    /// The cluster CA certificate (PEM), for a node serving TLS.
    #[arg(long, env = "SOVRA_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Give up after this long (connect and answer).
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// What the probe saw, as its exit code says: 0 SERVING, 1 anything else.
pub async fn check(args: &HealthArgs) -> Result<(), String> {
    let within = Duration::from_millis(args.timeout_ms);
    let uri = &args.addr;
    let channel = crate::client::connect(uri, args.ca.as_deref(), within)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| format!("{uri}: health check failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    match ServingStatus::try_from(answer.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("{uri}: {}", other.as_str_name())),
        Err(_) => Err(format!("{uri}: unknown status {}", answer.status)),
    }
}
