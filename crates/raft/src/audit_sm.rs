//! A region's audit group's Raft state machine: the region's audit log.
//!
//! Applying an [`AuditBatch`] appends its records to a [`sovra_audit::Log`]
//! (each becomes one chained JSON line, its exact bytes the Merkle leaf), in
//! log order, so every replica holds the same lines and the same tree. The
//! lines, a time index and the head (Raft's applied log id and membership,
//! the tree's perfect-subtree roots) are written in one sled batch when the
//! entry applies; the entry itself was durable in the Raft log on a quorum
//! before it committed, and a call audited by it is answered only after that.
//!
//! Snapshots are files: magic, format version, the head, every line (length
//! prefixed), then an xxh3-64 digest of everything before it. An installed
//! snapshot is checked whole (magic, version, digest, the announced log id,
//! and the tree recomputed from its lines matching its head) before it
//! replaces anything.

use crate::snapshot::SnapshotFile;
use crate::types::{AuditAppended, AuditBatch, AuditConfig, LogId, SnapshotMeta, StorageErr, StoredMembership, io_err};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sovra_audit::{Log, Tree};
use sovra_shard::ReplicaStore;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TREE: &str = "audit";
const HEAD: &[u8] = b"h";
const RECORD: u8 = b'r';
const BY_TIME: u8 = b't';
const CURRENT: &str = "current.snap";
const MAGIC: &[u8; 8] = b"SOVRAAUD";
/// Format of an audit snapshot file and of the persisted head.
pub const AUDIT_FORMAT: u32 = 1;

/// The state beside the lines: Raft's position and the tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Head {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub snapshot_id: String,
    pub tree: Tree,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditSnapshotError {
    #[error("not an audit snapshot (bad magic)")]
    Magic,
    #[error("audit snapshot has format version {found}; this build reads {AUDIT_FORMAT}")]
    Version { found: u32 },
    #[error("audit snapshot digest mismatch: the file is corrupt or cut short")]
    Digest,
    #[error("audit snapshot's lines do not give the tree its head names: it was altered")]
    Tree,
    #[error("audit snapshot is for log id {found:?}, but {expected:?} was announced")]
    MetaMismatch { found: Option<LogId>, expected: Option<LogId> },
    #[error("audit snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
}

fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [RECORD; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn time_key(at_ms: u64, seq: u64) -> [u8; 17] {
    let mut k = [BY_TIME; 17];
    k[1..9].copy_from_slice(&at_ms.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn encode_head(h: &Head) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(h, AUDIT_FORMAT.to_be_bytes().to_vec())
}

fn decode_head(v: &[u8]) -> Result<Head, AuditSnapshotError> {
    let (version, body) = v.split_at(4.min(v.len()));
    let found = u32::from_be_bytes(version.try_into().unwrap_or([0; 4]));
    if found != AUDIT_FORMAT {
        return Err(AuditSnapshotError::Version { found });
    }
    Ok(postcard::from_bytes(body)?)
}

struct Inner {
    store: ReplicaStore,
    tree: sled::Tree,
    dir: PathBuf,
    head: RwLock<Head>,
    /// Builds and installs of snapshot files, one at a time.
    files: tokio::sync::Mutex<()>,
}

/// One page of lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    pub lines: Vec<String>,
    /// Where the next page starts (a sequence number, or a time cursor),
    /// when there may be more.
    pub next: Option<(u64, u64)>,
}

#[derive(Clone)]
pub struct AuditStateMachine(Arc<Inner>);

fn read_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::read_snapshot(None, e)
}

fn write_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::write_snapshot(None, e)
}

