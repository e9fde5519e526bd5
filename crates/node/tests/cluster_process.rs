//! Three real `sovra node` processes replicating one shard group: node 1
//! bootstraps the cluster and the others join it; a replica killed with
//! SIGKILL in the middle of a write load rejoins (on a new port, announced
//! through its join seeds) and converges to the same digest; then every node
//! (every meta voter) is restarted on new ports, each joining through the
//! ones already back, and every acknowledged write is still there (D1).

use sovra_proto::v1;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_sovra");
const N: u64 = 3;

struct Proc {
    child: Child,
    grpc: String,
    cluster: String,
    /// The first admin key, once this (bootstrap) node prints it.
    key: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// The CA the node's public certificate chains to.
    ca: PathBuf,
}

use sovra_node::dev::keyed;

/// The key node 1 printed when it bootstrapped the cluster.
fn admin_key(p: &Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(k) = p.key.lock().unwrap().clone() {
            return k;
        }
        assert!(Instant::now() < deadline, "node 1 never printed the first admin key");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes' throwaway CA and certificates: these nodes speak mutual TLS
/// as a deployment would.
fn tls_dir(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    if !tls.join("ca.pem").exists() {
        let nodes: Vec<(u64, &str)> = (1..=N).map(|id| (id, "eu-west")).collect();
        sovra_node::certs::throwaway(&tls, &nodes).unwrap();
    }
    tls
}

fn config(dir: &Path, id: u64, join: &[String]) -> PathBuf {
    let path = dir.join(format!("node{id}.toml"));
    let mut text = format!(
        "node_id = {id}\nregion = \"eu-west\"\nzone = \"z{id}\"\ndata_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\ncluster_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ncluster_secret = \"process-test-cluster-secret\"\nheartbeat_ms = 200\ndown_after_ms = 5000\ntls_cert = \"{1}/node-{{node_id}}.pem\"\ntls_key = \"{1}/node-{{node_id}}-key.pem\"\ntls_ca = \"{1}/ca.pem\"\n",
        dir.join(format!("data{id}")).display(),
        tls_dir(dir).display(),
    );
    if id == 1 {
        text.push_str("bootstrap = true\n");
    }
    let seeds: Vec<String> = join.iter().map(|a| format!("\"{a}\"")).collect();
    text.push_str(&format!("join = [{}]\n", seeds.join(", ")));
    text.push_str("[raft]\nheartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\nwrite_timeout_ms = 4000\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(dir: &Path, id: u64, join: &[String]) -> Proc {
    let mut child = Command::new(BIN)
        .args(["node", "--config", config(dir, id, join).to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Some(Ok(line)) = lines.next().filter(|_| Instant::now() < deadline) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node {id} never printed its address");
        };
        let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string);
        if let (Some(grpc), Some(cluster)) = (field("grpc="), field("cluster=")) {
            // Keep draining stdout so the child never blocks on a full pipe,
            // keeping the admin key when it is printed.
            let key = std::sync::Arc::new(std::sync::Mutex::new(None));
            let k = key.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if line.contains("first admin key") {
                        *k.lock().unwrap() = line.split_whitespace().last().map(str::to_string);
                    }
                }
            });
            return Proc {
                child,
                grpc,
                cluster,
                key,
                ca: tls_dir(dir).join("ca.pem"),
            };
        }
    }
}

/// The cluster addresses of the running processes (seeds for another's join).
fn seeds(procs: &[Option<Proc>]) -> Vec<String> {
    procs.iter().flatten().map(|p| p.cluster.clone()).collect()
}

/// Starts nodes 1..=N in turn, each joining through those already started.
fn start_all(dir: &Path) -> Vec<Option<Proc>> {
    let mut procs: Vec<Option<Proc>> = Vec::new();
    for id in 1..=N {
        let p = start(dir, id, &seeds(&procs));
        procs.push(Some(p));
    }
    procs
}

async fn channel(p: &Proc) -> Channel {
    sovra_node::dev::wait_serving_with(p.grpc.parse().unwrap(), Some(&p.ca), Duration::from_secs(60))
        .await
        .unwrap()
}

fn point(id: u64, value: f32) -> v1::Point {
    v1::Point {
        id: Some(v1::PointId {
            kind: Some(v1::point_id::Kind::Num(id)),
        }),
        region: "eu-west".into(),
        vector: vec![value, id as f32, 1.0, 0.5],
        subject: format!("s{id}"),
        ..Default::default()
    }
}

