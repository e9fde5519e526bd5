//! The Raft state machine of a shard group is the shard engine itself: one entry
//! is one validated client batch, applied with the entry's log id and the
//! group's membership in the same sled batch (so state and position never
//! disagree after a crash).
//!
//! Snapshots are exact: the engine holds writers back while the store is copied
//! to the snapshot file (`ShardEngine::frozen`), so the file is the state at one
//! log id; the pause is recorded in `sovra_raft_snapshot_pause_seconds`.
//! Received snapshots are verified whole (digest, shard, region) before the
//! engine's contents are replaced; a refused snapshot leaves the state as it was.

use crate::snapshot::{self, SnapshotError, SnapshotFile, SnapshotHeader};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageErr, StoredMembership, TypeConfig, io_err};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use serde::{Deserialize, Serialize};
use sovra_shard::{ShardEngine, ShardError};
use sovra_types::{RegionId, ShardCommand, ShardId};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::types::ShardResponse;

const CURRENT: &str = "current.snap";

/// What the shard store keeps for Raft beside the data, in every apply batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReplicaMeta {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// Counters the node exports per group.
#[derive(Default, Debug)]
pub struct SmStats {
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
    pub snapshots_refused: AtomicU64,
    /// Writers' wait while the last snapshot was copied, in microseconds.
    pub last_snapshot_pause_us: AtomicU64,
}

#[derive(Clone)]
pub struct ShardStateMachine {
    engine: Arc<ShardEngine>,
    dir: PathBuf,
    node_region: RegionId,
    pub stats: Arc<SmStats>,
    /// Held by a build from reading the state to its file becoming current,
    /// and by an install from its file becoming current to the state
    /// replaced: otherwise a build of the state before an install could
    /// land over the installed file after it (the current file then older
    /// than what Raft has purged its log through).
    files: Arc<std::sync::Mutex<()>>,
}

/// A received snapshot file untouched this long was abandoned (its sender
/// gave up); younger ones may still be arriving.
const STALE_RECEIVE: std::time::Duration = std::time::Duration::from_secs(600);

fn meta_of(engine: &ShardEngine) -> Result<ReplicaMeta, StorageErr> {
    match engine
        .store()
        .replica_meta()
        .map_err(|e| io_err(e, StorageIOError::read_state_machine))?
    {
        None => Ok(ReplicaMeta::default()),
        Some(b) => postcard::from_bytes(&b).map_err(|e| io_err(e, StorageIOError::read_state_machine)),
    }
}

fn snap_err(e: SnapshotError) -> StorageErr {
    io_err(e, read_snapshot_any)
}

/// openraft's snapshot error constructors take a signature we do not have at
/// these points; these fit `io_err`.
fn read_snapshot_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::read_snapshot(None, e)
}

fn write_snapshot_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::write_snapshot(None, e)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StorageErr> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(e, StorageIOError::write_state_machine))
}

