//! One shard replica: [`ShardStore`] on disk plus a [`LiveIndex`] in memory,
//! changed only through [`ShardEngine::apply`].
//!
//! `apply(index, command)` is deterministic (no clock, no randomness, no local id
//! is stored: slots live only in memory) and total: a command that is invalid
//! against the shard (by `sovra_types::validate::check_command`, the same check
//! the edge of the log runs) changes nothing but the shard's recorded
//! [`Rejections`], identically on every replica; only storage failure stops it. Entries at or below `last_applied` are skipped,
//! so a log can be replayed. The data and `last_applied` go in one sled batch and
//! are flushed to disk before `apply` returns, so an acknowledged write survives
//! a crash.

use crate::ShardError;
use crate::live::{LiveIndex, SearchPath};
use crate::store::{Rejections, ShardStore};
use parking_lot::{Mutex, RwLock};
use sovra_index::SpaceDistance;
use sovra_index::{IndexOptions, Space};

/// The saved index's file name in a replica's directory.
pub const INDEX_FILE: &str = "index.sovra";
use crate::store::{Suppression, id_tag, subject_tag};
use sovra_types::validate::{check_command, check_record};
use sovra_types::{
    CollectionSpec, Erase, EraseTarget, Filter, LawfulBasis, Metric, OptOut, PointId, PointRecord, SPLIT_REFUSAL, ShardCommand, ShardId,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Points loaded per index batch on start and during a rebuild.
const LOAD_CHUNK: usize = 10_000;

pub struct ShardEngine {
    id: ShardId,
    spec: Arc<CollectionSpec>,
    store: ShardStore,
    /// The replica's own database (points and Raft log); flushed after every
    /// command. Held for as long as the engine lives.
    replica: crate::ReplicaStore,
    /// Swapped whole by compaction; readers clone the `Arc` and never wait for it.
    live: RwLock<Arc<LiveIndex>>,
    /// Serialises `apply` and the last step of a compaction.
    writer: Mutex<()>,
    last_applied: AtomicU64,
    index: IndexOptions,
    /// Whether open loaded a saved index (rather than rebuilding it).
    loaded: std::sync::atomic::AtomicBool,
    /// The opt-out registry as the store holds it (read by every search).
    opt_outs: RwLock<Arc<Vec<(String, OptOut)>>>,
}

/// Extra candidates a search asks its index for while the registry is not
/// empty, so that hits suppressed for an opt-out rarely leave it short of k.
const OPT_OUT_SLACK: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    pub index: u64,
    /// Points inserted or replaced (upsert), or that existed and were removed (delete).
    pub changed: usize,
    /// False if the index was at or below `last_applied` and so skipped.
    pub applied: bool,
    /// Why the command was refused (and nothing but the refusal recorded).
    pub rejected: Option<String>,
}

/// What applying one log entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOutcome {
    pub changed: usize,
    pub rejected: Option<String>,
}

pub struct SearchParams<'a> {
    pub vector: &'a [f32],
    pub k: usize,
    pub ef: usize,
    pub filter: Option<&'a Filter>,
    /// The caller's clock: points expired at this instant are never returned.
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: PointId,
    pub distance: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub live_points: usize,
    pub tombstones: usize,
    pub last_applied: u64,
    pub index_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompactionReport {
    pub tombstones_dropped: usize,
    pub live_points: usize,
    pub rebuild: Duration,
    /// Time writers were held back for the final catch-up and swap.
    pub pause: Duration,
}

pub fn space_of(metric: Metric) -> Space {
    match metric {
        Metric::L2 => Space::L2,
        Metric::Cosine | Metric::Dot => Space::OneMinusDot,
    }
}

