//! One replica's own store: a directory holding its own sled database (the
//! replica's points and its Raft log as two trees) and its snapshot files, as
//! TiKV's raftstore-v2 keeps one tablet per region. Destroying a replica is
//! deleting its directory: no byte of it stays in a database shared with other
//! replicas (sled keeps removed values until its own cleaner runs, sled #1512).
//!
//! Page cache comes from one node budget ([`CacheBudget`]): each replica's
//! database gets an equal share, and a node never opens more replicas than the
//! budget has shares for, so the total stays bounded. sled's background flusher
//! thread is off: every writer here flushes itself (an applied batch, an
//! appended log entry, a vote), so a replica costs no thread of its own.

use crate::ShardError;
use sovra_types::ShardId;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bumped whenever a replica directory's layout changes; another is refused.
pub const REPLICA_FORMAT: u32 = 1;
const FORMAT_KEY: &[u8] = b"replica_format";
const POINTS: &str = "points";
const RAFT_LOG: &str = "raftlog";
const DB_DIR: &str = "db";
/// A rewrite's copy while it is made, and the old database while it goes.
const DB_NEW: &str = "db.rewrite";
const DB_OLD: &str = "db.old";
/// Page cache of each database while a rewrite copies one into the other.
const REWRITE_CACHE: u64 = 8 << 20;
const SNAPSHOT_DIR: &str = "snapshots";

/// The node's page-cache budget, shared out among replica databases.
#[derive(Debug)]
pub struct CacheBudget {
    total_bytes: u64,
    shares: usize,
    open: AtomicUsize,
}

/// One replica's share of the budget; given back when the store is dropped.
#[derive(Debug)]
pub struct CacheShare {
    budget: Arc<CacheBudget>,
    pub bytes: u64,
}

