//! A group's Raft log on sled: a tree of the replica's own database, beside
//! its data.
//!
//! | key | value |
//! |---|---|
//! | `l` + u64 BE index | format version byte ([`ENTRY_FORMAT`]) + postcard [`Entry`] |
//! | `v` | postcard vote |
//! | `c` | postcard committed log id |
//! | `p` | postcard last purged log id |
//!
//! The version byte lets a later build read (or clearly refuse) entries an older
//! one wrote, so a rolling upgrade never misreads a log.
//!
//! `append` reports the entries durable (the callback) only after sled has
//! flushed them, which is what lets a leader count this replica in a quorum.

use crate::types::{GroupConfig, LogId, NodeId, StorageErr, TypeConfig, io_err};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const LOG: u8 = b'l';
const VOTE: &[u8] = b"v";
const COMMITTED: &[u8] = b"c";
const PURGED: &[u8] = b"p";

/// Format of a stored log entry; bumped whenever `Entry` or a group's command
/// (`ShardCommand`, `MetaCommand`) changes encoding.
pub const ENTRY_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum EntryFormatError {
    #[error("log entry has format version {found}; this build reads {ENTRY_FORMAT}: run a build that reads it")]
    Version { found: u8 },
    #[error("log entry is empty")]
    Empty,
    #[error("log entry does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode_entry<C: GroupConfig>(e: &openraft::Entry<C>) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(e, vec![ENTRY_FORMAT])
}

pub fn decode_entry<C: GroupConfig>(bytes: &[u8]) -> Result<openraft::Entry<C>, EntryFormatError> {
    match bytes.split_first() {
        None => Err(EntryFormatError::Empty),
        Some((&ENTRY_FORMAT, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&found, _)) => Err(EntryFormatError::Version { found }),
    }
}

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [LOG; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Counters the node exports per group.
#[derive(Default, Debug)]
pub struct LogStats {
    /// Last committed index reported by Raft (0 before any).
    pub committed: AtomicU64,
    pub purges: AtomicU64,
    /// The highest index of an entry appended here that fences reads (an
    /// erasure, `GroupConfig::fences_reads`): this replica applies it before
    /// it answers another `any` read, so an erasure's acknowledgement may
    /// count a replica that has appended it as one that will not answer
    /// without it. Set before the append is reported to Raft.
    pub fence: AtomicU64,
}

/// The log of one replica of a group of kind `C` (a shard group by default).
pub struct LogStore<C: GroupConfig = TypeConfig> {
    db: sled::Db,
    tree: sled::Tree,
    pub stats: Arc<LogStats>,
    _kind: std::marker::PhantomData<fn() -> C>,
}

impl<C: GroupConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            tree: self.tree.clone(),
            stats: self.stats.clone(),
            _kind: std::marker::PhantomData,
        }
    }
}

impl<C: GroupConfig> LogStore<C> {
    /// The log of the replica kept in `replica`'s own database.
    pub fn of(replica: &sovra_shard::ReplicaStore) -> Self {
        Self::new(replica.db().clone(), replica.raft_log().clone())
    }