impl ShardEngine {
    /// Opens the shard's store and rebuilds its index from it. Slow for big
    /// shards: the node reports NOT_SERVING until every engine is open.
    pub fn open(id: ShardId, spec: Arc<CollectionSpec>, replica: &crate::ReplicaStore, index: IndexOptions) -> Result<Self, ShardError> {
        let store = ShardStore::new(replica.points().clone());
        let last_applied = store.last_applied()?;
        let store_opt_outs = store.opt_outs()?;
        let engine = Self {
            live: RwLock::new(Arc::new(new_live(&spec, 0, &index))),
            id,
            spec,
            store,
            replica: replica.clone(),
            writer: Mutex::new(()),
            last_applied: AtomicU64::new(last_applied),
            index,
            loaded: std::sync::atomic::AtomicBool::new(false),
            opt_outs: RwLock::new(Arc::new(store_opt_outs)),
        };
        let path = engine.index_path();
        if path.exists() {
            let started = std::time::Instant::now();
            let records = engine.store.points().map(|r| {
                let rec = r.map_err(|e| e.to_string())?;
                engine.check_held(&rec).map_err(|e| e.to_string())?;
                Ok(rec)
            });
            match LiveIndex::load_verified(&engine.index, &path, &engine.spec, last_applied, records) {
                Ok(live) => {
                    tracing::info!(shard = %engine.id, points = live.live_count(), elapsed = ?started.elapsed(), "loaded the saved index");
                    *engine.live.write() = Arc::new(live);
                    std::fs::remove_file(&path)?;
                    engine.loaded.store(true, Ordering::Release);
                    return Ok(engine);
                }
                Err(why) => tracing::warn!(shard = %engine.id, %why, "the saved index is not usable; rebuilding it from the store"),
            }
            // Used or not, the file goes: writes from now on make it stale, and it
            // holds vectors that deletes must not leave on disk.
            std::fs::remove_file(&path)?;
        }
        let live = engine.live.read().clone();
        let mut chunk = Vec::with_capacity(LOAD_CHUNK);
        for rec in engine.store.points() {
            let rec = rec?;
            // A record this collection cannot hold (an older build wrote it)
            // fails this shard's load, never the index or the node.
            engine.check_held(&rec)?;
            chunk.push(rec);
            if chunk.len() == LOAD_CHUNK {
                live.upsert(&chunk);
                chunk.clear();
            }
        }
        live.upsert(&chunk);
        Ok(engine)
    }

    /// Links every point still waiting for the graph (they are searched exactly
    /// meanwhile); for benchmarks and tests that time or inspect the graph.
    pub fn link_pending(&self) {
        self.live.read().clone().link_pending();
    }

