//! `sovra dev`: a whole cluster on this machine (two regions, `uk` and `us`,
//! three nodes each, own ports and data directories), a sample collection
//! spanning both with replication factor 3, sample points about subjects in
//! both regions, and demo searches with a uk-only key, a us-only key and an
//! admin key, printed as a table of what each sees and which regions were
//! excluded and why. Serves until Ctrl-C, which stops every node.

use crate::config::NodeConfig;
use anyhow::Context;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_proto::v1::{
    self, admin_client::AdminClient, collections_client::CollectionsClient, points_client::PointsClient, search_client::SearchClient,
};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const DEV_REGIONS: [&str; 2] = ["uk", "us"];
pub const DEV_COLLECTION: &str = "people";
const DIM: usize = 64;
const NODES_PER_REGION: u64 = 3;
const CITIES: [(&str, [&str; 3]); 2] = [("uk", ["london", "leeds", "glasgow"]), ("us", ["boston", "denver", "austin"])];

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Keep data here, a directory per node (default: a temporary directory
    /// removed on exit).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Public gRPC address of node 1; node N listens on the next ports (port
    /// 0: every node picks a free port).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub grpc: SocketAddr,
    /// Prometheus /metrics address of node 1; the others on the next ports.
    #[arg(long, default_value = "127.0.0.1:9300")]
    pub metrics: SocketAddr,
    /// Sample points to load, half in each region.
    #[arg(long, default_value_t = 2000)]
    pub points: usize,
}