impl ShardStateMachine {
    /// `dir` holds this group's snapshot files. If an earlier install was cut
    /// off, it is redone from the snapshot file before anything else.
    pub fn open(engine: Arc<ShardEngine>, dir: PathBuf, node_region: RegionId) -> Result<Self, StorageErr> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err(e, write_snapshot_any))?;
        let sm = Self {
            engine,
            dir,
            node_region,
            stats: Arc::default(),
            files: Arc::default(),
        };
        sm.recover()?;
        // Nothing is being built or received yet: any temporary file is a
        // leftover.
        sm.remove_others(&sm.dir.join(CURRENT), true);
        Ok(sm)
    }

    /// Redoes a snapshot install that was cut off (crash or fatal error part
    /// way), from the snapshot file kept for exactly this. Blocking.
    pub fn recover(&self) -> Result<(), StorageErr> {
        let interrupted = self
            .engine
            .store()
            .install_interrupted()
            .map_err(|e| io_err(e, StorageIOError::read_state_machine))?;
        if interrupted {
            tracing::warn!(shard = %self.engine.id(), "snapshot install was interrupted; installing it again");
            self.install_file(&self.dir.join(CURRENT), None).map_err(snap_err)?;
        }
        Ok(())
    }

    pub fn engine(&self) -> &Arc<ShardEngine> {
        &self.engine
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks `path` whole, moves it into place as the current snapshot and
    /// replaces the engine's contents with it. Blocking.
    fn install_file(&self, path: &Path, expect: Option<&SnapshotMeta>) -> Result<u64, SnapshotError> {
        let id = self.engine.id().clone();
        let header = match snapshot::verify(path, &id, &self.node_region, self.engine.spec()) {
            Ok(h) => h,
            Err(e) => {
                self.stats.snapshots_refused.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if let Some(m) = expect
            && (m.last_log_id != header.last_log_id || m.last_membership != header.membership)
        {
            self.stats.snapshots_refused.fetch_add(1, Ordering::Relaxed);
            return Err(SnapshotError::MetaMismatch);
        }
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.dir.join(CURRENT);
        if path != current {
            std::fs::rename(path, &current)?;
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        let meta = ReplicaMeta {
            last_applied: header.last_log_id,
            membership: header.membership.clone(),
        };
        let meta_bytes = postcard::to_allocvec(&meta)?;
        let index = header.last_log_id.map_or(0, |l| l.index);
        let records = snapshot::Reader::open(&current)?;
        let count = match self
            .engine
            .install(records, index, &meta_bytes, &header.rejections, &header.suppression)
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(ShardError::Io(e)) => return Err(SnapshotError::Io(e)),
            Err(e) => return Err(SnapshotError::Io(std::io::Error::other(e.to_string()))),
        };
        self.remove_others(&current, false);
        self.stats.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(shard = %id, index, points = count, "snapshot installed");
        Ok(count as u64)
    }

    /// Deletes every file in the snapshot directory but `keep` and, unless
    /// `all`, snapshots still being received (touched within
    /// [`STALE_RECEIVE`]).
    fn remove_others(&self, keep: &Path, all: bool) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            if e.path() == keep {
                continue;
            }
            let receiving = e.file_name().to_string_lossy().starts_with("recv-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < STALE_RECEIVE));
            if all || !receiving {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Deletes the replica's directory: data, Raft log and snapshots (it left
    /// its group, or its collection was dropped).
    pub fn destroy(&self) -> Result<(), ShardError> {
        self.engine.destroy()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ShardStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageErr> {
        let this = self.clone();
        let (header, path) = blocking(move || -> Result<(SnapshotHeader, PathBuf), SnapshotError> {
            let tmp = this.dir.join(format!("build-{:016x}.tmp", rand::random::<u64>()));
            let _files = this.files.lock().unwrap_or_else(|p| p.into_inner());
            let (written, pause) = this.engine.frozen(|store| -> Result<SnapshotHeader, SnapshotError> {
                let meta = store
                    .replica_meta()
                    .map_err(|e| SnapshotError::Io(std::io::Error::other(e.to_string())))?
                    .map(|b| postcard::from_bytes::<ReplicaMeta>(&b))
                    .transpose()?
                    .unwrap_or_default();
                let header = SnapshotHeader {
                    shard: this.engine.id().clone(),
                    snapshot_id: format!("{}-{:016x}", meta.last_applied.map_or(0, |l| l.index), rand::random::<u64>()),
                    last_log_id: meta.last_applied,
                    membership: meta.membership,
                    spec: this.engine.spec().clone(),
                    rejections: store
                        .rejections()
                        .map_err(|e| SnapshotError::Io(std::io::Error::other(e.to_string())))?,
                    suppression: store
                        .suppression()
                        .map_err(|e| SnapshotError::Io(std::io::Error::other(e.to_string())))?,
                };
                snapshot::write(&tmp, &header, store.points())?.map_err(|e| SnapshotError::Io(std::io::Error::other(e.to_string())))?;
                Ok(header)
            });
            let header = written?;
            this.stats.last_snapshot_pause_us.store(pause.as_micros() as u64, Ordering::Relaxed);
            metrics::histogram!(crate::metrics::SNAPSHOT_PAUSE_SECONDS).record(pause.as_secs_f64());
            let current = this.dir.join(CURRENT);
            std::fs::rename(&tmp, &current)?;
            std::fs::File::open(&this.dir)?.sync_all()?;
            this.remove_others(&current, false);
            this.stats.snapshots_built.fetch_add(1, Ordering::Relaxed);
            Ok((header, current))
        })
        .await?
        .map_err(|e| io_err(e, write_snapshot_any))?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_snapshot_any))?;
        Ok(Snapshot {
            meta: header.meta(),
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageErr> {
        let m = meta_of(&self.engine)?;
        Ok((m.last_applied, m.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ShardResponse>, StorageErr>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut meta = meta_of(&self.engine)?;
        let mut metas = Vec::with_capacity(entries.len());
        for e in &entries {
            meta.last_applied = Some(e.log_id);
            if let EntryPayload::Membership(m) = &e.payload {
                meta.membership = StoredMembership::new(Some(e.log_id), m.clone());
            }
            metas.push(postcard::to_allocvec(&meta).map_err(|err| io_err(err, StorageIOError::write_state_machine))?);
        }
        let engine = self.engine.clone();
        let started = Instant::now();
        let changed = blocking(move || {
            let batch: Vec<(u64, Option<&ShardCommand>, Vec<u8>)> = entries
                .iter()
                .zip(metas)
                .map(|(e, m)| {
                    let cmd = match &e.payload {
                        EntryPayload::Normal(c) => Some(c),
                        _ => None,
                    };
                    (e.log_id.index, cmd, m)
                })
                .collect();
            engine.apply_entries(&batch)
        })
        .await?
        .map_err(|e| io_err(e, StorageIOError::write_state_machine))?;
        let labels = crate::metrics::group_labels(self.engine.id());
        metrics::histogram!(crate::metrics::APPLY_SECONDS, &labels).record(started.elapsed().as_secs_f64());
        let rejected = changed.iter().filter(|c| c.rejected.is_some()).count();
        if rejected > 0 {
            metrics::counter!(crate::metrics::ENTRIES_REJECTED, &labels).increment(rejected as u64);
        }
        Ok(changed
            .into_iter()
            .map(|c| ShardResponse {
                changed: c.changed as u64,
                rejected: c.rejected,
            })
            .collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageErr> {
        let path = self.dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
        SnapshotFile::create(path)
            .await
            .map(Box::new)
            .map_err(|e| io_err(e, write_snapshot_any))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageErr> {
        let SnapshotFile { mut file, path } = *snapshot;
        use tokio::io::AsyncWriteExt;
        file.flush().await.map_err(|e| io_err(e, write_snapshot_any))?;
        file.sync_all().await.map_err(|e| io_err(e, write_snapshot_any))?;
        drop(file);
        // A file from elsewhere (not received into our directory) is copied in
        // first, so the caller's file is left alone.
        let path = if path.parent() == Some(self.dir.as_path()) {
            path
        } else {
            let local = self.dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
            tokio::fs::copy(&path, &local).await.map_err(|e| io_err(e, write_snapshot_any))?;
            local
        };
        let this = self.clone();
        let meta = meta.clone();
        let shard: ShardId = self.engine.id().clone();
        blocking(move || {
            let r = this.install_file(&path, Some(&meta));
            if r.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            r
        })
        .await?
        .map_err(|e| {
            tracing::error!(shard = %shard, error = %e, "snapshot refused");
            snap_err(e)
        })?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageErr> {
        let path = self.dir.join(CURRENT);
        if !path.exists() {
            return Ok(None);
        }
        let p = path.clone();
        let header = blocking(move || -> Result<SnapshotHeader, SnapshotError> {
            let mut f = std::io::BufReader::new(std::fs::File::open(&p)?);
            snapshot::parse_header(&mut f)
        })
        .await?
        .map_err(snap_err)?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_snapshot_any))?;
        Ok(Some(Snapshot {
            meta: header.meta(),
            snapshot: Box::new(file),
        }))
    }
}
