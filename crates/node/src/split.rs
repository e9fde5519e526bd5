//! Carrying out a shard split (`sovra_meta::ops`, a `Split` job) on the node
//! that leads the parent shard's Raft group, and the rebuild of a shard that
//! lost its quorum (a `Recover` job, [`recover`]) on its surviving replica's
//! node. A split:
//!
//! 1. waits until both halves (new groups founded by the parent's nodes,
//!    opened by every node's reconcile) have a leader;
//! 2. copies the parent's points, suppression list and opt-out registry into
//!    the halves through their logs, while the parent keeps taking writes;
//! 3. fences the parent (`Freeze` in its log: it refuses writes from then on,
//!    and its writers wait for the new map);
//! 4. copies again, now from the fenced (final) state, what differs: each
//!    half is first sealed, so a copy read before the fence by a driver that
//!    lost the leadership meanwhile can no longer land after the final one;
//! 5. retires the parent (`Retire`: it answers no reads; readers with the
//!    old map wait for the new one), then records `SplitDone` in meta, which
//!    switches the map to the halves in one version; the parent's replicas
//!    are then destroyed by every node's reconcile.
//!
//! Every step reads its position from the parent's own state (fenced or
//! not), so a new leader, after any restart, carries on; copies are
//! idempotent (they set points to the parent's values). A split that ends
//! otherwise (cancelled, or cancelled by an erasure of its shard) leaves a
//! fenced parent: its leader then lifts the fence ([`unfence`]).

use crate::ops::progress;
use crate::state::NodeState;
use sovra_meta::MetaCommand;
use sovra_meta::ops::SplitJob;
use sovra_raft::ReadLevel;
use sovra_shard::ShardEngine;
use sovra_types::{ApiError, CopyBatch, HashRange, PointRecord, ShardCommand, ShardId, point_hash};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// A copy batch's bound: well under the 1 MiB a Raft message carries, so a
/// lagging half replica catches up through its log.
const COPY_BYTES: usize = 512 * 1024;
const COPY_POINTS: usize = 500;
/// How long a driver waits for something outside it (a leader, a replica to
/// catch up) before it gives the step up and the next pass tries again.
const STEP_WAIT: Duration = Duration::from_secs(30);

/// Starts a driver for every running split whose parent this node leads
/// (one per job), and lifts the fence of a parent whose split ended
/// without switching the map.
pub async fn pass(state: &Arc<NodeState>) {
    let me = state.config.node_id;
    let view = state.view();
    for (job, split) in view.state.ops.splits() {
        let parent = parent_id(split);
        let Some(g) = state.host.group(&parent) else { continue };
        if g.leader() != Some(me) {
            continue;
        }
        if !state.split_drivers.lock().insert(job.id.clone()) {
            continue;
        }
        let (state, id, split) = (state.clone(), job.id.clone(), split.clone());
        tokio::spawn(async move {
            match drive(&state, &id, &split).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(job = %id, error = %e.message, "split step failed; will retry");
                    progress(&state, &id, format!("{}; retrying", e.message)).await;
                }
            }
            state.split_drivers.lock().remove(&id);
        });
    }
    for g in state.host.groups() {
        if g.leader() != Some(me) {
            continue;
        }
        if let Some(job) = g.engine().split_fence() {
            unfence(state, &g.id, &job).await;
        }
    }
    for (job, r) in view.state.ops.recoveries() {
        if r.survivor != me || !state.split_drivers.lock().insert(job.id.clone()) {
            continue;
        }
        let (state, id, r) = (state.clone(), job.id.clone(), r.clone());
        tokio::spawn(async move {
            if let Err(e) = recover(&state, &id, &r).await {
                tracing::warn!(job = %id, error = %e.message, "rebuilding a shard failed a step; will retry");
                progress(&state, &id, format!("{}; retrying", e.message)).await;
            }
            state.split_drivers.lock().remove(&id);
        });
    }
}

