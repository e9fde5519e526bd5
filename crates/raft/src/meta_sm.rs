//! The meta group's Raft state machine: [`sovra_meta::MetaState`] held in
//! memory and persisted whole, with Raft's applied log id and membership, in
//! the meta replica's own database after every applied batch (metadata is
//! small: nodes, collections, the shard map, policies, keys).
//!
//! Snapshots are files: magic, format version, then one postcard record of the
//! same persisted state, then an xxh3-64 digest of everything before it. A
//! received snapshot is checked whole (magic, version, digest, and the meta
//! that openraft announced) before it replaces anything.
//!
//! Watchers ([`MetaStateMachine::subscribe`]) learn the applied index after
//! every change, so a node's reconcile loop wakes when the map moves.

use crate::snapshot::SnapshotFile;
use crate::types::{LogId, MetaConfig, MetaResponse, SnapshotMeta, StorageErr, StoredMembership, io_err};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sovra_meta::MetaState;
use sovra_meta::state::MetaExt;
use sovra_shard::ReplicaStore;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const STATE_KEY: &[u8] = b"meta_state";
const CURRENT: &str = "current.snap";
const MAGIC: &[u8; 8] = b"SOVRAMET";
/// Format of a meta snapshot file and of the persisted state; bumped whenever
/// `MetaState` changes encoding. 4: the state's [`MetaExt`] follows it; a
/// state at the base meta level is still written as 3 (its bytes are what
/// builds before levels write), so those builds read it until the cluster's
/// level rises, and refuse it, by its number, after.
pub const META_FORMAT: u32 = 4;
/// The format before levels, which this build also reads.
pub const META_FORMAT_BASE: u32 = 3;

fn format_for(ext: &MetaExt) -> u32 {
    if ext.is_base() { META_FORMAT_BASE } else { META_FORMAT }
}

/// A value whose serde form ends with one [`MetaState`]: a state, the
/// replica's persisted record, a node's saved view. The state's [`MetaExt`]
/// (which serde skips) is written after it by [`encode_state`] and put back
/// by [`decode_state`], so no caller can drop it.
pub trait HoldsMeta: Serialize + DeserializeOwned {
    fn meta(&self) -> &MetaState;
    fn meta_mut(&mut self) -> &mut MetaState;
}

impl HoldsMeta for MetaState {
    fn meta(&self) -> &MetaState {
        self
    }
    fn meta_mut(&mut self) -> &mut MetaState {
        self
    }
}

impl HoldsMeta for Persisted {
    fn meta(&self) -> &MetaState {
        &self.state
    }
    fn meta_mut(&mut self) -> &mut MetaState {
        &mut self.state
    }
}

/// A node's saved view: the meta index it reflects, and the state.
impl HoldsMeta for (u64, MetaState) {
    fn meta(&self) -> &MetaState {
        &self.1
    }
    fn meta_mut(&mut self) -> &mut MetaState {
        &mut self.1
    }
}

/// `value`, then its state's [`MetaExt`] unless that is the base level's:
/// then the bytes are exactly what a build before levels writes, and such a
/// build reads the result either way (postcard ignores what follows a value).
pub fn encode_state<T: HoldsMeta>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let out = postcard::to_allocvec(value)?;
    let ext = &value.meta().ext;
    if ext.is_base() { Ok(out) } else { postcard::to_extend(ext, out) }
}

/// Reads what [`encode_state`] wrote, or a build before levels: nothing
/// after the value means the base level.
pub fn decode_state<T: HoldsMeta>(bytes: &[u8]) -> Result<T, postcard::Error> {
    let (mut value, rest): (T, _) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        value.meta_mut().ext = postcard::from_bytes(rest)?;
    }
    Ok(value)
}

fn readable(found: u32) -> bool {
    found == META_FORMAT || found == META_FORMAT_BASE
}

