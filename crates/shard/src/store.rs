//! On-disk layout of one shard, in its own sled tree:
//!
//! | key | value |
//! |---|---|
//! | `p` + point key | postcard [`PointRecord`] |
//! | `s` + u16 BE subject length + subject + point key | empty (subject index) |
//! | `e` + u64 BE `expires_at_ms` + point key | empty (expiry index) |
//! | `m` + `last_applied` | u64 BE |
//! | `m` + `replica` | opaque bytes of the replication layer (Raft's applied log id and membership) |
//! | `m` + `installing` | present only while a snapshot replaces the shard's contents |
//! | `m` + `rejections` | postcard [`Rejections`]: entries refused on apply |
//! | `m` + `frozen` | the split job whose fence the shard applied (it takes no writes) |
//! | `m` + `retired` | present once the split's halves hold it all: it answers no reads |
//! | `m` + `sealed` | a split half: the job whose final copy began (earlier copies are refused) |
//! | `m` + `suppress_key` | 32 bytes: the key of the suppression list's hashes |
//! | `m` + `purge_pending` | u64 BE: log index of the last erasure applied (this replica's own bookkeeping) |
//! | `m` + `purge_done` | u64 BE: erasures through this index are purged (index, snapshots, log, database files) |
//! | `m` + `purge_reported` | u64 BE: the purge mark last reported to the meta group |
//! | `j` + job id | postcard (log index, points removed): an erasure job this replica applied, until reported |
//! | `x` + HMAC-SHA256(suppress key, subject) | u64 BE: when the subject was erased (ms) |
//! | `t` + HMAC-SHA256(suppress key, point key) | u64 BE: when the point was erased (ms): a tombstone |
//! | `o` + template id | postcard [`OptOut`]: an opted-out likeness (vector, threshold, time) |
//!
//! The suppression list names erased subjects only by a keyed hash: the list
//! alone does not tell whose data was erased, and a guessed subject id cannot be
//! checked against it without the key, which lives only in this shard group's
//! replicas (its own region).
//!
//! Point keys are [`PointId::key_bytes`], so `p` keys sort by id. The state
//! digest is a pure function of the points, the recorded rejections, the
//! suppression list and the opt-out registry (the purge marks and job records are this replica's own
//! bookkeeping: not in it, and kept across a snapshot install).

use crate::ShardError;
use sled::{Batch, Tree};
use sovra_types::{OptOut, PointId, PointRecord};
use xxhash_rust::xxh3::Xxh3;

const POINT: u8 = b'p';
const SUBJECT: u8 = b's';
const EXPIRY: u8 = b'e';
const SUPPRESSED: u8 = b'x';
const TOMBSTONE: u8 = b't';
const OPT_OUT: u8 = b'o';
const SUPPRESS_KEY: &[u8] = b"msuppress_key";
const PURGE_PENDING: &[u8] = b"mpurge_pending";
const PURGE_DONE: &[u8] = b"mpurge_done";
const PURGE_REPORTED: &[u8] = b"mpurge_reported";
const JOB: u8 = b'j';
const LAST_APPLIED: &[u8] = b"mlast_applied";
const REPLICA_META: &[u8] = b"mreplica";
const INSTALLING: &[u8] = b"minstalling";
const REJECTIONS: &[u8] = b"mrejections";
const FROZEN: &[u8] = b"mfrozen";
const SEALED: &[u8] = b"msealed";
const RETIRED: &[u8] = b"mretired";
/// Rejections kept with their reason; older ones only count.
pub const RECENT_REJECTIONS: usize = 16;

/// Log entries this shard refused on apply because they were invalid against
/// its state (an older build, a bug: the edge of the log refuses them first).
/// Part of the replicated state: every replica records the same ones, snapshots
/// carry them and the digest covers them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejections {
    pub count: u64,
    /// The most recent, oldest first, at most [`RECENT_REJECTIONS`].
    pub recent: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// Log index of the refused entry.
    pub index: u64,
    pub reason: String,
}