/// Rebuilds a shard that lost its quorum for good from this node's replica
/// (`sovra_meta::ops::RecoverJob`): once the new group has a leader, copies
/// everything this replica holds into it (as a split's final copy), then
/// records the recovery done, which moves the map to the new shard. Refused,
/// unless the job accepts it, when meta shows an erasure committed on the
/// shard past the last entry this replica applied (its points would come
/// back with the copy).
async fn recover(state: &Arc<NodeState>, job: &str, r: &sovra_meta::ops::RecoverJob) -> Result<(), ApiError> {
    let old = ShardId {
        collection: r.collection.clone(),
        region: r.shard.0.clone(),
        number: r.shard.1,
    };
    let new = ShardId {
        number: r.number,
        ..old.clone()
    };
    let members: BTreeSet<u64> = r.replicas.iter().copied().collect();
    wait_until(
        || state.host.group(&new).is_some_and(|g| g.leader().is_some()),
        "the new shard's group to elect a leader",
    )
    .await?;
    let engine = state
        .host
        .group(&old)
        .ok_or_else(|| ApiError::unavailable(format!("node {} has no open replica of shard {old}", state.config.node_id)))?
        .engine()
        .clone();
    let view = state.view();
    let applied = engine.last_applied();
    let lost: Vec<String> = view
        .state
        .erasures
        .jobs
        .values()
        .filter(|j| j.collection == r.collection && j.region == r.shard.0)
        .filter(|j| j.shards.get(&r.shard.1).and_then(|s| s.index).is_some_and(|i| i > applied))
        .map(|j| format!("{} ({})", j.id, j.kind.as_str()))
        .collect();
    if !lost.is_empty() && !r.accept_lost_erasures {
        let why = format!(
            "erasure jobs {} committed on shard {old} after log index {applied}, the last this replica applied:              rebuilt from it, their points would come back. Recover from a replica that applied them, or accept it              (--accept-lost-erasures) and run those erasures again at once",
            lost.join(", ")
        );
        let end = MetaCommand::EndOp {
            job: job.to_string(),
            failed: Some(why),
            at_ms: crate::cluster::now_ms(),
        };
        state.meta_change(end, &format!("failing recovery {job}")).await?;
        return Ok(());
    }
    if !lost.is_empty() {
        tracing::error!(job, shard = %old, lost = ?lost, "rebuilding a shard from a replica that missed erasures: run them again");
    }
    tracing::warn!(
        job,
        shard = %old,
        survivor = state.config.node_id,
        applied,
        "rebuilding a shard that lost its quorum from this replica: writes acknowledged after its log index {applied} are lost"
    );
    let range = view
        .state
        .collections
        .get(&r.collection)
        .and_then(|c| c.shards.get(&r.shard))
        .map(|s| s.range)
        .ok_or_else(|| ApiError::unavailable(format!("shard {old} is no longer in the map")))?;
    let total = engine.stats().live_points as u64;
    let copied = sync(state, job, &engine, &new, range, &members, true, total).await?;
    let done = MetaCommand::RecoverDone {
        job: job.to_string(),
        at_ms: crate::cluster::now_ms(),
    };
    let index = state.meta_change(done, &format!("recording recovery {job} done")).await?;
    state.caught_up(index).await?;
    tracing::warn!(job, shard = %old, new = %new, copied, applied, "shard rebuilt from this replica");
    Ok(())
}

fn parent_id(s: &SplitJob) -> ShardId {
    ShardId {
        collection: s.collection.clone(),
        region: s.shard.0.clone(),
        number: s.shard.1,
    }
}

fn half_ids(s: &SplitJob) -> [ShardId; 2] {
    s.halves().map(|(region, number)| ShardId {
        collection: s.collection.clone(),
        region,
        number,
    })
}

/// Whether the split `job` still runs, by the freshest view.
fn running(state: &NodeState, job: &str) -> bool {
    state
        .view()
        .state
        .ops
        .jobs
        .get(job)
        .is_some_and(|j| j.state == sovra_meta::ops::OpState::Running)
}