impl AuditStateMachine {
    /// Loads the head from `store` (empty for a new replica); a snapshot
    /// installed but cut off before its lines were all stored is stored
    /// again from its file. Blocking.
    pub fn open(store: ReplicaStore) -> Result<Self, StorageErr> {
        let dir = store.snapshot_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(e, write_any))?;
        let tree = store
            .db()
            .open_tree(TREE)
            .map_err(|e| io_err(e, StorageIOError::read_state_machine))?;
        let this = Self(Arc::new(Inner {
            store,
            tree,
            dir,
            head: RwLock::new(Head::default()),
            files: tokio::sync::Mutex::new(()),
        }));
        this.recover()?;
        Ok(this)
    }

    /// Reloads the head from disk (at open, and after the watchdog restarted
    /// the core). Blocking.
    pub fn recover(&self) -> Result<(), StorageErr> {
        let stored = match self.0.tree.get(HEAD).map_err(|e| io_err(e, StorageIOError::read_state_machine))? {
            None => Head::default(),
            Some(v) => decode_head(&v).map_err(|e| io_err(e, StorageIOError::read_state_machine))?,
        };
        let current = self.0.dir.join(CURRENT);
        let head = match std::fs::read(&current) {
            // An install renames its file into place before it stores the
            // lines: a crash between leaves the store behind the file.
            Ok(bytes) => {
                let snap = decode_file(&bytes).map_err(|e| io_err(e, StorageIOError::read_state_machine))?;
                if snap.0.last_applied > stored.last_applied {
                    tracing::warn!("audit store is behind its snapshot (an install was cut off); storing the snapshot again");
                    self.store_snapshot(&snap)
                        .map_err(|e| io_err(e, StorageIOError::read_state_machine))?;
                    snap.0
                } else {
                    stored
                }
            }
            Err(_) => stored,
        };
        *self.0.head.write() = head;
        Ok(())
    }

    /// The log's size and root, and the Raft index they reflect.
    pub fn head(&self) -> (u64, sovra_audit::Hash, u64) {
        let h = self.0.head.read();
        (h.tree.size(), h.tree.root(), h.last_applied.map_or(0, |l| l.index))
    }

    /// The tree as applied now (to sign a checkpoint of it).
    pub fn tree(&self) -> Tree {
        self.0.head.read().tree.clone()
    }

    pub fn last_applied(&self) -> u64 {
        self.0.head.read().last_applied.map_or(0, |l| l.index)
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Deletes the replica's whole directory (its lines, log and snapshots);
    /// the caller has stopped its Raft core. Blocking.
    pub fn destroy(&self) -> Result<(), sovra_shard::ShardError> {
        self.0.store.destroy()
    }

    /// Up to `limit` lines (and about `max_bytes`, at least one line) from
    /// sequence number `from`, in order. Blocking.
    pub fn lines_from(&self, from: u64, limit: usize, max_bytes: usize) -> Result<Lines, sled::Error> {
        let size = self.head().0;
        let mut out = Lines::default();
        let mut used = 0;
        for kv in self.0.tree.range(record_key(from)..record_key(size)) {
            let (k, v) = kv?;
            used += v.len();
            if out.lines.len() == limit || (used > max_bytes && !out.lines.is_empty()) {
                let seq = u64::from_be_bytes(k[1..9].try_into().expect("record key"));
                out.next = Some((seq, 0));
                break;
            }
            out.lines.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Up to `limit` lines (and about `max_bytes`, at least one line) whose
    /// record time is in `[from_ms, to_ms)`, by time then sequence, starting
    /// at cursor `after` (a previous page's `next`: time, sequence). Blocking.
    pub fn lines_between(
        &self,
        from_ms: u64,
        to_ms: u64,
        after: Option<(u64, u64)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Lines, sled::Error> {
        let start = match after {
            Some((at, seq)) => time_key(at, seq),
            None => time_key(from_ms, 0),
        };
        let mut out = Lines::default();
        if from_ms >= to_ms {
            return Ok(out);
        }
        let mut used = 0;
        for kv in self.0.tree.range(start..time_key(to_ms, 0)) {
            let (k, _) = kv?;
            let at = u64::from_be_bytes(k[1..9].try_into().expect("time key"));
            let seq = u64::from_be_bytes(k[9..17].try_into().expect("time key"));
            let Some(v) = self.0.tree.get(record_key(seq))? else { continue };
            used += v.len();
            if out.lines.len() == limit || (used > max_bytes && !out.lines.is_empty()) {
                out.next = Some((at, seq));
                break;
            }
            out.lines.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Replaces the store's lines and head with `snap`'s. Blocking.
    fn store_snapshot(&self, snap: &(Head, Vec<String>)) -> Result<(), AuditSnapshotError> {
        let (head, lines) = snap;
        self.0.tree.clear()?;
        let mut batch = sled::Batch::default();
        for (seq, line) in lines.iter().enumerate() {
            let seq = seq as u64;
            batch.insert(&record_key(seq), line.as_bytes());
            if let Some(at) = at_ms_of(line) {
                batch.insert(&time_key(at, seq), &[]);
            }
        }
        batch.insert(HEAD, encode_head(head)?);
        self.0.tree.apply_batch(batch)?;
        self.0.tree.flush()?;
        Ok(())
    }
}

/// A stored line's record time (lines are this log's own JSON).
fn at_ms_of(line: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct At {
        at_ms: u64,
    }
    serde_json::from_str::<At>(line).ok().map(|a| a.at_ms)
}

fn decode_file(bytes: &[u8]) -> Result<(Head, Vec<String>), AuditSnapshotError> {
    if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(AuditSnapshotError::Magic);
    }
    let found = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != AUDIT_FORMAT {
        return Err(AuditSnapshotError::Version { found });
    }
    let (body, digest) = bytes.split_at(bytes.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body).to_be_bytes() != digest {
        return Err(AuditSnapshotError::Digest);
    }
    let mut r = &body[12..];
    let head: Head = postcard::from_bytes(take(&mut r)?)?;
    let mut lines = Vec::with_capacity(head.tree.size() as usize);
    let mut tree = Tree::default();
    for _ in 0..head.tree.size() {
        let line = String::from_utf8(take(&mut r)?.to_vec()).map_err(|_| AuditSnapshotError::Tree)?;
        tree.push(sovra_audit::leaf_hash(line.as_bytes()));
        lines.push(line);
    }
    if tree != head.tree {
        return Err(AuditSnapshotError::Tree);
    }
    Ok((head, lines))
}

/// The next length-prefixed item of a snapshot body.
fn take<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], AuditSnapshotError> {
    if r.len() < 4 {
        return Err(AuditSnapshotError::Digest);
    }
    let n = u32::from_be_bytes(r[..4].try_into().expect("4 bytes")) as usize;
    if r.len() < 4 + n {
        return Err(AuditSnapshotError::Digest);
    }
    let (item, rest) = r[4..].split_at(n);
    *r = rest;
    Ok(item)
}

fn put(w: &mut impl Write, hasher: &mut xxhash_rust::xxh3::Xxh3, bytes: &[u8]) -> std::io::Result<()> {
    let len = (bytes.len() as u32).to_be_bytes();
    hasher.update(&len);
    hasher.update(bytes);
    w.write_all(&len)?;
    w.write_all(bytes)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StorageErr> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(e, StorageIOError::write_state_machine))
}

fn meta_of(h: &Head) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: h.last_applied,
        last_membership: h.membership.clone(),
        snapshot_id: h.snapshot_id.clone(),
    }
}

