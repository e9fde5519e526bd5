//! `sovra recover-meta`: the offline half of recovering the meta group, and
//! the node's region's audit log group, after they lost a majority of their
//! voters for good (the lost-quorum runbook in the README). Run on a stopped
//! surviving node, it makes that node's replica of each the group's only
//! voter (a membership entry appended to its log under a new term); started
//! again, the node elects itself, commits what its log holds, and the other
//! nodes are added back as they run. Whatever the lost voters had committed
//! beyond this replica's log is lost. (A region's calls all wait on its audit
//! log, so it is recovered with meta when this node holds a replica of it.)

use crate::config::NodeConfig;
use sovra_raft::{AuditConfig, GroupConfig, LogStore, MetaConfig};
use sovra_shard::{CacheBudget, ReplicaStore};
use std::path::Path;

/// Makes the replica in `dir` its group's only voter, naming the group `what`.
fn sole_voter<C: GroupConfig>(dir: &Path, me: u64, what: &str) -> anyhow::Result<String> {
    let budget = CacheBudget::new(64 << 20, 1);
    let store = ReplicaStore::open(dir, &budget)
        .map_err(|e| anyhow::anyhow!("cannot open {} ({e}); is node {me} still running? stop it first", dir.display()))?;
    let id = LogStore::<C>::of(&store)
        .force_sole_voter(me)
        .map_err(|e| anyhow::anyhow!("writing the membership entry failed: {e}"))?;
    Ok(format!(
        "node {me}'s {what} replica is now the group's only voter (membership entry at log index {}, term {})",
        id.index, id.leader_id.term
    ))
}

/// Makes the meta replica under `cfg`'s data directory its group's only
/// voter. The node must be stopped (its database is locked while it runs).
pub fn recover_meta(cfg: &NodeConfig) -> anyhow::Result<String> {
    anyhow::ensure!(
        cfg.has_role("meta"),
        "node {} does not have the meta role: it holds no meta replica to recover from",
        cfg.node_id
    );
    let dir = cfg.data_dir.join("meta");
    anyhow::ensure!(
        dir.exists(),
        "{} does not exist: node {} never held a meta replica",
        dir.display(),
        cfg.node_id
    );
    let mut out = vec![sole_voter::<MetaConfig>(&dir, cfg.node_id, "meta")?];
    let audit = cfg.data_dir.join("audit");
    if audit.exists() {
        out.push(sole_voter::<AuditConfig>(&audit, cfg.node_id, "audit log")?);
    }
    out.push(format!(
        "Start node {} again: it elects itself and leads; the other nodes are added back as they run.\n\
         Never start a lost node on its old data: delete its data directory first.",
        cfg.node_id
    ));
    Ok(out.join("\n"))
}
