//! `sovra bench replicas`: what a node pays, in threads, memory, open files
//! and start-up time, for holding many replicas, each in its own directory and
//! sled database with its own Raft group. One in-process node; collections of
//! `--shards` shards are created until it holds `--replicas` replicas, a few
//! points are written to every collection, then the node is restarted so the
//! load of every replica is timed. Figures come from `/proc/self` (Linux).

use crate::config::NodeConfig;
use crate::run::start;
use sovra_proto::v1;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ReplicasBenchArgs {
    /// Replicas the node ends up holding.
    #[arg(long, default_value_t = 200)]
    pub replicas: u32,
    /// Shards per collection (each one replica here: replication factor 1).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Points written to each collection.
    #[arg(long, default_value_t = 64)]
    pub points: u32,
    /// The node's page-cache budget in MiB (shared by every replica database).
    #[arg(long, default_value_t = 256)]
    pub cache_mb: u64,
    /// Internal: reopen the node kept in this directory, print its usage once
    /// serving, and exit. The restart is measured in a fresh process, since
    /// memory the first node freed is not always handed back to the system.
    #[arg(long, hide = true)]
    pub reopen: Option<std::path::PathBuf>,
}

/// Threads, resident memory and open descriptors of this process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    threads: u64,
    rss_mib: f64,
    fds: usize,
}

fn usage() -> Usage {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        threads: field("Threads:"),
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
    }
}

pub fn replicas(args: ReplicasBenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.reopen {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return rt.block_on(reopen(dir, &args));
    }
    anyhow::ensure!(
        args.shards >= 1 && args.replicas >= args.shards,
        "--replicas must be at least --shards (>= 1)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn config(dir: &std::path::Path, args: &ReplicasBenchArgs) -> NodeConfig {
    let collections = args.replicas.div_ceil(args.shards);
    let mut config = NodeConfig::local(1, "eu-west", dir.to_path_buf());
    config.cache_capacity_mb = args.cache_mb;
    // One more share: a meta-role node's meta replica has its own database too.
    config.max_replicas = (collections * args.shards) as usize + 1;
    config
}

/// The child's side: open the node, wait for SERVING, print one line.
async fn reopen(dir: &std::path::Path, args: &ReplicasBenchArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let node = start(config(dir, args)).await?;
    crate::dev::wait_serving(node.grpc_addr, Duration::from_secs(300)).await?;
    let took = t.elapsed();
    let u = usage();
    println!(
        "reopened {} {} {} {} {}",
        took.as_secs_f64(),
        u.threads,
        u.rss_mib,
        u.fds,
        node.state.engines().len()
    );
    node.stop().await?;
    Ok(())
}

async fn run(args: ReplicasBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let collections = args.replicas.div_ceil(args.shards);
    let config = config(dir.path(), &args);
    let before = usage();
    let node = start(config.clone()).await?;
    let ch = crate::dev::wait_serving(node.grpc_addr, Duration::from_secs(60)).await?;
    let empty = usage();
    let mut admin = v1::collections_client::CollectionsClient::new(ch.clone());
    let mut points = v1::points_client::PointsClient::new(ch.clone());
    let started = Instant::now();
    for c in 0..collections {
        let name = format!("c{c:03}");
        admin
            .create_collection(v1::CreateCollectionRequest {
                collection: Some(v1::CollectionSpec {
                    name: name.clone(),
                    dimension: 16,
                    metric: v1::Metric::L2 as i32,
                    regions: vec![v1::RegionShards {
                        region: "eu-west".into(),
                        shard_count: args.shards,
                    }],
                    replication_factor: 1,
                    ..Default::default()
                }),
            })
            .await?;
        let batch = (0..args.points)
            .map(|i| v1::Point {
                id: Some(v1::PointId {
                    kind: Some(v1::point_id::Kind::Num(u64::from(i))),
                }),
                vector: (0..16).map(|d| ((i * 31 + d) % 17) as f32).collect(),
                region: "eu-west".into(),
                subject: format!("s{i}"),
                lawful_basis: v1::LawfulBasis::Consent as i32,
                ..Default::default()
            })
            .collect();
        points
            .upsert(v1::UpsertRequest {
                collection: name,
                points: batch,
            })
            .await?;
    }
    let created = started.elapsed();
    let full = usage();
    let held = node.state.engines().len();
    node.stop().await?;
    drop(config);
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "replicas", "--cache-mb", &args.cache_mb.to_string()])
        .args(["--replicas", &args.replicas.to_string(), "--shards", &args.shards.to_string()])
        .arg("--reopen")
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .output()
        .await?;
    let line = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = line
        .lines()
        .find_map(|l| l.strip_prefix("reopened "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    anyhow::ensure!(
        f.len() == 5,
        "the reopening process failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reload = Duration::from_secs_f64(f[0]);
    let reloaded = Usage {
        threads: f[1] as u64,
        rss_mib: f[2],
        fds: f[3] as usize,
    };
    anyhow::ensure!(f[4] as usize == held, "the restarted node opened {} replicas, not {held}", f[4]);
    let disk = sovra_shard::replica::dir_bytes(&dir.path().join("replicas"));

    let n = held as f64;
    println!(
        "replica cost: {held} replicas ({collections} collections x {} shards, {} points each collection), page-cache budget {} MiB, {} cores",
        args.shards,
        args.points,
        args.cache_mb,
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    println!("| state | threads | RSS MiB | open fds |");
    println!("|---|---|---|---|");
    for (name, u) in [
        ("process before the node", before),
        ("node up, no replicas", empty),
        ("node with every replica, written", full),
        ("restarted in a new process (all reloaded)", reloaded),
    ] {
        println!("| {name} | {} | {:.1} | {} |", u.threads, u.rss_mib, u.fds);
    }
    println!(
        "per replica: {:.2} threads, {:.2} MiB RSS, {:.2} fds; on disk {:.2} MiB in all ({:.1} KiB each)",
        (full.threads as f64 - empty.threads as f64) / n,
        (full.rss_mib - empty.rss_mib) / n,
        (full.fds as f64 - empty.fds as f64) / n,
        disk as f64 / (1 << 20) as f64,
        disk as f64 / 1024.0 / n
    );
    println!(
        "per replica after a restart (sled reads each database's segments back): {:.2} MiB RSS",
        (reloaded.rss_mib - empty.rss_mib) / n
    );
    println!(
        "create + write all: {:.2} s ({:.1} ms per replica); restart until serving: {:.2} s ({:.1} ms per replica)",
        created.as_secs_f64(),
        created.as_secs_f64() * 1e3 / n,
        reload.as_secs_f64(),
        reload.as_secs_f64() * 1e3 / n
    );
    Ok(())
}
