//! Backup and restore of a collection's region.
//!
//! A **backup** is a directory: one snapshot file per shard of the region
//! (`crates/raft/src/snapshot.rs` format: the shard's points and its side
//! state, which is its suppression list, tombstones of erased points and
//! opt-out registry, at one log position, with a digest), exported by a node
//! of the region that holds a replica (R2: the data leaves the cluster only
//! through its own region's nodes), and `manifest.json` (collection, region,
//! when it was taken, each shard's file, points and log index).
//!
//! A **restore** goes into a cluster where the collection's shards in that
//! region are empty (a new cluster, or a collection created anew): it creates
//! the collection with the backup's spec, gives each shard the backup's side
//! state (so tags made under the shard's key keep matching), and upserts the
//! points through the public API, where every shard checks each one against
//! its suppression list and opt-out registry at apply. Given a **ledger** (a
//! later backup of the same region, or just its side state), the restore
//! first adopts the later suppression entries, tombstones and opt-outs, and
//! leaves out every backed-up point erased after the backup (its tombstone
//! is later than the backup), of a subject suppressed since (without consent
//! given after), within an opt-out, or expired: a restore never brings
//! erased data back.

use crate::ctl::Conn;
use crate::state::NodeState;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sovra_proto::v1;
use sovra_raft::ReadLevel;
use sovra_raft::snapshot::{self, SnapshotHeader};
use sovra_types::{ApiError, CopyBatch, LawfulBasis, PointRecord, ShardCommand, ShardId, Suppression};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per streamed chunk of a shard's backup.
const CHUNK: usize = 1 << 20;
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub collection: String,
    pub region: String,
    /// When the backup began (the ctl's clock, Unix ms): tombstones later
    /// than this mark points erased after it.
    pub taken_at_ms: u64,
    pub shards: Vec<ManifestShard>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestShard {
    pub number: u32,
    pub file: String,
    pub points: u64,
    pub log_index: u64,
}

