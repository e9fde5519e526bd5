//! `sovra bench replication`: write throughput and acknowledgement latency of
//! a 3-replica shard group on loopback (three in-process nodes, writes through
//! the public gRPC API to one of them), beside the same batches applied to a
//! single unreplicated shard engine, in one run. Prints both and their ratio.

use crate::config::NodeConfig;
use crate::run::RunningNode;
use rand::{Rng, SeedableRng};
use sovra_proto::v1;
use sovra_shard::{CacheBudget, ReplicaStore, ShardEngine};
use sovra_types::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ReplicationBenchArgs {
    /// Batches written to each target.
    #[arg(long, default_value_t = 300)]
    pub batches: usize,
    /// Points per batch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

struct Run {
    points_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarise(lat: &mut [Duration], total: Duration, points: usize) -> Run {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Run {
        points_per_s: points as f64 / total.as_secs_f64(),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
    }
}

fn batches(args: &ReplicationBenchArgs) -> Vec<Vec<PointRecord>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let region = RegionId::parse("eu-west").expect("literal");
    (0..args.batches)
        .map(|b| {
            (0..args.batch)
                .map(|i| PointRecord {
                    id: PointId::Num((b * args.batch + i) as u64),
                    region: region.clone(),
                    vector: (0..args.dim).map(|_| rng.random::<f32>()).collect(),
                    subject: format!("subject-{}", i % 97),
                    payload: Default::default(),
                    lawful_basis: LawfulBasis::Consent,
                    source: "bench".into(),
                    expires_at_ms: 0,
                    consent_at_ms: 0,
                })
                .collect()
        })
        .collect()
}

fn spec(args: &ReplicationBenchArgs, rf: u32) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("bench").expect("literal"),
        dimension: args.dim as u32,
        metric: Metric::L2,
        hnsw: HnswParams::default(),
        regions: vec![RegionShards {
            region: RegionId::parse("eu-west").expect("literal"),
            shard_count: 1,
            split_map: None,
        }],
        replication_factor: rf,
        default_retention_seconds: 0,
        require_lawful_basis: false,
        require_purpose: false,
    }
}

fn single_engine(args: &ReplicationBenchArgs, data: &[Vec<PointRecord>]) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let spec = spec(args, 1);
    let replica = ReplicaStore::open(&dir.path().join("replica"), &CacheBudget::new(256 << 20, 1))?;
    let id = ShardId {
        collection: spec.name.clone(),
        region: spec.regions[0].region.clone(),
        number: 0,
    };
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build()?);
    let engine = ShardEngine::open(id.clone(), Arc::new(spec), &replica, sovra_index::IndexOptions::with_pool(pool))?;
    let mut lat = Vec::with_capacity(data.len());
    let started = Instant::now();
    for b in data {
        let t = Instant::now();
        engine.apply_next(&ShardCommand::Upsert(b.clone()))?;
        lat.push(t.elapsed());
    }
    Ok(summarise(&mut lat, started.elapsed(), args.batch * data.len()))
}

async fn replicated(args: &ReplicationBenchArgs, data: &[Vec<PointRecord>]) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let secret = format!("bench-{:032x}", rand::random::<u128>());
    let configs = (1..=3u64)
        .map(|id| {
            let mut cfg = NodeConfig::local(id, "eu-west", dir.path().join(format!("n{id}")));
            cfg.cluster_secret = Some(secret.clone());
            cfg.index_threads = 1;
            // Three in-process nodes on loopback measuring the write path: the
            // benchmark's client is trusted (and the key check is not what is
            // measured here).
            cfg.auth = false;
            cfg
        })
        .collect();
    let nodes: Vec<RunningNode> = crate::run::start_joined(configs, Default::default(), Duration::from_secs(60)).await?;
    let ch = crate::dev::wait_serving(nodes[0].grpc_addr, Duration::from_secs(60)).await?;
    for n in &nodes[1..] {
        crate::dev::wait_serving(n.grpc_addr, Duration::from_secs(60)).await?;
    }
    let mut collections = v1::collections_client::CollectionsClient::new(ch.clone());
    collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(sovra_proto::convert::spec_to(&spec(args, 3))),
        })
        .await?;
    // Write to the leader, as a router that follows leader hints would.
    let leader = loop {
        if let Some(l) = nodes[0].state.host.groups().first().and_then(|g| g.leader()) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let addr = nodes[(leader - 1) as usize].grpc_addr;
    let ch = crate::dev::wait_serving(addr, Duration::from_secs(10)).await?;
    let mut points = v1::points_client::PointsClient::new(ch)
        .max_encoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES);
    let wire: Vec<Vec<v1::Point>> = data
        .iter()
        .map(|b| b.iter().map(|r| sovra_proto::convert::point_to(r, true, true)).collect())
        .collect();
    let mut lat = Vec::with_capacity(data.len());
    let started = Instant::now();
    for b in wire {
        let t = Instant::now();
        points
            .upsert(v1::UpsertRequest {
                collection: "bench".into(),
                points: b,
            })
            .await?;
        lat.push(t.elapsed());
    }
    let run = summarise(&mut lat, started.elapsed(), args.batch * data.len());
    for n in nodes {
        n.stop().await?;
    }
    Ok(run)
}

pub fn replication(args: ReplicationBenchArgs) -> anyhow::Result<()> {
    let data = batches(&args);
    println!(
        "write benchmark: {} batches of {} points, {}-d, L2, loopback, {} cores",
        args.batches,
        args.batch,
        args.dim,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let single = single_engine(&args, &data)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let three = rt.block_on(replicated(&args, &data))?;
    println!("| target | points/s | p50 ack ms | p99 ack ms |");
    println!("|---|---|---|---|");
    for (name, r) in [("single engine (no Raft, no gRPC)", &single), ("3-replica group via gRPC", &three)] {
        println!("| {name} | {:.0} | {:.2} | {:.2} |", r.points_per_s, r.p50_ms, r.p99_ms);
    }
    println!(
        "replicated / single: throughput {:.2}x, p50 latency {:.2}x",
        three.points_per_s / single.points_per_s,
        three.p50_ms / single.p50_ms
    );
    Ok(())
}
