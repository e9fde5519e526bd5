//! Metric names of the replication layer. Labels name the group
//! (collection, region, shard): never a point, subject or vector.

use sovra_types::ShardId;

pub const APPLY_SECONDS: &str = "sovra_raft_apply_seconds";
pub const SNAPSHOT_PAUSE_SECONDS: &str = "sovra_raft_snapshot_pause_seconds";
pub const TERM: &str = "sovra_raft_term";
pub const LEADER: &str = "sovra_raft_leader";
pub const IS_LEADER: &str = "sovra_raft_is_leader";
pub const COMMIT_INDEX: &str = "sovra_raft_commit_index";
pub const APPLIED_INDEX: &str = "sovra_raft_applied_index";
pub const LAST_LOG_INDEX: &str = "sovra_raft_last_log_index";
pub const SNAPSHOTS_BUILT: &str = "sovra_raft_snapshots_built";
pub const SNAPSHOTS_INSTALLED: &str = "sovra_raft_snapshots_installed";
pub const SNAPSHOTS_REFUSED: &str = "sovra_raft_snapshots_refused";
pub const PURGES: &str = "sovra_raft_log_purges";
pub const WATCHDOG_RESTARTS: &str = "sovra_raft_watchdog_restarts_total";
pub const FORWARDED_WRITES: &str = "sovra_raft_forwarded_writes_total";
pub const RPC_SECONDS: &str = "sovra_raft_rpc_seconds";
/// Committed entries refused on apply (recorded as rejections, nothing changed).
pub const ENTRIES_REJECTED: &str = "sovra_raft_entries_rejected_total";
/// Cluster messages naming a shard of another region, refused (R2), by node and RPC.
pub const RESIDENCY_REFUSED: &str = "sovra_residency_refused_total";
/// Group messages refused: not from a member of the group's membership.
pub const NOT_MEMBER: &str = "sovra_raft_refused_not_member_total";
/// Replicas stopped from standing for election: a leader's append found
/// them candidates in a later term (see `Replica::hold_elections`).
pub const ELECTIONS_HELD: &str = "sovra_raft_elections_held_total";

pub fn group_labels(id: &ShardId) -> [(&'static str, String); 3] {
    [
        ("collection", id.collection.to_string()),
        ("region", id.region.to_string()),
        ("shard", id.number.to_string()),
    ]
}