impl Rejections {
    pub fn record(&mut self, index: u64, reason: String) {
        self.count += 1;
        self.recent.push(Rejection { index, reason });
        if self.recent.len() > RECENT_REJECTIONS {
            self.recent.remove(0);
        }
    }
}

pub use sovra_types::Suppression;

fn opt_out_key(template: &str) -> Vec<u8> {
    let mut k = vec![OPT_OUT];
    k.extend_from_slice(template.as_bytes());
    k
}

/// The suppression list's tag of a subject: HMAC-SHA256 under the shard's key.
pub fn subject_tag(key: &[u8; 32], subject: &str) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(subject.as_bytes());
    mac.finalize().into_bytes().into()
}

/// A tombstone's tag of a point id: HMAC-SHA256 under the shard's key over
/// `id:` and the id's key bytes (apart from any subject's tag).
pub fn id_tag(key: &[u8; 32], id: &PointId) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"id:");
    mac.update(&id.key_bytes());
    mac.finalize().into_bytes().into()
}

fn suppressed_key(tag: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(SUPPRESSED);
    k.extend_from_slice(tag);
    k
}

pub struct ShardStore {
    tree: Tree,
}

fn point_key(id: &PointId) -> Vec<u8> {
    let mut k = vec![POINT];
    k.extend_from_slice(&id.key_bytes());
    k
}

/// `s` + u16 BE length + subject: the prefix of all of one subject's keys.
fn subject_prefix(subject: &str) -> Vec<u8> {
    let mut k = vec![SUBJECT];
    // Subjects are at most 256 bytes (validated), so u16 always fits.
    k.extend_from_slice(&(subject.len() as u16).to_be_bytes());
    k.extend_from_slice(subject.as_bytes());
    k
}

fn subject_key(subject: &str, id: &PointId) -> Vec<u8> {
    let mut k = subject_prefix(subject);
    k.extend_from_slice(&id.key_bytes());
    k
}

fn expiry_key(at: u64, id: &PointId) -> Vec<u8> {
    let mut k = vec![EXPIRY];
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(&id.key_bytes());
    k
}

fn decode(what: &[u8], bytes: &[u8]) -> Result<PointRecord, ShardError> {
    postcard::from_bytes(bytes).map_err(|source| ShardError::Corrupt {
        what: format!("{what:?}"),
        source,
    })
}

/// A batch of changes being prepared for one command; it reads through to the
/// tree but sees its own pending writes, so several upserts of one id in a batch
/// leave exactly one record and consistent index entries.
pub struct PendingBatch<'a> {
    store: &'a ShardStore,
    batch: Batch,
    overlay: std::collections::HashMap<PointId, Option<PointRecord>>,
}

impl<'a> PendingBatch<'a> {
    fn current(&self, id: &PointId) -> Result<Option<PointRecord>, ShardError> {
        match self.overlay.get(id) {
            Some(r) => Ok(r.clone()),
            None => self.store.get(id),
        }
    }

    fn remove_indexes(&mut self, old: &PointRecord) {
        self.batch.remove(subject_key(&old.subject, &old.id));
        if old.expires_at_ms != 0 {
            self.batch.remove(expiry_key(old.expires_at_ms, &old.id));
        }
    }

    /// Returns whether the id existed before.
    pub fn upsert(&mut self, rec: &PointRecord) -> Result<bool, ShardError> {
        let old = self.current(&rec.id)?;
        if let Some(old) = &old {
            self.remove_indexes(old);
        }
        self.batch
            .insert(point_key(&rec.id), postcard::to_allocvec(rec).map_err(ShardError::Encode)?);
        self.batch.insert(subject_key(&rec.subject, &rec.id), &[][..]);
        if rec.expires_at_ms != 0 {
            self.batch.insert(expiry_key(rec.expires_at_ms, &rec.id), &[][..]);
        }
        self.overlay.insert(rec.id, Some(rec.clone()));
        Ok(old.is_some())
    }

    /// Returns whether the id existed.
    pub fn delete(&mut self, id: &PointId) -> Result<bool, ShardError> {
        Ok(self.take(id)?.is_some())
    }

