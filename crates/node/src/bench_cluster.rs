//! `sovra bench cluster`: end-to-end search through a coordinator over two
//! regions x three nodes on loopback (in this process, real gRPC between
//! them), beside the same points in one in-process engine, in one run, on a
//! seeded clustered set (the recall tests' Gaussian mixture). For each `ef`:
//! recall@k against exact truth, QPS and p50/p99 of one client's searches,
//! and the coordinator's overhead per request: its end-to-end time (the
//! answer's `took_us`, receipt to answer) minus the slowest leaf's own time
//! (each shard's `leaf_us`); and the same seen from the client (its round
//! trip minus the slowest leaf), which adds the client's own hop.

use crate::dev::keyed;
use sovra_index::synth::{MixtureSpec, gaussian_mixture};
use sovra_proto::v1;
use sovra_shard::{CacheBudget, ReplicaStore, SearchParams, ShardEngine};
use sovra_types::{CollectionName, Metric, PointId, PointRecord, RegionId, ShardCommand, ShardId};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ClusterBenchArgs {
    /// Points (half in each region).
    #[arg(long, default_value_t = 20_000)]
    pub points: usize,
    /// Held-out queries, searched one at a time.
    #[arg(long, default_value_t = 500)]
    pub queries: usize,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Shards per region.
    #[arg(long, default_value_t = 3)]
    pub shards: u32,
    #[arg(long, default_value_t = 1)]
    pub replication_factor: u32,
    /// Candidate list sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub ef: Vec<u32>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Concurrent clients of the audit-cost phase (searches at the middle ef,
    /// with every call audited, then with auditing off, in turns).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Searches per turn of the audit-cost phase.
    #[arg(long, default_value_t = 2000)]
    pub audit_searches: usize,
}

