//! The node's own small database: a format version and the catalog of
//! collection specs. Replicas keep their data in their own databases
//! ([`crate::replica`]), never here.

use crate::ShardError;
use sovra_types::{CollectionName, CollectionSpec};
use std::path::Path;

/// Bumped whenever the on-disk layout changes; a node refuses other versions.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_KEY: &[u8] = b"format_version";

/// What a build reads and writes: its format, and the older formats it
/// upgrades in place when it opens a directory of one (a rolling upgrade:
/// the node comes back on its old data). A newer format is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub current: u32,
    pub upgrades_from: &'static [u32],
}

/// This crate's format: nothing older is upgraded.
pub const FORMAT: Format = Format {
    current: FORMAT_VERSION,
    upgrades_from: &[],
};
const CATALOG: &str = "catalog";

/// A catalog entry: the collection's name and its spec, or why it cannot be read.
pub type CatalogEntry = (String, Result<CollectionSpec, ShardError>);

#[derive(Clone)]
pub struct NodeStore {
    db: sled::Db,
    catalog: sled::Tree,
}

fn decode(bytes: &[u8], what: &str) -> Result<CollectionSpec, ShardError> {
    postcard::from_bytes(bytes).map_err(|source| ShardError::Corrupt {
        what: what.to_string(),
        source,
    })
}

impl NodeStore {
    /// Opens (or creates) the store. `cache_bytes` bounds sled's page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, ShardError> {
        Self::open_as(path, cache_bytes, FORMAT).map(|(s, _)| s)
    }

    /// Opens the store as a build of `format`: also returns the format it
    /// upgraded the directory from, if it did. The marker moves only once
    /// the upgrade's steps are written, so a crash midway upgrades again.
    pub fn open_as(path: &Path, cache_bytes: u64, format: Format) -> Result<(Self, Option<u32>), ShardError> {
        let db = sled::Config::new().path(path).cache_capacity(cache_bytes).open()?;
        let mut upgraded = None;
        match db.get(FORMAT_KEY)? {
            None => {
                db.insert(FORMAT_KEY, &format.current.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]));
                if found != format.current {
                    if !format.upgrades_from.contains(&found) {
                        return Err(ShardError::FormatVersion {
                            found,
                            expected: format.current,
                        });
                    }
                    // No format this build knows changes the catalog's
                    // layout yet: an upgrade that did would rewrite it here.
                    db.insert(FORMAT_KEY, &format.current.to_be_bytes())?;
                    db.flush()?;
                    upgraded = Some(found);
                }
            }
        }
        let catalog = db.open_tree(CATALOG)?;
        Ok((Self { db, catalog }, upgraded))
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Every catalog entry by name, each decoded on its own: one that cannot
    /// be read does not hide the others.
    pub fn catalog_entries(&self) -> Result<Vec<CatalogEntry>, ShardError> {
        self.catalog
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let name = String::from_utf8_lossy(&k).into_owned();
                let spec = decode(&v, &name);
                Ok((name, spec))
            })
            .collect()
    }

    pub fn collections(&self) -> Result<Vec<CollectionSpec>, ShardError> {
        self.catalog
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &String::from_utf8_lossy(&k))
            })
            .collect()
    }

    pub fn put_collection(&self, spec: &CollectionSpec) -> Result<(), ShardError> {
        let bytes = postcard::to_allocvec(spec).map_err(ShardError::Encode)?;
        self.catalog.insert(spec.name.as_str(), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// Keeps `bytes` under `key` in the node's database, flushed (the node's
    /// last view of the cluster metadata, so it restarts with it).
    pub fn put_raw(&self, key: &str, bytes: &[u8]) -> Result<(), ShardError> {
        self.db.insert(key, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, ShardError> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// Removes the collection from the catalog. Its replicas' directories are
    /// the node's to delete: one left behind by a crash is an orphan the next
    /// start removes.
    pub fn remove_collection(&self, name: &CollectionName) -> Result<(), ShardError> {
        self.catalog.remove(name.as_str())?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `path` as `format`, waiting out the lock a dropped database's
    /// background thread holds for a moment after the drop.
    fn reopen(path: &Path, format: Format) -> Result<(NodeStore, Option<u32>), ShardError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match NodeStore::open_as(path, 1 << 20, format) {
                Err(ShardError::Storage(e)) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    #[test]
    fn a_newer_build_upgrades_an_older_directory_and_an_older_build_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node");
        drop(reopen(&path, FORMAT).unwrap());
        let next = Format {
            current: FORMAT_VERSION + 1,
            upgrades_from: &[FORMAT_VERSION],
        };
        let (s, from) = reopen(&path, next).unwrap();
        assert_eq!(from, Some(FORMAT_VERSION));
        drop(s);
        // Opened again by the same build: nothing to upgrade.
        let (s, from) = reopen(&path, next).unwrap();
        assert_eq!(from, None);
        drop(s);
        // The older build cannot read what the newer one wrote.
        let e = reopen(&path, FORMAT).err().unwrap();
        assert!(matches!(e, ShardError::FormatVersion { found, expected } if found == FORMAT_VERSION + 1 && expected == FORMAT_VERSION));
    }
}
