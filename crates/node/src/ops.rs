//! Executing operations jobs (`sovra_meta::ops`): on the node that leads a
//! shard's Raft group, a running move adds its target as a learner, waits
//! until it has caught up, then replaces the source by the target in one
//! joint-consensus change and records the move done in meta (which moves the
//! shard map; the source then destroys its copy). With no job running, a
//! shard group's members follow the replicas meta records (so a cancelled
//! move is undone). Every step is idempotent and re-derived from meta and
//! the group's own membership each pass, so a job resumes after any restart
//! or leader change.

use crate::state::NodeState;
use sovra_meta::MetaCommand;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// A learner this far behind the leader's log is not promoted yet.
const CATCH_UP_SLACK: u64 = 64;

pub async fn ops_loop(state: Arc<NodeState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if crate::cluster::stopped(&mut stop, Duration::from_millis(300)).await {
            return;
        }
        if state.is_ready() {
            pass(&state).await;
            crate::split::pass(&state).await;
        }
    }
}

/// Records what a running job's last step did (shared with `crate::split`).
pub(crate) async fn progress(state: &NodeState, job: &str, text: String) {
    // Unchanged progress is not written again on every pass.
    if state.view().state.ops.jobs.get(job).is_some_and(|j| j.progress == text) {
        return;
    }
    let _ = crate::cluster::meta_write(
        state,
        MetaCommand::OpProgress {
            job: job.to_string(),
            progress: text,
            at_ms: crate::cluster::now_ms(),
        },
    )
    .await;
}

async fn pass(state: &Arc<NodeState>) {
    let me = state.config.node_id;
    let view = state.view();
    for g in state.host.groups() {
        if g.leader() != Some(me) {
            continue;
        }
        let key = (g.id.region.clone(), g.id.number);
        let Some(rec) = view.state.collections.get(&g.id.collection).and_then(|c| c.shards.get(&key)) else {
            continue;
        };
        let job = view
            .state
            .ops
            .running_on(&g.id.collection, &key)
            .map(|(j, m)| (j.id.clone(), m.clone()));
        let mut want: BTreeSet<u64> = rec.replicas.iter().copied().collect();
        if let Some((_, m)) = &job {
            want.remove(&m.from);
            want.insert(m.to);
        }
        let raft = g.raft();
        let (voters, all, last, matched) = {
            let m = raft.metrics();
            let m = m.borrow();
            let mm = m.membership_config.membership();
            let voters: BTreeSet<u64> = mm.voter_ids().collect();
            let all: BTreeSet<u64> = mm.nodes().map(|(n, _)| *n).collect();
            let matched = |n: u64| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&n).cloned().flatten())
                    .map_or(0, |l| l.index)
            };
            let matched: Vec<(u64, u64)> = want.iter().map(|&n| (n, matched(n))).collect();
            (voters, all, m.last_log_index.unwrap_or(0), matched)
        };
        if voters == want && all == want {
            if let Some((id, m)) = &job {
                let done = MetaCommand::MoveDone {
                    job: id.clone(),
                    at_ms: crate::cluster::now_ms(),
                };
                match crate::cluster::meta_write(state, done).await {
                    Ok(_) => tracing::info!(job = %id, shard = %g.id, from = m.from, to = m.to, "replica move done"),
                    Err(e) => tracing::warn!(job = %id, error = %e.message, "recording the move done failed; will retry"),
                }
            }
            continue;
        }
        let Some((id, j)) = job else {
            // No job: the group follows the shard map (a cancelled move, or
            // one cut off between its membership change and its record).
            // Only on a view confirmed just now: a leader whose view predates
            // a move another leader carried out must not undo it.
            state.refresh_view().await;
            let fresh = state.view();
            let confirmed = fresh
                .state
                .collections
                .get(&g.id.collection)
                .and_then(|c| c.shards.get(&key))
                .map(|r| r.replicas.iter().copied().collect::<BTreeSet<u64>>());
            if confirmed.as_ref() != Some(&want) || fresh.state.ops.running_on(&g.id.collection, &key).is_some() {
                continue;
            }
            if let Err(e) = state.host.set_members_in(&g, want, BTreeSet::new()).await {
                tracing::warn!(shard = %g.id, error = %e.message, "bringing the group's members back to the shard map failed; will retry");
            }
            continue;
        };
        if !all.contains(&j.to) {
            progress(state, &id, format!("adding node {} as a learner", j.to)).await;
            if let Err(e) = state.host.add_learner_in(&g, j.to).await {
                progress(state, &id, format!("{}; retrying", e.message)).await;
            }
            continue;
        }
        let behind = matched.iter().find(|(n, m)| *n == j.to && last.saturating_sub(*m) > CATCH_UP_SLACK);
        if let Some((_, m)) = behind {
            progress(state, &id, format!("node {} catching up: log index {m} of {last}", j.to)).await;
            continue;
        }
        progress(state, &id, format!("replacing node {} by node {}", j.from, j.to)).await;
        match state.host.replace_voters_in(&g, want.clone()).await {
            Ok(()) => tracing::info!(job = %id, shard = %g.id, "membership changed; recording the move"),
            Err(e) => progress(state, &id, format!("{}; retrying", e.message)).await,
        }
    }
}
