//! Operations jobs: replica moves recorded in meta, so they survive a meta
//! leader change or a restart of any node, are listed with their state, and
//! can be cancelled. A job names only ids (collection, shard, nodes): no
//! personal data. At most one job touches a shard at a time.
//!
//! A move of shard S from node A to node B (same region, R1 checked here):
//! `StartMove` records it; B opens an empty replica of S; S's Raft leader adds
//! B as a learner, waits for it to catch up, then replaces A by B in one
//! joint-consensus change; `MoveDone` then makes B a replica of S in the
//! shard map (a new map version) and A destroys its copy. Cancelled before the
//! membership change, S is as before; after it, the move is done.

use serde::{Deserialize, Serialize};
use sovra_types::CollectionName;

use crate::placement::ShardKey;

/// Finished jobs kept for listing.
pub const KEPT_FINISHED_OPS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    /// Recorded; the shard's leader is adding the target and moving.
    Running,
    Done,
    Cancelled,
    Failed(String),
}

impl OpState {
    pub fn as_str(&self) -> &str {
        match self {
            OpState::Running => "running",
            OpState::Done => "done",
            OpState::Cancelled => "cancelled",
            OpState::Failed(_) => "failed",
        }
    }

    pub fn finished(&self) -> bool {
        !matches!(self, OpState::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveJob {
    pub id: String,
    pub collection: CollectionName,
    pub shard: ShardKey,
    pub from: u64,
    pub to: u64,
    pub state: OpState,
    /// What the last step did or is waiting for (progress, shown as is).
    pub progress: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Order of creation, for pruning the oldest finished first.
    pub seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    pub jobs: std::collections::BTreeMap<String, MoveJob>,
    next_seq: u64,
}

impl Ops {
    /// The running job on `shard` of `c`, if any.
    pub fn running_on(&self, c: &CollectionName, shard: &ShardKey) -> Option<&MoveJob> {
        self.jobs
            .values()
            .find(|j| j.state == OpState::Running && &j.collection == c && &j.shard == shard)
    }

    pub fn running(&self) -> impl Iterator<Item = &MoveJob> {
        self.jobs.values().filter(|j| j.state == OpState::Running)
    }

    pub(crate) fn insert(&mut self, mut j: MoveJob) {
        j.seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.insert(j.id.clone(), j);
        self.prune();
    }

    fn prune(&mut self) {
        let finished = self.jobs.values().filter(|j| j.state.finished()).count();
        if finished <= KEPT_FINISHED_OPS {
            return;
        }
        let mut old: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.finished())
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        old.sort();
        for (_, id) in old.into_iter().take(finished - KEPT_FINISHED_OPS) {
            self.jobs.remove(&id);
        }
    }

    pub(crate) fn finish(&mut self, id: &str, state: OpState, at_ms: u64) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.state = state;
            j.updated_ms = at_ms;
        }
        self.prune();
    }
}
