//! Operations jobs, recorded in meta so they survive a meta leader change or a
//! restart of any node, are listed with their progress, and can be cancelled.
//! A job names only ids (collection, shard, nodes, region): no personal data.
//! At most one move touches a shard at a time.
//!
//! - A **move** of shard S from node A to node B (same region, R1 checked by
//!   the state): `StartMove` records it; B opens an empty replica of S; S's
//!   Raft leader adds B as a learner, waits for it to catch up, then replaces
//!   A by B in one joint-consensus change; `MoveDone` then makes B a replica
//!   of S in the shard map (a new map version) and A destroys its copy.
//!   Cancelled before the membership change, S is as before; after it, S's
//!   group follows the shard map back.
//! - A **drain** of node N marks N draining and runs moves (children of the
//!   drain job) that take every replica off N, planned again on the current
//!   state each step ([`crate::rebalance::plan_drain`]), at most `concurrency`
//!   at a time; once N holds nothing it is marked drained.
//! - A **rebalance** of region R fixes its plan when it starts
//!   ([`crate::rebalance::plan_rebalance`], what `--dry-run` shows) and runs
//!   it in order, at most `concurrency` moves at a time, skipping a move the
//!   cluster has since made pointless or impossible.
//!
//! Drains and rebalances advance only through [`MetaState::advance_ops`], a
//! pure function of the committed state applied as `MetaCommand::AdvanceOps`:
//! the meta leader proposes it when advancing would change something, so
//! every replica derives the same children with the same ids, and a new
//! leader resumes where the old one stopped.
//!
//! - A **split** of shard S halves its hash range between two new shards
//!   (new numbers, never reused) on S's nodes: `StartSplit` records them in
//!   the job only (not routed); every replica node opens them as founders of
//!   new groups; S's leader copies S's points, suppression list and opt-out
//!   registry into them (through their logs), fences S (`Freeze` in S's log:
//!   S takes no more writes), copies what changed since, then `SplitDone`
//!   replaces S by its halves in the shard map in one step (a new map
//!   version; the collection's spec carries the region's new map) and S is
//!   destroyed everywhere. Writes refused by the fence are sent again by
//!   their node once it sees the new map. Cancelled before `SplitDone`, the
//!   halves are destroyed and S's fence lifted: the map is as before.
//!
//! Erasures and splits: a split does not start while an erasure job is
//! unfinished on its shard, and an erasure job started on a shard being
//! split cancels the split (the erasure goes first; split again after).
//!
//! Erasures and moves: a move's target joins every unfinished erasure job on
//! its shard (and a job started during a move includes it), so no purge is
//! lost to a move: the receipt waits for the new replica to purge too.

use crate::placement::{Candidate, ShardKey};
use crate::rebalance::{ShardRef, plan_drain};
use crate::state::{MetaState, NodeStatus};
use serde::{Deserialize, Serialize};
use sovra_types::{CollectionName, RegionId};
use std::collections::{BTreeMap, BTreeSet};

/// Finished jobs kept for listing.
pub const KEPT_FINISHED_OPS: usize = 200;
/// Moves a drain or rebalance runs at once unless told otherwise, and the most.
pub const DEFAULT_CONCURRENCY: u32 = 2;
pub const MAX_CONCURRENCY: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    /// Recorded; being carried out.
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

/// One replica of `shard` of `collection` moves from node `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveSpec {
    pub collection: CollectionName,
    pub shard: ShardKey,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainJob {
    pub node: u64,
    pub region: RegionId,
    pub concurrency: u32,
    /// Children started so far (the next child's id suffix).
    pub started: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceJob {
    pub region: RegionId,
    pub concurrency: u32,
    /// The plan fixed when the job started.
    pub plan: Vec<MoveSpec>,
    /// Moves of the plan started or skipped (the next one to look at).
    pub next: u32,
    /// Moves skipped because the cluster changed meanwhile, with why.
    pub skipped: Vec<(u32, String)>,
}

/// Shard `shard` of `collection` splits into `low` (the lower half of its
/// hash range) and `high`, on `replicas` (the shard's nodes as it started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitJob {
    pub collection: CollectionName,
    pub shard: ShardKey,
    pub low: u32,
    pub high: u32,
    pub replicas: Vec<u64>,
}

