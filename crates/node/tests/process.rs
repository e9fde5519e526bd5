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