async fn drive(state: &Arc<NodeState>, job: &str, split: &SplitJob) -> Result<(), ApiError> {
    let parent = parent_id(split);
    let halves = half_ids(split);
    let members: BTreeSet<u64> = split.replicas.iter().copied().collect();
    // 1. The halves have leaders.
    let deadline = tokio::time::Instant::now() + STEP_WAIT;
    loop {
        if !running(state, job) {
            return Ok(());
        }
        if halves.iter().all(|h| state.host.group(h).is_some_and(|g| g.leader().is_some())) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(format!(
                "shards {} and {} have no leader yet",
                halves[0].number, halves[1].number
            )));
        }
        progress(
            state,
            job,
            format!("waiting for shards {} and {} to elect leaders", halves[0].number, halves[1].number),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pg = state
        .host
        .group(&parent)
        .ok_or_else(|| ApiError::unavailable(format!("this node no longer holds shard {parent}")))?;
    let engine = pg.engine().clone();
    let map = state
        .view()
        .state
        .collections
        .get(&split.collection)
        .and_then(|c| c.spec.shard_map(&split.shard.0).ok())
        .ok_or_else(|| ApiError::unavailable(format!("collection {} is gone", split.collection)))?;
    let range = map
        .range_of(split.shard.1)
        .ok_or_else(|| ApiError::unavailable(format!("shard {parent} is no longer in the map")))?;
    let (low, high) = range.split().expect("meta checked the range splits");
    let ranges = [low, high];
    let total = engine.stats().live_points as u64;
    // 2. A first copy, while the parent takes writes.
    if engine.split_fence().as_deref() != Some(job) {
        for (h, r) in halves.iter().zip(ranges) {
            let copied = sync(state, job, &engine, h, r, &members, false, total).await?;
            tracing::info!(job, half = %h, copied, "split: first copy done");
        }
        // 3. The fence.
        progress(
            state,
            job,
            format!("fencing shard {}: its writers wait for the new map", parent.number),
        )
        .await;
        if !running(state, job) {
            return Ok(());
        }
        state
            .host
            .write_to(&parent, &members, ShardCommand::Freeze { job: job.to_string() })
            .await?;
    }
    // The local replica has the fence applied (it may have lost the lead
    // meanwhile and be a follower applying it a little later).
    wait_until(|| engine.split_fence().as_deref() == Some(job), "the parent's fence to apply here").await?;
    // 4. The final copy, from the parent's final state.
    for (h, r) in halves.iter().zip(ranges) {
        let copied = sync(state, job, &engine, h, r, &members, true, total).await?;
        tracing::info!(job, half = %h, copied, "split: final copy done");
    }
    // 5. Retire, then switch.
    if !running(state, job) {
        return Ok(());
    }
    state
        .host
        .write_to(&parent, &members, ShardCommand::Retire { job: job.to_string() })
        .await?;
    let done = MetaCommand::SplitDone {
        job: job.to_string(),
        at_ms: crate::cluster::now_ms(),
    };
    let index = state.meta_change(done, &format!("recording split {job} done")).await?;
    state.caught_up(index).await?;
    tracing::info!(job, shard = %parent, low = halves[0].number, high = halves[1].number, "shard split done");
    Ok(())
}