impl RaftSnapshotBuilder<AuditConfig> for AuditStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<AuditConfig>, StorageErr> {
        let _one = self.0.files.lock().await;
        // Lines are only ever appended: those below the head's size are the
        // head's, whatever is applied meanwhile.
        let mut head = self.0.head.read().clone();
        head.snapshot_id = format!("{}-{:016x}", head.last_applied.map_or(0, |l| l.index), rand::random::<u64>());
        let this = self.clone();
        let h2 = head.clone();
        let path = blocking(move || -> Result<PathBuf, AuditSnapshotError> {
            let tmp = this.0.dir.join(format!("build-{:016x}.tmp", rand::random::<u64>()));
            let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            let mut prefix = MAGIC.to_vec();
            prefix.extend_from_slice(&AUDIT_FORMAT.to_be_bytes());
            hasher.update(&prefix);
            w.write_all(&prefix)?;
            put(&mut w, &mut hasher, &postcard::to_allocvec(&h2)?)?;
            let mut n = 0u64;
            for kv in this.0.tree.range(record_key(0)..record_key(h2.tree.size())) {
                let (_, v) = kv?;
                put(&mut w, &mut hasher, &v)?;
                n += 1;
            }
            if n != h2.tree.size() {
                return Err(AuditSnapshotError::Tree);
            }
            w.write_all(&hasher.digest().to_be_bytes())?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let current = this.0.dir.join(CURRENT);
            std::fs::rename(&tmp, &current)?;
            std::fs::File::open(&this.0.dir)?.sync_all()?;
            Ok(current)
        })
        .await?
        .map_err(|e| io_err(e, write_any))?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_any))?;
        Ok(Snapshot {
            meta: meta_of(&head),
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<AuditConfig> for AuditStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageErr> {
        let h = self.0.head.read();
        Ok((h.last_applied, h.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<AuditAppended>, StorageErr>
    where
        I: IntoIterator<Item = openraft::Entry<AuditConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut head = self.0.head.read().clone();
        let mut log = Log::resume(head.tree.clone());
        let mut batch = sled::Batch::default();
        let mut out = Vec::new();
        for e in entries {
            head.last_applied = Some(e.log_id);
            let first_seq = log.tree().size();
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => head.membership = StoredMembership::new(Some(e.log_id), m),
                EntryPayload::Normal(AuditBatch { records }) => {
                    for r in &records {
                        let seq = log.tree().size();
                        let line = log.append(r);
                        batch.insert(&record_key(seq), line.as_bytes());
                        batch.insert(&time_key(r.at_ms, seq), &[]);
                    }
                }
            }
            out.push(AuditAppended {
                first_seq,
                size: log.tree().size(),
            });
        }
        if out.is_empty() {
            return Ok(out);
        }
        head.tree = log.tree().clone();
        let this = self.clone();
        let head = blocking(move || -> Result<Head, StorageErr> {
            let w = |e: sled::Error| io_err(e, StorageIOError::write_state_machine);
            batch.insert(
                HEAD,
                encode_head(&head).map_err(|e| io_err(e, StorageIOError::write_state_machine))?,
            );
            // Not flushed here: the entries are durable in the Raft log (the
            // same database, flushed on append), the lines and head land in
            // one atomic batch, and replaying entries past a head that was
            // lost in a crash writes the same lines at the same keys.
            this.0.tree.apply_batch(batch).map_err(w)?;
            Ok(head)
        })
        .await??;
        *self.0.head.write() = head;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageErr> {
        let path = self.0.dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
        SnapshotFile::create(path).await.map(Box::new).map_err(|e| io_err(e, write_any))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageErr> {
        let _one = self.0.files.lock().await;
        let SnapshotFile { mut file, path } = *snapshot;
        use tokio::io::AsyncWriteExt;
        file.flush().await.map_err(|e| io_err(e, write_any))?;
        drop(file);
        let expected = meta.last_log_id;
        let this = self.clone();
        let head = blocking(move || -> Result<Head, AuditSnapshotError> {
            let mut bytes = Vec::new();
            BufReader::new(std::fs::File::open(&path)?).read_to_end(&mut bytes)?;
            let checked = decode_file(&bytes).and_then(|s| {
                if s.0.last_applied == expected {
                    Ok(s)
                } else {
                    Err(AuditSnapshotError::MetaMismatch {
                        found: s.0.last_applied,
                        expected,
                    })
                }
            });
            let snap = match checked {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
            let current = this.0.dir.join(CURRENT);
            if path != current {
                std::fs::rename(&path, &current)?;
                std::fs::File::open(&this.0.dir)?.sync_all()?;
            }
            this.store_snapshot(&snap)?;
            Ok(snap.0)
        })
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "audit snapshot refused");
            io_err(e, read_any)
        })?;
        *self.0.head.write() = head;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<AuditConfig>>, StorageErr> {
        let path = self.0.dir.join(CURRENT);
        if !path.exists() {
            return Ok(None);
        }
        let p = path.clone();
        let head = blocking(move || -> Result<Head, AuditSnapshotError> { Ok(decode_file(&std::fs::read(&p)?)?.0) })
            .await?
            .map_err(|e| io_err(e, read_any))?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_any))?;
        Ok(Some(Snapshot {
            meta: meta_of(&head),
            snapshot: Box::new(file),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_file(lines: &[String], tree: Tree) -> Vec<u8> {
        let head = Head {
            tree,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut prefix = MAGIC.to_vec();
        prefix.extend_from_slice(&AUDIT_FORMAT.to_be_bytes());
        hasher.update(&prefix);
        out.extend_from_slice(&prefix);
        put(&mut out, &mut hasher, &postcard::to_allocvec(&head).unwrap()).unwrap();
        for l in lines {
            put(&mut out, &mut hasher, l.as_bytes()).unwrap();
        }
        out.extend_from_slice(&hasher.digest().to_be_bytes());
        out
    }

    #[test]
    fn snapshot_files_are_checked_whole_and_against_their_tree() {
        let mut log = Log::default();
        let r = sovra_audit::Record {
            at_ms: 5,
            key_id: "k".into(),
            call: "search".into(),
            purpose: String::new(),
            collection: "c".into(),
            regions: vec![],
            shards: 1,
            results: 0,
            query_sha256: None,
            target: None,
            status: "OK".into(),
        };
        let lines: Vec<String> = (0..3).map(|_| log.append(&r)).collect();
        let good = line_file(&lines, log.tree().clone());
        let (head, back) = decode_file(&good).unwrap();
        assert_eq!(back, lines);
        assert_eq!(head.tree, *log.tree());
        assert_eq!(at_ms_of(&back[0]), Some(5));
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        assert!(matches!(decode_file(&flipped), Err(AuditSnapshotError::Digest)));
        // A consistent file whose lines were edited no longer gives its tree.
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("search", "upsert");
        assert!(matches!(
            decode_file(&line_file(&edited, log.tree().clone())),
            Err(AuditSnapshotError::Tree)
        ));
        assert!(matches!(decode_file(b"garbage"), Err(AuditSnapshotError::Magic)));
    }
}