impl Drop for CacheShare {
    fn drop(&mut self) {
        self.budget.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// sled needs some cache to work at all; below this a share is refused.
const MIN_SHARE: u64 = 256 << 10;

impl CacheBudget {
    /// `total_bytes` split into `shares` equal parts, one per open replica.
    pub fn new(total_bytes: u64, shares: usize) -> Arc<Self> {
        Arc::new(Self {
            total_bytes,
            shares: shares.max(1),
            open: AtomicUsize::new(0),
        })
    }

    pub fn share_bytes(&self) -> u64 {
        (self.total_bytes / self.shares as u64).max(MIN_SHARE)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn shares(&self) -> usize {
        self.shares
    }

    /// Takes one share, or says why not: the node already holds as many
    /// replicas as its budget was sized for.
    pub fn take(self: &Arc<Self>) -> Result<CacheShare, ShardError> {
        let mut cur = self.open.load(Ordering::Acquire);
        loop {
            if cur >= self.shares {
                return Err(ShardError::Budget {
                    open: cur,
                    shares: self.shares,
                });
            }
            match self.open.compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        Ok(CacheShare {
            budget: self.clone(),
            bytes: self.share_bytes(),
        })
    }
}

/// The directory of `id`'s replica under `root`.
pub fn replica_dir(root: &Path, id: &ShardId) -> PathBuf {
    root.join(id.collection.as_str())
        .join(id.region.as_str())
        .join(id.number.to_string())
}

/// A replica's database and directory. Cloning shares the same database.
#[derive(Clone)]
pub struct ReplicaStore {
    dir: PathBuf,
    db: sled::Db,
    points: sled::Tree,
    raft_log: sled::Tree,
    _share: Arc<CacheShare>,
}

impl ReplicaStore {
    /// Opens (or creates) the replica in `dir` with one share of `budget`.
    pub fn open(dir: &Path, budget: &Arc<CacheBudget>) -> Result<Self, ShardError> {
        let share = budget.take()?;
        std::fs::create_dir_all(dir)?;
        finish_rewrite(dir)?;
        let db = open_db(&dir.join(DB_DIR), share.bytes, LOCK_WAIT)?;
        match db.get(FORMAT_KEY)? {
            None => {
                db.insert(FORMAT_KEY, &REPLICA_FORMAT.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]));
                if found != REPLICA_FORMAT {
                    return Err(ShardError::FormatVersion {
                        found,
                        expected: REPLICA_FORMAT,
                    });
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            points: db.open_tree(POINTS)?,
            raft_log: db.open_tree(RAFT_LOG)?,
            db,
            _share: Arc::new(share),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The tree of the replica's points (the shard engine's store).
    pub fn points(&self) -> &sled::Tree {
        &self.points
    }

    /// The tree of the replica's Raft log, vote and purge mark.
    pub fn raft_log(&self) -> &sled::Tree {
        &self.raft_log
    }

    /// Where the replica's snapshot files live.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }

    /// Deletes the replica's whole directory (its database, log and
    /// snapshots). The caller has stopped everything that wrote to it; handles
    /// still open only reach unlinked files.
    pub fn destroy(&self) -> Result<(), ShardError> {
        remove_dir(&self.dir)
    }
}

impl ReplicaStore {
    /// Rewrites this replica's database into a fresh one and deletes the old:
    /// sled keeps removed and overwritten values in its files until its own
    /// cleaner relocates their segment (sled #1512), so after an erasure the
    /// only way to be sure they are gone is to copy what is live into new
    /// files and delete the old ones. Copies from this open handle (reopening
    /// a database just closed in the same process can meet sled's own
    /// recovery bug, "tried to serialize Uninitialized"), so nothing else may
    /// write to it meanwhile: the caller has stopped the replica's group and
    /// holds no other handle. Crash-safe: the copy is flushed before the swap,
    /// and [`ReplicaStore::open`] finishes or drops a swap cut off. Returns the
    /// bytes the database's files took before and after.
    pub fn rewrite(self) -> Result<(u64, u64), ShardError> {
        let dir = self.dir.clone();
        let (old_path, new_path) = (dir.join(DB_DIR), dir.join(DB_NEW));
        remove_dir(&new_path)?;
        let before = dir_bytes(&old_path);
        {
            let new = open_db(&new_path, REWRITE_CACHE, LOCK_WAIT)?;
            for name in self.db.tree_names() {
                let (from, to) = (self.db.open_tree(&name)?, new.open_tree(&name)?);
                let mut batch = sled::Batch::default();
                let mut n = 0usize;
                for kv in from.iter() {
                    let (k, v) = kv?;
                    batch.insert(k, v);
                    n += 1;
                    if n.is_multiple_of(10_000) {
                        to.apply_batch(std::mem::take(&mut batch))?;
                    }
                }
                to.apply_batch(batch)?;
            }
            new.flush()?;
        }
        // The old files go once renamed, whenever sled's threads let go of
        // them; nothing reads them again.
        drop(self);
        std::fs::rename(&old_path, dir.join(DB_OLD))?;
        std::fs::rename(&new_path, &old_path)?;
        std::fs::File::open(&dir)?.sync_all()?;
        remove_dir(&dir.join(DB_OLD))?;
        Ok((before, dir_bytes(&old_path)))
    }
}

/// How long an open waits for a database lock to be let go. A database just
/// dropped (before a rewrite, or by the rewrite's copy) stays locked for a
/// moment while sled's own I/O threads finish with it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the sled database at `path`, waiting up to `within` for its lock.
/// Another process holding it past that is an error naming the lock.
fn open_db(path: &Path, cache: u64, within: std::time::Duration) -> Result<sled::Db, ShardError> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match sled::Config::new().path(path).cache_capacity(cache).flush_every_ms(None).open() {
            Ok(db) => return Ok(db),
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Finishes a rewrite cut off by a crash: a complete copy waiting to be
/// swapped in is swapped in; otherwise a partial copy or an old database left
/// behind is deleted.
fn finish_rewrite(dir: &Path) -> Result<(), ShardError> {
    let (db, new, old) = (dir.join(DB_DIR), dir.join(DB_NEW), dir.join(DB_OLD));
    if !db.exists() && new.exists() && old.exists() {
        // Cut off between the two renames: the copy was flushed before them.
        std::fs::rename(&new, &db)?;
    }
    remove_dir(&new)?;
    remove_dir(&old)
}

/// Bytes of every file under `dir` (0 for what cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Removes `dir` and everything in it; a directory already gone is fine.
pub fn remove_dir(dir: &Path) -> Result<(), ShardError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Every replica directory under `root` (`collection/region/number`), as
/// the names found there: the node compares them with what it should hold.
pub fn replica_dirs(root: &Path) -> Result<Vec<(String, String, String, PathBuf)>, ShardError> {
    let mut out = Vec::new();
    let Ok(collections) = std::fs::read_dir(root) else { return Ok(out) };
    for c in collections {
        let c = c?;
        if !c.file_type()?.is_dir() {
            continue;
        }
        for r in std::fs::read_dir(c.path())? {
            let r = r?;
            if !r.file_type()?.is_dir() {
                continue;
            }
            for n in std::fs::read_dir(r.path())? {
                let n = n?;
                if n.file_type()?.is_dir() {
                    out.push((
                        c.file_name().to_string_lossy().into_owned(),
                        r.file_name().to_string_lossy().into_owned(),
                        n.file_name().to_string_lossy().into_owned(),
                        n.path(),
                    ));
                }
            }
        }
    }
    out.sort_by(|a, b| a.3.cmp(&b.3));
    Ok(out)
}

/// Removes empty collection and region directories left after replicas went.
pub fn prune_empty(root: &Path) {
    let Ok(collections) = std::fs::read_dir(root) else { return };
    for c in collections.flatten() {
        if let Ok(regions) = std::fs::read_dir(c.path()) {
            for r in regions.flatten() {
                let _ = std::fs::remove_dir(r.path()); // only succeeds when empty
            }
        }
        let _ = std::fs::remove_dir(c.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sovra_types::{CollectionName, RegionId};

    fn id(n: u32) -> ShardId {
        ShardId {
            collection: CollectionName::parse("people").unwrap(),
            region: RegionId::parse("eu-west").unwrap(),
            number: n,
        }
    }

    #[test]
    fn the_budget_bounds_how_many_replicas_open_and_shares_return_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = CacheBudget::new(8 << 20, 2);
        assert_eq!(budget.share_bytes(), 4 << 20);
        let a = ReplicaStore::open(&replica_dir(tmp.path(), &id(0)), &budget).unwrap();
        let b = ReplicaStore::open(&replica_dir(tmp.path(), &id(1)), &budget).unwrap();
        let third = ReplicaStore::open(&replica_dir(tmp.path(), &id(2)), &budget);
        let msg = third.err().expect("a third replica exceeds two shares").to_string();
        assert!(msg.contains("2 of 2"), "{msg}");
        drop(a);
        assert_eq!(budget.open(), 1);
        ReplicaStore::open(&replica_dir(tmp.path(), &id(2)), &budget).unwrap();
        drop(b);
    }

    #[test]
    fn destroying_a_replica_leaves_no_file_and_spares_its_neighbours() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = CacheBudget::new(8 << 20, 4);
        let a = ReplicaStore::open(&replica_dir(tmp.path(), &id(0)), &budget).unwrap();
        let b = ReplicaStore::open(&replica_dir(tmp.path(), &id(1)), &budget).unwrap();
        a.points().insert(b"secret-a", &b"x"[..]).unwrap();
        b.points().insert(b"kept-b", &b"y"[..]).unwrap();
        a.db().flush().unwrap();
        b.db().flush().unwrap();
        std::fs::create_dir_all(a.snapshot_dir()).unwrap();
        std::fs::write(a.snapshot_dir().join("current.snap"), b"snap").unwrap();
        let dir = a.dir().to_path_buf();
        a.destroy().unwrap();
        drop(a);
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert_eq!(b.points().get(b"kept-b").unwrap().as_deref(), Some(&b"y"[..]));
        let dirs = replica_dirs(tmp.path()).unwrap();
        assert_eq!(dirs.len(), 1);
        assert_eq!(dirs[0].2, "1");
    }

    #[test]
    fn a_replica_of_another_format_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = CacheBudget::new(8 << 20, 4);
        let dir = replica_dir(tmp.path(), &id(0));
        {
            let a = ReplicaStore::open(&dir, &budget).unwrap();
            a.db().insert(FORMAT_KEY, &7u32.to_be_bytes()).unwrap();
            a.db().flush().unwrap();
        }
        let e = ReplicaStore::open(&dir, &budget).err().unwrap().to_string();
        assert!(e.contains("format version 7"), "{e}");
        assert_eq!(budget.open(), 0, "a refused open gives its share back");
    }
}
