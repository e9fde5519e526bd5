//! `sovra recover-groups`: the offline half of recovering the meta group, or
//! the node's region's audit log group, after it lost a majority of its
//! voters for good (the lost-quorum runbook in the README). Run on a stopped
//! surviving node, it makes that node's replica of each the group's only
//! voter (a membership entry appended to its log under a new term); started
//! again, the node elects itself, commits what its log holds, and the other
//! nodes are added back as they run. Whatever the lost voters had committed
//! beyond this replica's log is lost. (A region's calls all wait on its audit
//! log: when it lost its quorum with meta, recover both.)

use crate::config::NodeConfig;
use sovra_raft::{AuditConfig, GroupConfig, LogStore, MetaConfig};
use sovra_shard::{CacheBudget, ReplicaStore};
use std::path::Path;

/// Makes the replica in `dir` its group's only voter, naming the group
/// `what`; with `dry_run`, only says how far its log goes.
fn sole_voter<C: GroupConfig>(dir: &Path, me: u64, what: &str, dry_run: bool) -> anyhow::Result<String> {
    let budget = CacheBudget::new(64 << 20, 1);
    let store = ReplicaStore::open(dir, &budget)
        .map_err(|e| anyhow::anyhow!("cannot open {} ({e}); is node {me} still running? stop it first", dir.display()))?;
    let log = LogStore::<C>::of(&store);
    if dry_run {
        let last = log.last_log_id().map_err(|e| anyhow::anyhow!("reading the log failed: {e}"))?;
        return Ok(format!(
            "node {me}'s {what} replica: last log index {}, term {} (the survivor to recover from has the highest; nothing was changed)",
            last.map_or(0, |l| l.index),
            last.map_or(0, |l| l.leader_id.term)
        ));
    }
    let id = log
        .force_sole_voter(me)
        .map_err(|e| anyhow::anyhow!("writing the membership entry failed: {e}"))?;
    Ok(format!(
        "node {me}'s {what} replica is now the group's only voter (membership entry at log index {}, term {})",
        id.index, id.leader_id.term
    ))
}

/// Makes this node's meta replica (with `meta`) and its region's audit log
/// replica (with `audit`) their groups' only voters. The node must be
/// stopped (its databases are locked while it runs). Never for a group that
/// still has a quorum: it would then have two leaders' worth of history.
pub fn recover_groups(cfg: &NodeConfig, meta: bool, audit: bool, dry_run: bool) -> anyhow::Result<String> {
    anyhow::ensure!(meta || audit, "name the group to recover: --meta, --audit or both");
    let mut out = Vec::new();
    if meta {
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
        out.push(sole_voter::<MetaConfig>(&dir, cfg.node_id, "meta", dry_run)?);
    }
    if audit {
        let dir = cfg.data_dir.join("audit");
        anyhow::ensure!(
            dir.exists(),
            "{} does not exist: node {} holds no replica of its region's audit log",
            dir.display(),
            cfg.node_id
        );
        out.push(sole_voter::<AuditConfig>(&dir, cfg.node_id, "audit log", dry_run)?);
    }
    if dry_run {
        return Ok(out.join("\n"));
    }
    out.push(format!(
        "Start node {} again: it elects itself and leads; the other nodes are added back as they run.\n\
         Never start a lost node on its old data: delete its data directory first.",
        cfg.node_id
    ));
    Ok(out.join("\n"))
}