/// What the meta replica persists: the state and Raft's position in one record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub snapshot_id: String,
    pub state: MetaState,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaSnapshotError {
    #[error("not a meta snapshot (bad magic)")]
    Magic,
    #[error("meta snapshot has format version {found}; this build reads {META_FORMAT_BASE} and {META_FORMAT}: run a build that reads it")]
    Version { found: u32 },
    #[error("meta snapshot digest mismatch: the file is corrupt or cut short")]
    Digest,
    #[error("meta snapshot is for log id {found:?}, but {expected:?} was announced")]
    MetaMismatch { found: Option<LogId>, expected: Option<LogId> },
    #[error("meta snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("meta snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

fn encode_file(p: &Persisted) -> Result<Vec<u8>, postcard::Error> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&format_for(&p.state.ext).to_be_bytes());
    out.extend_from_slice(&encode_state(p)?);
    let digest = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&digest.to_be_bytes());
    Ok(out)
}

fn decode_file(bytes: &[u8]) -> Result<Persisted, MetaSnapshotError> {
    if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(MetaSnapshotError::Magic);
    }
    let found = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !readable(found) {
        return Err(MetaSnapshotError::Version { found });
    }
    let (body, digest) = bytes.split_at(bytes.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body).to_be_bytes() != digest {
        return Err(MetaSnapshotError::Digest);
    }
    Ok(decode_state(&body[12..])?)
}

struct Inner {
    store: ReplicaStore,
    dir: PathBuf,
    state: RwLock<Persisted>,
    applied: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
pub struct MetaStateMachine(Arc<Inner>);

fn read_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::read_snapshot(None, e)
}

fn write_any(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::write_snapshot(None, e)
}

impl MetaStateMachine {
    /// Loads the persisted state from `store` (empty for a new replica). Blocking.
    pub fn open(store: ReplicaStore) -> Result<Self, StorageErr> {
        let dir = store.snapshot_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(e, write_any))?;
        let persisted = load(&store)?;
        let index = persisted.last_applied.map_or(0, |l| l.index);
        Ok(Self(Arc::new(Inner {
            store,
            dir,
            state: RwLock::new(persisted),
            applied: tokio::sync::watch::channel(index).0,
        })))
    }

    /// Reloads the state from disk (after the watchdog restarted the core). Blocking.
    pub fn recover(&self) -> Result<(), StorageErr> {
        *self.0.state.write() = load(&self.0.store)?;
        Ok(())
    }

    /// A copy of the current state.
    pub fn state(&self) -> MetaState {
        self.0.state.read().state.clone()
    }

    /// Reads the current state without copying it.
    pub fn read<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        f(&self.0.state.read().state)
    }

    pub fn last_applied(&self) -> u64 {
        self.0.state.read().last_applied.map_or(0, |l| l.index)
    }

    /// Changes whenever an entry or snapshot is applied (the applied index).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.applied.subscribe()
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    fn persist(&self, p: &Persisted) -> Result<(), StorageErr> {
        let bytes = encode_state(p).map_err(|e| io_err(e, StorageIOError::write_state_machine))?;
        let mut v = format_for(&p.state.ext).to_be_bytes().to_vec();
        v.extend_from_slice(&bytes);
        let db = self.0.store.db();
        db.insert(STATE_KEY, v)
            .map_err(|e| io_err(e, StorageIOError::write_state_machine))?;
        db.flush().map_err(|e| io_err(e, StorageIOError::write_state_machine))?;
        Ok(())
    }

    fn notify(&self, index: u64) {
        self.0.applied.send_replace(index);
    }
}

fn load(store: &ReplicaStore) -> Result<Persisted, StorageErr> {
    match store
        .db()
        .get(STATE_KEY)
        .map_err(|e| io_err(e, StorageIOError::read_state_machine))?
    {
        None => Ok(Persisted::default()),
        Some(v) => {
            let (version, body) = v.split_at(4.min(v.len()));
            let found = u32::from_be_bytes(version.try_into().unwrap_or([0; 4]));
            if !readable(found) {
                return Err(io_err(MetaSnapshotError::Version { found }, StorageIOError::read_state_machine));
            }
            decode_state(body).map_err(|e| io_err(e, StorageIOError::read_state_machine))
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StorageErr> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(e, StorageIOError::write_state_machine))
}

fn meta_of(p: &Persisted) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: p.last_applied,
        last_membership: p.membership.clone(),
        snapshot_id: p.snapshot_id.clone(),
    }
}