    /// Removes a point and returns it as it was (`None`: it did not exist).
    pub fn take(&mut self, id: &PointId) -> Result<Option<PointRecord>, ShardError> {
        let Some(old) = self.current(id)? else { return Ok(None) };
        self.remove_indexes(&old);
        self.batch.remove(point_key(id));
        self.overlay.insert(*id, None);
        Ok(Some(old))
    }

    /// Sets the suppression list's key (only ever once per shard).
    pub fn set_suppress_key(&mut self, key: &[u8; 32]) {
        self.batch.insert(SUPPRESS_KEY, &key[..]);
    }

    /// Puts a subject's tag on the suppression list, erased at `at_ms`.
    pub fn suppress(&mut self, tag: &[u8; 32], at_ms: u64) {
        self.batch.insert(suppressed_key(tag), &at_ms.to_be_bytes());
    }

    /// Records that the point with this tag (the keyed hash of its id) was
    /// erased at `at_ms`.
    pub fn tombstone(&mut self, tag: &[u8; 32], at_ms: u64) {
        let mut k = Vec::with_capacity(33);
        k.push(TOMBSTONE);
        k.extend_from_slice(tag);
        self.batch.insert(k, &at_ms.to_be_bytes());
    }

    /// Puts a likeness on the opt-out registry.
    pub fn opt_out(&mut self, template: &str, o: &OptOut) -> Result<(), ShardError> {
        self.batch
            .insert(opt_out_key(template), postcard::to_allocvec(o).map_err(ShardError::Encode)?);
        Ok(())
    }

    /// A split's fence: the shard takes no more writes.
    pub fn freeze(&mut self, job: &str) {
        self.batch.insert(FROZEN, job.as_bytes());
    }

    /// Lifts the fence and the retirement.
    pub fn unfreeze(&mut self) {
        self.batch.remove(FROZEN);
        self.batch.remove(RETIRED);
    }

    /// The split is complete: the shard answers no reads.
    pub fn retire(&mut self) {
        self.batch.insert(RETIRED, &[][..]);
    }

    /// A split half's final copy began.
    pub fn seal(&mut self, job: &str) {
        self.batch.insert(SEALED, job.as_bytes());
    }

    /// Takes a likeness off the opt-out registry.
    pub fn remove_opt_out(&mut self, template: &str) {
        self.batch.remove(opt_out_key(template));
    }

    /// Notes that the entry at `index` erased points, so the replica purges
    /// what is left of them (index, snapshots, log, database files) through it.
    pub fn purge_pending(&mut self, index: u64) {
        self.batch.insert(PURGE_PENDING, &index.to_be_bytes());
    }

    /// Records that this replica applied erasure job `job` at `index`,
    /// removing `removed` points, for its next purge report.
    pub fn applied_job(&mut self, job: &str, index: u64, removed: u64) -> Result<(), ShardError> {
        let mut key = vec![JOB];
        key.extend_from_slice(job.as_bytes());
        self.batch
            .insert(key, postcard::to_allocvec(&(index, removed)).map_err(ShardError::Encode)?);
        Ok(())
    }

    /// Records a refused entry in the same batch.
    pub fn set_rejections(&mut self, r: &Rejections) -> Result<(), ShardError> {
        self.batch.insert(REJECTIONS, postcard::to_allocvec(r).map_err(ShardError::Encode)?);
        Ok(())
    }

    /// Writes everything and `last_applied` atomically.
    pub fn commit(self, index: u64) -> Result<(), ShardError> {
        self.commit_with(index, None)
    }

    /// Writes everything, `last_applied` and the replication layer's `meta`
    /// atomically, so the state and the log position it reflects never disagree.
    pub fn commit_with(mut self, index: u64, meta: Option<&[u8]>) -> Result<(), ShardError> {
        self.batch.insert(LAST_APPLIED, &index.to_be_bytes());
        if let Some(meta) = meta {
            self.batch.insert(REPLICA_META, meta);
        }
        self.store.tree.apply_batch(self.batch)?;
        Ok(())
    }
}

impl ShardStore {
    pub fn new(tree: Tree) -> Self {
        Self { tree }
    }

