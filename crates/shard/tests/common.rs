//! Helpers shared by the shard tests.
#![allow(dead_code)]

use sovra_shard::{CacheBudget, ReplicaStore, ShardEngine};
use sovra_types::*;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

pub fn spec(name: &str, dim: u32, metric: Metric) -> CollectionSpec {
    CollectionSpec {
        hnsw: HnswParams {
            m: 16,
            ef_construction: 200,
            ef_search: 128,
        },
        ..CollectionSpec::single_region(CollectionName::parse(name).unwrap(), dim, metric, RegionId::parse("eu").unwrap())
    }
}

pub fn pool() -> Arc<rayon::ThreadPool> {
    Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap())
}

pub fn shard_id(spec: &CollectionSpec) -> ShardId {
    ShardId {
        collection: spec.name.clone(),
        region: RegionId::parse("eu").unwrap(),
        number: 0,
    }
}

/// The replica store of `spec`'s one shard under `dir`. A store just dropped
/// may still be locked for a moment by sled's own I/O threads finishing its
/// last writes (it locks the directory): the open is retried until it works,
/// within a deadline.
pub fn replica(dir: &Path) -> ReplicaStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match ReplicaStore::open(&dir.join("replica"), &CacheBudget::new(64 << 20, 4)) {
            Ok(r) => return r,
            // The Debug form carries sled's own message, whichever way the
            // display of the error is worded.
            Err(e) if std::time::Instant::now() < deadline && format!("{e:?}").contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("opening the replica store: {e}: {e:?}"),
        }
    }
}

pub fn open(dir: &Path, spec: &CollectionSpec) -> ShardEngine {
    open_with(dir, spec, sovra_index::IndexEngine::default())
}

#[allow(dead_code)] // not every test binary compares engines
pub fn open_with(dir: &Path, spec: &CollectionSpec, engine: sovra_index::IndexEngine) -> ShardEngine {
    let options = sovra_index::IndexOptions {
        engine,
        pool: Some(pool()),
    };
    ShardEngine::open(shard_id(spec), Arc::new(spec.clone()), &replica(dir), options).unwrap()
}

pub fn record(id: u64, vector: Vec<f32>, payload: Payload) -> PointRecord {
    PointRecord {
        id: PointId::Num(id),
        region: RegionId::parse("eu").unwrap(),
        vector,
        subject: format!("subject-{}", id % 97),
        payload,
        lawful_basis: LawfulBasis::Consent,
        source: "test".into(),
        expires_at_ms: 0,
        consent_at_ms: 0,
    }
}

/// `shared/bench/data` beside the checkout, or `SOVRA_BENCH_DATA`; `None` when
/// neither is there (a clone on its own).
pub fn data_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SOVRA_BENCH_DATA") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/data");
    p.is_dir().then_some(p)
}