    pub fn new(db: sled::Db, tree: sled::Tree) -> Self {
        Self {
            db,
            tree,
            stats: Arc::default(),
            _kind: std::marker::PhantomData,
        }
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageErr> {
        match self.tree.get(key).map_err(|e| io_err(e, StorageIOError::read))? {
            None => Ok(None),
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(|e| io_err(e, StorageIOError::read)),
        }
    }

    async fn put_flushed<T: Serialize>(
        &self,
        key: &'static [u8],
        value: &T,
        f: fn(openraft::AnyError) -> StorageIOError<NodeId>,
    ) -> Result<(), StorageErr> {
        let bytes = postcard::to_allocvec(value).map_err(|e| io_err(e, f))?;
        self.tree.insert(key, bytes).map_err(|e| io_err(e, f))?;
        self.flush().await.map_err(|e| io_err(e, f))
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(r) => r.map(|_| ()),
            Err(e) => Err(sled::Error::Io(std::io::Error::other(e))),
        }
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageErr> {
        match self.tree.scan_prefix([LOG]).next_back() {
            None => Ok(None),
            Some(kv) => {
                let (_, v) = kv.map_err(|e| io_err(e, StorageIOError::read_logs))?;
                let e = decode_entry::<C>(&v).map_err(|e| io_err(e, StorageIOError::read_logs))?;
                Ok(Some(e.log_id))
            }
        }
    }

    /// The last log id this replica holds (appended, maybe not committed),
    /// or the last purged one: what a lost-quorum recovery compares.
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageErr> {
        let purged: Option<LogId> = self.get(PURGED)?;
        Ok(self.last_entry_id()?.or(purged))
    }

    /// Lost-quorum recovery, on a stopped node: appends a membership entry
    /// naming `me` as the group's only voter, under a term above any this
    /// replica has seen (its vote moved to that term, for `me`), so that on
    /// its next start this replica elects itself and commits everything in
    /// its log. Entries the lost majority had and this replica lacks are
    /// lost. Returns the entry's log id.
    pub fn force_sole_voter(&self, me: NodeId) -> Result<LogId, StorageErr> {
        let vote: Option<Vote<NodeId>> = self.get(VOTE)?;
        let purged: Option<LogId> = self.get(PURGED)?;
        let last = self.last_entry_id()?.or(purged);
        let term = vote.map_or(0, |v| v.leader_id().term).max(last.map_or(0, |l| l.leader_id.term)) + 1;
        let log_id = LogId::new(openraft::CommittedLeaderId::new(term, me), last.map_or(0, |l| l.index) + 1);
        let entry = openraft::Entry::<C> {
            log_id,
            payload: openraft::EntryPayload::Membership(openraft::Membership::new(vec![std::collections::BTreeSet::from([me])], None)),
        };
        let bytes = encode_entry(&entry).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        let vote_bytes = postcard::to_allocvec(&Vote::new(term, me)).map_err(|e| io_err(e, StorageIOError::write_vote))?;
        let mut batch = sled::Batch::default();
        batch.insert(&log_key(log_id.index), bytes);
        batch.insert(VOTE, vote_bytes);
        self.tree.apply_batch(batch).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        self.db.flush().map_err(|e| io_err(e, StorageIOError::write_logs))?;
        Ok(log_id)
    }

    /// Removes every key of the group (the replica left it).
    pub fn destroy(&self) -> Result<(), sled::Error> {
        self.tree.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// Number of entries held (for tests and metrics).
    pub fn entry_count(&self) -> usize {
        self.tree.scan_prefix([LOG]).count()
    }

    /// The index of the first entry held, if any (what a purge left).
    pub fn first_index(&self) -> Result<Option<u64>, StorageErr> {
        match self.tree.scan_prefix([LOG]).next() {
            None => Ok(None),
            Some(kv) => {
                let (_, v) = kv.map_err(|e| io_err(e, StorageIOError::read_logs))?;
                let e = decode_entry::<C>(&v).map_err(|e| io_err(e, StorageIOError::read_logs))?;
                Ok(Some(e.log_id.index))
            }
        }
    }
}

impl<C: GroupConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<openraft::Entry<C>>, StorageErr> {
        let start = match range.start_bound() {
            Bound::Included(i) => log_key(*i),
            Bound::Excluded(i) => log_key(i.saturating_add(1)),
            Bound::Unbounded => log_key(0),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, v) = kv.map_err(|e| io_err(e, StorageIOError::read_logs))?;
            if k.first() != Some(&LOG) {
                break;
            }
            let index = u64::from_be_bytes(k[1..9].try_into().expect("9-byte log key"));
            if !range.contains(&index) {
                break;
            }
            out.push(decode_entry(&v).map_err(|e| io_err(e, StorageIOError::read_logs))?);
        }
        Ok(out)
    }
}

impl<C: GroupConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageErr> {
        let last_purged_log_id: Option<LogId> = self.get(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageErr> {
        self.put_flushed(VOTE, vote, StorageIOError::write_vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageErr> {
        self.get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageErr> {
        self.stats.committed.store(committed.map_or(0, |c| c.index), Ordering::Relaxed);
        // Not flushed: a lost committed index is only re-learned from the leader.
        let bytes = postcard::to_allocvec(&committed).map_err(|e| io_err(e, StorageIOError::write))?;
        self.tree.insert(COMMITTED, bytes).map_err(|e| io_err(e, StorageIOError::write))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageErr> {
        Ok(self.get::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageErr>
    where
        I: IntoIterator<Item = openraft::Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            if let openraft::EntryPayload::Normal(d) = &e.payload
                && C::fences_reads(d)
            {
                self.stats.fence.fetch_max(e.log_id.index, std::sync::atomic::Ordering::AcqRel);
            }
            let bytes = encode_entry(&e).map_err(|err| io_err(err, StorageIOError::write_logs))?;
            batch.insert(&log_key(e.log_id.index), bytes);
        }
        self.tree.apply_batch(batch).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        let flushed = self.flush().await.map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageErr> {
        let mut batch = sled::Batch::default();
        for k in self.tree.range(log_key(log_id.index)..=log_key(u64::MAX)).keys() {
            batch.remove(k.map_err(|e| io_err(e, StorageIOError::write_logs))?);
        }
        self.tree.apply_batch(batch).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        self.flush().await.map_err(|e| io_err(e, StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageErr> {
        // The purge mark first, so a crash part way never leaves entries below a
        // gap that `get_log_state` would not know about.
        let bytes = postcard::to_allocvec(&log_id).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        let mut batch = sled::Batch::default();
        batch.insert(PURGED, bytes);
        for k in self.tree.range(log_key(0)..=log_key(log_id.index)).keys() {
            batch.remove(k.map_err(|e| io_err(e, StorageIOError::write_logs))?);
        }
        self.tree.apply_batch(batch).map_err(|e| io_err(e, StorageIOError::write_logs))?;
        self.stats.purges.fetch_add(1, Ordering::Relaxed);
        self.flush().await.map_err(|e| io_err(e, StorageIOError::write_logs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Entry;

    #[test]
    fn entries_carry_their_format_and_another_is_refused_by_name() {
        let e = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: openraft::EntryPayload::Blank,
        };
        let bytes = encode_entry(&e).unwrap();
        assert_eq!(bytes[0], ENTRY_FORMAT);
        assert_eq!(decode_entry::<TypeConfig>(&bytes).unwrap().log_id, e.log_id);
        let mut newer = bytes.clone();
        newer[0] = ENTRY_FORMAT + 1;
        let err = decode_entry::<TypeConfig>(&newer).unwrap_err().to_string();
        assert!(err.contains(&format!("format version {}", ENTRY_FORMAT + 1)), "{err}");
        assert!(decode_entry::<TypeConfig>(&[]).is_err());
    }
}
