//! The node's own small database: a format version and the catalog of
//! collection specs. Replicas keep their data in their own databases
//! ([`crate::replica`]), never here.

use crate::ShardError;
use sovra_types::{CollectionName, CollectionSpec};
use std::path::Path;

/// Bumped whenever the on-disk layout changes; a node refuses other versions.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_KEY: &[u8] = b"format_version";
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
        Ok(Self { db, catalog })
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
