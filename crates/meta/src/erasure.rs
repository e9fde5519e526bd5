//! Erasure jobs as the meta group tracks them: an opaque id, what kind of
//! erase, on which shards, each shard's log index and count, and for every
//! replica whether its purge (store, index, snapshots, log, database files)
//! has reached that index. Nothing here names what was erased: the criteria
//! (ids, subject, filter) stay in the region's own shard logs (R2).
//!
//! A job's replicas are the shard's replicas when the job started. Each one
//! ends purged (it reported a purge through the erase's index), or removed
//! (its replica was moved off the node or its collection dropped, which
//! destroys the replica's directory). A replica that is down stays pending,
//! visibly, until it is back and purges or is replaced. When every replica
//! of every shard has ended, the job is done; the receipt is built from the
//! final record (`Receipt`) and signed by the node that serves it.

use crate::placement::ShardKey;
use serde::{Deserialize, Serialize};
use sovra_types::{CollectionName, RegionId};
use std::collections::BTreeMap;

/// Jobs kept once done or failed; the oldest go first past this.
pub const KEPT_FINISHED_JOBS: usize = 1_000;
/// Jobs that may be unfinished at once: a start past it is refused.
pub const MAX_OPEN_JOBS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EraseKind {
    Ids,
    Subject,
    Filter,
    Region,
    /// An opt-out's registration: the points within a likeness.
    Likeness,
}