impl SplitJob {
    /// The two new shards' keys.
    pub fn halves(&self) -> [ShardKey; 2] {
        [(self.shard.0.clone(), self.low), (self.shard.0.clone(), self.high)]
    }

    /// Whether it touches `shard` of `c` (the parent or a half).
    pub fn touches(&self, c: &CollectionName, shard: &ShardKey) -> bool {
        &self.collection == c && (&self.shard == shard || self.halves().contains(shard))
    }
}

/// Shard `shard` of `collection`, whose group lost its quorum for good, is
/// rebuilt from node `survivor`'s replica as new shard `number` (same hash
/// range) on `replicas` (the survivor and other up nodes of its region).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverJob {
    pub collection: CollectionName,
    pub shard: ShardKey,
    pub survivor: u64,
    pub number: u32,
    pub replicas: Vec<u64>,
    /// Go on even when an erasure committed on the shard after the last
    /// entry the survivor applied (its points come back: erase again).
    pub accept_lost_erasures: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Move(MoveSpec),
    Drain(DrainJob),
    Rebalance(RebalanceJob),
    Split(SplitJob),
    Recover(RecoverJob),
}

impl JobKind {
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Move(_) => "move",
            JobKind::Drain(_) => "drain",
            JobKind::Rebalance(_) => "rebalance",
            JobKind::Split(_) => "split",
            JobKind::Recover(_) => "recover",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    /// The drain or rebalance this move is part of.
    pub parent: Option<String>,
    pub state: OpState,
    /// What the last step did or is waiting for (shown as is).
    pub progress: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Order of creation, for listing and for pruning the oldest finished first.
    pub seq: u64,
}

impl Job {
    /// A running job, just started.
    pub fn started(id: String, kind: JobKind, parent: Option<String>, progress: String, at_ms: u64) -> Self {
        Self {
            id,
            kind,
            parent,
            state: OpState::Running,
            progress,
            created_ms: at_ms,
            updated_ms: at_ms,
            seq: 0,
        }
    }

