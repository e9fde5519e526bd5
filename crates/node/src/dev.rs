//! `sovra dev`: a local node with a sample collection, loaded and searched
//! through the public gRPC API, serving until Ctrl-C.

use crate::config::NodeConfig;
use anyhow::Context;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_proto::v1::{self, collections_client::CollectionsClient, points_client::PointsClient, search_client::SearchClient};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const DEV_REGION: &str = "eu-west";
pub const DEV_COLLECTION: &str = "people";
const DIM: usize = 64;
const COUNTRIES: [&str; 5] = ["fr", "de", "ie", "it", "es"];

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Keep data here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Public gRPC address.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub grpc: SocketAddr,
    /// Prometheus /metrics address.
    #[arg(long, default_value = "127.0.0.1:9300")]
    pub metrics: SocketAddr,
    /// Sample points to load.
    #[arg(long, default_value_t = 5000)]
    pub points: usize,
}

/// A seeded sample: 40 clusters of 64-d vectors, each point a pseudonymous subject
/// with a country and an age.
fn sample(n: usize) -> Vec<v1::Point> {
    let mut rng = StdRng::seed_from_u64(7);
    let centers: Vec<Vec<f32>> = (0..40).map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    (0..n)
        .map(|i| {
            let c = &centers[rng.random_range(0..centers.len())];
            let vector = c.iter().map(|x| x + rng.random_range(-0.15..0.15)).collect();
            let age: i64 = rng.random_range(18..88);
            let payload = [
                (
                    "country".to_string(),
                    v1::Value {
                        kind: Some(v1::value::Kind::StringValue(COUNTRIES[i % 5].into())),
                    },
                ),
                (
                    "age".to_string(),
                    v1::Value {
                        kind: Some(v1::value::Kind::IntegerValue(age)),
                    },
                ),
            ]
            .into();
            v1::Point {
                id: Some(v1::PointId {
                    kind: Some(v1::point_id::Kind::Num(i as u64)),
                }),
                vector,
                subject: format!("subject-{:06}", i / 3),
                region: DEV_REGION.into(),
                payload,
                lawful_basis: v1::LawfulBasis::Consent as i32,
                source: "sovra dev synthetic sample".into(),
                expires_at_ms: 0,
            }
        })
        .collect()
}

/// Waits until the node's health service says SERVING, or fails after `limit`.
pub async fn wait_serving(addr: SocketAddr, limit: Duration) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            if let Ok(r) = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await
                && r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return Ok(ch);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "node at {addr} not SERVING within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A payload value as a user would write it: `fr`, `42`, `0.5`, `true`.
fn value_text(k: &v1::value::Kind) -> String {
    use v1::value::Kind;
    match k {
        Kind::StringValue(s) => s.clone(),
        Kind::IntegerValue(i) => i.to_string(),
        Kind::DoubleValue(d) => d.to_string(),
        Kind::BoolValue(b) => b.to_string(),
    }
}

pub async fn dev(args: DevArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tmp;
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut config = NodeConfig::local(1, DEV_REGION, data_dir.clone());
    config.grpc_listen = args.grpc;
    config.metrics_listen = args.metrics;
    // One node: nothing else speaks to its cluster listener, so any free port.
    config.cluster_listen = "127.0.0.1:0".parse().expect("literal");
    let node = crate::start(config).await?;
    let addr = node.grpc_addr;
    println!("sovra dev: node 1 in region {DEV_REGION}, data in {}", data_dir.display());
    let ch = wait_serving(addr, Duration::from_secs(120)).await?;
    let mut collections = CollectionsClient::new(ch.clone());
    let mut points = PointsClient::new(ch.clone());
    let mut search = SearchClient::new(ch);

    let exists = collections
        .get_collection(v1::GetCollectionRequest {
            name: DEV_COLLECTION.into(),
            ..Default::default()
        })
        .await
        .is_ok();
    if !exists {
        let spec = v1::CollectionSpec {
            name: DEV_COLLECTION.into(),
            dimension: DIM as u32,
            metric: v1::Metric::Cosine as i32,
            regions: vec![v1::RegionShards {
                region: DEV_REGION.into(),
                shard_count: 2,
            }],
            require_lawful_basis: true,
            ..Default::default()
        };
        collections
            .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
            .await
            .context("creating the sample collection")?;
        let all = sample(args.points);
        let t = Instant::now();
        for batch in all.chunks(500) {
            points
                .upsert(v1::UpsertRequest {
                    collection: DEV_COLLECTION.into(),
                    points: batch.to_vec(),
                })
                .await
                .context("loading sample points")?;
        }
        println!(
            "loaded {} sample points into collection {DEV_COLLECTION:?} (2 shards) in {:.1?}",
            all.len(),
            t.elapsed()
        );
    } else {
        println!(
            "collection {DEV_COLLECTION:?} already exists in {}; not reloading",
            data_dir.display()
        );
    }

    let query = sample(1)[0].vector.clone();
    let fr_in_thirties = v1::Filter {
        kind: Some(v1::filter::Kind::And(v1::FilterList {
            filters: vec![
                v1::Filter {
                    kind: Some(v1::filter::Kind::Condition(v1::Condition {
                        key: "country".into(),
                        test: Some(v1::condition::Test::Match(v1::Value {
                            kind: Some(v1::value::Kind::StringValue("fr".into())),
                        })),
                    })),
                },
                v1::Filter {
                    kind: Some(v1::filter::Kind::Condition(v1::Condition {
                        key: "age".into(),
                        test: Some(v1::condition::Test::Range(v1::Range {
                            gte: Some(30.0),
                            lt: Some(40.0),
                            ..Default::default()
                        })),
                    })),
                },
            ],
        })),
    };
    for (title, filter) in [
        ("nearest 5", None),
        ("nearest 5 with country = fr and 30 <= age < 40", Some(fr_in_thirties)),
    ] {
        let t = Instant::now();
        let r = search
            .search(v1::SearchRequest {
                collection: DEV_COLLECTION.into(),
                vector: query.clone(),
                k: 5,
                filter,
                with_payload: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        println!(
            "search: {title} ({:.1?}, {} shards answered)",
            t.elapsed(),
            r.shards.iter().filter(|s| s.answered).count()
        );
        for h in r.hits {
            let p = h.point.unwrap_or_default();
            let show = |k: &str| p.payload.get(k).and_then(|v| v.kind.as_ref()).map(value_text).unwrap_or_default();
            let id = match p.id.as_ref().and_then(|i| i.kind.as_ref()) {
                Some(v1::point_id::Kind::Num(n)) => n.to_string(),
                Some(v1::point_id::Kind::Uuid(u)) => u.clone(),
                None => "-".into(),
            };
            println!(
                "  id {id:>6}  distance {:.4}  subject {}  country {}  age {}",
                h.distance,
                p.subject,
                show("country"),
                show("age")
            );
        }
    }
    println!("\nconnect: grpcurl -plaintext {addr} list");
    println!("         grpcurl -plaintext -d '{{\"name\":\"{DEV_COLLECTION}\"}}' {addr} sovra.v1.Collections/GetCollection");
    println!("metrics: curl http://{}/metrics", node.metrics_addr);
    println!("serving; Ctrl-C to stop");
    tokio::select! {
        _ = shutdown => {}
        reason = node.fatal() => anyhow::bail!("node stopped: {reason}"),
    }
    node.stop().await
}
