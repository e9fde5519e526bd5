//! The node's storage: one sled `Db` with a format version, the catalog of
//! collection specs, and one tree per shard.

use crate::ShardError;
use sovra_types::{CollectionName, CollectionSpec, ShardId};
use std::path::Path;

/// Bumped whenever the on-disk layout changes; a node refuses other versions.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"format_version";
const CATALOG: &str = "catalog";
const SHARD_PREFIX: &str = "shard/";
/// A shard group's Raft log lives beside the shard, under the same names.
const RAFT_LOG_PREFIX: &str = "raftlog/";

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
        let db = sled::Config::new().path(path).cache_capacity(cache_bytes).open()?;
        match db.get(FORMAT_KEY)? {
            None => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]));
                if found != FORMAT_VERSION {
                    return Err(ShardError::FormatVersion {
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
        }
        let catalog = db.open_tree(CATALOG)?;
        let store = Self { db, catalog };
        store.drop_orphan_shards()?;
        Ok(store)
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

    /// Removes the collection from the catalog first, then its shard trees, so a
    /// crash in between leaves only orphans that the next start drops.
    pub fn remove_collection(&self, name: &CollectionName) -> Result<usize, ShardError> {
        self.catalog.remove(name.as_str())?;
        self.db.flush()?;
        let prefixes = [format!("{SHARD_PREFIX}{name}/"), format!("{RAFT_LOG_PREFIX}{name}/")];
        let mut dropped = 0;
        for t in self.db.tree_names() {
            if prefixes.iter().any(|p| t.starts_with(p.as_bytes())) {
                self.db.drop_tree(&t)?;
                // Count shards, not their log trees.
                dropped += usize::from(t.starts_with(prefixes[0].as_bytes()));
            }
        }
        self.db.flush()?;
        Ok(dropped)
    }

    pub fn shard_tree(&self, id: &ShardId) -> Result<sled::Tree, ShardError> {
        Ok(self
            .db
            .open_tree(format!("{SHARD_PREFIX}{}/{}/{}", id.collection, id.region, id.number))?)
    }

    /// The Raft log tree of a shard's group.
    pub fn raft_log_tree(&self, id: &ShardId) -> Result<sled::Tree, ShardError> {
        Ok(self
            .db
            .open_tree(format!("{RAFT_LOG_PREFIX}{}/{}/{}", id.collection, id.region, id.number))?)
    }

    fn drop_orphan_shards(&self) -> Result<(), ShardError> {
        // Names, not decoded specs: an unreadable entry keeps its data.
        let names: Vec<String> = self.catalog_entries()?.into_iter().map(|(n, _)| n).collect();
        let known: Vec<String> = names
            .iter()
            .flat_map(|n| [format!("{SHARD_PREFIX}{n}/"), format!("{RAFT_LOG_PREFIX}{n}/")])
            .collect();
        for t in self.db.tree_names() {
            let ours = t.starts_with(SHARD_PREFIX.as_bytes()) || t.starts_with(RAFT_LOG_PREFIX.as_bytes());
            if ours && !known.iter().any(|k| t.starts_with(k.as_bytes())) {
                self.db.drop_tree(&t)?;
            }
        }
        Ok(())
    }
}
