//! Metric names and units of the node, and the Prometheus `/metrics` endpoint.
//! Labels never carry personal data: only collection, region and shard numbers.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const REQUESTS: &str = "sovra_requests_total";
pub const REQUEST_SECONDS: &str = "sovra_request_seconds";
pub const SEARCH_PATH: &str = "sovra_search_path_total";
pub const SHARD_LIVE_POINTS: &str = "sovra_shard_live_points";
pub const SHARD_TOMBSTONES: &str = "sovra_shard_tombstones";
pub const SHARD_APPLIED_INDEX: &str = "sovra_shard_applied_index";
pub const SHARD_INDEX_BYTES: &str = "sovra_shard_index_bytes";
pub const COMPACTIONS: &str = "sovra_compactions_total";
pub const EXPIRED_ERASED: &str = "sovra_retention_erased_total";
pub const ERASURE_PURGES: &str = "sovra_erasure_purges_total";
pub const COMPACTION_PAUSE_SECONDS: &str = "sovra_compaction_pause_seconds";
/// Replicas on this node that failed to open (the node serves the others).
pub const SHARDS_FAILED: &str = "sovra_shards_failed";
/// Catalog entries that could not be read at start.
pub const COLLECTIONS_UNREADABLE: &str = "sovra_collections_unreadable_total";
/// Log entries a shard refused on apply, as recorded in its state.
pub const SHARD_REJECTED_ENTRIES: &str = "sovra_shard_rejected_entries";

/// The meta index this node's view of the cluster reflects.
pub const META_VIEW_INDEX: &str = "sovra_meta_view_index";
/// Nodes of the cluster by status, as this node's view has them.
pub const CLUSTER_NODES: &str = "sovra_cluster_nodes";
/// 1 on the meta group's leader.
pub const META_IS_LEADER: &str = "sovra_meta_is_leader";
/// Replica databases open on this node, and the budget's shares (max_replicas).
pub const REPLICAS_OPEN: &str = "sovra_replicas_open";
pub const REPLICA_SHARES: &str = "sovra_replica_shares";
/// Public calls refused by key checks, by node and reason (unauthenticated,
/// lease, collection, read_region, write_region, admin).
pub const AUTH_DENIED: &str = "sovra_auth_denied_total";
/// Public calls refused because their key was over its rate, by node and key id.
pub const KEY_RATE_LIMITED: &str = "sovra_key_rate_limited_total";
/// Milliseconds since this node last confirmed its view with meta's quorum.
pub const KEY_LEASE_AGE_MS: &str = "sovra_key_lease_age_ms";
/// Calls failed because their audit record could not be committed.
pub const AUDIT_FAILED: &str = "sovra_audit_failed_total";
/// Records per committed audit batch.
pub const AUDIT_BATCH: &str = "sovra_audit_batch_records";

/// The process-wide recorder: `metrics` has one global recorder, so several
/// nodes in one process (tests, `sovra dev`) share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours
            // simply renders nothing, which tests would notice.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!(REQUESTS, "gRPC requests by method and status code");
            metrics::describe_histogram!(REQUEST_SECONDS, metrics::Unit::Seconds, "gRPC request latency by method");
            metrics::describe_counter!(SEARCH_PATH, "shard searches by path: graph, exact_filtered, exact_fallback");
            metrics::describe_gauge!(SHARD_LIVE_POINTS, "live points per shard");
            metrics::describe_gauge!(SHARD_TOMBSTONES, "index tombstones per shard awaiting compaction");
            metrics::describe_gauge!(SHARD_APPLIED_INDEX, "last applied log index per shard");
            metrics::describe_gauge!(SHARD_INDEX_BYTES, metrics::Unit::Bytes, "estimated index memory per shard");
            metrics::describe_counter!(COMPACTIONS, "index compactions");
            metrics::describe_histogram!(COMPACTION_PAUSE_SECONDS, metrics::Unit::Seconds, "writer pause at compaction swap");
            metrics::describe_gauge!(SHARDS_FAILED, "replicas on this node that failed to open");
            metrics::describe_counter!(COLLECTIONS_UNREADABLE, "catalog entries that could not be read at start");
            metrics::describe_gauge!(META_VIEW_INDEX, "meta index this node's view of the cluster reflects");
            metrics::describe_gauge!(
                CLUSTER_NODES,
                "nodes of the cluster by status (joining, up, draining, down) in this node's view"
            );
            metrics::describe_gauge!(META_IS_LEADER, "1 on the meta group's leader");
            metrics::describe_gauge!(
                REPLICAS_OPEN,
                "replica databases open on this node (its meta and audit replicas included)"
            );
            metrics::describe_gauge!(
                REPLICA_SHARES,
                "replica databases the page-cache budget is shared among (max_replicas)"
            );
            metrics::describe_counter!(AUDIT_FAILED, "calls failed closed: their audit record was not committed");
            metrics::describe_histogram!(AUDIT_BATCH, "audit records per group-committed batch");
            metrics::describe_counter!(AUTH_DENIED, "public calls refused by API key checks, by node and reason");
            metrics::describe_counter!(
                KEY_RATE_LIMITED,
                "public calls refused RESOURCE_EXHAUSTED because their API key was over its rate, by node and key"
            );
            metrics::describe_gauge!(
                KEY_LEASE_AGE_MS,
                "ms since this node last confirmed its metadata (and keys) with the meta group's quorum"
            );
            metrics::describe_counter!(
                sovra_coord::leaf::LEAF_REQUESTS,
                "leaf requests (a coordinator's per-shard read) this node's replicas answered, by region and rpc"
            );
            metrics::describe_counter!(
                sovra_coord::leaf::LEAF_REFUSED_POLICY,
                "leaf requests refused because the shard region's policy keeps its results in it (R3)"
            );
            metrics::describe_counter!(
                sovra_raft::metrics::RESIDENCY_REFUSED,
                "cluster messages for another region's shard refused (R2), by rpc"
            );
            metrics::describe_counter!("sovra_coordinator_hedges_total", "second replicas asked because the first was slow");
            metrics::describe_gauge!(
                SHARD_REJECTED_ENTRIES,
                "log entries refused on apply, recorded in the shard's state"
            );
            handle
        })
        .clone()
}