async fn wait_until(mut f: impl FnMut() -> bool, what: &str) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + STEP_WAIT;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(format!("waited {} s for {what}", STEP_WAIT.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Makes half `half` (the parent's `range`) hold what the local parent
/// replica holds there: points set or removed, suppression entries and
/// opt-out templates adopted. With `fenced`, the parent is final and the
/// half is sealed first. Returns how many points were sent.
#[allow(clippy::too_many_arguments)]
async fn sync(
    state: &Arc<NodeState>,
    job: &str,
    parent: &Arc<ShardEngine>,
    half: &ShardId,
    range: HashRange,
    members: &BTreeSet<u64>,
    fenced: bool,
    total: u64,
) -> Result<u64, ApiError> {
    let copy = |c: CopyBatch| ShardCommand::Copy(Box::new(c));
    if fenced {
        let seal = CopyBatch {
            job: job.to_string(),
            fenced: true,
            ..Default::default()
        };
        state.host.write_to(half, members, copy(seal)).await?;
    }
    // The local half replica has every copy committed so far: what it lacks
    // is what remains to send (and what it holds that the parent does not
    // is removed).
    state.host.read_barrier(half, ReadLevel::Linearizable).await?;
    let child = state
        .host
        .group(half)
        .ok_or_else(|| ApiError::unavailable(format!("this node holds no replica of shard {half}")))?
        .engine()
        .clone();
    // The side state first: a point copied must never land in a half that
    // would take a write its parent refuses (suppressed, opted out).
    let (p_side, c_side) = (
        parent.store().suppression().map_err(|e| ApiError::internal(e.to_string()))?,
        child.store().suppression().map_err(|e| ApiError::internal(e.to_string()))?,
    );
    let missing = |p: &[([u8; 32], u64)], c: &[([u8; 32], u64)]| -> Vec<([u8; 32], u64)> {
        let had: BTreeMap<[u8; 32], u64> = c.iter().copied().collect();
        p.iter().filter(|(t, at)| had.get(t) != Some(at)).copied().collect()
    };
    let entries = missing(&p_side.entries, &c_side.entries);
    let tombs = missing(&p_side.tombstones, &c_side.tombstones);
    let c_opt: BTreeMap<&String, &sovra_types::OptOut> = c_side.opt_outs.iter().map(|(t, o)| (t, o)).collect();
    let p_opt: BTreeSet<&String> = p_side.opt_outs.iter().map(|(t, _)| t).collect();
    let opt_outs: Vec<(String, sovra_types::OptOut)> = p_side.opt_outs.iter().filter(|(t, o)| c_opt.get(t) != Some(&o)).cloned().collect();
    let remove: Vec<String> = c_side
        .opt_outs
        .iter()
        .filter(|(t, _)| !p_opt.contains(t))
        .map(|(t, _)| t.clone())
        .collect();
    let key = (p_side.key != c_side.key).then_some(p_side.key).flatten();
    let limit = sovra_types::limits::MAX_IDS_PER_REQUEST;
    let mut first = true;
    let mut ec = entries.chunks(limit).peekable();
    let mut tc = tombs.chunks(limit).peekable();
    let mut oc = opt_outs.chunks(limit / 2).peekable();
    let mut rc = remove.chunks(limit / 2).peekable();
    while first || ec.peek().is_some() || tc.peek().is_some() || oc.peek().is_some() || rc.peek().is_some() {
        let b = CopyBatch {
            job: job.to_string(),
            fenced,
            suppress_key: if first { key } else { None },
            suppressed: ec.next().map(<[_]>::to_vec).unwrap_or_default(),
            tombstones: tc.next().map(<[_]>::to_vec).unwrap_or_default(),
            opt_outs: oc.next().map(<[_]>::to_vec).unwrap_or_default(),
            remove_opt_outs: rc.next().map(<[_]>::to_vec).unwrap_or_default(),
            ..Default::default()
        };
        first = false;
        if b.suppress_key.is_none()
            && b.suppressed.is_empty()
            && b.tombstones.is_empty()
            && b.opt_outs.is_empty()
            && b.remove_opt_outs.is_empty()
        {
            break;
        }
        state.host.write_to(half, members, copy(b)).await?;
    }
    // The points: both stores in key order, merged on a blocking thread,
    // the differences sent in bounded batches as they are found.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<CopyBatch, String>>(2);
    let (p, c, job_s) = (parent.clone(), child.clone(), job.to_string());
    let producer = tokio::task::spawn_blocking(move || diff(&p, &c, range, &job_s, fenced, &tx));
    let mut sent = 0u64;
    let mut removed = 0u64;
    let mut last_report = std::time::Instant::now();
    while let Some(b) = rx.recv().await {
        let b = b.map_err(ApiError::internal)?;
        sent += b.points.len() as u64;
        removed += b.delete.len() as u64;
        state.host.write_to(half, members, copy(b)).await?;
        if last_report.elapsed() > Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            let phase = if fenced { "final copy" } else { "copying" };
            progress(
                state,
                job,
                format!("{phase} into shard {}: {sent} points sent (the shard holds {total})", half.number),
            )
            .await;
        }
    }
    producer.await.map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::info!(job, half = %half, fenced, points = sent, removed, "split: copy sent");
    Ok(sent)
}

/// The batches that make `child` hold `parent`'s points in `range`.
fn diff(
    parent: &ShardEngine,
    child: &ShardEngine,
    range: HashRange,
    job: &str,
    fenced: bool,
    tx: &tokio::sync::mpsc::Sender<Result<CopyBatch, String>>,
) {
    let new_batch = || CopyBatch {
        job: job.to_string(),
        fenced,
        ..Default::default()
    };
    let mut b = new_batch();
    let mut bytes = 0usize;
    let flush = |b: &mut CopyBatch, bytes: &mut usize, force: bool| -> bool {
        let full = b.points.len() >= COPY_POINTS || *bytes >= COPY_BYTES || b.delete.len() >= COPY_POINTS;
        if (force || full) && (!b.points.is_empty() || !b.delete.is_empty()) {
            *bytes = 0;
            return tx.blocking_send(Ok(std::mem::replace(b, new_batch()))).is_ok();
        }
        true
    };
    let mut ps = parent
        .store()
        .points()
        .filter(|r| r.as_ref().map_or(true, |p| range.contains(point_hash(&p.id))));
    let mut cs = child.store().points();
    let mut pn = ps.next();
    let mut cn = cs.next();
    loop {
        let (p, c): (Option<PointRecord>, Option<PointRecord>) = match (pn.take(), cn.take()) {
            (None, None) => break,
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                let _ = tx.blocking_send(Err(format!("reading a replica failed: {e}")));
                return;
            }
            (Some(Ok(p)), Some(Ok(c))) => (Some(p), Some(c)),
            (Some(Ok(p)), None) => (Some(p), None),
            (None, Some(Ok(c))) => (None, Some(c)),
        };
        match (p, c) {
            (Some(p), Some(c)) => match p.id.key_bytes().cmp(&c.id.key_bytes()) {
                std::cmp::Ordering::Equal => {
                    if p != c {
                        bytes += p.vector.len() * 4 + 256;
                        b.points.push(p);
                    }
                    pn = ps.next();
                    cn = cs.next();
                }
                std::cmp::Ordering::Less => {
                    bytes += p.vector.len() * 4 + 256;
                    b.points.push(p);
                    pn = ps.next();
                    cn = Some(Ok(c));
                }
                std::cmp::Ordering::Greater => {
                    b.delete.push(c.id);
                    pn = Some(Ok(p));
                    cn = cs.next();
                }
            },
            (Some(p), None) => {
                bytes += p.vector.len() * 4 + 256;
                b.points.push(p);
                pn = ps.next();
            }
            (None, Some(c)) => {
                b.delete.push(c.id);
                cn = cs.next();
            }
            (None, None) => break,
        }
        if !flush(&mut b, &mut bytes, false) {
            return;
        }
    }
    flush(&mut b, &mut bytes, true);
}

/// Lifts `shard`'s fence when its split `job` ended without switching the map
/// (cancelled, failed, or cancelled by an erasure), by a view confirmed just
/// now: a stale view must not unfence a shard whose split is under way.
async fn unfence(state: &Arc<NodeState>, shard: &ShardId, job: &str) {
    let view = state.view();
    let running_here = view
        .state
        .ops
        .jobs
        .get(job)
        .is_some_and(|j| j.state == sovra_meta::ops::OpState::Running);
    if running_here {
        return;
    }
    state.refresh_view().await;
    let view = state.view();
    let Some(j) = view.state.ops.jobs.get(job) else {
        // Cancelled splits are unfenced within a pass, long before their
        // record is pruned; a view without the job is one to wait out.
        tracing::warn!(shard = %shard, job, "fenced by a split this node's view does not know; leaving the fence");
        return;
    };
    if j.state == sovra_meta::ops::OpState::Running || j.state == sovra_meta::ops::OpState::Done {
        return;
    }
    if still_mapped(&view, shard) {
        lift(state, shard, job).await;
    }
}

fn still_mapped(view: &sovra_meta::View, shard: &ShardId) -> bool {
    view.state
        .collections
        .get(&shard.collection)
        .is_some_and(|c| c.shards.contains_key(&(shard.region.clone(), shard.number)))
}

async fn lift(state: &Arc<NodeState>, shard: &ShardId, job: &str) {
    let members = state
        .view()
        .state
        .collections
        .get(&shard.collection)
        .and_then(|c| c.shards.get(&(shard.region.clone(), shard.number)))
        .map(|r| r.replicas.iter().copied().collect())
        .unwrap_or_default();
    match state
        .host
        .write_to(shard, &members, ShardCommand::Unfreeze { job: job.to_string() })
        .await
    {
        Ok(_) => tracing::info!(shard = %shard, job, "split ended without switching the map: the shard takes writes again"),
        Err(e) => tracing::warn!(shard = %shard, job, error = %e.message, "lifting a split's fence failed; will retry"),
    }
}