    pub fn as_move(&self) -> Option<&MoveSpec> {
        match &self.kind {
            JobKind::Move(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_recover(&self) -> Option<&RecoverJob> {
        match &self.kind {
            JobKind::Recover(r) => Some(r),
            _ => None,
        }
    }

    pub fn as_split(&self) -> Option<&SplitJob> {
        match &self.kind {
            JobKind::Split(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    pub jobs: BTreeMap<String, Job>,
    /// Nodes a drain emptied: they stay drained (no new replicas) across
    /// restarts and missed heartbeats.
    pub drained: BTreeSet<u64>,
    next_seq: u64,
    /// The next shard number a split hands out, per collection and region:
    /// numbers are never reused (a cancelled split's halves may linger on a
    /// node that has not seen the cancel yet).
    pub next_shard: BTreeMap<(CollectionName, RegionId), u32>,
}

impl Ops {
    /// The running move on `shard` of `c`, if any.
    pub fn running_on(&self, c: &CollectionName, shard: &ShardKey) -> Option<(&Job, &MoveSpec)> {
        self.running()
            .filter_map(|j| j.as_move().map(|m| (j, m)))
            .find(|(_, m)| &m.collection == c && &m.shard == shard)
    }

    /// The running split touching `shard` of `c` (as its parent or a half).
    pub fn split_on(&self, c: &CollectionName, shard: &ShardKey) -> Option<(&Job, &SplitJob)> {
        self.running()
            .filter_map(|j| j.as_split().map(|s| (j, s)))
            .find(|(_, s)| s.touches(c, shard))
    }

    /// The running recovery of `shard` of `c` (the lost shard or its new one).
    pub fn recover_on(&self, c: &CollectionName, shard: &ShardKey) -> Option<(&Job, &RecoverJob)> {
        self.running()
            .filter_map(|j| j.as_recover().map(|r| (j, r)))
            .find(|(_, r)| &r.collection == c && (&r.shard == shard || (r.shard.0.clone(), r.number) == *shard))
    }

    /// Running recoveries.
    pub fn recoveries(&self) -> impl Iterator<Item = (&Job, &RecoverJob)> {
        self.running().filter_map(|j| j.as_recover().map(|r| (j, r)))
    }

    /// Running splits.
    pub fn splits(&self) -> impl Iterator<Item = (&Job, &SplitJob)> {
        self.running().filter_map(|j| j.as_split().map(|s| (j, s)))
    }

    pub fn running(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(|j| j.state == OpState::Running)
    }

    /// The running drain of `node`, if any.
    pub fn draining(&self, node: u64) -> Option<&Job> {
        self.running().find(|j| matches!(&j.kind, JobKind::Drain(d) if d.node == node))
    }

    pub fn children<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs.values().filter(move |j| j.parent.as_deref() == Some(parent))
    }

    /// Refuses a job id already taken (finished jobs included).
    pub(crate) fn fresh(&self, id: &str) -> Result<(), crate::state::Refused> {
        if self.jobs.contains_key(id) {
            return Err(crate::state::Refused::Op(format!("job {id} exists")));
        }
        Ok(())
    }

    pub(crate) fn insert(&mut self, mut j: Job) {
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
        // A finished child goes with its parent, never before: a running
        // drain or rebalance counts its finished moves.
        let running_parents: BTreeSet<String> = self.running().map(|j| j.id.clone()).collect();
        let mut old: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.finished() && j.parent.as_ref().is_none_or(|p| !running_parents.contains(p)))
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        old.sort();
        for (_, id) in old.into_iter().take(finished - KEPT_FINISHED_OPS) {
            self.jobs.remove(&id);
        }
    }

    pub(crate) fn finish(&mut self, id: &str, state: OpState, progress: Option<String>, at_ms: u64) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.state = state;
            j.updated_ms = at_ms;
            if let Some(p) = progress {
                j.progress = p;
            }
        }
        self.prune();
    }
}

impl MetaState {
    /// Every up data node with the replicas it holds: where a new
    /// collection's replicas may go ([`crate::place_collection`]).
    pub fn placement_candidates(&self) -> Vec<Candidate> {
        let mut load: BTreeMap<u64, usize> = BTreeMap::new();
        for c in self.collections.values() {
            for r in c.shards.values() {
                for n in &r.replicas {
                    *load.entry(*n).or_default() += 1;
                }
            }
        }
        self.nodes
            .values()
            .filter(|n| n.roles.data && n.status == NodeStatus::Up)
            .map(|n| Candidate {
                id: n.id,
                region: n.region.clone(),
                zone: n.zone.clone(),
                load: load.get(&n.id).copied().unwrap_or(0),
            })
            .collect()
    }

    /// The placement candidates of `region`: where moves may go.
    pub fn move_candidates(&self, region: &RegionId) -> Vec<Candidate> {
        let mut c = self.placement_candidates();
        c.retain(|n| &n.region == region);
        c
    }

    /// Every shard of `region` (all collections) and the nodes holding it.
    pub fn region_shards(&self, region: &RegionId) -> BTreeMap<ShardRef, BTreeSet<u64>> {
        let mut out = BTreeMap::new();
        for (name, c) in &self.collections {
            for ((r, n), rec) in &c.shards {
                if r == region {
                    out.insert((name.clone(), *n), rec.replicas.iter().copied().collect());
                }
            }
        }
        out
    }

    /// The moves that even out `region` now ([`crate::rebalance::plan_rebalance`]).
    pub fn rebalance_plan(&self, region: &RegionId) -> Vec<MoveSpec> {
        crate::rebalance::plan_rebalance(region, &self.move_candidates(region), &self.region_shards(region))
            .into_iter()
            .map(|m| MoveSpec {
                collection: m.shard.0,
                shard: (region.clone(), m.shard.1),
                from: m.from,
                to: m.to,
            })
            .collect()
    }

    /// Advances every running drain and rebalance by what the state allows
    /// now: ends those whose work is done or whose move was cancelled or
    /// failed, and starts child moves up to each job's concurrency. Returns
    /// whether anything changed. Pure and deterministic: the meta leader runs
    /// it on a copy of its state to see whether to propose `AdvanceOps`, and
    /// every replica applies the same.
    pub fn advance_ops(&mut self, at_ms: u64) -> bool {
        let before = self.ops.clone();
        let parents: Vec<String> = self
            .ops
            .running()
            .filter(|j| matches!(j.kind, JobKind::Drain(_) | JobKind::Rebalance(_)))
            .map(|j| j.id.clone())
            .collect();
        for id in parents {
            self.advance_one(&id, at_ms);
        }
        // Every change advancing makes (node states, erasure jobs' replicas)
        // goes with a change to a job.
        self.ops != before
    }

    fn set_progress(&mut self, id: &str, text: String, at_ms: u64) {
        if let Some(j) = self.ops.jobs.get_mut(id)
            && j.progress != text
        {
            j.progress = text;
            j.updated_ms = at_ms;
        }
    }

    fn advance_one(&mut self, id: &str, at_ms: u64) {
        let Some(job) = self.ops.jobs.get(id).cloned() else { return };
        let children: Vec<Job> = self.ops.children(id).cloned().collect();
        if let Some(bad) = children.iter().find(|c| matches!(c.state, OpState::Cancelled | OpState::Failed(_))) {
            let why = match &bad.state {
                OpState::Failed(w) => format!("move {} failed: {w}", bad.id),
                _ => format!("move {} was cancelled", bad.id),
            };
            self.end_op(id, Some(why), at_ms);
            return;
        }
        let running = children.iter().filter(|c| c.state == OpState::Running).count() as u32;
        let done = children.iter().filter(|c| c.state == OpState::Done).count();
        match job.kind {
            JobKind::Drain(mut d) => {
                let shards = self.region_shards(&d.region);
                let holding = shards.values().filter(|h| h.contains(&d.node)).count();
                if holding == 0 && running == 0 {
                    if let Some(n) = self.nodes.get_mut(&d.node) {
                        n.status = NodeStatus::Drained;
                    }
                    self.ops.drained.insert(d.node);
                    let text = format!("node {} holds no replica: drained ({done} moves)", d.node);
                    self.ops.finish(id, OpState::Done, Some(text), at_ms);
                    return;
                }
                let mut running = running;
                let mut waiting = None;
                if running < d.concurrency {
                    match plan_drain(&d.region, d.node, &self.move_candidates(&d.region), &shards) {
                        Err(e) => waiting = Some(format!("; waiting: {e}")),
                        Ok(moves) => {
                            for m in moves {
                                if running >= d.concurrency {
                                    break;
                                }
                                let key = (d.region.clone(), m.shard.1);
                                if self.ops.running_on(&m.shard.0, &key).is_some() {
                                    continue;
                                }
                                let spec = MoveSpec {
                                    collection: m.shard.0.clone(),
                                    shard: key,
                                    from: m.from,
                                    to: m.to,
                                };
                                let child = format!("{id}.{}", d.started);
                                if self.start_move(child, Some(id.to_string()), spec, at_ms).is_ok() {
                                    d.started += 1;
                                    running += 1;
                                }
                            }
                        }
                    }
                }
                let text = format!(
                    "{done} moved off node {}, {running} moving, {} left{}",
                    d.node,
                    holding.saturating_sub(running as usize),
                    waiting.unwrap_or_default()
                );
                if let Some(j) = self.ops.jobs.get_mut(id) {
                    j.kind = JobKind::Drain(d);
                }
                self.set_progress(id, text, at_ms);
            }
            JobKind::Rebalance(mut r) => {
                let mut running = running;
                while running < r.concurrency && (r.next as usize) < r.plan.len() {
                    let m = r.plan[r.next as usize].clone();
                    // In order: a shard moved twice waits for its first move.
                    if self.ops.running_on(&m.collection, &m.shard).is_some() {
                        break;
                    }
                    let n = r.next;
                    r.next += 1;
                    // A move the cluster has since made pointless or
                    // impossible is refused by start_move, which says why.
                    let child = format!("{id}.{n}");
                    match self.start_move(child, Some(id.to_string()), m, at_ms) {
                        Ok(()) => running += 1,
                        Err(e) => r.skipped.push((n, e.to_string())),
                    }
                }
                let total = r.plan.len();
                let finished = r.next as usize >= total && running == 0;
                let text = format!("{done} of {total} moves done, {running} running, {} skipped", r.skipped.len());
                if let Some(j) = self.ops.jobs.get_mut(id) {
                    j.kind = JobKind::Rebalance(r);
                }
                if finished {
                    self.ops.finish(id, OpState::Done, Some(text), at_ms);
                } else {
                    self.set_progress(id, text, at_ms);
                }
            }
            JobKind::Move(_) | JobKind::Split(_) | JobKind::Recover(_) => {}
        }
    }
}