    /// Whether this open loaded the saved index instead of rebuilding it.
    pub fn loaded_saved_index(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The saved index's file, inside the replica's own directory so that
    /// destroying the replica removes it.
    fn index_path(&self) -> std::path::PathBuf {
        self.replica.dir().join(INDEX_FILE)
    }

    /// Saves the index (graph, vectors of live points, slot table) so the next
    /// open loads it instead of rebuilding; for a clean stop. Applies wait
    /// meanwhile. `Ok(false)`: the engine cannot save (hnsw_rs).
    pub fn save_index(&self) -> Result<bool, ShardError> {
        let _w = self.writer.lock();
        let live = self.live.read().clone();
        match live.save(&self.index_path(), self.last_applied()) {
            Ok(()) => Ok(true),
            Err(sovra_index::file::IndexFileError::Unsupported(_)) => Ok(false),
            Err(sovra_index::file::IndexFileError::Io(e)) => Err(e.into()),
            Err(e) => Err(std::io::Error::other(e.to_string()).into()),
        }
    }

    pub fn id(&self) -> &ShardId {
        &self.id
    }

    pub fn spec(&self) -> &CollectionSpec {
        &self.spec
    }

    /// Whether `rec` may be held by this shard: of its region, valid for the spec.
    pub fn check_held(&self, rec: &PointRecord) -> Result<(), ShardError> {
        let invalid = |reason: String| ShardError::Invalid {
            what: format!("{} in shard {}", rec.id, self.id),
            reason,
        };
        if rec.region != self.id.region {
            return Err(invalid(format!("it is of region {}", rec.region)));
        }
        check_record(&self.spec, rec, "point").map_err(|e| invalid(e.message))
    }

    pub fn rejections(&self) -> Result<Rejections, ShardError> {
        self.store.rejections()
    }

    /// The split job whose fence this replica applied, if any: it takes no writes.
    pub fn split_fence(&self) -> Option<String> {
        self.store.frozen().ok().flatten()
    }

    /// Whether a split retired this replica's shard: it answers no reads.
    pub fn retired(&self) -> bool {
        self.store.retired().unwrap_or(false)
    }

    pub fn last_applied(&self) -> u64 {
        self.last_applied.load(Ordering::Acquire)
    }

    /// Stand-in for a replicated log until Raft arrives: gives the command the
    /// next index and applies it, under the writer lock so indexes are gapless.
    pub fn apply_next(&self, cmd: &ShardCommand) -> Result<ApplyOutcome, ShardError> {
        let _w = self.writer.lock();
        self.apply_locked(self.last_applied() + 1, cmd)
    }

    pub fn apply(&self, index: u64, cmd: &ShardCommand) -> Result<ApplyOutcome, ShardError> {
        let _w = self.writer.lock();
        self.apply_locked(index, cmd)
    }

    fn apply_locked(&self, index: u64, cmd: &ShardCommand) -> Result<ApplyOutcome, ShardError> {
        if index <= self.last_applied() {
            return Ok(ApplyOutcome {
                index,
                changed: 0,
                applied: false,
                rejected: None,
            });
        }
        let out = self.write_entry(index, Some(cmd), None)?;
        self.replica.db().flush()?;
        Ok(ApplyOutcome {
            index,
            changed: out.changed,
            applied: true,
            rejected: out.rejected,
        })
    }

    /// Applies entries of a replicated log, in order: each is `(index, command or
    /// None for the log's own bookkeeping entries, the replication layer's meta
    /// after it)`, each in its own atomic batch, with one flush at the end. The
    /// log decides what to apply, so nothing is skipped here.
    pub fn apply_entries(&self, entries: &[(u64, Option<&ShardCommand>, Vec<u8>)]) -> Result<Vec<EntryOutcome>, ShardError> {
        let _w = self.writer.lock();
        let mut changed = Vec::with_capacity(entries.len());
        for (index, cmd, meta) in entries {
            changed.push(self.write_entry(*index, *cmd, Some(meta))?);
        }
        self.replica.db().flush()?;
        Ok(changed)
    }

    /// One command's store batch, then the in-memory index. Caller holds `writer`.
    /// An invalid command writes only its rejection (and the log position).
    fn write_entry(&self, index: u64, cmd: Option<&ShardCommand>, meta: Option<&[u8]>) -> Result<EntryOutcome, ShardError> {
        let mut batch = self.store.batch();
        if let Some(Err(refused)) = cmd.map(|c| check_command(&self.spec, &self.id, c)) {
            tracing::error!(shard = %self.id, index, reason = %refused.message, "log entry refused on apply");
            return self.refuse(batch, index, meta, refused.message);
        }
        if let Some(ShardCommand::Upsert(_) | ShardCommand::Delete(_) | ShardCommand::RemoveOptOut { .. }) = cmd
            && let Some(job) = self.store.frozen()?
        {
            // Expected while a split copies this shard's final state.
            return self.refuse(batch, index, meta, split_refusal(&self.id, &job));
        }
        if let Some(ShardCommand::Copy(c)) = cmd
            && !c.fenced
            && self.store.sealed()?.is_some()
        {
            return self.refuse(
                batch,
                index,
                meta,
                format!(
                    "split job {}: a copy read before the parent's fence arrived after the final copy began; the final copy covers it",
                    c.job
                ),
            );
        }
        if let Some(ShardCommand::Upsert(points)) = cmd
            && let Some(refused) = self.suppressed_write(points)?
        {
            // Expected (an erased subject written again), not a fault; the
            // reason names no subject.
            tracing::info!(shard = %self.id, index, reason = %refused, "write refused on apply");
            return self.refuse(batch, index, meta, refused);
        }
        if let Some(ShardCommand::Upsert(points)) = cmd
            && !sovra_types::chaos::broken(sovra_types::chaos::Switch::SkipOptOutCheck)
            && let Some(refused) = self.opted_out_write(points)
        {
            // The reason names neither the template nor the subject.
            tracing::info!(shard = %self.id, index, reason = %refused, "write refused on apply");
            return self.refuse(batch, index, meta, refused);
        }
        if let Some(ShardCommand::Upsert(_)) = cmd
            && index.is_multiple_of(5)
            && sovra_types::chaos::broken(sovra_types::chaos::Switch::Diverge)
        {
            return self.refuse(batch, index, meta, "chaos switch diverge: this replica dropped the entry".into());
        }
        let mut erased: Vec<PointId> = Vec::new();
        let changed = match cmd {
            Some(ShardCommand::Upsert(points)) => {
                for p in points {
                    batch.upsert(p)?;
                }
                points.len()
            }
            Some(ShardCommand::Delete(ids)) => {
                let mut n = 0;
                for id in ids {
                    n += batch.delete(id)? as usize;
                }
                n
            }
            Some(ShardCommand::Erase(e)) => {
                erased = self.erase_into(&mut batch, e)?;
                if !erased.is_empty() {
                    batch.purge_pending(index);
                }
                // A requested erasure is a meta job this replica reports on;
                // the sweeper's are not.
                if !matches!(e.target, EraseTarget::Expired { .. }) {
                    batch.applied_job(&e.job, index, erased.len() as u64)?;
                }
                erased.len()
            }
            Some(ShardCommand::RemoveOptOut { template }) => {
                let had = self.opt_outs.read().iter().any(|(t, _)| t == template);
                batch.remove_opt_out(template);
                usize::from(had)
            }
            Some(ShardCommand::Freeze { job }) => {
                batch.freeze(job);
                0
            }
            Some(ShardCommand::Retire { job }) => {
                if self.store.frozen()?.as_ref() == Some(job) {
                    batch.retire();
                }
                0
            }
            Some(ShardCommand::Unfreeze { job }) => {
                if self.store.frozen()?.as_ref() == Some(job) {
                    batch.unfreeze();
                }
                0
            }
            Some(ShardCommand::Copy(c)) => {
                if c.fenced {
                    batch.seal(&c.job);
                }
                for p in &c.points {
                    batch.upsert(p)?;
                }
                let mut n = c.points.len();
                for id in &c.delete {
                    n += batch.delete(id)? as usize;
                }
                if let Some(key) = &c.suppress_key {
                    batch.set_suppress_key(key);
                }
                for (tag, at) in &c.suppressed {
                    batch.suppress(tag, *at);
                }
                for (tag, at) in &c.tombstones {
                    batch.tombstone(tag, *at);
                }
                for (t, o) in &c.opt_outs {
                    batch.opt_out(t, o)?;
                }
                for t in &c.remove_opt_outs {
                    batch.remove_opt_out(t);
                }
                n
            }
            None => 0,
        };
        batch.commit_with(index, meta)?;
        let registry_changed = matches!(
            cmd,
            Some(ShardCommand::RemoveOptOut { .. })
                | Some(ShardCommand::Erase(Erase {
                    target: EraseTarget::Likeness { .. },
                    ..
                }))
        ) || matches!(cmd, Some(ShardCommand::Copy(c)) if !c.opt_outs.is_empty() || !c.remove_opt_outs.is_empty());
        if registry_changed {
            *self.opt_outs.write() = Arc::new(self.store.opt_outs()?);
        }
        // Memory follows the store: if we crash before the flush, the index is
        // rebuilt from the store on start.
        let live = self.live.read().clone();
        match cmd {
            Some(ShardCommand::Upsert(points)) => live.upsert(points),
            Some(ShardCommand::Delete(ids)) => live.delete(ids),
            Some(ShardCommand::Erase(_)) => live.delete(&erased),
            Some(ShardCommand::Copy(c)) => {
                live.upsert(&c.points);
                live.delete(&c.delete);
            }
            Some(
                ShardCommand::RemoveOptOut { .. }
                | ShardCommand::Freeze { .. }
                | ShardCommand::Unfreeze { .. }
                | ShardCommand::Retire { .. },
            )
            | None => {}
        }
        self.last_applied.store(index, Ordering::Release);
        Ok(EntryOutcome { changed, rejected: None })
    }

    /// Applies a refused entry: only the refusal is recorded (with the log
    /// position), identically on every replica.
    fn refuse(
        &self,
        mut batch: crate::store::PendingBatch<'_>,
        index: u64,
        meta: Option<&[u8]>,
        reason: String,
    ) -> Result<EntryOutcome, ShardError> {
        let mut r = self.store.rejections()?;
        r.record(index, reason.clone());
        batch.set_rejections(&r)?;
        batch.commit_with(index, meta)?;
        self.last_applied.store(index, Ordering::Release);
        Ok(EntryOutcome {
            changed: 0,
            rejected: Some(reason),
        })
    }

    /// Why a batch may not be written: a point of a subject on the
    /// suppression list without consent given after the erasure. Checked at
    /// apply, so a write validated before the erasure committed is refused too.
    fn suppressed_write(&self, points: &[PointRecord]) -> Result<Option<String>, ShardError> {
        let Some(key) = self.store.suppress_key()? else { return Ok(None) };
        for (i, p) in points.iter().enumerate() {
            if p.subject.is_empty() {
                continue;
            }
            let Some(erased_at) = self.store.suppressed_at(&subject_tag(&key, &p.subject))? else {
                continue;
            };
            if p.lawful_basis == LawfulBasis::Consent && p.consent_at_ms > erased_at {
                continue;
            }
            return Ok(Some(format!(
                "points[{i}]: its subject was erased at {erased_at} (Unix ms) and is on region {}'s suppression list; \
                 a write for them needs lawful_basis CONSENT with consent_at_ms after the erasure; nothing was written",
                self.id.region
            )));
        }
        Ok(None)
    }

    /// Why a batch may not be written: a point within an opted-out likeness's
    /// threshold. Checked at apply, so a write validated before the opt-out
    /// committed is refused too. The reason never echoes the template.
    fn opted_out_write(&self, points: &[PointRecord]) -> Option<String> {
        let registry = self.opt_outs.read().clone();
        if registry.is_empty() {
            return None;
        }
        let d = SpaceDistance::new(space_of(self.spec.metric));
        let i = points
            .iter()
            .position(|p| registry.iter().any(|(_, o)| d.eval(&o.vector, &p.vector) <= o.threshold))?;
        Some(format!(
            "points[{i}]: a likeness opted out of region {}'s collection {} (the opt-out registry), and this point is within its threshold; nothing was written",
            self.id.region, self.id.collection
        ))
    }

    /// Whether a stored vector is within an opted-out likeness.
    fn opted_out(&self, registry: &[(String, OptOut)], d: &SpaceDistance, v: &[f32]) -> bool {
        registry.iter().any(|(_, o)| d.eval(&o.vector, v) <= o.threshold)
    }

    /// Removes what an erasure selects, in `batch`, and suppresses the subjects
    /// it names; returns the ids removed.
    fn erase_into(&self, batch: &mut crate::store::PendingBatch<'_>, e: &Erase) -> Result<Vec<PointId>, ShardError> {
        let key = match self.store.suppress_key()? {
            Some(k) => k,
            None => {
                batch.set_suppress_key(&e.salt);
                e.salt
            }
        };
        let candidates: Vec<PointId> = match &e.target {
            EraseTarget::Ids(_) if sovra_types::chaos::broken(sovra_types::chaos::Switch::SkipErasure) => Vec::new(),
            EraseTarget::Ids(ids) => ids.clone(),
            EraseTarget::Expired { ids, now_ms } => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if self.store.get(id)?.is_some_and(|r| r.is_expired(*now_ms)) {
                        out.push(*id);
                    }
                }
                out
            }
            EraseTarget::Subject(s) => self.store.ids_of_subject(s)?,
            EraseTarget::Filter(f) => {
                let mut ids = Vec::new();
                for r in self.store.points() {
                    let r = r?;
                    if f.matches(&r.payload) {
                        ids.push(r.id);
                    }
                }
                ids
            }
            EraseTarget::All => self.store.points().map(|r| r.map(|r| r.id)).collect::<Result<_, _>>()?,
            EraseTarget::Likeness {
                template,
                vector,
                threshold,
                subject,
            } => {
                batch.opt_out(
                    template,
                    &OptOut {
                        vector: vector.clone(),
                        threshold: *threshold,
                        at_ms: e.at_ms,
                    },
                )?;
                let d = SpaceDistance::new(space_of(self.spec.metric));
                let mut ids = Vec::new();
                for r in self.store.points() {
                    let r = r?;
                    if d.eval(vector, &r.vector) <= *threshold {
                        ids.push(r.id);
                    }
                }
                if let Some(s) = subject {
                    ids.extend(self.store.ids_of_subject(s)?);
                }
                ids
            }
        };
        let mut subjects = std::collections::BTreeSet::new();
        match &e.target {
            EraseTarget::Subject(s) | EraseTarget::Likeness { subject: Some(s), .. } => {
                subjects.insert(s.clone());
            }
            _ => {}
        }
        let mut erased = Vec::with_capacity(candidates.len());
        for id in candidates {
            if let Some(old) = batch.take(&id)? {
                let tag = id_tag(&key, &id);
                let at = self.store.tombstone_at(&tag)?.map_or(e.at_ms, |t| t.max(e.at_ms));
                batch.tombstone(&tag, at);
                if e.target.suppresses() && !old.subject.is_empty() {
                    subjects.insert(old.subject);
                }
                erased.push(id);
            }
        }
        for s in &subjects {
            let tag = subject_tag(&key, s);
            // A later erasure of the same subject moves the line consent must pass.
            let at = self.store.suppressed_at(&tag)?.map_or(e.at_ms, |t| t.max(e.at_ms));
            batch.suppress(&tag, at);
        }
        Ok(erased)
    }

    /// Runs `f` with writers held back, so what it reads of the store is exactly
    /// the state at one log position (an exact snapshot). Returns `f`'s result
    /// and how long writers waited.
    pub fn frozen<T>(&self, f: impl FnOnce(&ShardStore) -> T) -> (T, Duration) {
        let _w = self.writer.lock();
        let started = Instant::now();
        let out = f(&self.store);
        (out, started.elapsed())
    }

    /// Replaces the whole shard with `records` (from a snapshot) at `index`, then
    /// rebuilds the index. A crash part way leaves a marker
    /// ([`ShardStore::install_interrupted`]) so the caller installs again.
    pub fn install<E>(
        &self,
        records: impl Iterator<Item = Result<PointRecord, E>>,
        index: u64,
        meta: &[u8],
        rejections: &Rejections,
        suppression: &Suppression,
    ) -> Result<Result<usize, E>, ShardError> {
        let _w = self.writer.lock();
        self.store.begin_install()?;
        let fresh = new_live(&self.spec, 0, &self.index);
        let mut chunk = Vec::with_capacity(LOAD_CHUNK);
        let mut count = 0;
        for rec in records {
            match rec {
                Ok(r) => {
                    // The caller verified the file; this keeps the index safe
                    // whatever the caller did.
                    self.check_held(&r)?;
                    chunk.push(r)
                }
                // The marker stays: the shard is unusable until a good install.
                Err(e) => return Ok(Err(e)),
            }
            if chunk.len() == LOAD_CHUNK {
                count += self.install_chunk(&fresh, &mut chunk)?;
            }
        }
        count += self.install_chunk(&fresh, &mut chunk)?;
        self.store.finish_install(index, meta, rejections, suppression)?;
        self.replica.db().flush()?;
        *self.opt_outs.write() = Arc::new(suppression.opt_outs.clone());
        *self.live.write() = Arc::new(fresh);
        self.last_applied.store(index, Ordering::Release);
        Ok(Ok(count))
    }

    fn install_chunk(&self, live: &LiveIndex, chunk: &mut Vec<PointRecord>) -> Result<usize, ShardError> {
        let mut batch = self.store.batch();
        for r in chunk.iter() {
            batch.upsert(r)?;
        }
        batch.commit_with(self.last_applied(), None)?;
        live.upsert(chunk);
        let n = chunk.len();
        chunk.clear();
        Ok(n)
    }

    /// Deletes the replica's directory (its data, Raft log and snapshots) and
    /// empties its index (the replica was removed from its group, or its
    /// collection dropped). The Raft core writing to it is stopped first.
    pub fn destroy(&self) -> Result<(), ShardError> {
        let _w = self.writer.lock();
        *self.live.write() = Arc::new(new_live(&self.spec, 0, &self.index));
        self.last_applied.store(0, Ordering::Release);
        self.replica.destroy()
    }

    pub fn replica(&self) -> &crate::ReplicaStore {
        &self.replica
    }

    pub fn search(&self, p: &SearchParams<'_>) -> (Vec<Hit>, SearchPath) {
        self.search_with(p, false)
    }

    /// As [`Self::search`]; `exact` compares the query with every live point.
    pub fn search_with(&self, p: &SearchParams<'_>, exact: bool) -> (Vec<Hit>, SearchPath) {
        let live = self.live.read().clone();
        let registry = self.opt_outs.read().clone();
        if registry.is_empty() {
            let (hits, path) = live.search_with(p.vector, p.k, p.ef, p.filter, p.now_ms, exact);
            let hits = hits
                .into_iter()
                .map(|h| Hit {
                    id: h.id,
                    distance: h.distance,
                })
                .collect();
            return (hits, path);
        }
        // Every replica suppresses what an opted-out likeness covers, also a
        // point the registration has not erased here yet.
        let d = SpaceDistance::new(space_of(self.spec.metric));
        let k = p.k + OPT_OUT_SLACK;
        let (hits, path) = live.search_with(p.vector, k, p.ef.max(k), p.filter, p.now_ms, exact);
        let hits = hits
            .into_iter()
            .filter(|h| !live.vector_of(&h.id).is_some_and(|v| self.opted_out(&registry, &d, &v)))
            .take(p.k)
            .map(|h| Hit {
                id: h.id,
                distance: h.distance,
            })
            .collect();
        (hits, path)
    }

    /// As [`Self::scroll`], over one subject's points (the subject index):
    /// those after `after` in id-key order, unexpired at `now_ms`.
    pub fn scroll_subject(
        &self,
        subject: &str,
        after: Option<&PointId>,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<PointRecord>, bool), ShardError> {
        let after_key = after.map(PointId::key_bytes);
        let mut out = Vec::new();
        for id in self.store.ids_of_subject(subject)? {
            if after_key.as_ref().is_some_and(|a| id.key_bytes() <= *a) {
                continue;
            }
            let Some(r) = self.store.get(&id)? else { continue };
            if r.is_expired(now_ms) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, false));
            }
            out.push(r);
        }
        Ok((out, true))
    }

    /// The opt-out registry's template ids, in order.
    pub fn opt_out_ids(&self) -> Vec<String> {
        self.opt_outs.read().iter().map(|(t, _)| t.clone()).collect()
    }

    /// Up to `limit` live points after `after` (from the first without it) in
    /// id-key order, those `filter` accepts, unexpired at `now_ms`; and whether
    /// the shard has no more. Keys are stable, so a point present for a whole
    /// scroll is met exactly once however others are written meanwhile.
    pub fn scroll(
        &self,
        after: Option<&PointId>,
        limit: usize,
        filter: Option<&sovra_types::Filter>,
        now_ms: u64,
    ) -> Result<(Vec<PointRecord>, bool), ShardError> {
        let mut out = Vec::new();
        for r in self.store.points_after(after) {
            let r = r?;
            if r.is_expired(now_ms) || filter.is_some_and(|f| !f.matches(&r.payload)) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, false));
            }
            out.push(r);
        }
        Ok((out, true))
    }

    /// A point as stored, unless it is absent or expired at `now_ms`.
    pub fn get(&self, id: &PointId, now_ms: u64) -> Result<Option<PointRecord>, ShardError> {
        Ok(self.store.get(id)?.filter(|r| !r.is_expired(now_ms)))
    }

    pub fn store(&self) -> &ShardStore {
        &self.store
    }

    pub fn digest(&self) -> Result<u64, ShardError> {
        self.store.digest()
    }

    pub fn stats(&self) -> ShardStats {
        let live = self.live.read().clone();
        ShardStats {
            live_points: live.live_count(),
            tombstones: live.tombstones(),
            last_applied: self.last_applied(),
            index_bytes: live.memory_bytes(),
        }
    }

    /// Rebuilds the index without tombstones while searches and writes go on:
    /// copy the live points into a new graph, catch up with what was written
    /// meanwhile, then, with writers held back only for the last catch-up, swap.
    pub fn compact(&self) -> CompactionReport {
        let started = Instant::now();
        let old = self.live.read().clone();
        let before_tombstones = old.tombstones();
        let fresh = new_live(&self.spec, old.live_count(), &self.index);
        let mut mark = old.copy_into(&fresh, 0);
        // A second pass without the lock shortens the pause under steady writes.
        mark = old.copy_into(&fresh, mark);
        let rebuild = started.elapsed();
        let paused = Instant::now();
        {
            let _w = self.writer.lock();
            old.copy_into(&fresh, mark);
            old.reconcile_deletes(&fresh);
            *self.live.write() = Arc::new(fresh);
        }
        let pause = paused.elapsed();
        let live = self.live.read().clone();
        CompactionReport {
            tombstones_dropped: before_tombstones.saturating_sub(live.tombstones()),
            live_points: live.live_count(),
            rebuild,
            pause,
        }
    }

    /// Whether tombstones are a large enough share to make a rebuild worth it.
    pub fn needs_compaction(&self, threshold: f64) -> bool {
        let s = self.stats();
        let total = s.live_points + s.tombstones;
        total > 0 && s.tombstones as f64 / total as f64 >= threshold
    }

    /// The stored vector as indexed (normalised under cosine).
    pub fn vector_of(&self, id: &PointId) -> Option<Vec<f32>> {
        self.live.read().vector_of(id)
    }
}

fn new_live(spec: &CollectionSpec, expected: usize, index: &IndexOptions) -> LiveIndex {
    let m = spec.hnsw.m as usize;
    let efc = spec.hnsw.ef_construction as usize;
    LiveIndex::new(index.build(spec.dimension as usize, space_of(spec.metric), m, efc, expected))
}

/// Why a write to a shard being split is refused (contains [`SPLIT_REFUSAL`]).
pub fn split_refusal(shard: &ShardId, job: &str) -> String {
    format!(
        "shard {shard} {SPLIT_REFUSAL} (job {job}): nothing was written; send it again, it goes to the shard's halves once the split is done"
    )
}