impl EraseKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EraseKind::Ids => "ids",
            EraseKind::Subject => "subject",
            EraseKind::Filter => "filter",
            EraseKind::Likeness => "likeness",
            EraseKind::Region => "region",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaPurge {
    /// Not purged through the erase yet (or not reported).
    Pending,
    /// Purged through log index `through` at `at_ms` (the replica's clock);
    /// `removed`: points its own apply of the erase removed (`None` when it
    /// reached the erase by installing a snapshot past it).
    Purged { through: u64, at_ms: u64, removed: Option<u64> },
    /// The replica left the shard (moved off the node, or the collection
    /// was dropped): its directory is destroyed with it.
    Removed,
    /// The erase removed no point on this shard: nothing to purge.
    NothingErased,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobShard {
    /// Log index of the shard's erase entry, once known (from the
    /// acknowledgement, or from a replica that applied it).
    pub index: Option<u64>,
    /// Points the erase removed on the shard, by its leader's count.
    pub erased: Option<u64>,
    pub replicas: BTreeMap<u64, ReplicaPurge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Started; its erase entries are being committed.
    Requested,
    /// Committed on every shard and acknowledged; replicas purging.
    Acknowledged,
    /// Every replica purged or removed: the receipt can be served.
    Done,
    /// Not acknowledged: the erase did not commit on every shard (the
    /// shards that did commit it still purge it).
    Failed { why: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureJob {
    pub id: String,
    pub kind: EraseKind,
    pub collection: CollectionName,
    pub region: RegionId,
    pub requested_at_ms: u64,
    pub acknowledged_at_ms: Option<u64>,
    pub done_at_ms: Option<u64>,
    pub state: JobState,
    /// By shard number (all of `region`).
    pub shards: BTreeMap<u32, JobShard>,
    /// Meta's apply order, for pruning the oldest finished jobs.
    pub seq: u64,
}

impl ReplicaPurge {
    /// Its name in job status and receipts.
    pub fn outcome(&self) -> &'static str {
        match self {
            ReplicaPurge::Pending => "pending",
            ReplicaPurge::Purged { .. } => "purged",
            ReplicaPurge::Removed => "removed",
            ReplicaPurge::NothingErased => "nothing-erased",
        }
    }

    pub fn purged_through(&self) -> Option<u64> {
        match self {
            ReplicaPurge::Purged { through, .. } => Some(*through),
            _ => None,
        }
    }
}

impl ErasureJob {
    pub fn finished(&self) -> bool {
        matches!(self.state, JobState::Done | JobState::Failed { .. })
    }

    /// Replicas still pending, as (shard number, node).
    pub fn pending(&self) -> Vec<(u32, u64)> {
        self.shards
            .iter()
            .flat_map(|(n, s)| {
                s.replicas
                    .iter()
                    .filter(|(_, p)| matches!(p, ReplicaPurge::Pending))
                    .map(move |(node, _)| (*n, *node))
            })
            .collect()
    }

    /// Marks the job done once acknowledged and every replica has ended;
    /// done at the latest replica's time.
    fn settle(&mut self) {
        if self.state != JobState::Acknowledged || !self.pending().is_empty() {
            return;
        }
        if self.shards.values().any(|s| s.index.is_none()) {
            return;
        }
        let last = self
            .shards
            .values()
            .flat_map(|s| s.replicas.values())
            .map(|p| match p {
                ReplicaPurge::Purged { at_ms, .. } => *at_ms,
                ReplicaPurge::Removed | ReplicaPurge::NothingErased | ReplicaPurge::Pending => 0,
            })
            .max()
            .unwrap_or(0);
        self.done_at_ms = Some(last.max(self.acknowledged_at_ms.unwrap_or(0)));
        self.state = JobState::Done;
    }

    /// A replica of shard `number` reported a purge through `through`;
    /// `applied`: the index and count of this job's erase as it applied it.
    fn purged(&mut self, number: u32, node: u64, through: u64, at_ms: u64, applied: Option<(u64, u64)>) {
        let Some(s) = self.shards.get_mut(&number) else { return };
        if s.index.is_none() {
            s.index = applied.map(|(i, _)| i);
        }
        let Some(index) = s.index else { return };
        if let Some(p @ ReplicaPurge::Pending) = s.replicas.get_mut(&node) {
            if applied.is_some_and(|(_, n)| n == 0) {
                *p = ReplicaPurge::NothingErased;
            } else if through >= index {
                *p = ReplicaPurge::Purged {
                    through,
                    at_ms,
                    removed: applied.map(|(_, n)| n),
                };
            }
        }
        self.settle();
    }

    fn removed(&mut self, number: Option<u32>, keep: &[u64]) {
        for (n, s) in &mut self.shards {
            if number.is_some_and(|x| x != *n) {
                continue;
            }
            for (node, p) in &mut s.replicas {
                if *p == ReplicaPurge::Pending && !keep.contains(node) {
                    *p = ReplicaPurge::Removed;
                }
            }
        }
        self.settle();
    }
}

/// What a replica reports after a purge: the shard, itself, how far, and
/// for each job it applied since its last report, the erase's index and the
/// points it removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    pub collection: CollectionName,
    pub shard: ShardKey,
    pub node: u64,
    pub through: u64,
    pub at_ms: u64,
    pub applied: Vec<(String, u64, u64)>,
}

/// All of it, in the meta state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasures {
    pub jobs: BTreeMap<String, ErasureJob>,
    /// Every replica's latest purge report: (collection, shard, node) ->
    /// index purged through. A job started or acknowledged after a replica
    /// purged past it is settled from these, and a replica waits for the
    /// replicas before it in its shard by them (one rewrite at a time).
    pub purged: BTreeMap<(CollectionName, ShardKey, u64), u64>,
    next_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum JobRefused {
    #[error("erasure job {0} already exists")]
    Exists(String),
    #[error("erasure job {0} does not exist")]
    Unknown(String),
    #[error("{0} erasure jobs are unfinished (at most {MAX_OPEN_JOBS}); wait for some to finish")]
    TooMany(usize),
    #[error("erasure job {0} names no shard")]
    NoShards(String),
}

impl Erasures {
    pub fn start(&mut self, mut job: ErasureJob) -> Result<(), JobRefused> {
        if self.jobs.contains_key(&job.id) {
            return Err(JobRefused::Exists(job.id));
        }
        if job.shards.is_empty() {
            return Err(JobRefused::NoShards(job.id));
        }
        let open = self.jobs.values().filter(|j| !j.finished()).count();
        if open >= MAX_OPEN_JOBS {
            return Err(JobRefused::TooMany(open));
        }
        job.state = JobState::Requested;
        job.seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.insert(job.id.clone(), job);
        Ok(())
    }

    /// The erase committed on every shard (`failed` none) with these
    /// indexes and counts, or did not (the job fails, with why).
    pub fn committed(&mut self, id: &str, at_ms: u64, shards: &[(u32, u64, u64)], failed: Option<String>) -> Result<(), JobRefused> {
        let job = self.jobs.get_mut(id).ok_or_else(|| JobRefused::Unknown(id.to_string()))?;
        for (n, index, erased) in shards {
            if let Some(s) = job.shards.get_mut(n) {
                s.index = Some(*index);
                s.erased = Some(*erased);
                if *erased == 0 {
                    for p in s.replicas.values_mut().filter(|p| **p == ReplicaPurge::Pending) {
                        *p = ReplicaPurge::NothingErased;
                    }
                }
            }
        }
        if job.state == JobState::Requested {
            job.state = match failed {
                Some(why) => JobState::Failed { why },
                None => {
                    job.acknowledged_at_ms = Some(at_ms);
                    JobState::Acknowledged
                }
            };
        }
        // Replicas that reported a purge past the erase before this.
        let marked: Vec<(u32, u64, u64)> = job
            .pending()
            .into_iter()
            .filter_map(|(n, node)| {
                let key = (job.collection.clone(), (job.region.clone(), n), node);
                self.purged.get(&key).map(|&through| (n, node, through))
            })
            .collect();
        for (n, node, through) in marked {
            job.purged(n, node, through, at_ms, None);
        }
        job.settle();
        self.prune();
        Ok(())
    }

    pub fn report(&mut self, r: PurgeReport) {
        let key = (r.collection.clone(), r.shard.clone(), r.node);
        let mark = self.purged.entry(key).or_insert(0);
        *mark = (*mark).max(r.through);
        let applied: BTreeMap<&str, (u64, u64)> = r.applied.iter().map(|(j, i, n)| (j.as_str(), (*i, *n))).collect();
        for job in self.jobs.values_mut() {
            if job.finished() || job.collection != r.collection || job.region != r.shard.0 {
                continue;
            }
            job.purged(r.shard.1, r.node, r.through, r.at_ms, applied.get(job.id.as_str()).copied());
        }
        self.prune();
    }

    /// An unfinished job on `shard`, if any.
    pub fn unfinished_on(&self, c: &CollectionName, shard: &ShardKey) -> Option<&str> {
        self.jobs
            .values()
            .find(|j| !j.finished() && &j.collection == c && j.region == shard.0 && j.shards.contains_key(&shard.1))
            .map(|j| j.id.as_str())
    }

    /// A replica joins `shard` (a move's target): every unfinished job on
    /// the shard waits for it to purge too, since it may catch up from a
    /// snapshot or log entries that still hold the erased points.
    pub fn replica_added(&mut self, c: &CollectionName, shard: &ShardKey, node: u64) {
        for job in self.jobs.values_mut() {
            if job.finished() || &job.collection != c || job.region != shard.0 {
                continue;
            }
            if let Some(s) = job.shards.get_mut(&shard.1) {
                s.replicas.entry(node).or_insert(ReplicaPurge::Pending);
            }
        }
    }

    /// A shard's replica set changed: pending replicas no longer in it end
    /// as removed; their marks go.
    pub fn replicas_set(&mut self, c: &CollectionName, shard: &ShardKey, keep: &[u64]) {
        for job in self.jobs.values_mut() {
            if !job.finished() && &job.collection == c && job.region == shard.0 {
                job.removed(Some(shard.1), keep);
            }
        }
        self.purged.retain(|(cc, s, n), _| !(cc == c && s == shard && !keep.contains(n)));
        self.prune();
    }

    pub fn collection_dropped(&mut self, c: &CollectionName) {
        for job in self.jobs.values_mut() {
            if !job.finished() && &job.collection == c {
                job.removed(None, &[]);
            }
        }
        self.purged.retain(|(cc, _, _), _| cc != c);
        self.prune();
    }

    /// The replicas of `shard` that go before `node`'s rewrite and are
    /// behind `index`: a replica rewrites its files only when none is (or
    /// they are down), so a shard loses at most one replica at a time. The
    /// order is by id with the group's leader (as `node` knows it) last:
    /// taking the leader out costs the shard an election, so it happens once,
    /// after the followers are back.
    pub fn behind_before(
        &self,
        c: &CollectionName,
        shard: &ShardKey,
        replicas: &[u64],
        node: u64,
        leader: Option<u64>,
        index: u64,
    ) -> Vec<u64> {
        replicas
            .iter()
            .filter(|&&n| n != node)
            .filter(|&&n| leader == Some(node) || (n < node && Some(n) != leader))
            .filter(|&&n| self.purged.get(&(c.clone(), shard.clone(), n)).is_none_or(|&t| t < index))
            .copied()
            .collect()
    }

    fn prune(&mut self) {
        let mut finished: Vec<(u64, String)> = self.jobs.values().filter(|j| j.finished()).map(|j| (j.seq, j.id.clone())).collect();
        if finished.len() <= KEPT_FINISHED_JOBS {
            return;
        }
        finished.sort_unstable();
        let excess = finished.len() - KEPT_FINISHED_JOBS;
        for (_, id) in finished.into_iter().take(excess) {
            self.jobs.remove(&id);
        }
    }
}

/// What a done job's receipt says: every field is in the meta record; none
/// is erased data. Serialised as JSON in this field order, it is the exact
/// byte string the cluster key signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub format: String,
    pub job: String,
    pub kind: String,
    pub collection: String,
    pub region: String,
    pub requested_at_ms: u64,
    pub acknowledged_at_ms: u64,
    pub done_at_ms: u64,
    pub erased: u64,
    pub shards: Vec<ReceiptShard>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptShard {
    pub shard: u32,
    pub log_index: u64,
    pub erased: u64,
    pub replicas: Vec<ReceiptReplica>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptReplica {
    pub node: u64,
    /// `purged`, `removed` (the replica left the shard; its directory was
    /// destroyed) or `nothing-erased` (no point of the shard matched).
    pub outcome: String,
    pub purged_through: Option<u64>,
    /// Points this replica's apply removed (`None`: it reached the erase by
    /// a snapshot install, or left the shard).
    pub removed: Option<u64>,
    /// When it purged (its clock); `None` for a replica removed.
    pub at_ms: Option<u64>,
}

pub const RECEIPT_FORMAT: &str = "sovra.erasure-receipt.v1";

impl Receipt {
    /// The receipt of `job`, once it is done.
    pub fn of(job: &ErasureJob) -> Option<Receipt> {
        if job.state != JobState::Done {
            return None;
        }
        let shards: Vec<ReceiptShard> = job
            .shards
            .iter()
            .map(|(n, s)| ReceiptShard {
                shard: *n,
                log_index: s.index.unwrap_or(0),
                erased: s.erased.unwrap_or(0),
                replicas: s
                    .replicas
                    .iter()
                    .map(|(node, p)| {
                        let (removed, at_ms) = match *p {
                            ReplicaPurge::Purged { at_ms, removed, .. } => (removed, Some(at_ms)),
                            ReplicaPurge::NothingErased => (Some(0), None),
                            // Pending is not in a done job.
                            ReplicaPurge::Removed | ReplicaPurge::Pending => (None, None),
                        };
                        ReceiptReplica {
                            node: *node,
                            outcome: p.outcome().into(),
                            purged_through: p.purged_through(),
                            removed,
                            at_ms,
                        }
                    })
                    .collect(),
            })
            .collect();
        Some(Receipt {
            format: RECEIPT_FORMAT.into(),
            job: job.id.clone(),
            kind: job.kind.as_str().into(),
            collection: job.collection.to_string(),
            region: job.region.to_string(),
            requested_at_ms: job.requested_at_ms,
            acknowledged_at_ms: job.acknowledged_at_ms.unwrap_or(0),
            done_at_ms: job.done_at_ms.unwrap_or(0),
            erased: shards.iter().map(|s| s.erased).sum(),
            shards,
        })
    }
}