/// Retries `f` until it succeeds or the deadline passes.
async fn retry<T, F: AsyncFnMut() -> Result<T, tonic::Status>>(what: &str, within: Duration, mut f: F) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(s) if Instant::now() < deadline => {
                let _ = s;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{what}: {s}"),
        }
    }
}

async fn shard_state(ch: Channel, key: &str) -> Result<(u64, u64), tonic::Status> {
    let info = v1::collections_client::CollectionsClient::new(keyed(&ch, key))
        .get_collection(v1::GetCollectionRequest {
            name: "faces".into(),
            with_digest: true,
        })
        .await?
        .into_inner();
    let s = &info.shards[0];
    Ok((s.digest.unwrap_or(0), s.applied_index))
}

async fn converge(procs: &[Option<Proc>], key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut states = Vec::new();
        for p in procs.iter().flatten() {
            states.push(shard_state(channel(p).await, key).await.ok());
        }
        if states.iter().all(Option::is_some) && states.windows(2).all(|w| w[0] == w[1]) {
            return states[0].unwrap().0;
        }
        assert!(Instant::now() < deadline, "replicas did not converge: {states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_replica_rejoins_and_a_full_restart_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start_all(dir.path());
    let ch1 = channel(procs[0].as_ref().unwrap()).await;
    for p in procs.iter().flatten() {
        channel(p).await;
    }
    let key = admin_key(procs[0].as_ref().unwrap());
    let spec = v1::CollectionSpec {
        name: "faces".into(),
        dimension: 4,
        metric: v1::Metric::L2 as i32,
        regions: vec![v1::RegionShards {
            region: "eu-west".into(),
            shard_count: 1,
        }],
        replication_factor: 3,
        ..Default::default()
    };
    // Until every node has registered, placement finds too few nodes.
    retry("create with three replicas", Duration::from_secs(30), async || {
        v1::collections_client::CollectionsClient::new(keyed(&ch1, &key))
            .create_collection(v1::CreateCollectionRequest {
                collection: Some(spec.clone()),
            })
            .await
    })
    .await;

    let mut acked: Vec<(u64, f32)> = Vec::new();
    let mut points = v1::points_client::PointsClient::new(keyed(&ch1, &key));
    for b in 0..30u64 {
        if b == 10 {
            // SIGKILL a follower-or-leader mid-load.
            let mut p = procs[2].take().unwrap();
            p.child.kill().unwrap();
            p.child.wait().unwrap();
        }
        if b == 20 {
            let join = seeds(&procs);
            procs[2] = Some(start(dir.path(), 3, &join));
        }
        let batch: Vec<v1::Point> = (b * 10..b * 10 + 10).map(|i| point(i, b as f32)).collect();
        // Writes go through node 1; while a new leader is elected they may fail
        // UNAVAILABLE, and are retried (idempotent by id). Only acks count.
        let r = retry("upsert", Duration::from_secs(30), async || {
            points
                .upsert(v1::UpsertRequest {
                    collection: "faces".into(),
                    points: batch.clone(),
                })
                .await
        })
        .await;
        assert_eq!(r.into_inner().writes.len(), 1);
        acked.extend((b * 10..b * 10 + 10).map(|i| (i, b as f32)));
    }
    let digest = converge(&procs, &key).await;

    // Every node down (SIGTERM), every node back on new ports.
    for p in procs.iter_mut().flatten() {
        assert!(
            Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        assert!(p.child.wait().unwrap().success(), "SIGTERM is a clean exit");
    }
    // Every voter comes back on a new port: each announces itself to the
    // ones already back, so they find one another and elect again.
    let procs = start_all(dir.path());
    assert_eq!(converge(&procs, &key).await, digest, "state changed across a full restart");
    for p in procs.iter().flatten() {
        let ch = channel(p).await;
        let got = retry("linearizable get", Duration::from_secs(30), async || {
            v1::points_client::PointsClient::new(keyed(&ch, &key))
                .get(v1::GetPointsRequest {
                    collection: "faces".into(),
                    region: "eu-west".into(),
                    ids: acked
                        .iter()
                        .map(|(i, _)| v1::PointId {
                            kind: Some(v1::point_id::Kind::Num(*i)),
                        })
                        .collect(),
                    with_vector: true,
                    consistency: v1::Consistency::Linearizable as i32,
                    ..Default::default()
                })
                .await
        })
        .await
        .into_inner();
        assert_eq!(got.points.len(), acked.len(), "node lost acknowledged points");
        for (pt, (_, value)) in got.points.iter().zip(&acked) {
            assert_eq!(pt.vector[0], *value);
        }
    }
    for mut p in procs.into_iter().flatten() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}
