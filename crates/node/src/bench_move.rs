//! `sovra bench move`: what moving a replica costs, in one run. Four nodes of
//! one region on loopback, one shard with replication factor 3 on three of
//! them. The units, measured first on the same machine: one full index
//! rebuild of the shard (the work a new replica would do from the store
//! alone), and client search latency through a node holding a replica. Then
//! one replica is moved to the fourth node (`Admin/MoveReplica`, learner,
//! snapshot and log catch-up, joint consensus, source destroyed) while the
//! same searches run: the time to the move's `done` against the rebuild, and
//! search p50/p99 during the move against before it.

use crate::bench_erasure::{link_all, load, quantile, region_cluster};
use rand::{Rng, SeedableRng};
use sovra_proto::v1;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct MoveBenchArgs {
    /// Points in the shard.
    #[arg(long, default_value_t = 20_000)]
    pub points: usize,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Searches measured before the move (during it, as many as it lasts).
    #[arg(long, default_value_t = 1000)]
    pub searches: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn bench_move(args: MoveBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.points > 0 && args.searches > 0, "--points and --searches must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

type Search = v1::search_client::SearchClient<crate::dev::Keyed>;

/// One search of a random vector; its latency in ms, or its error.
async fn one(s: &mut Search, dim: usize, rng: &mut rand::rngs::StdRng) -> Result<f64, tonic::Status> {
    let vector: Vec<f32> = (0..dim).map(|_| rng.random::<f32>()).collect();
    let t = Instant::now();
    s.search(v1::SearchRequest {
        collection: "bench".into(),
        vector,
        k: 10,
        ..Default::default()
    })
    .await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

async fn run(args: MoveBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, k) = region_cluster(dir.path(), 4, |_| {}).await?;
    let mut collections = v1::collections_client::CollectionsClient::new(k.clone());
    let mut points = v1::points_client::PointsClient::new(k.clone())
        .max_encoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(sovra_types::limits::MAX_MESSAGE_BYTES);
    let mut admin = v1::admin_client::AdminClient::new(k);
    let spec = crate::dev::spanning_spec("bench", args.dim as u32, v1::Metric::L2, &["uk"], 1, 3);
    collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let all: Vec<v1::Point> = (0..args.points)
        .map(|i| v1::Point {
            id: Some(v1::PointId {
                kind: Some(v1::point_id::Kind::Num(i as u64)),
            }),
            vector: (0..args.dim).map(|_| rng.random::<f32>()).collect(),
            subject: format!("subject-{i}"),
            region: "uk".into(),
            lawful_basis: v1::LawfulBasis::Consent as i32,
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    load(&mut points, "bench", &all).await?;
    link_all(&nodes).await?;
    eprintln!("loaded and linked {} points in {:.1?}", args.points, t.elapsed());

    // Who holds the shard: the move goes from one holder to the node that
    // holds none; searches go through another holder (its replica answers).
    let info = collections
        .get_collection(v1::GetCollectionRequest {
            name: "bench".into(),
            with_digest: false,
        })
        .await?
        .into_inner();
    let holders = info.shards[0].replicas.clone();
    let to = (1..=4u64).find(|n| !holders.contains(n)).expect("four nodes, three replicas");
    let (from, via) = (holders[0], holders[1]);
    let via_node = &nodes[(via - 1) as usize];
    let ch = crate::dev::wait_serving(via_node.grpc_addr, Duration::from_secs(60)).await?;
    let key = nodes[0]
        .state
        .first_admin_key_within(Duration::from_secs(5))
        .await
        .ok_or_else(|| anyhow::anyhow!("no admin key"))?;
    let search = Search::new(crate::dev::keyed(&ch, &key));

    // Unit 1: one full rebuild of the shard's index, on the source.
    let e = nodes[(from - 1) as usize]
        .state
        .engines()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("node {from} holds no replica"))?;
    let t = Instant::now();
    tokio::task::spawn_blocking(move || e.compact()).await?;
    let rebuild = t.elapsed().as_secs_f64();
    eprintln!("rebuilt the shard's index on node {from} in {rebuild:.2} s");

    // Unit 2: search latency before the move.
    let mut s = search.clone();
    let mut before = Vec::with_capacity(args.searches);
    for _ in 0..args.searches {
        before.push(one(&mut s, args.dim, &mut rng).await?);
    }

    // The move, with the same searches running until it is done.
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = {
        let (stop, mut s, dim, seed) = (stop.clone(), search.clone(), args.dim, args.seed + 1);
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut during, mut failed) = (Vec::new(), 0usize);
            // Bounded: at most a million searches, the move's deadline first.
            while !stop.load(Ordering::Relaxed) && during.len() + failed < 1_000_000 {
                match one(&mut s, dim, &mut rng).await {
                    Ok(ms) => during.push(ms),
                    Err(_) => failed += 1,
                }
            }
            (during, failed)
        })
    };
    let t = Instant::now();
    let job = admin
        .move_replica(v1::MoveReplicaRequest {
            collection: "bench".into(),
            region: "uk".into(),
            shard: 0,
            from,
            to,
        })
        .await?
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last = String::new();
    let done = loop {
        let j = admin
            .list_jobs(v1::ListJobsRequest {})
            .await?
            .into_inner()
            .jobs
            .into_iter()
            .find(|j| j.job == job.job)
            .ok_or_else(|| anyhow::anyhow!("job {} is not listed", job.job))?;
        if j.progress != last {
            eprintln!("{:.1?} {}: {}", t.elapsed(), j.job, j.progress);
            last = j.progress.clone();
        }
        if j.state != "running" {
            break j;
        }
        anyhow::ensure!(Instant::now() < deadline, "the move did not finish within 30 minutes: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let moved = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut during, failed) = searcher.await?;
    anyhow::ensure!(done.state == "done", "the move ended {}: {}", done.state, done.error);
    anyhow::ensure!(!during.is_empty(), "no search answered during the move ({failed} failed)");
    // A target is promoted within 64 log entries of the leader: it applies
    // the rest just after. Wait (bounded) until it holds every point.
    let target = &nodes[(to - 1) as usize];
    let live = || -> usize { target.state.engines().iter().map(|e| e.store().points().count()).sum() };
    while live() < args.points {
        anyhow::ensure!(Instant::now() < deadline, "the target holds {} points of {}", live(), args.points);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let whole = t.elapsed().as_secs_f64();

    // What the moved replica costs on disk: the target's whole data directory
    // (its one replica: store and Raft log, snapshot, and its node database).
    let disk = sovra_shard::replica::dir_bytes(&target.state.config.data_dir);

    let (b50, b99) = (quantile(&mut before, 0.5), quantile(&mut before, 0.99));
    let (d50, d99) = (quantile(&mut during, 0.5), quantile(&mut during, 0.99));
    println!(
        "sovra bench move: 4 nodes of one region, one shard, rf 3, {} points of {}-d; node {from} -> node {to}, searches through node {via}",
        args.points, args.dim
    );
    println!("| | s | / rebuild |");
    println!("|---|---:|---:|");
    println!("| one full index rebuild of the shard (node {from}) | {rebuild:.2} | 1.00 |");
    println!(
        "| move to done (learner, catch-up, joint change) | {moved:.2} | {:.2} |",
        moved / rebuild
    );
    println!("| move until the target holds every point | {whole:.2} | {:.2} |", whole / rebuild);
    println!(
        "the target's data directory after the move: {:.1} MiB, {:.0} bytes per point",
        disk as f64 / (1 << 20) as f64,
        disk as f64 / args.points as f64
    );
    let index: usize = target.state.engines().iter().map(|e| e.stats().index_bytes).sum();
    println!(
        "the target's index in memory: {:.1} MiB, {:.0} bytes per point",
        index as f64 / (1 << 20) as f64,
        index as f64 / args.points as f64
    );
    println!();
    println!("| search k=10 | n | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    println!("| before the move | {} | {b50:.2} | {b99:.2} |", before.len());
    println!("| during the move | {} | {d50:.2} | {d99:.2} |", during.len());
    println!(
        "during / before: p50 {:.2}x, p99 {:.2}x; {failed} searches failed during the move",
        d50 / b50,
        d99 / b99
    );
    for n in nodes {
        n.stop().await?;
    }
    Ok(())
}