fn q(lat: &mut [f64], p: f64) -> f64 {
    lat.sort_by(f64::total_cmp);
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

struct Row {
    recall: f64,
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    overhead_p50_ms: f64,
    overhead_p99_ms: f64,
    client_overhead_p50_ms: f64,
    overhead_cpu_p50_ms: f64,
}

pub fn cluster(args: ClusterBenchArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    anyhow::ensure!(
        args.points >= 2 && args.queries > 0 && args.k > 0,
        "--points >= 2, --queries and --k >= 1"
    );
    let mut spec = MixtureSpec::gmm_128(args.seed);
    spec.base = args.points;
    spec.queries = args.queries;
    let data = gaussian_mixture(spec);
    let dim = data.base[0].len();
    eprintln!(
        "truth: exact top-{} of {} queries over {} points ({dim}-d)",
        args.k,
        data.queries.len(),
        data.base.len()
    );
    // Exact truth over every point (ids are positions; even ids uk, odd us).
    let truth: Vec<Vec<u64>> = data
        .queries
        .iter()
        .map(|qv| {
            let mut all: Vec<(f32, u64)> = data.base.iter().enumerate().map(|(i, v)| (l2(v, qv), i as u64)).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all.into_iter().take(args.k).map(|(_, i)| i).collect()
        })
        .collect();
    let recall = |got: &[u64], want: &[u64]| got.iter().filter(|g| want.contains(g)).count() as f64 / want.len() as f64;
    let regions = ["uk", "us"];
    let region_of = |i: usize| regions[i % 2];

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let cluster_rows = rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let configs = crate::dev::dev_configs(dir.path(), "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
        let nodes = crate::run::start_joined(configs, sovra_raft::Faults::default(), Duration::from_secs(120)).await?;
        let key = nodes[0]
            .state
            .first_admin_key_within(Duration::from_secs(30))
            .await
            .ok_or_else(|| anyhow::anyhow!("the bootstrap node made no admin key"))?;
        let uk = crate::dev::wait_serving(nodes[0].grpc_addr, Duration::from_secs(60)).await?;
        let us = crate::dev::wait_serving(nodes[3].grpc_addr, Duration::from_secs(60)).await?;
        let mut admin = v1::admin_client::AdminClient::new(keyed(&uk, &key));
        // us results may come to the uk coordinator that runs the searches.
        admin
            .set_region_policy(v1::SetRegionPolicyRequest {
                policy: Some(v1::RegionPolicy {
                    region: "us".into(),
                    results_may_go_to: vec!["uk".into()],
                }),
            })
            .await?;
        v1::collections_client::CollectionsClient::new(keyed(&uk, &key))
            .create_collection(v1::CreateCollectionRequest {
                collection: Some(crate::dev::spanning_spec(
                    "bench",
                    dim as u32,
                    v1::Metric::L2,
                    &regions,
                    args.shards,
                    args.replication_factor,
                )),
            })
            .await?;
        let t = Instant::now();
        for (r, ch) in [("uk", &uk), ("us", &us)] {
            let mut points = v1::points_client::PointsClient::new(keyed(ch, &key));
            let mine: Vec<v1::Point> = data
                .base
                .iter()
                .enumerate()
                .filter(|(i, _)| region_of(*i) == r)
                .map(|(i, v)| v1::Point {
                    id: Some(v1::PointId {
                        kind: Some(v1::point_id::Kind::Num(i as u64)),
                    }),
                    vector: v.clone(),
                    region: r.into(),
                    subject: format!("s{i}"),
                    ..Default::default()
                })
                .collect();
            for b in mine.chunks(500) {
                points
                    .upsert(v1::UpsertRequest {
                        collection: "bench".into(),
                        points: b.to_vec(),
                    })
                    .await?;
            }
        }
        eprintln!("cluster: loaded {} points in {:.1?}", data.base.len(), t.elapsed());
        // One bare gRPC round trip on this machine (health check, no key):
        // the unit the overhead is made of.
        let mut health = tonic_health::pb::health_client::HealthClient::new(uk.clone());
        let mut rtt = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            health
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await?;
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let rtt_p50 = q(&mut rtt, 0.5);
        let mut search = v1::search_client::SearchClient::new(keyed(&uk, &key));
        let mut rows = Vec::new();
        for &ef in &args.ef {
            // Warm-up: every shard's latency window fills (hedging uses it).
            let request = |qv: &Vec<f32>| v1::SearchRequest {
                collection: "bench".into(),
                vector: qv.clone(),
                k: args.k as u32,
                ef: Some(ef),
                ..Default::default()
            };
            for qv in data.queries.iter().take(50) {
                search.search(request(qv)).await?;
            }
            let (mut lat, mut over, mut client_over, mut over_cpu, mut rec) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0.0);
            let start = Instant::now();
            for (qv, want) in data.queries.iter().zip(&truth) {
                let t = Instant::now();
                let r = search.search(request(qv)).await?.into_inner();
                let e2e = t.elapsed().as_secs_f64() * 1e3;
                anyhow::ensure!(r.shards.len() == 2 * args.shards as usize && !r.partial, "not every shard answered");
                let slowest = r.shards.iter().map(|s| s.leaf_us).max().unwrap_or(0) as f64 / 1e3;
                // All six nodes share this machine's cores: the leaves' searches
                // queue for them, which the slowest leaf's own time does not
                // show. The floor any coordinator would meet here is the larger
                // of the slowest leaf and all leaves' work spread over the cores.
                let work = r.shards.iter().map(|s| s.leaf_us).sum::<u64>() as f64 / 1e3 / cores;
                lat.push(e2e);
                over.push(r.took_us as f64 / 1e3 - slowest);
                over_cpu.push(r.took_us as f64 / 1e3 - slowest.max(work));
                client_over.push(e2e - slowest);
                let got: Vec<u64> = r
                    .hits
                    .iter()
                    .filter_map(|h| match h.point.as_ref()?.id.as_ref()?.kind {
                        Some(v1::point_id::Kind::Num(n)) => Some(n),
                        _ => None,
                    })
                    .collect();
                rec += recall(&got, want);
            }
            let secs = start.elapsed().as_secs_f64();
            rows.push((
                ef,
                Row {
                    recall: rec / truth.len() as f64,
                    qps: truth.len() as f64 / secs,
                    p50_ms: q(&mut lat, 0.5),
                    p99_ms: q(&mut lat, 0.99),
                    overhead_p50_ms: q(&mut over, 0.5),
                    overhead_p99_ms: q(&mut over, 0.99),
                    client_overhead_p50_ms: q(&mut client_over, 0.5),
                    overhead_cpu_p50_ms: q(&mut over_cpu, 0.5),
                },
            ));
        }
        // What auditing costs: the same concurrent load with every search
        // audited (a record group-committed in each region's audit log before
        // the answer) and with auditing off, in alternating turns.
        let ef = args.ef[args.ef.len() / 2];
        let mut turns: Vec<(bool, f64, f64)> = Vec::new();
        for turn in 0..4 {
            let audited = turn % 2 == 0;
            for n in &nodes {
                n.state.unaudited_for_bench.store(!audited, std::sync::atomic::Ordering::Relaxed);
            }
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let start = Instant::now();
            let workers: Vec<_> = (0..args.clients.max(1))
                .map(|_| {
                    let mut search = search.clone();
                    let next = next.clone();
                    let queries = data.queries.clone();
                    let (k, total) = (args.k as u32, args.audit_searches);
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= total {
                                return anyhow::Ok(lat);
                            }
                            let t = Instant::now();
                            search
                                .search(v1::SearchRequest {
                                    collection: "bench".into(),
                                    vector: queries[i % queries.len()].clone(),
                                    k,
                                    ef: Some(ef),
                                    ..Default::default()
                                })
                                .await?;
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for w in workers {
                lat.extend(w.await??);
            }
            let qps = args.audit_searches as f64 / start.elapsed().as_secs_f64();
            turns.push((audited, qps, q(&mut lat, 0.5)));
        }
        for n in &nodes {
            n.state.unaudited_for_bench.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        let mean = |a: bool, f: fn(&(bool, f64, f64)) -> f64| {
            let v: Vec<f64> = turns.iter().filter(|t| t.0 == a).map(f).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let audit_cost = (
            ef,
            mean(true, |t| t.1),
            mean(false, |t| t.1),
            mean(true, |t| t.2),
            mean(false, |t| t.2),
        );
        for n in nodes {
            n.stop().await?;
        }
        anyhow::Ok((rows, rtt_p50, audit_cost))
    })?;
    let (cluster_rows, rtt_p50, audit_cost) = cluster_rows;

    // The same points in one engine, searched in this process.
    let dir = tempfile::tempdir()?;
    let spec = sovra_types::CollectionSpec::single_region(CollectionName::parse("bench")?, dim as u32, Metric::L2, RegionId::parse("uk")?);
    let replica = ReplicaStore::open(&dir.path().join("one"), &CacheBudget::new(512 << 20, 1))?;
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build()?);
    let id = ShardId {
        collection: spec.name.clone(),
        region: spec.regions[0].region.clone(),
        number: 0,
    };
    let engine = ShardEngine::open(id, Arc::new(spec), &replica, sovra_index::IndexOptions::with_pool(pool))?;
    let t = Instant::now();
    let records: Vec<PointRecord> = data
        .base
        .iter()
        .enumerate()
        .map(|(i, v)| PointRecord {
            id: PointId::Num(i as u64),
            region: RegionId::parse("uk").expect("literal"),
            vector: v.clone(),
            subject: format!("s{i}"),
            payload: Default::default(),
            lawful_basis: sovra_types::LawfulBasis::Unspecified,
            source: String::new(),
            expires_at_ms: 0,
            consent_at_ms: 0,
        })
        .collect();
    for b in records.chunks(500) {
        engine.apply_next(&ShardCommand::Upsert(b.to_vec()))?;
    }
    eprintln!("engine: loaded {} points in {:.1?}", records.len(), t.elapsed());
    println!(
        "sovra bench cluster: {} points ({dim}-d gmm, seed {}), 2 regions x 3 nodes, {} shards per region, rf {}, k={}, {} queries, one client",
        data.base.len(),
        args.seed,
        args.shards,
        args.replication_factor,
        args.k,
        data.queries.len()
    );
    println!(
        "{:>5} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>9}",
        "ef",
        "recall",
        "QPS",
        "p50 ms",
        "p99 ms",
        "ovh p50",
        "ovh p99",
        "c-ovh p50",
        "x-ovh p50",
        "recall",
        "QPS",
        "p50 ms",
        "p99 ms",
        "QPS ratio"
    );
    for (ef, c) in cluster_rows {
        let (mut lat, mut rec) = (Vec::new(), 0.0);
        let start = Instant::now();
        for (qv, want) in data.queries.iter().zip(&truth) {
            let t = Instant::now();
            let (hits, _) = engine.search(&SearchParams {
                vector: qv,
                k: args.k,
                ef: (ef as usize).max(args.k),
                filter: None,
                now_ms: 0,
            });
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let got: Vec<u64> = hits
                .iter()
                .filter_map(|h| match h.id {
                    PointId::Num(n) => Some(n),
                    _ => None,
                })
                .collect();
            rec += recall(&got, want);
        }
        let qps = truth.len() as f64 / start.elapsed().as_secs_f64();
        println!(
            "{ef:>5} | {:>8.4} {:>8.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>9.3} | {:>8.4} {:>8.0} {:>8.3} {:>8.3} | {:>8.2}x",
            c.recall,
            c.qps,
            c.p50_ms,
            c.p99_ms,
            c.overhead_p50_ms,
            c.overhead_p99_ms,
            c.client_overhead_p50_ms,
            c.overhead_cpu_p50_ms,
            rec / truth.len() as f64,
            qps,
            q(&mut lat, 0.5),
            q(&mut lat, 0.99),
            c.qps / qps
        );
    }
    println!("one bare gRPC round trip (health check) to the coordinator: p50 {rtt_p50:.3} ms");
    let (ef, qa, qu, la, lu) = audit_cost;
    println!(
        "audit cost, {} concurrent clients, ef {ef}, {} searches per turn, 2 turns each: audited {qa:.0} QPS (p50 {la:.3} ms), unaudited {qu:.0} QPS (p50 {lu:.3} ms): audited/unaudited QPS {:.3} (cost {:.1}%)",
        args.clients,
        args.audit_searches,
        qa / qu,
        (1.0 - qa / qu) * 100.0
    );
    println!(
        "left: cluster through node 1's coordinator (ovh = the coordinator's took_us minus the slowest leaf's leaf_us; c-ovh = the client's round trip minus the same; x-ovh = took_us minus the larger of the slowest leaf and all leaves' time over the {cores} cores they share); right: one in-process engine"
    );
    Ok(())
}