/// A seeded sample: 40 clusters of 64-d vectors shared by both regions (so
/// a query finds neighbours in each), each point a pseudonymous subject of
/// region `uk` (even ids) or `us` (odd ids) with a city and an age.
fn sample(n: usize) -> Vec<v1::Point> {
    let mut rng = StdRng::seed_from_u64(7);
    let centers: Vec<Vec<f32>> = (0..40).map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    (0..n)
        .map(|i| {
            let c = &centers[rng.random_range(0..centers.len())];
            let vector = c.iter().map(|x| x + rng.random_range(-0.15..0.15)).collect();
            let age: i64 = rng.random_range(18..88);
            let (region, cities) = CITIES[i % 2];
            let payload = [
                (
                    "city".to_string(),
                    v1::Value {
                        kind: Some(v1::value::Kind::StringValue(cities[(i / 2) % 3].into())),
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
                subject: format!("{region}-subject-{:06}", i / 6),
                region: region.into(),
                payload,
                lawful_basis: v1::LawfulBasis::Consent as i32,
                source: "sovra dev synthetic sample".into(),
                expires_at_ms: 0,
                consent_at_ms: 0,
            }
        })
        .collect()
}

/// Waits until the node's health service says SERVING, or fails after `limit`.
pub async fn wait_serving(addr: SocketAddr, limit: Duration) -> anyhow::Result<tonic::transport::Channel> {
    wait_serving_with(addr, None, limit).await
}

/// As [`wait_serving`], over TLS trusting the CA in `ca` when given.
pub async fn wait_serving_with(
    addr: SocketAddr,
    ca: Option<&std::path::Path>,
    limit: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + limit;
    let endpoint = crate::client::endpoint(&addr.to_string(), ca)?;
    loop {
        if let Ok(ch) = endpoint.connect().await {
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

/// Presents an API key on every call (none when the key is empty).
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.0.is_empty() {
            let v = format!("Bearer {}", self.0)
                .parse()
                .map_err(|_| tonic::Status::internal("the key is not valid metadata"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

pub type Keyed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

pub fn keyed(ch: &tonic::transport::Channel, key: &str) -> Keyed {
    tonic::service::interceptor::InterceptedService::new(ch.clone(), Bearer(key.to_string()))
}

fn nth_port(base: SocketAddr, i: u16) -> SocketAddr {
    if base.port() == 0 {
        base
    } else {
        SocketAddr::new(base.ip(), base.port() + i)
    }
}

/// A collection spanning `regions` with `shards` shards in each and `rf`
/// replicas per shard (the other fields at their defaults).
pub fn spanning_spec(name: &str, dimension: u32, metric: v1::Metric, regions: &[&str], shards: u32, rf: u32) -> v1::CollectionSpec {
    v1::CollectionSpec {
        name: name.into(),
        dimension,
        metric: metric as i32,
        regions: regions
            .iter()
            .map(|r| v1::RegionShards {
                region: (*r).into(),
                shard_count: shards,
            })
            .collect(),
        replication_factor: rf,
        ..Default::default()
    }
}

/// The dev cluster's throwaway CA and node certificates (nodes 1-6, and 7
/// for the add-node config), in `DATA/tls`; kept with kept data.
fn dev_tls(data_dir: &std::path::Path, configs: &mut [NodeConfig]) -> anyhow::Result<std::path::PathBuf> {
    let dir = data_dir.join("tls");
    if !dir.join("ca.pem").exists() {
        let mut nodes: Vec<(u64, &str)> = configs.iter().map(|c| (c.node_id, c.region.as_str())).collect();
        nodes.push((7, "uk"));
        crate::certs::throwaway(&dir, &nodes).context("making the dev cluster's throwaway CA")?;
    }
    for c in configs {
        let (cert, key) = crate::certs::node_files(&dir, c.node_id);
        c.tls = Some(true);
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.tls_ca = Some(dir.join("ca.pem"));
    }
    Ok(dir.join("ca.pem"))
}

/// The configs of the six dev nodes (node 1 bootstraps; the others join).
pub fn dev_configs(root: &std::path::Path, grpc: SocketAddr, metrics: SocketAddr) -> Vec<NodeConfig> {
    let secret = crate::cluster::new_secret();
    let mut out = Vec::new();
    for (r, region) in DEV_REGIONS.iter().enumerate() {
        for z in 0..NODES_PER_REGION {
            let id = r as u64 * NODES_PER_REGION + z + 1;
            let mut c = NodeConfig::local(id, region, root.join(format!("node-{id}")));
            c.zone = format!("{region}-{}", (b'a' + z as u8) as char);
            c.grpc_listen = nth_port(grpc, (id - 1) as u16);
            c.metrics_listen = nth_port(metrics, (id - 1) as u16);
            c.cluster_listen = "127.0.0.1:0".parse().expect("literal");
            c.cluster_secret = Some(secret.clone());
            c.cache_capacity_mb = 32;
            c.max_replicas = 32;
            c.index_threads = 1;
            out.push(c);
        }
    }
    out
}

fn id_text(p: &v1::Point) -> String {
    match p.id.as_ref().and_then(|i| i.kind.as_ref()) {
        Some(v1::point_id::Kind::Num(n)) => n.to_string(),
        Some(v1::point_id::Kind::Uuid(u)) => u.clone(),
        None => "-".into(),
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
    let fresh = !data_dir.join("node-1").exists();
    println!(
        "sovra dev: starting 6 nodes (regions {} x {NODES_PER_REGION}), data in {}",
        DEV_REGIONS.join(", "),
        data_dir.display()
    );
    let t = Instant::now();
    let mut configs = dev_configs(&data_dir, args.grpc, args.metrics);
    let ca = dev_tls(&data_dir, &mut configs)?;
    if !fresh {
        // Restarted on kept data: everyone joins whoever is back first.
        for c in &mut configs {
            c.bootstrap = false;
        }
    }
    let nodes = crate::run::start_joined(configs, sovra_raft::Faults::default(), Duration::from_secs(120))
        .await
        .context("starting the dev cluster")?;
    for n in &nodes {
        let s = &n.state;
        println!(
            "  node {} region {:<3} zone {:<5} grpc {}  metrics http://{}/metrics",
            s.config.node_id, s.region, s.config.zone, n.grpc_addr, n.metrics_addr
        );
    }
    println!("cluster up in {:.1?}", t.elapsed());
    println!(
        "TLS on every port, from a throwaway CA: export SOVRA_CA={} (grpcurl -cacert $SOVRA_CA ..., sovra ctl and sovra health read SOVRA_CA)",
        ca.display()
    );
    match write_add_node(&data_dir, &nodes) {
        Ok(path) => println!(
            "add a node to uk: sovra node --config {} (node 7, zone uk-d; then sovra ctl rebalance --region uk)",
            path.display()
        ),
        Err(e) => eprintln!("sovra dev: could not write the add-node config: {e}"),
    }
    let result = demo(&nodes, &args, fresh).await;
    if let Err(e) = &result {
        eprintln!("sovra dev: {e:#}");
    }
    if result.is_ok() {
        println!("serving; Ctrl-C stops every node");
        let fatal = futures_any(&nodes);
        tokio::select! {
            _ = shutdown => {}
            reason = fatal => eprintln!("a node stopped: {reason}"),
        }
    }
    for n in nodes {
        n.stop().await?;
    }
    result
}

/// Writes `DATA/add-node.toml`: a seventh node for region uk that joins
/// this cluster (its secret and the six nodes' cluster addresses), on free
/// ports, for trying `sovra ctl rebalance` and `drain`. Readable by its owner
/// only: it holds the cluster secret.
fn write_add_node(data_dir: &std::path::Path, nodes: &[crate::RunningNode]) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = nodes[0].state.config.cluster_secret().map_err(std::io::Error::other)?;
    let secret = String::from_utf8_lossy(secret.expose()).into_owned();
    let tls = data_dir.join("tls");
    let join: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.cluster_addr)).collect();
    let text = format!(
        "node_id = 7\nregion = \"uk\"\nzone = \"uk-d\"\ndata_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\ncluster_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nbootstrap = false\njoin = [{}]\ncluster_secret = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
        data_dir.join("node-7").display(),
        join.join(", "),
        secret,
        tls.join("node-7.pem").display(),
        tls.join("node-7-key.pem").display(),
        tls.join("ca.pem").display(),
    );
    let path = data_dir.join("add-node.toml");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(text.as_bytes())?;
    Ok(path)
}

/// Resolves with the first node's fatal error.
async fn futures_any(nodes: &[crate::RunningNode]) -> String {
    let mut set = tokio::task::JoinSet::new();
    for n in nodes {
        let mut rx = n.state.fatal();
        set.spawn(async move {
            let reason = rx.wait_for(Option::is_some).await.ok().map(|r| r.clone().unwrap_or_default());
            match reason {
                Some(r) => r,
                None => std::future::pending().await,
            }
        });
    }
    set.join_next().await.and_then(Result::ok).unwrap_or_default()
}

async fn demo(nodes: &[crate::RunningNode], args: &DevArgs, fresh: bool) -> anyhow::Result<()> {
    let uk = &nodes[0];
    let us = &nodes[NODES_PER_REGION as usize];
    let admin = if fresh {
        uk.state
            .first_admin_key_within(Duration::from_secs(30))
            .await
            .context("the bootstrap node made no admin key")?
    } else {
        match std::env::var("SOVRA_DEV_ADMIN_KEY") {
            Ok(k) => k,
            Err(_) => {
                println!("data kept from an earlier run: its admin key was printed then; set SOVRA_DEV_ADMIN_KEY to it for the demo");
                return Ok(());
            }
        }
    };
    let ca = uk.state.config.tls_ca.clone();
    let uk_ch = wait_serving_with(uk.grpc_addr, ca.as_deref(), Duration::from_secs(60)).await?;
    let us_ch = wait_serving_with(us.grpc_addr, ca.as_deref(), Duration::from_secs(60)).await?;
    let mut adm = AdminClient::new(keyed(&uk_ch, &admin));
    let mut keys = vec![("admin".to_string(), admin.clone())];
    if fresh {
        // us results may be shown to uk coordinators; uk results stay in uk.
        adm.set_region_policy(v1::SetRegionPolicyRequest {
            policy: Some(v1::RegionPolicy {
                region: "us".into(),
                results_may_go_to: vec!["uk".into()],
            }),
        })
        .await
        .context("setting the us region policy")?;
        let spec = v1::CollectionSpec {
            require_lawful_basis: true,
            require_purpose: false,
            ..spanning_spec(DEV_COLLECTION, DIM as u32, v1::Metric::Cosine, &DEV_REGIONS, 2, 3)
        };
        CollectionsClient::new(keyed(&uk_ch, &admin))
            .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
            .await
            .context("creating the sample collection")?;
        let all = sample(args.points);
        let t = Instant::now();
        // A region's points enter through a node of that region (R2).
        for (region, ch) in [("uk", &uk_ch), ("us", &us_ch)] {
            let mine: Vec<v1::Point> = all.iter().filter(|p| p.region == region).cloned().collect();
            let mut points = PointsClient::new(keyed(ch, &admin));
            for batch in mine.chunks(250) {
                points
                    .upsert(v1::UpsertRequest {
                        collection: DEV_COLLECTION.into(),
                        points: batch.to_vec(),
                    })
                    .await
                    .context("loading sample points")?;
            }
        }
        println!(
            "loaded {} sample points into {DEV_COLLECTION:?} (uk and us, 2 shards each, 3 replicas per shard) in {:.1?}",
            all.len(),
            t.elapsed()
        );
        for (id, read, write) in [("uk-reader", "uk", "uk"), ("us-reader", "us", "us")] {
            let k = adm
                .create_key(v1::CreateKeyRequest {
                    rate: None,
                    id: id.into(),
                    scopes: Some(v1::KeyScopes {
                        read_regions: vec![read.into()],
                        write_regions: vec![write.into()],
                        ..Default::default()
                    }),
                })
                .await
                .with_context(|| format!("creating key {id}"))?
                .into_inner();
            keys.push((id.to_string(), k.key));
        }
    }

    let query = sample(1)[0].vector.clone();
    println!("\ndemo: nearest 5 to one sample vector, per key and coordinator");
    println!(
        "{:<10} {:<12} {:<6} {:<28} excluded regions (why)",
        "key", "coordinator", "hits", "ids (region)"
    );
    let rows: Vec<(&str, &str, &tonic::transport::Channel, u64)> = vec![
        ("admin", &admin, &uk_ch, 1),
        (
            "uk-reader",
            keys.iter().find(|k| k.0 == "uk-reader").map_or("", |k| k.1.as_str()),
            &uk_ch,
            1,
        ),
        (
            "us-reader",
            keys.iter().find(|k| k.0 == "us-reader").map_or("", |k| k.1.as_str()),
            &uk_ch,
            1,
        ),
        ("admin", &admin, &us_ch, NODES_PER_REGION + 1),
    ];
    for (name, key, ch, node) in rows {
        if key.is_empty() {
            continue;
        }
        let coordinator = if node == 1 { "uk (node 1)" } else { "us (node 4)" };
        let r = SearchClient::new(keyed(ch, key))
            .search(v1::SearchRequest {
                collection: DEV_COLLECTION.into(),
                vector: query.clone(),
                k: 5,
                with_payload: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                let ids: Vec<String> = r
                    .hits
                    .iter()
                    .map(|h| {
                        let p = h.point.clone().unwrap_or_default();
                        format!("{} ({})", id_text(&p), p.region)
                    })
                    .collect();
                let excluded: Vec<String> = r.excluded.iter().map(|e| format!("{}: {}", e.region, e.reason)).collect();
                println!(
                    "{name:<10} {coordinator:<12} {:<6} {:<28} {}",
                    r.hits.len(),
                    ids.join(" "),
                    if excluded.is_empty() { "-".into() } else { excluded.join("; ") }
                );
            }
            Err(e) => println!("{name:<10} {coordinator:<12} refused: {:?} {}", e.code(), e.message()),
        }
    }
    let one = SearchClient::new(keyed(&uk_ch, &admin))
        .search(v1::SearchRequest {
            collection: DEV_COLLECTION.into(),
            vector: query.clone(),
            k: 3,
            with_payload: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("\nthe admin key's nearest 3 through node 1, with payloads:");
    for h in one.hits {
        let p = h.point.unwrap_or_default();
        let show = |k: &str| p.payload.get(k).and_then(|v| v.kind.as_ref()).map(value_text).unwrap_or_default();
        println!(
            "  id {:>5}  region {}  distance {:.4}  subject {}  city {}  age {}",
            id_text(&p),
            p.region,
            h.distance,
            p.subject,
            show("city"),
            show("age")
        );
    }
    let addr = uk.grpc_addr;
    let ca = uk.state.config.tls_ca.as_ref().map(|p| format!("-cacert {}", p.display()));
    let tls = ca.as_deref().unwrap_or("-plaintext");
    println!("\nconnect: grpcurl {tls} {addr} list");
    for (name, key) in &keys {
        println!("key {name}: {key}");
    }
    println!(
        "try:     grpcurl {tls} -H \"authorization: Bearer {admin}\" -d '{{\"name\":\"{DEV_COLLECTION}\"}}' {addr} sovra.v1.Collections/GetCollection"
    );
    println!(
        "erase:   grpcurl -plaintext -H \"authorization: Bearer {admin}\" -d '{{\"collection\":\"{DEV_COLLECTION}\",\"region\":\"uk\",\"subject\":\"uk-subject-000001\"}}' {addr} sovra.v1.Erasure/Erase"
    );
    println!(
        "job:     grpcurl -plaintext -H \"authorization: Bearer {admin}\" -d '{{\"job\":\"JOB\"}}' {addr} sovra.v1.Erasure/GetErasureJob   (JOB: the erase answer's job; state goes requested, acknowledged, done)"
    );
    println!(
        "verify:  ... GetErasureJob | target/release/sovra verify-receipt --public-key {}   (this cluster's receipt key)",
        uk.state.receipt_key.public_hex()
    );
    // Point 2's likeness (a uk subject's): the sample is seeded, so this is
    // the vector that was loaded.
    let probe = sample(3)[2].vector.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(",");
    println!(
        "access:  grpcurl -plaintext -H \"authorization: Bearer {admin}\" -d '{{\"collection\":\"{DEV_COLLECTION}\",\"region\":\"uk\",\"subject\":\"uk-subject-000000\"}}' {addr} sovra.v1.Erasure/SubjectAccess"
    );
    println!(
        "         grpcurl -plaintext -H \"authorization: Bearer {admin}\" -d '{{\"collection\":\"{DEV_COLLECTION}\",\"region\":\"uk\",\"vector\":[{probe}],\"threshold\":0.005}}' {addr} sovra.v1.Erasure/LikenessAccess"
    );
    println!(
        "opt-out: grpcurl -plaintext -H \"authorization: Bearer {admin}\" -d '{{\"collection\":\"{DEV_COLLECTION}\",\"region\":\"uk\",\"vector\":[{probe}],\"threshold\":0.005}}' {addr} sovra.v1.Erasure/RegisterOptOut"
    );
    println!(
        "audit:   target/release/sovra ctl audit export --addr {addr} --key {admin} --region uk --out uk-audit.jsonl --checkpoint uk-checkpoint.json"
    );
    println!(
        "         target/release/sovra ctl audit verify --export uk-audit.jsonl --checkpoint uk-checkpoint.json --public-key {}   (this cluster's audit key)",
        uk.state.audit_key.public_hex()
    );
    if let Some((_, k)) = keys.iter().find(|k| k.0 == "uk-reader") {
        println!(
            "         grpcurl -plaintext -H \"authorization: Bearer {k}\" -d '{{\"collection\":\"{DEV_COLLECTION}\",\"region\":\"uk\",\"limit\":3}}' {addr} sovra.v1.Points/Scroll"
        );
    }
    Ok(())
}