impl RaftSnapshotBuilder<MetaConfig> for MetaStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaConfig>, StorageErr> {
        let mut p = self.0.state.read().clone();
        p.snapshot_id = format!("{}-{:016x}", p.last_applied.map_or(0, |l| l.index), rand::random::<u64>());
        let dir = self.0.dir.clone();
        let p2 = p.clone();
        let path = blocking(move || -> Result<PathBuf, MetaSnapshotError> {
            let tmp = dir.join(format!("build-{:016x}.tmp", rand::random::<u64>()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode_file(&p2)?)?;
            f.sync_all()?;
            let current = dir.join(CURRENT);
            std::fs::rename(&tmp, &current)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(current)
        })
        .await?
        .map_err(|e| io_err(e, write_any))?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_any))?;
        Ok(Snapshot {
            meta: meta_of(&p),
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<MetaConfig> for MetaStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageErr> {
        let p = self.0.state.read();
        Ok((p.last_applied, p.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageErr>
    where
        I: IntoIterator<Item = openraft::Entry<MetaConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut p = self.0.state.read().clone();
        let mut out = Vec::new();
        for e in entries {
            p.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Ok(sovra_meta::Applied::Done)),
                EntryPayload::Membership(m) => {
                    p.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Ok(sovra_meta::Applied::Done));
                }
                EntryPayload::Normal(cmd) => out.push(p.state.apply(cmd)),
            }
        }
        if out.is_empty() {
            return Ok(out);
        }
        let this = self.clone();
        let index = p.last_applied.map_or(0, |l| l.index);
        let p = blocking(move || this.persist(&p).map(|()| p)).await??;
        *self.0.state.write() = p;
        self.notify(index);
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
        let SnapshotFile { mut file, path } = *snapshot;
        use tokio::io::AsyncWriteExt;
        file.flush().await.map_err(|e| io_err(e, write_any))?;
        drop(file);
        let dir = self.0.dir.clone();
        let expected = meta.last_log_id;
        let this = self.clone();
        let p = blocking(move || -> Result<Persisted, MetaSnapshotError> {
            let mut bytes = Vec::new();
            std::fs::File::open(&path)?.read_to_end(&mut bytes)?;
            let checked = decode_file(&bytes).and_then(|p| {
                if p.last_applied == expected {
                    Ok(p)
                } else {
                    Err(MetaSnapshotError::MetaMismatch {
                        found: p.last_applied,
                        expected,
                    })
                }
            });
            let p = match checked {
                Ok(p) => p,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
            let current = dir.join(CURRENT);
            if path != current {
                std::fs::rename(&path, &current)?;
            }
            this.persist(&p)
                .map_err(|e| MetaSnapshotError::Io(std::io::Error::other(e.to_string())))?;
            Ok(p)
        })
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "meta snapshot refused");
            io_err(e, read_any)
        })?;
        let index = p.last_applied.map_or(0, |l| l.index);
        *self.0.state.write() = p;
        self.notify(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MetaConfig>>, StorageErr> {
        let path = self.0.dir.join(CURRENT);
        if !path.exists() {
            return Ok(None);
        }
        let p = path.clone();
        let persisted = blocking(move || -> Result<Persisted, MetaSnapshotError> {
            let mut bytes = Vec::new();
            std::fs::File::open(&p)?.read_to_end(&mut bytes)?;
            decode_file(&bytes)
        })
        .await?
        .map_err(|e| io_err(e, read_any))?;
        let file = SnapshotFile::open(path).await.map_err(|e| io_err(e, read_any))?;
        Ok(Some(Snapshot {
            meta: meta_of(&persisted),
            snapshot: Box::new(file),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sovra_meta::keys::KeyRate;
    use sovra_meta::state::{META_LEVEL, MetaCommand};

    /// The state in `tests/fixtures/meta-format3.snap`, made by the build
    /// before meta levels (commit 7eed3e5) with these same commands.
    fn fixture_state() -> MetaState {
        use sovra_meta::keys::{ApiKeyRecord, Regions, Scopes, hash_secret};
        use sovra_meta::state::{MetaCommand, RegionPolicy};
        use sovra_meta::{NodeRecord, NodeStatus, Roles};
        use sovra_types::{CollectionName, CollectionSpec, Metric, RegionId, RegionShards};
        let uk = RegionId::parse("uk").unwrap();
        let us = RegionId::parse("us").unwrap();
        let mut s = MetaState::default();
        let mut cmds = Vec::new();
        for (id, region) in [(1, &uk), (2, &uk), (3, &us)] {
            cmds.push(MetaCommand::RegisterNode(NodeRecord {
                id,
                region: region.clone(),
                zone: format!("z{id}"),
                roles: Roles::default(),
                cluster_addr: format!("10.0.0.{id}:7400"),
                public_addr: format!("10.0.0.{id}:7300"),
                status: NodeStatus::Up,
                last_heartbeat_ms: 5,
                incarnation: 7,
            }));
        }
        cmds.push(MetaCommand::AddApiKey(ApiKeyRecord {
            id: "uk-reader".into(),
            sha256: hash_secret("secret"),
            scopes: Scopes {
                read: Regions::Only([uk.clone()].into()),
                write: Regions::none(),
                collections: None,
                admin: false,
                data_protection: false,
            },
            created_ms: 1234,
        }));
        cmds.push(MetaCommand::SetRegionPolicy {
            region: uk.clone(),
            policy: RegionPolicy {
                results_may_go_to: [us.clone()].into(),
            },
        });
        let spec = CollectionSpec {
            metric: Metric::Cosine,
            regions: vec![
                RegionShards {
                    region: uk.clone(),
                    shard_count: 1,
                    split_map: None,
                },
                RegionShards {
                    region: us.clone(),
                    shard_count: 1,
                    split_map: None,
                },
            ],
            ..CollectionSpec::single_region(CollectionName::parse("people").unwrap(), 4, Metric::L2, uk.clone())
        };
        cmds.push(MetaCommand::CreateCollection {
            spec,
            replicas: [((uk.clone(), 0), vec![1]), ((us.clone(), 0), vec![3])].into(),
        });
        for c in cmds {
            s.apply(c).unwrap();
        }
        s
    }

    #[test]
    fn a_state_written_before_meta_levels_reads_as_the_base_level_and_writes_back_the_same() {
        let old = include_bytes!("../tests/fixtures/meta-format3.snap");
        let p = decode_file(old).unwrap();
        assert_eq!(p.snapshot_id, "9-abc");
        assert_eq!(p.state, fixture_state());
        assert!(p.state.ext.is_base());
        // Unchanged, it is written as that build wrote it: a build before
        // levels, still in the cluster, reads it.
        assert_eq!(&encode_file(&p).unwrap()[..], &old[..]);
        assert_eq!(
            encode_state(&p.state).unwrap(),
            include_bytes!("../tests/fixtures/meta-state3.bin").to_vec()
        );
    }

    #[test]
    fn a_state_above_the_base_level_is_format_4_and_keeps_its_rates() {
        let mut s = fixture_state();
        s.apply(MetaCommand::SetMetaLevel { level: META_LEVEL }).unwrap();
        let rate = KeyRate { per_second: 5, burst: 10 };
        s.apply(MetaCommand::SetKeyRate {
            id: "uk-reader".into(),
            rate: Some(rate),
        })
        .unwrap();
        let p = Persisted {
            state: s.clone(),
            ..Default::default()
        };
        let bytes = encode_file(&p).unwrap();
        assert_eq!(u32::from_be_bytes(bytes[8..12].try_into().unwrap()), META_FORMAT);
        let back = decode_file(&bytes).unwrap();
        assert_eq!(back.state, s);
        assert_eq!(back.state.ext.key_rates["uk-reader"], rate);
        let sent = encode_state(&s).unwrap();
        assert_eq!(decode_state::<MetaState>(&sent).unwrap(), s);
        // What a build before levels makes of it (it decodes MetaState
        // alone): the same state without the level's record.
        let old_view: MetaState = postcard::from_bytes(&sent).unwrap();
        assert_eq!(old_view, fixture_state());
    }

    #[test]
    fn snapshot_files_are_checked_whole_and_name_their_version() {
        let p = Persisted {
            snapshot_id: "7-1".into(),
            ..Default::default()
        };
        let bytes = encode_file(&p).unwrap();
        assert_eq!(decode_file(&bytes).unwrap().snapshot_id, "7-1");
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        assert!(matches!(decode_file(&flipped), Err(MetaSnapshotError::Digest)));
        let mut newer = bytes.clone();
        newer[11] = 9;
        let e = decode_file(&newer).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        assert!(matches!(decode_file(b"garbage"), Err(MetaSnapshotError::Magic)));
    }
}
