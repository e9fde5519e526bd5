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
        let prefix = format!("{SHARD_PREFIX}{name}/");
        let mut dropped = 0;
        for t in self.db.tree_names() {
            if t.starts_with(prefix.as_bytes()) {
                self.db.drop_tree(&t)?;
                dropped += 1;
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

    fn drop_orphan_shards(&self) -> Result<(), ShardError> {
        let known: Vec<String> = self.collections()?.iter().map(|c| format!("{SHARD_PREFIX}{}/", c.name)).collect();
        for t in self.db.tree_names() {
            if t.starts_with(SHARD_PREFIX.as_bytes()) && !known.iter().any(|k| t.starts_with(k.as_bytes())) {
                self.db.drop_tree(&t)?;
            }
        }
        Ok(())
    }
}