    pub fn batch(&self) -> PendingBatch<'_> {
        PendingBatch {
            store: self,
            batch: Batch::default(),
            overlay: Default::default(),
        }
    }

    pub fn last_applied(&self) -> Result<u64, ShardError> {
        Ok(self.get_u64(LAST_APPLIED)?.unwrap_or(0))
    }

    /// A u64 BE value under `key`.
    fn get_u64(&self, key: &[u8]) -> Result<Option<u64>, ShardError> {
        Ok(self
            .tree
            .get(key)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// The replication layer's bytes from the last commit, if any.
    pub fn replica_meta(&self) -> Result<Option<Vec<u8>>, ShardError> {
        Ok(self.tree.get(REPLICA_META)?.map(|v| v.to_vec()))
    }

    pub fn rejections(&self) -> Result<Rejections, ShardError> {
        match self.tree.get(REJECTIONS)? {
            None => Ok(Rejections::default()),
            Some(v) => postcard::from_bytes(&v).map_err(|source| ShardError::Corrupt {
                what: "rejections".into(),
                source,
            }),
        }
    }

    /// Whether a snapshot install was cut off part way (the contents are then
    /// neither the old state nor the new one and must be installed again).
    pub fn install_interrupted(&self) -> Result<bool, ShardError> {
        Ok(self.tree.contains_key(INSTALLING)?)
    }

    /// Marks an install as started and removes every key but the marker
    /// and this replica's own purge bookkeeping (an erasure not purged yet
    /// must still be: the removed keys' bytes stay in the files).
    pub(crate) fn begin_install(&self) -> Result<(), ShardError> {
        self.tree.insert(INSTALLING, &[][..])?;
        self.tree.flush()?;
        for k in self.tree.iter().keys() {
            let k = k?;
            let own = [INSTALLING, PURGE_PENDING, PURGE_DONE, PURGE_REPORTED].contains(&k.as_ref()) || k.first() == Some(&JOB);
            if !own {
                self.tree.remove(k)?;
            }
        }
        Ok(())
    }

    /// Ends an install: position, meta, the snapshot's rejections and
    /// suppression list written, marker removed, in one batch.
    pub(crate) fn finish_install(
        &self,
        index: u64,
        meta: &[u8],
        rejections: &Rejections,
        suppression: &Suppression,
    ) -> Result<(), ShardError> {
        let mut b = Batch::default();
        if let Some(key) = &suppression.key {
            b.insert(SUPPRESS_KEY, &key[..]);
        }
        for (tag, at) in &suppression.entries {
            b.insert(suppressed_key(tag), &at.to_be_bytes());
        }
        for (tag, at) in &suppression.tombstones {
            let mut k = vec![TOMBSTONE];
            k.extend_from_slice(tag);
            b.insert(k, &at.to_be_bytes());
        }
        for (t, o) in &suppression.opt_outs {
            b.insert(opt_out_key(t), postcard::to_allocvec(o).map_err(ShardError::Encode)?);
        }
        if let Some(job) = &suppression.frozen {
            b.insert(FROZEN, job.as_bytes());
        }
        if let Some(job) = &suppression.sealed {
            b.insert(SEALED, job.as_bytes());
        }
        if suppression.retired {
            b.insert(RETIRED, &[][..]);
        }
        b.insert(LAST_APPLIED, &index.to_be_bytes());
        b.insert(REPLICA_META, meta);
        // What the install replaced (points, log entries, maybe erased ones)
        // is removed but still in the files: purge through the snapshot.
        let pending = self.get_u64(PURGE_PENDING)?.unwrap_or(0).max(index);
        b.insert(PURGE_PENDING, &pending.to_be_bytes());
        if rejections.count > 0 {
            b.insert(REJECTIONS, postcard::to_allocvec(rejections).map_err(ShardError::Encode)?);
        }
        b.remove(INSTALLING);
        self.tree.apply_batch(b)?;
        Ok(())
    }

    /// (last erasure applied, erasures purged through): a purge is due while
    /// the first is above the second. Survives restarts, so a purge cut off
    /// is done again.
    pub fn purge_state(&self) -> Result<(u64, u64), ShardError> {
        Ok((self.get_u64(PURGE_PENDING)?.unwrap_or(0), self.get_u64(PURGE_DONE)?.unwrap_or(0)))
    }

    /// Records that erasures through `index` are purged.
    pub fn set_purged(&self, index: u64) -> Result<(), ShardError> {
        self.tree.insert(PURGE_DONE, &index.to_be_bytes())?;
        self.tree.flush()?;
        Ok(())
    }

    /// The purge mark last reported to the meta group.
    pub fn purge_reported(&self) -> Result<u64, ShardError> {
        Ok(self.get_u64(PURGE_REPORTED)?.unwrap_or(0))
    }

    /// Erasure jobs applied and not reported yet: (job, index, removed).
    pub fn applied_jobs(&self) -> Result<Vec<(String, u64, u64)>, ShardError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([JOB]) {
            let (k, v) = kv?;
            let (index, removed): (u64, u64) = postcard::from_bytes(&v).map_err(|source| ShardError::Corrupt {
                what: "an erasure job record".into(),
                source,
            })?;
            out.push((String::from_utf8_lossy(&k[1..]).into_owned(), index, removed));
        }
        Ok(out)
    }

    /// The meta group took a report of a purge through `through` with
    /// these jobs: they are forgotten here.
    pub fn set_reported(&self, through: u64, jobs: &[String]) -> Result<(), ShardError> {
        let mut b = Batch::default();
        for j in jobs {
            let mut key = vec![JOB];
            key.extend_from_slice(j.as_bytes());
            b.remove(key);
        }
        b.insert(PURGE_REPORTED, &through.to_be_bytes());
        self.tree.apply_batch(b)?;
        Ok(())
    }

    /// The suppression list's key, once the shard has applied an erasure.
    pub fn suppress_key(&self) -> Result<Option<[u8; 32]>, ShardError> {
        Ok(self.tree.get(SUPPRESS_KEY)?.and_then(|v| <[u8; 32]>::try_from(v.as_ref()).ok()))
    }

    /// When the subject with this tag was erased, if it is suppressed.
    pub fn suppressed_at(&self, tag: &[u8; 32]) -> Result<Option<u64>, ShardError> {
        self.get_u64(&suppressed_key(tag))
    }

    /// The whole suppression list, for a snapshot.
    pub fn suppression(&self) -> Result<Suppression, ShardError> {
        let mut entries = Vec::new();
        for kv in self.tree.scan_prefix([SUPPRESSED]) {
            let (k, v) = kv?;
            if let (Ok(tag), Ok(at)) = (<[u8; 32]>::try_from(&k[1..]), <[u8; 8]>::try_from(v.as_ref())) {
                entries.push((tag, u64::from_be_bytes(at)));
            }
        }
        Ok(Suppression {
            key: self.suppress_key()?,
            entries,
            opt_outs: self.opt_outs()?,
            frozen: self.frozen()?,
            sealed: self.sealed()?,
            retired: self.retired()?,
            tombstones: self.tagged(TOMBSTONE)?,
        })
    }

    /// Every (tag, ms) entry under `prefix`, in tag order.
    fn tagged(&self, prefix: u8) -> Result<Vec<([u8; 32], u64)>, ShardError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([prefix]) {
            let (k, v) = kv?;
            if let (Ok(tag), Ok(at)) = (<[u8; 32]>::try_from(&k[1..]), <[u8; 8]>::try_from(v.as_ref())) {
                out.push((tag, u64::from_be_bytes(at)));
            }
        }
        Ok(out)
    }

    /// The tombstone of a point (the keyed hash of its id), if it was erased.
    pub fn tombstone_at(&self, tag: &[u8; 32]) -> Result<Option<u64>, ShardError> {
        let mut k = vec![TOMBSTONE];
        k.extend_from_slice(tag);
        self.get_u64(&k)
    }

    /// Whether a split retired this shard.
    pub fn retired(&self) -> Result<bool, ShardError> {
        Ok(self.tree.contains_key(RETIRED)?)
    }

    /// The split job whose final copy began on this half, if any.
    pub fn sealed(&self) -> Result<Option<String>, ShardError> {
        Ok(self.tree.get(SEALED)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The split job whose fence this shard applied, if any.
    pub fn frozen(&self) -> Result<Option<String>, ShardError> {
        Ok(self.tree.get(FROZEN)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The opt-out registry, in template id order.
    pub fn opt_outs(&self) -> Result<Vec<(String, OptOut)>, ShardError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([OPT_OUT]) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[1..]).into_owned();
            let o: OptOut = postcard::from_bytes(&v).map_err(|source| ShardError::Corrupt {
                what: format!("opt-out {id}"),
                source,
            })?;
            out.push((id, o));
        }
        Ok(out)
    }

    /// Removes every key of the shard (the replica left its group).
    pub fn clear(&self) -> Result<(), ShardError> {
        self.tree.clear()?;
        Ok(())
    }

    pub fn get(&self, id: &PointId) -> Result<Option<PointRecord>, ShardError> {
        let key = point_key(id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Every point in key order.
    pub fn points(&self) -> impl Iterator<Item = Result<PointRecord, ShardError>> + '_ {
        self.tree.scan_prefix([POINT]).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// Every point after `after` (all, without it) in key order.
    pub fn points_after(&self, after: Option<&PointId>) -> impl Iterator<Item = Result<PointRecord, ShardError>> + '_ {
        use std::ops::Bound;
        let start = match after {
            Some(id) => Bound::Excluded(point_key(id)),
            None => Bound::Included(vec![POINT]),
        };
        self.tree.range((start, Bound::Excluded(vec![POINT + 1]))).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// Ids of a subject's points, from the subject index.
    pub fn ids_of_subject(&self, subject: &str) -> Result<Vec<PointId>, ShardError> {
        let prefix = subject_prefix(subject);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, _) = kv?;
            if let Some(id) = PointId::from_key_bytes(&k[prefix.len()..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Ids whose `expires_at_ms` is at or before `now_ms`, oldest first.
    pub fn expired_ids(&self, now_ms: u64, limit: usize) -> Result<Vec<PointId>, ShardError> {
        let end = expiry_key(now_ms, &PointId::Uuid(uuid::Uuid::max()));
        let mut out = Vec::new();
        for kv in self.tree.range(vec![EXPIRY, 0, 0, 0, 0, 0, 0, 0, 1]..=end).take(limit) {
            let (k, _) = kv?;
            if let Some(id) = PointId::from_key_bytes(&k[9..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// xxh3-64 over the recorded rejections, the suppression list, then every
    /// point's key and encoded record in key order: equal digests mean equal
    /// points, rejections and suppressions, whatever order the commands came in.
    pub fn digest(&self) -> Result<u64, ShardError> {
        let mut h = Xxh3::new();
        if let Some(r) = self.tree.get(REJECTIONS)? {
            h.update(&(r.len() as u32).to_be_bytes());
            h.update(&r);
        }
        let suppression = self.suppression()?;
        if let Some(key) = &suppression.key {
            h.update(b"suppress");
            h.update(key);
        }
        for (tag, at) in &suppression.entries {
            h.update(tag);
            h.update(&at.to_be_bytes());
        }
        if let Some(job) = &suppression.frozen {
            h.update(b"frozen");
            h.update(job.as_bytes());
        }
        if let Some(job) = &suppression.sealed {
            h.update(b"sealed");
            h.update(job.as_bytes());
        }
        if suppression.retired {
            h.update(b"retired");
        }
        for (tag, at) in &suppression.tombstones {
            h.update(b"tomb");
            h.update(tag);
            h.update(&at.to_be_bytes());
        }
        for kv in self.tree.scan_prefix([OPT_OUT]) {
            let (k, v) = kv?;
            h.update(b"optout");
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(&k);
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(&v);
        }
        for kv in self.tree.scan_prefix([POINT]) {
            let (k, v) = kv?;
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(&k);
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(&v);
        }
        Ok(h.digest())
    }
}
