//! openraft's storage conformance suite over the sled log store and the shard
//! engine as state machine; plus snapshot refusal (corrupt, wrong region).

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
use sovra_raft::types::StorageErr;
use sovra_raft::{LogStore, ShardStateMachine, TypeConfig};
use sovra_shard::{CacheBudget, NodeStore, ReplicaStore, ShardEngine};
use sovra_types::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use tempfile::TempDir;

fn spec(region: &str) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("people").unwrap(),
        dimension: 4,
        metric: Metric::L2,
        hnsw: HnswParams {
            m: 8,
            ef_construction: 32,
            ef_search: 32,
        },
        regions: vec![RegionShards {
            region: RegionId::parse(region).unwrap(),
            shard_count: 1,
            split_map: None,
        }],
        replication_factor: 3,
        default_retention_seconds: 0,
        require_lawful_basis: false,
        require_purpose: false,
    }
}

struct Replica {
    _dir: TempDir,
    store: NodeStore,
    sm: ShardStateMachine,
    log: LogStore,
}

fn replica(shard_region: &str, node_region: &str) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(&dir.path().join("db"), 16 << 20).unwrap();
    let spec = spec(shard_region);
    store.put_collection(&spec).unwrap();
    let id = ShardId {
        collection: spec.name.clone(),
        region: RegionId::parse(shard_region).unwrap(),
        number: 0,
    };
    let rs = ReplicaStore::open(&dir.path().join("replica"), &CacheBudget::new(16 << 20, 1)).unwrap();
    let engine = Arc::new(ShardEngine::open(id.clone(), Arc::new(spec), &rs, Default::default()).unwrap());
    let sm = ShardStateMachine::open(engine, rs.snapshot_dir(), RegionId::parse(node_region).unwrap()).unwrap();
    let log = LogStore::of(&rs);
    Replica { _dir: dir, store, sm, log }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, ShardStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, ShardStateMachine), StorageErr> {
        let r = replica("eu-west", "eu-west");
        drop(r.store);
        Ok((r._dir, r.log, r.sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn point(id: u64, region: &str) -> PointRecord {
    PointRecord {
        id: PointId::Num(id),
        region: RegionId::parse(region).unwrap(),
        vector: vec![id as f32, 1.0, 2.0, 3.0],
        subject: format!("s{id}"),
        payload: Default::default(),
        lawful_basis: LawfulBasis::Consent,
        source: "test".into(),
        expires_at_ms: 0,
        consent_at_ms: 0,
    }
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// A replica of `region` with a membership entry and 50 points in 5 batches,
/// and a snapshot built of it.
async fn loaded(region: &str) -> (Replica, std::path::PathBuf) {
    let mut r = replica(region, region);
    let mut entries = vec![Entry::<TypeConfig> {
        log_id: log_id(1),
        payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None)),
    }];
    for b in 0..5u64 {
        entries.push(Entry {
            log_id: log_id(2 + b),
            payload: EntryPayload::Normal(ShardCommand::Upsert((b * 10..b * 10 + 10).map(|i| point(i, region)).collect())),
        });
    }
    let out = r.sm.apply(entries).await.unwrap();
    assert_eq!(out.iter().map(|o| o.changed).sum::<u64>(), 50);
    let snap = r.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(6)));
    let path = snap.snapshot.path.clone();
    (r, path)
}

async fn install(target: &mut Replica, src: &std::path::Path) -> Result<(), StorageErr> {
    let meta = {
        let mut f = std::io::BufReader::new(std::fs::File::open(src).unwrap());
        sovra_raft::snapshot::parse_header(&mut f).unwrap().meta()
    };
    let mut recv = target.sm.begin_receiving_snapshot().await?;
    let bytes = std::fs::read(src).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &bytes).await.unwrap();
    target.sm.install_snapshot(&meta, recv).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_installs_and_matches_the_source() {
    let (src, path) = loaded("eu-west").await;
    let mut dst = replica("eu-west", "eu-west");
    install(&mut dst, &path).await.unwrap();
    assert_eq!(dst.sm.engine().digest().unwrap(), src.sm.engine().digest().unwrap());
    assert_eq!(dst.sm.engine().stats().live_points, 50, "the index is rebuilt from the snapshot");
    let (applied, membership) = dst.sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(6)));
    assert_eq!(membership.log_id(), &Some(log_id(1)));
    assert!(dst.sm.get_current_snapshot().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_snapshot_is_refused_and_state_is_untouched() {
    let (_src, path) = loaded("eu-west").await;
    let mut dst = replica("eu-west", "eu-west");
    // Give the target some state of its own to keep.
    dst.sm
        .apply([Entry::<TypeConfig> {
            log_id: log_id(1),
            payload: EntryPayload::Normal(ShardCommand::Upsert(vec![point(999, "eu-west")])),
        }])
        .await
        .unwrap();
    let before = dst.sm.engine().digest().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = path.with_file_name("corrupt.bin");
    std::fs::write(&bad, &bytes).unwrap();
    let err = install(&mut dst, &bad).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("digest") || text.contains("malformed"), "{text}");
    assert_eq!(dst.sm.engine().digest().unwrap(), before);
    assert_eq!(dst.sm.applied_state().await.unwrap().0, Some(log_id(1)));
    assert!(dst.sm.get_current_snapshot().await.unwrap().is_none(), "a refused file is not kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_region_snapshot_is_refused() {
    let (_src, path) = loaded("us-east").await;
    // A node of eu-west holding an eu-west shard of the same collection.
    let mut dst = replica("eu-west", "eu-west");
    let err = install(&mut dst, &path).await.unwrap_err();
    assert!(format!("{err:?}").contains("region us-east"), "{err:?}");
    assert_eq!(dst.sm.engine().stats().live_points, 0);
    // Even when the shard itself is mislabelled as the node's region, points of
    // another region inside it are refused.
    let mut dst2 = replica("us-east", "eu-west");
    let err = install(&mut dst2, &path).await.unwrap_err();
    assert!(format!("{err:?}").contains("region"), "{err:?}");
}
