//! `sovra bench erasure`: how long an erasure takes to be acknowledged, beside
//! a one-point write to the same shards, in one run: three nodes of one region
//! on loopback, replication factor 3, subjects spread over every shard. An
//! erasure by subject writes one command into every shard's log and then waits
//! for every replica to confirm it applied it (E1), so its unit is one commit
//! round trip per shard plus one confirmation round; the ratio printed is
//! erasure / write at p50 and p99.
//!
//! Then the purge (E2): one full index rebuild of the collection on one node
//! (the unit, measured in the same run), and for one subject and for 10% of
//! the points (a payload filter), the time from the request to its
//! acknowledgement and to its signed receipt (every replica purged: index
//! compacted, snapshot rebuilt, log purged, database rewritten, reported).

use crate::config::NodeConfig;
use crate::run::RunningNode;
use rand::{Rng, SeedableRng};
use sovra_proto::v1;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ErasureBenchArgs {
    /// Points loaded first (each subject holds `per_subject` of them).
    #[arg(long, default_value_t = 20_000)]
    pub points: usize,
    #[arg(long, default_value_t = 10)]
    pub per_subject: usize,
    /// Erasures measured (and as many one-point writes).
    #[arg(long, default_value_t = 100)]
    pub erasures: usize,
    /// Shards of the region.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// How often replicas look for erasures to purge (the nodes' purge_check_ms).
    #[arg(long, default_value_t = 200)]
    pub purge_check_ms: u64,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub(crate) fn quantile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 * p) as usize).min(xs.len() - 1)]
}

