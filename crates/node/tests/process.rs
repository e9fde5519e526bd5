//! Real `sovra` processes: durability across SIGKILL, clean exit on SIGTERM, and
//! `sovra dev` answering a search through the gRPC API.

use sovra_proto::v1;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sovra");

use sovra_node::dev::keyed;

/// The key a bootstrap node (or `sovra dev`) prints once: the last word of
/// the first stdout line containing `marker`.
fn printed_key(rx: &mpsc::Receiver<String>, marker: &str) -> String {
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the key line");
        if line.contains(marker) {
            return line.split_whitespace().last().unwrap().to_string();
        }
    }
}

/// Starts `sovra` with `args` and waits (with a deadline) for a stdout line
/// containing `marker`; returns the child, that line, and the rest of stdout.
fn spawn_until(args: &[&str], marker: &str) -> (Child, String, mpsc::Receiver<String>) {
    // The child's log goes to a file, shown if it never prints the marker.
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file"))
        .spawn()
        .expect("spawn sovra");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains(marker) => return (child, line, rx),
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().filter(|l| !l.contains("WARN")).rev().take(30).collect();
                panic!(
                    "sovra {args:?} never printed {marker:?}: {e}; its last log lines (WARN left out):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

fn addr_after(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "sovra did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_node(config: &std::path::Path) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    let (child, line, rx) = spawn_until(&["node", "--config", config.to_str().unwrap()], "sovra node listening");
    (child, addr_after(&line, "grpc="), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_an_acknowledged_upsert_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\nregion = \"eu-west\"\nbootstrap = true\ndata_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\ncluster_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ntls = false\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (mut child, addr, rx) = start_node(&config);
    let key = printed_key(&rx, "first admin key");
    let ch = sovra_node::dev::wait_serving(addr, Duration::from_secs(60)).await.unwrap();
    let mut collections = v1::collections_client::CollectionsClient::new(keyed(&ch, &key));
    let spec = v1::CollectionSpec {
        name: "faces".into(),
        dimension: 3,
        metric: v1::Metric::L2 as i32,
        regions: vec![v1::RegionShards {
            region: "eu-west".into(),
            shard_count: 2,
        }],
        ..Default::default()
    };
    collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await
        .unwrap();

    let mut acknowledged = Vec::new();
    for round in 0..3u64 {
        let mut points = v1::points_client::PointsClient::new(keyed(&ch, &key));
        if round > 0 {
            // Restarted: the node must come back with everything acknowledged so far.
            let (c, a, _) = start_node(&config);
            child = c;
            let ch2 = sovra_node::dev::wait_serving(a, Duration::from_secs(60)).await.unwrap();
            points = v1::points_client::PointsClient::new(keyed(&ch2, &key));
            let got = points
                .get(v1::GetPointsRequest {
                    collection: "faces".into(),
                    region: "eu-west".into(),
                    ids: acknowledged.clone(),
                    with_vector: true,
                    with_payload: false,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                got.points.len(),
                acknowledged.len(),
                "round {round}: acknowledged points lost after SIGKILL"
            );
        }
        let batch: Vec<v1::Point> = (0..20)
            .map(|i| v1::Point {
                id: Some(v1::PointId {
                    kind: Some(v1::point_id::Kind::Num(round * 100 + i)),
                }),
                vector: vec![i as f32, round as f32, 1.0],
                region: "eu-west".into(),
                ..Default::default()
            })
            .collect();
        let ack = points
            .upsert(v1::UpsertRequest {
                collection: "faces".into(),
                points: batch.clone(),
            })
            .await
            .unwrap();
        assert_eq!(ack.get_ref().count, 20);
        // SIGKILL immediately after the acknowledgement.
        child.kill().unwrap();
        wait_exit(&mut child);
        acknowledged.extend(batch.into_iter().map(|p| p.id.unwrap()));
    }
    let (mut child, addr, _) = start_node(&config);
    let ch = sovra_node::dev::wait_serving(addr, Duration::from_secs(60)).await.unwrap();
    let mut points = v1::points_client::PointsClient::new(keyed(&ch, &key));
    let got = points
        .get(v1::GetPointsRequest {
            collection: "faces".into(),
            region: "eu-west".into(),
            ids: acknowledged.clone(),
            with_vector: false,
            with_payload: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.points.len(), 60);
    // SIGTERM is a clean shutdown with exit status 0.
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(wait_exit(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sovra_dev_starts_and_answers_a_search() {
    let (mut child, line, rest) = spawn_until(
        &["dev", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--points", "600"],
        "connect: grpcurl",
    );
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("address in the connect line");
    // Every port is TLS, from the throwaway CA the connect line names.
    let ca = line
        .split_whitespace()
        .skip_while(|w| *w != "-cacert")
        .nth(1)
        .map(std::path::PathBuf::from)
        .expect("the CA in the connect line");
    let key = printed_key(&rest, "key admin:");
    let ch = sovra_node::dev::wait_serving_with(addr, Some(&ca), Duration::from_secs(30))
        .await
        .unwrap();
    // A plaintext client is not served.
    assert!(sovra_node::dev::wait_serving(addr, Duration::from_millis(300)).await.is_err());
    let mut search = v1::search_client::SearchClient::new(keyed(&ch, &key));
    let r = search
        .search(v1::SearchRequest {
            collection: "people".into(),
            vector: vec![0.5; 64],
            k: 7,
            with_payload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 7);
    assert!(r.hits.windows(2).all(|w| w[0].distance <= w[1].distance));
    assert!(r.hits.iter().all(|h| h.point.as_ref().unwrap().payload.contains_key("city")));
    // Two regions, both searched through a uk coordinator (us lets its results go to uk).
    assert_eq!(r.shards.len(), 4, "{:?}", r.shards);
    assert!(r.shards.iter().all(|s| s.answered));
    // Without a key: refused.
    let st = v1::search_client::SearchClient::new(ch)
        .search(v1::SearchRequest {
            collection: "people".into(),
            vector: vec![0.5; 64],
            k: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(wait_exit(&mut child).success());
}

/// A process's memory figure from /proc (kB there), in bytes.
fn proc_mem(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_large_requests_is_shed_within_the_byte_budget_and_health_stays_serving() {
    const BUDGET: u64 = 64 << 20;
    const CONNECTIONS: usize = 64;
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\nregion = \"eu-west\"\nbootstrap = true\ndata_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\ncluster_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ntls = false\nmax_inflight_bytes = {BUDGET}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (mut child, addr, rx) = start_node(&config);
    let key = printed_key(&rx, "first admin key");
    let ch = sovra_node::dev::wait_serving(addr, Duration::from_secs(60)).await.unwrap();
    let pid = child.id();
    // Each request: 2,000 points of 512 floats, about 4 MB on the wire, for a
    // collection that does not exist (NOT_FOUND once decoded), so the node
    // keeps nothing of them and its memory is what it holds in flight.
    let body = v1::UpsertRequest {
        collection: "nowhere".into(),
        points: (0..2000u64)
            .map(|i| v1::Point {
                id: Some(v1::PointId {
                    kind: Some(v1::point_id::Kind::Num(i)),
                }),
                vector: vec![0.25; 512],
                region: "eu-west".into(),
                subject: format!("s{i}"),
                ..Default::default()
            })
            .collect(),
    };
    // Peak RSS from here on: the flood's cost, over what the node holds idle.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let idle = proc_mem(pid, "VmRSS");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = {
        let (ch, stop) = (ch.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut checks, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                // A probe's bound (Kubernetes' timeoutSeconds is 3; this
                // machine is shared with the rest of the tests).
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }),
                )
                .await;
                match r {
                    Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 => {}
                    other => bad.push(format!("{other:?}")),
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (checks, bad)
        })
    };
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let body = body.clone();
        let key = key.clone();
        flood.spawn(async move {
            // One connection each.
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut points = v1::points_client::PointsClient::new(keyed(&ch, &key)).max_encoding_message_size(16 << 20);
            let mut codes = Vec::new();
            for _ in 0..ROUNDS {
                let e = points.upsert(body.clone()).await.unwrap_err();
                if e.code() == tonic::Code::ResourceExhausted {
                    assert!(e.message().contains("max_inflight_bytes"), "{}", e.message());
                }
                codes.push(e.code());
            }
            codes
        });
    }
    let mut codes = Vec::new();
    while let Some(c) = flood.join_next().await {
        codes.extend(c.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checks, bad) = health.await.unwrap();
    let peak = proc_mem(pid, "VmHWM");
    let shed = codes.iter().filter(|c| **c == tonic::Code::ResourceExhausted).count();
    let served = codes.iter().filter(|c| **c == tonic::Code::NotFound).count();
    println!(
        "{} requests: {served} served (NOT_FOUND), {shed} shed; peak RSS {} MiB over {} MiB idle (budget {} MiB); {checks} health checks",
        codes.len(),
        (peak - idle) >> 20,
        idle >> 20,
        BUDGET >> 20
    );
    assert_eq!(shed + served, codes.len(), "only NOT_FOUND or RESOURCE_EXHAUSTED: {codes:?}");
    assert!(shed > 0, "the flood never met the budget");
    assert!(served > 0, "the node took none of the flood");
    assert!(bad.is_empty(), "health was not SERVING during the flood: {bad:?}");
    assert!(checks > 0);
    // What the node held for the flood: the budget, plus room for the
    // allocator, connection buffers and requests' headers (not counted).
    // Without the budget this flood takes about 250 MiB here.
    assert!(
        peak.saturating_sub(idle) < BUDGET + (32 << 20),
        "peak RSS grew {} MiB for a budget of {} MiB",
        (peak - idle) >> 20,
        BUDGET >> 20
    );
    // Every reservation came back: four at once (48 of the 64 MiB) are all taken.
    let mut after = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut points = v1::points_client::PointsClient::new(keyed(&ch, &key)).max_encoding_message_size(16 << 20);
        let body = body.clone();
        after.spawn(async move { points.upsert(body).await.unwrap_err().code() });
    }
    while let Some(c) = after.join_next().await {
        assert_eq!(c.unwrap(), tonic::Code::NotFound, "a request after the flood was not taken");
    }
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    assert!(wait_exit(&mut child).success());
}