/// Writes this node's replica of `shard` to a snapshot file in `dir`, exact
/// at one log position (writers wait while it is written), after a
/// linearizable read barrier. Returns the file and the log position.
pub async fn export_shard(state: &Arc<NodeState>, shard: &ShardId) -> Result<(PathBuf, u64), ApiError> {
    let g = state.host.group(shard).ok_or_else(|| {
        let holders = state
            .view()
            .state
            .collections
            .get(&shard.collection)
            .and_then(|c| c.shards.get(&(shard.region.clone(), shard.number)).map(|s| s.replicas.clone()));
        ApiError::precondition(format!(
            "node {} holds no replica of shard {shard}; export it through a node of {} that holds one (nodes {:?})",
            state.config.node_id,
            shard.region,
            holders.unwrap_or_default()
        ))
    })?;
    state.host.read_barrier(shard, ReadLevel::Linearizable).await?;
    let engine = g.engine().clone();
    let dir = state.config.data_dir.join("exports");
    let path = dir.join(format!(
        "{}-{}-{}-{:016x}.snap",
        shard.collection,
        shard.region,
        shard.number,
        rand::random::<u64>()
    ));
    let id = shard.clone();
    tokio::task::spawn_blocking(move || -> Result<(PathBuf, u64), ApiError> {
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let (written, _) = engine.frozen(|store| -> Result<u64, ApiError> {
            let index = engine.last_applied();
            let header = SnapshotHeader {
                shard: id.clone(),
                snapshot_id: format!("backup-{index}"),
                last_log_id: None,
                membership: Default::default(),
                spec: engine.spec().clone(),
                rejections: store.rejections().map_err(|e| ApiError::internal(e.to_string()))?,
                suppression: store.suppression().map_err(|e| ApiError::internal(e.to_string()))?,
            };
            snapshot::write(&path, &header, store.points())
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(index)
        });
        Ok((path, written?))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Streams `path` in chunks, deleting it once sent (or on failure).
pub fn stream_file(path: PathBuf) -> tokio_stream::wrappers::ReceiverStream<Result<v1::ExportChunk, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let send = async {
            let mut f = tokio::fs::File::open(&path).await?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                if tx.send(Ok(v1::ExportChunk { data: buf[..n].to_vec() })).await.is_err() {
                    return Ok(());
                }
            }
        };
        if let Err(e) = send.await {
            let _ = tx
                .send(Err(tonic::Status::internal(format!("reading the export failed: {e}"))))
                .await;
        }
        let _ = tokio::fs::remove_file(&path).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Gives an empty shard a backup's side state (suppression key and list,
/// tombstones, opt-out registry), through its Raft group.
pub async fn restore_side(state: &Arc<NodeState>, shard: &ShardId, side: Suppression) -> Result<(), ApiError> {
    let g = state.host.group(shard).ok_or_else(|| {
        ApiError::precondition(format!(
            "node {} holds no replica of shard {shard}; send it to a node of {} that holds one",
            state.config.node_id, shard.region
        ))
    })?;
    state.host.read_barrier(shard, ReadLevel::Linearizable).await?;
    let engine = g.engine();
    let key = engine.store().suppress_key().map_err(|e| ApiError::internal(e.to_string()))?;
    if engine.stats().live_points > 0 || key.is_some_and(|k| Some(k) != side.key) {
        return Err(ApiError::precondition(format!(
            "shard {shard} is not empty (it holds points or its own suppression key): restore into a collection created anew"
        )));
    }
    let members = g.raft().metrics().borrow().membership_config.membership().voter_ids().collect();
    let limit = sovra_types::limits::MAX_IDS_PER_REQUEST;
    let chunks = side
        .entries
        .len()
        .max(side.tombstones.len())
        .div_ceil(limit)
        .max(side.opt_outs.len().div_ceil(limit))
        .max(1);
    for i in 0..chunks {
        let part = |v: &[([u8; 32], u64)]| v.iter().skip(i * limit).take(limit).copied().collect::<Vec<_>>();
        let b = CopyBatch {
            job: "restore".into(),
            fenced: false,
            suppress_key: if i == 0 { side.key } else { None },
            suppressed: part(&side.entries),
            tombstones: part(&side.tombstones),
            opt_outs: side.opt_outs.iter().skip(i * limit).take(limit).cloned().collect(),
            ..Default::default()
        };
        state.host.write_to(shard, &members, ShardCommand::Copy(Box::new(b))).await?;
    }
    Ok(())
}

/// `sovra ctl backup`: every shard of `region` of `collection` into `out`.
pub async fn backup(c: &Conn, collection: &str, region: &str, out: &Path) -> anyhow::Result<String> {
    let taken_at_ms = crate::cluster::now_ms();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    anyhow::ensure!(
        !out.join(MANIFEST).exists(),
        "{} already holds a backup: give an empty directory",
        out.display()
    );
    let info = v1::collections_client::CollectionsClient::new(c.keyed().await?)
        .get_collection(v1::GetCollectionRequest {
            name: collection.into(),
            with_digest: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetCollection: {}", s.message()))?
        .into_inner();
    let addr = public_addresses(c).await?;
    let mut shards = Vec::new();
    for s in info.shards.iter().filter(|s| s.region == region) {
        let file = format!("shard-{}.snap", s.number);
        let path = out.join(&file);
        let mut last = None;
        for node in &s.replicas {
            let Some(a) = addr.get(node) else { continue };
            match export_one(c, a, collection, region, s.number, &path).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(format!("node {node}: {e:#}")),
            }
        }
        if let Some(why) = last {
            anyhow::bail!("shard {} could not be exported: {why}", s.number);
        }
        let mut r = snapshot::Reader::open(&path)?;
        let log_index = r.header.snapshot_id.trim_start_matches("backup-").parse().unwrap_or(0);
        let points = r.by_ref().try_fold(0u64, |n, rec| rec.map(|_| n + 1))?;
        shards.push(ManifestShard {
            number: s.number,
            file,
            points,
            log_index,
        });
    }
    anyhow::ensure!(!shards.is_empty(), "collection {collection} has no shard in region {region}");
    let m = Manifest {
        format: 1,
        collection: collection.into(),
        region: region.into(),
        taken_at_ms,
        shards,
    };
    std::fs::write(out.join(MANIFEST), serde_json::to_vec_pretty(&m)?)?;
    let total: u64 = m.shards.iter().map(|s| s.points).sum();
    Ok(format!(
        "backed up {total} points of {collection} in {region} ({} shards) to {}",
        m.shards.len(),
        out.display()
    ))
}

/// Every node's public address, by id.
async fn public_addresses(c: &Conn) -> anyhow::Result<BTreeMap<u64, String>> {
    let status = c.cluster_status().await?;
    Ok(status.nodes.into_iter().map(|n| (n.id, n.public_addr)).collect())
}

async fn export_one(c: &Conn, addr: &str, collection: &str, region: &str, shard: u32, path: &Path) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (_, key, ca) = c.resolve()?;
    let there = Conn {
        ca,
        ..Conn::to(addr, key, c.format)
    };
    let mut stream = there
        .admin()
        .await?
        .export_shard(v1::ExportShardRequest {
            collection: collection.into(),
            region: region.into(),
            shard,
        })
        .await
        .map_err(|s| anyhow::anyhow!("ExportShard: {}", s.message()))?
        .into_inner();
    let tmp = path.with_extension("part");
    let mut f = tokio::fs::File::create(&tmp).await?;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("ExportShard: {}", s.message()))?
    {
        f.write_all(&chunk.data).await?;
    }
    f.sync_all().await?;
    tokio::fs::rename(&tmp, path).await?;
    // The digest is checked here, before the backup counts the file.
    let r = snapshot::Reader::open(path)?;
    for rec in r {
        rec?;
    }
    Ok(())
}

/// Whether a backed-up point may come back: not erased after the backup
/// (tombstone), not of a subject suppressed without later consent, not
/// within an opt-out, not expired.
fn may_return(p: &PointRecord, side: &Suppression, taken_at_ms: u64, metric: sovra_types::Metric, now_ms: u64) -> bool {
    if p.is_expired(now_ms) {
        return false;
    }
    let Some(key) = side.key else { return true };
    let tag = sovra_shard::id_tag(&key, &p.id);
    if side.tombstones.iter().any(|(t, at)| *t == tag && *at >= taken_at_ms) {
        return false;
    }
    if !p.subject.is_empty() {
        let st = sovra_shard::subject_tag(&key, &p.subject);
        if let Some((_, erased)) = side.entries.iter().find(|(t, _)| *t == st)
            && !(p.lawful_basis == LawfulBasis::Consent && p.consent_at_ms > *erased)
        {
            return false;
        }
    }
    let d = sovra_index::SpaceDistance::new(sovra_shard::engine::space_of(metric));
    !side.opt_outs.iter().any(|(_, o)| d.eval(&o.vector, &p.vector) <= o.threshold)
}

/// The side state a restore adopts: the backup's, with a later ledger's
/// entries, tombstones and opt-out registry over it (same key required).
fn merged(backup: &Suppression, ledger: Option<&Suppression>) -> anyhow::Result<Suppression> {
    let Some(l) = ledger else { return Ok(backup.clone()) };
    anyhow::ensure!(
        backup.key.is_none() || l.key.is_none() || backup.key == l.key,
        "the ledger's shard has another suppression key: it is not a later backup of the same shard"
    );
    let union = |a: &[([u8; 32], u64)], b: &[([u8; 32], u64)]| -> Vec<([u8; 32], u64)> {
        let mut m: BTreeMap<[u8; 32], u64> = a.iter().copied().collect();
        for (t, at) in b {
            let e = m.entry(*t).or_insert(*at);
            *e = (*e).max(*at);
        }
        m.into_iter().collect()
    };
    Ok(Suppression {
        key: backup.key.or(l.key),
        entries: union(&backup.entries, &l.entries),
        tombstones: union(&backup.tombstones, &l.tombstones),
        opt_outs: l.opt_outs.clone(),
        ..Default::default()
    })
}

/// `sovra ctl restore`: the backup in `dir` into the cluster behind `c`,
/// leaving out what `ledger` (a later backup's directory) shows erased.
pub async fn restore(c: &Conn, dir: &Path, ledger: Option<&Path>) -> anyhow::Result<String> {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).with_context(|| format!("reading {}", dir.join(MANIFEST).display()))?)?;
    let later: Option<Manifest> = match ledger {
        Some(l) => Some(serde_json::from_slice(&std::fs::read(l.join(MANIFEST))?)?),
        None => None,
    };
    if let Some(l) = &later {
        anyhow::ensure!(
            l.collection == m.collection && l.region == m.region && l.taken_at_ms >= m.taken_at_ms,
            "the ledger is not a later backup of {} in {}",
            m.collection,
            m.region
        );
    }
    let first = snapshot::Reader::open(&dir.join(&m.shards[0].file))?;
    let spec = first.header.spec.clone();
    let region = sovra_types::RegionId::parse(&m.region)?;
    anyhow::ensure!(
        spec.region(&region).is_some_and(|r| r.split_map.is_none()),
        "region {} of {} was split before this backup: restoring a split region is not supported yet",
        m.region,
        m.collection
    );
    let mut collections = v1::collections_client::CollectionsClient::new(c.keyed().await?);
    match collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(sovra_proto::convert::spec_to(&spec)),
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => anyhow::bail!("CreateCollection: {}", s.message()),
    }
    let info = collections
        .get_collection(v1::GetCollectionRequest {
            name: m.collection.clone(),
            with_digest: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetCollection: {}", s.message()))?
        .into_inner();
    let addr = public_addresses(c).await?;
    let now = crate::cluster::now_ms();
    let (mut restored, mut left_out) = (0u64, 0u64);
    for s in &m.shards {
        let mut r = snapshot::Reader::open(&dir.join(&s.file))?;
        let ledger_side = match (&later, ledger) {
            (Some(l), Some(ld)) => match l.shards.iter().find(|x| x.number == s.number) {
                Some(x) => Some(snapshot::Reader::open(&ld.join(&x.file))?.header.suppression),
                None => anyhow::bail!("the ledger has no shard {}", s.number),
            },
            _ => None,
        };
        let side = merged(&r.header.suppression, ledger_side.as_ref())?;
        let holders = info
            .shards
            .iter()
            .find(|x| x.region == m.region && x.number == s.number)
            .map(|x| x.replicas.clone())
            .ok_or_else(|| anyhow::anyhow!("the restored collection has no shard {} in {}", s.number, m.region))?;
        let state = postcard::to_allocvec(&side)?;
        let mut last = None;
        let mut via = None;
        for node in &holders {
            let Some(a) = addr.get(node) else { continue };
            let (_, key, ca) = c.resolve()?;
            let there = Conn {
                ca,
                ..Conn::to(a.clone(), key, c.format)
            };
            let req = v1::RestoreShardStateRequest {
                collection: m.collection.clone(),
                region: m.region.clone(),
                shard: s.number,
                state: state.clone(),
            };
            match there.admin().await?.restore_shard_state(req).await {
                Ok(_) => {
                    via = Some(there);
                    break;
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition && e.message().contains("not empty") => {
                    anyhow::bail!("RestoreShardState: {}", e.message())
                }
                Err(e) => last = Some(format!("node {node}: {}", e.message())),
            }
        }
        let via = via.ok_or_else(|| anyhow::anyhow!("no node took shard {}'s state: {}", s.number, last.unwrap_or_default()))?;
        let mut points = v1::points_client::PointsClient::new(via.keyed().await?);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let mut flush = async |batch: &mut Vec<v1::Point>| -> anyhow::Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            points
                .upsert(v1::UpsertRequest {
                    collection: m.collection.clone(),
                    points: std::mem::take(batch),
                })
                .await
                .map_err(|s| anyhow::anyhow!("Upsert: {}", s.message()))?;
            Ok(())
        };
        for rec in r.by_ref() {
            let p = rec?;
            if !may_return(&p, &side, m.taken_at_ms, spec.metric, now) {
                left_out += 1;
                continue;
            }
            bytes += p.vector.len() * 4 + 512;
            batch.push(sovra_proto::convert::point_to(&p, true, true));
            restored += 1;
            if batch.len() >= 256 || bytes >= 2 << 20 {
                flush(&mut batch).await?;
                bytes = 0;
            }
        }
        flush(&mut batch).await?;
    }
    Ok(format!(
        "restored {restored} points of {} in {} ({} shards); left out {left_out} erased, suppressed, opted out or expired since the backup",
        m.collection,
        m.region,
        m.shards.len()
    ))
}