pub fn erasure(args: ErasureBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.erasures > 0 && args.per_subject > 0,
        "--erasures and --per-subject must be at least 1"
    );
    anyhow::ensure!(
        args.erasures * args.per_subject <= args.points,
        "--points must hold --erasures x --per-subject points"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

/// Starts `count` nodes of region uk on loopback in `dir` (each config
/// passed through `tweak`), waits until all serve, and returns them with a
/// channel to node 1 carrying its first admin key.
pub(crate) async fn region_cluster(
    dir: &std::path::Path,
    count: u64,
    tweak: impl Fn(&mut NodeConfig),
) -> anyhow::Result<(Vec<RunningNode>, crate::dev::Keyed)> {
    let secret = format!("bench-{:032x}", rand::random::<u128>());
    let configs = (1..=count)
        .map(|id| {
            let mut cfg = NodeConfig::local(id, "uk", dir.join(format!("n{id}")));
            cfg.cluster_secret = Some(secret.clone());
            cfg.zone = format!("zone-{id}");
            tweak(&mut cfg);
            cfg
        })
        .collect();
    let nodes: Vec<RunningNode> = crate::run::start_joined(configs, Default::default(), Duration::from_secs(60)).await?;
    let key = nodes[0]
        .state
        .first_admin_key_within(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("no admin key"))?;
    let ch = crate::dev::wait_serving(nodes[0].grpc_addr, Duration::from_secs(60)).await?;
    for n in &nodes[1..] {
        crate::dev::wait_serving(n.grpc_addr, Duration::from_secs(60)).await?;
    }
    Ok((nodes, crate::dev::keyed(&ch, &key)))
}

/// Upserts `all` into `collection` in batches of 500. A batch not
/// acknowledged in time (the replicas' graphs falling behind a long load on
/// two cores) is retried: writes are idempotent.
pub(crate) async fn load(
    points: &mut v1::points_client::PointsClient<crate::dev::Keyed>,
    collection: &str,
    all: &[v1::Point],
) -> anyhow::Result<()> {
    for (i, batch) in all.chunks(500).enumerate() {
        let mut tries = 0;
        loop {
            let r = points
                .upsert(v1::UpsertRequest {
                    collection: collection.into(),
                    points: batch.to_vec(),
                })
                .await;
            match r {
                Ok(_) => break,
                Err(st) if st.code() == tonic::Code::Unavailable && tries < 20 => {
                    tries += 1;
                    eprintln!("batch {i} not acknowledged ({}); retry {tries}", st.message());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(st) => return Err(st.into()),
            }
        }
    }
    Ok(())
}

/// Waits until every replica on `nodes` has linked what it stored into its
/// graph (they link behind the acks): measure on whole graphs.
pub(crate) async fn link_all(nodes: &[RunningNode]) -> anyhow::Result<()> {
    for n in nodes {
        for e in n.state.engines() {
            tokio::task::spawn_blocking(move || e.link_pending()).await?;
        }
    }
    Ok(())
}

async fn run(args: ErasureBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, k) = region_cluster(dir.path(), 3, |cfg| cfg.purge_check_ms = args.purge_check_ms).await?;
    let mut collections = v1::collections_client::CollectionsClient::new(k.clone());
    let mut points = v1::points_client::PointsClient::new(k.clone())
        .max_encoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES);
    let mut erasure = v1::erasure_client::ErasureClient::new(k);
    let spec = crate::dev::spanning_spec("bench", args.dim as u32, v1::Metric::L2, &["uk"], args.shards, 3);
    collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut vector = || (0..args.dim).map(|_| rng.random::<f32>()).collect::<Vec<f32>>();
    let point = |i: usize, v: Vec<f32>| v1::Point {
        id: Some(v1::PointId {
            kind: Some(v1::point_id::Kind::Num(i as u64)),
        }),
        vector: v,
        subject: format!("subject-{}", i / args.per_subject),
        region: "uk".into(),
        lawful_basis: v1::LawfulBasis::Consent as i32,
        // A tenth of the points in each bucket: the 10% erasure's filter.
        payload: [(
            "bucket".to_string(),
            v1::Value {
                kind: Some(v1::value::Kind::IntegerValue((i % 10) as i64)),
            },
        )]
        .into(),
        ..Default::default()
    };
    let started = Instant::now();
    let all: Vec<v1::Point> = (0..args.points).map(|i| point(i, vector())).collect();
    load(&mut points, "bench", &all).await?;
    eprintln!("loaded {} points in {:.1?}", args.points, started.elapsed());
    // Every replica links what it stored behind the acks: measure on graphs
    // that are whole, not while three of them are still being built.
    let t = Instant::now();
    link_all(&nodes).await?;
    eprintln!("every replica's graph linked {:.1?} later", t.elapsed());
    // Acknowledgements are measured with purges held (a purge rebuilds three
    // indexes on the same two cores); the purge is measured after.
    for n in &nodes {
        n.state.purges_held.store(true, std::sync::atomic::Ordering::Release);
    }
    let (mut writes, mut erases) = (Vec::new(), Vec::new());
    let mut erased = 0u64;
    let mut jobs = Vec::new();
    for s in 0..args.erasures {
        // One write of a fresh point (a new subject), then one erasure of an
        // old subject, interleaved so both see the same machine.
        let fresh = point(args.points + s * args.per_subject, vector());
        let t = Instant::now();
        points
            .upsert(v1::UpsertRequest {
                collection: "bench".into(),
                points: vec![fresh],
            })
            .await?;
        writes.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let ack = erasure
            .erase(v1::EraseRequest {
                collection: "bench".into(),
                region: "uk".into(),
                target: Some(v1::erase_request::Target::Subject(format!("subject-{s}"))),
            })
            .await?
            .into_inner();
        erases.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(ack.waited_out.is_empty(), "a replica was waited out: {:?}", ack.waited_out);
        erased += ack.erased;
        jobs.push(ack.job);
    }
    anyhow::ensure!(
        erased == (args.erasures * args.per_subject) as u64,
        "erased {erased} points, expected {}",
        args.erasures * args.per_subject
    );
    let (w50, w99) = (quantile(&mut writes, 0.5), quantile(&mut writes, 0.99));
    let (e50, e99) = (quantile(&mut erases, 0.5), quantile(&mut erases, 0.99));
    println!(
        "sovra bench erasure: 3 nodes of one region, rf 3, {} shards, {} points of {}-d, {} per subject, {} erasures",
        args.shards, args.points, args.dim, args.per_subject, args.erasures
    );
    println!("| operation | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    println!("| one-point write (commit on one shard) | {w50:.2} | {w99:.2} |");
    println!(
        "| erase one subject ({} points; commit on {} shards, then every replica confirms) | {e50:.2} | {e99:.2} |",
        args.per_subject, args.shards
    );
    println!("erasure / write: p50 {:.2}x, p99 {:.2}x", e50 / w50, e99 / w99);

    // The purge. First the single-subject erasures above finish (all in one
    // purge now), so what follows is measured on a quiet cluster.
    for n in &nodes {
        n.state.purges_held.store(false, std::sync::atomic::Ordering::Release);
    }
    let started = Instant::now();
    for j in &jobs {
        receipt(&mut erasure, j).await?;
    }
    eprintln!(
        "the {} erasures above purged and receipted in {:.1?}",
        jobs.len(),
        started.elapsed()
    );
    // The unit: one full rebuild of the collection's index, on one node
    // (every shard of it, one after the other).
    let t = Instant::now();
    for e in nodes[0].state.engines() {
        tokio::task::spawn_blocking(move || e.compact()).await?;
    }
    let rebuild = t.elapsed().as_secs_f64();
    let live: usize = nodes[0].state.engines().iter().map(|e| e.store().points().count()).sum();
    println!();
    println!("| purge, {live} points live | ack ms | receipt s | receipt / rebuild |");
    println!("|---|---:|---:|---:|");
    println!("| one full index rebuild (one node) | | {rebuild:.2} | 1.00 |");
    let subject = v1::erase_request::Target::Subject(format!("subject-{}", args.erasures));
    let tenth = v1::erase_request::Target::Filter(v1::Filter {
        kind: Some(v1::filter::Kind::Condition(v1::Condition {
            key: "bucket".into(),
            test: Some(v1::condition::Test::Match(v1::Value {
                kind: Some(v1::value::Kind::IntegerValue(7)),
            })),
        })),
    });
    for (what, target) in [("one subject", subject), ("10% of the points (a filter)", tenth)] {
        let t = Instant::now();
        let ack = erasure
            .erase(v1::EraseRequest {
                collection: "bench".into(),
                region: "uk".into(),
                target: Some(target),
            })
            .await?
            .into_inner();
        let acked = t.elapsed().as_secs_f64() * 1e3;
        let job = receipt(&mut erasure, &ack.job).await?;
        let done = t.elapsed().as_secs_f64();
        let r = crate::receipt::verify(&job.receipt_json, &job.signature, &nodes[0].state.receipt_key.public_hex())
            .map_err(|e| anyhow::anyhow!("the receipt does not verify: {e}"))?;
        anyhow::ensure!(r.erased == ack.erased, "receipt says {} erased, the ack {}", r.erased, ack.erased);
        println!(
            "| erase {what}: {} points | {acked:.1} | {done:.2} | {:.2} |",
            ack.erased,
            done / rebuild
        );
    }
    for n in nodes {
        n.stop().await?;
    }
    Ok(())
}

/// Waits for job `job` to be done (bounded: 30 minutes) and returns it.
async fn receipt(c: &mut v1::erasure_client::ErasureClient<crate::dev::Keyed>, job: &str) -> anyhow::Result<v1::ErasureJob> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let j = c.get_erasure_job(v1::GetErasureJobRequest { job: job.into() }).await?.into_inner();
        match j.state.as_str() {
            "done" => return Ok(j),
            "failed" => anyhow::bail!("erasure job {job} failed: {}", j.failed_reason),
            _ if Instant::now() > deadline => anyhow::bail!("erasure job {job} not done within 30 minutes: {j:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
