//! What an outside client found, each as a test that failed before the fix:
//! the cluster API on the public port, poisoned log entries, partly written
//! batches, duplicate regions, errors echoing huge input, answers too large to
//! send, Nagle's delay, reflection only in v1.

use sovra_proto::raft as rpb;
use sovra_proto::v1;
use sovra_tests::*;
use std::time::Duration;
use tonic::Code;

const EU: &str = "eu-west";
const US: &str = "us-east";

async fn create(n: &mut TestNode, s: v1::CollectionSpec) {
    n.collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(s) })
        .await
        .unwrap();
}

/// A 2-d L2 collection `name` of three eu-west shards holding points
/// 0..count at (i, 0).
async fn line(n: &mut TestNode, name: &str, count: u64) {
    create(n, spec(name, 2, v1::Metric::L2, EU)).await;
    n.points
        .upsert(v1::UpsertRequest {
            collection: name.into(),
            points: (0..count).map(|i| point(i, vec![i as f32, 0.0], EU)).collect(),
        })
        .await
        .unwrap();
}

async fn info(n: &mut TestNode, name: &str, with_digest: bool) -> v1::CollectionInfo {
    n.collections
        .get_collection(v1::GetCollectionRequest {
            name: name.into(),
            with_digest,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn live_points(n: &mut TestNode, name: &str) -> u64 {
    info(n, name, false).await.shards.iter().map(|s| s.live_points).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_port_does_not_serve_the_cluster_api_and_the_cluster_port_needs_the_secret() {
    let mut n = TestNode::start(EU).await;
    line(&mut n, "faces", 10).await;
    // What an outsider would try: announce itself as node 1 at an address it
    // controls, to take over node 1's traffic.
    let drop = || rpb::JoinRequest {
        from: 1,
        cluster_addr: "203.0.113.9:7400".into(),
        incarnation: u64::MAX,
    };
    // The public listener knows nothing of sovra.raft.v1.
    let st = rpb::raft_client::RaftClient::new(n.channel.clone()).join(drop()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unimplemented, "{st:?}");

    // The cluster listener refuses callers without the secret, or with another.
    let cluster = tonic::transport::Endpoint::from_shared(format!("http://{}", n.node().cluster_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let st = rpb::raft_client::RaftClient::new(cluster.clone()).join(drop()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let wrong = sovra_raft::auth::AttachSecret(sovra_raft::ClusterSecret::new("a-guess-at-the-cluster-secret").unwrap());
    let st = rpb::raft_client::RaftClient::with_interceptor(cluster, wrong)
        .join(drop())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert_eq!(live_points(&mut n, "faces").await, 10, "a refused request changed something");
    n.stop().await;
}

macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().and_then(|r| r.message_response) {
            Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
            other => panic!("no service list: {other:?}"),
        }
    }};
}

#[tokio::test]
async fn reflection_lists_the_services_through_v1_and_v1alpha() {
    let n = TestNode::start(EU).await;
    let v1 = list_services!(v1, n.channel.clone());
    let v1alpha = list_services!(v1alpha, n.channel.clone());
    for names in [&v1, &v1alpha] {
        for want in [
            "sovra.v1.Search",
            "sovra.v1.Points",
            "sovra.v1.Collections",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|s| s == want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|s| s.starts_with("sovra.raft")), "{names:?}");
    }
    n.stop().await;
}

#[tokio::test]
async fn accepted_sockets_have_tcp_nodelay() {
    use tokio_stream::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The same function both of a node's gRPC listeners are served through.
    let mut incoming = sovra_node::run::incoming(listener);
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    assert!(accepted.nodelay().unwrap(), "accepted socket keeps Nagle's algorithm on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_mixed_region_batch_writes_nothing_in_either_order() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, US)]).await;
    let mut s = spec("faces", 2, v1::Metric::L2, EU);
    s.regions.push(v1::RegionShards {
        region: US.into(),
        shard_count: 2,
    });
    create(&mut nodes[0], s).await;
    let eu: Vec<v1::Point> = (0..6).map(|i| point(i, vec![i as f32, 1.0], EU)).collect();
    let us = point(100, vec![1.0, 1.0], US);
    for batch in [
        eu.iter().cloned().chain([us.clone()]).collect::<Vec<_>>(),
        [us.clone()].into_iter().chain(eu.iter().cloned()).collect(),
    ] {
        let st = nodes[0]
            .points
            .upsert(v1::UpsertRequest {
                collection: "faces".into(),
                points: batch,
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert!(st.message().contains("nothing was written"), "{}", st.message());
        assert_eq!(live_points(&mut nodes[0], "faces").await, 0, "a refused batch wrote points");
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_region_named_twice_is_searched_once() {
    let mut n = TestNode::start(EU).await;
    line(&mut n, "faces", 10).await;
    let r = n
        .search
        .search(v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![0.0, 0.0],
            k: 6,
            regions: vec![EU.into(), EU.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&r), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(r.shards.len(), 3, "each shard reported once: {:?}", r.shards);
    n.stop().await;
}

/// Every string field of every public request, 20,000 characters long, on a
/// default client: a precise status and a short message every time.
#[tokio::test]
async fn a_huge_value_in_any_string_field_gets_a_precise_status_with_a_short_message() {
    let mut n = TestNode::start(EU).await;
    create(&mut n, spec("faces", 2, v1::Metric::L2, EU)).await;
    let huge = "x".repeat(20_000);
    let huge_uuid = v1::PointId {
        kind: Some(v1::point_id::Kind::Uuid(huge.clone())),
    };
    let text = |s: &str| v1::Value {
        kind: Some(v1::value::Kind::StringValue(s.into())),
    };
    let up = |p: v1::Point, collection: &str| v1::UpsertRequest {
        collection: collection.into(),
        points: vec![p],
    };
    let good = || point(1, vec![1.0, 0.0], EU);
    let write = |w: v1::ShardWrite| vec![w];
    let far = v1::ShardWrite {
        region: huge.clone(),
        shard: 0,
        index: 1,
    };
    let cond = |key: &str, value: v1::Value| v1::Filter {
        kind: Some(v1::filter::Kind::Condition(v1::Condition {
            key: key.into(),
            test: Some(v1::condition::Test::Match(value)),
        })),
    };
    let search = |f: &dyn Fn(&mut v1::SearchRequest)| {
        let mut r = v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![1.0, 0.0],
            k: 3,
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let get = |f: &dyn Fn(&mut v1::GetPointsRequest)| {
        let mut r = v1::GetPointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: vec![num(1)],
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let del = |f: &dyn Fn(&mut v1::DeletePointsRequest)| {
        let mut r = v1::DeletePointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: vec![num(1)],
        };
        f(&mut r);
        r
    };
    let mut spec_named = spec("faces", 2, v1::Metric::L2, EU);
    spec_named.name = huge.clone();
    let mut spec_region = spec("other", 2, v1::Metric::L2, EU);
    spec_region.regions[0].region = huge.clone();

    let mut results: Vec<(&str, Result<(), tonic::Status>, Code)> = Vec::new();
    macro_rules! case {
        ($what:expr, $call:expr, $code:expr) => {
            results.push(($what, $call.await.map(|_| ()), $code));
        };
    }
    case!(
        "CreateCollection.name",
        n.collections.create_collection(v1::CreateCollectionRequest {
            collection: Some(spec_named.clone())
        }),
        Code::InvalidArgument
    );
    case!(
        "CreateCollection.regions[].region",
        n.collections.create_collection(v1::CreateCollectionRequest {
            collection: Some(spec_region.clone())
        }),
        Code::InvalidArgument
    );
    case!(
        "GetCollection.name",
        n.collections.get_collection(v1::GetCollectionRequest {
            name: huge.clone(),
            with_digest: false
        }),
        Code::InvalidArgument
    );
    case!(
        "DropCollection.name",
        n.collections.drop_collection(v1::DropCollectionRequest { name: huge.clone() }),
        Code::InvalidArgument
    );
    case!("Upsert.collection", n.points.upsert(up(good(), &huge)), Code::InvalidArgument);
    case!(
        "Upsert.points[].id.uuid",
        n.points.upsert(up(
            v1::Point {
                id: Some(huge_uuid.clone()),
                ..good()
            },
            "faces"
        )),
        Code::InvalidArgument
    );
    case!(
        "Upsert.points[].region",
        n.points.upsert(up(
            v1::Point {
                region: huge.clone(),
                ..good()
            },
            "faces"
        )),
        Code::InvalidArgument
    );
    case!(
        "Upsert.points[].subject",
        n.points.upsert(up(
            v1::Point {
                subject: huge.clone(),
                ..good()
            },
            "faces"
        )),
        Code::InvalidArgument
    );
    case!(
        "Upsert.points[].source",
        n.points.upsert(up(
            v1::Point {
                source: huge.clone(),
                ..good()
            },
            "faces"
        )),
        Code::InvalidArgument
    );
    case!(
        "Upsert.points[].payload key",
        n.points.upsert(up(
            v1::Point {
                payload: [(huge.clone(), text("v"))].into(),
                ..good()
            },
            "faces"
        )),
        Code::InvalidArgument
    );
    // 20,000 bytes is within the payload limit (64 KiB): accepted.
    case!(
        "Upsert.points[].payload value",
        n.points.upsert(up(
            v1::Point {
                payload: [("k".to_string(), text(&huge))].into(),
                ..good()
            },
            "faces"
        )),
        Code::Ok
    );
    case!(
        "Get.collection",
        n.points.get(get(&|r| r.collection = huge.clone())),
        Code::InvalidArgument
    );
    case!("Get.region", n.points.get(get(&|r| r.region = huge.clone())), Code::InvalidArgument);
    case!(
        "Get.ids[].uuid",
        n.points.get(get(&|r| r.ids = vec![huge_uuid.clone()])),
        Code::InvalidArgument
    );
    case!(
        "Get.after[].region",
        n.points.get(get(&|r| r.after = write(far.clone()))),
        Code::InvalidArgument
    );
    case!(
        "Delete.collection",
        n.points.delete(del(&|r| r.collection = huge.clone())),
        Code::InvalidArgument
    );
    case!(
        "Delete.region",
        n.points.delete(del(&|r| r.region = huge.clone())),
        Code::InvalidArgument
    );
    case!(
        "Delete.ids[].uuid",
        n.points.delete(del(&|r| r.ids = vec![huge_uuid.clone()])),
        Code::InvalidArgument
    );
    case!(
        "Search.collection",
        n.search.search(search(&|r| r.collection = huge.clone())),
        Code::InvalidArgument
    );
    case!(
        "Search.regions[]",
        n.search.search(search(&|r| r.regions = vec![huge.clone()])),
        Code::InvalidArgument
    );
    case!(
        "Search.after[].region",
        n.search.search(search(&|r| r.after = write(far.clone()))),
        Code::InvalidArgument
    );
    case!(
        "Search.filter key",
        n.search.search(search(&|r| r.filter = Some(cond(&huge, text("v"))))),
        Code::InvalidArgument
    );
    case!(
        "Search.filter match value",
        n.search.search(search(&|r| r.filter = Some(cond("k", text(&huge))))),
        Code::Ok
    );
    for (what, result, code) in results {
        match result {
            Ok(()) => assert_eq!(code, Code::Ok, "{what}: accepted"),
            Err(st) => {
                assert_eq!(st.code(), code, "{what}: {st:?}");
                assert!(st.message().len() <= 400, "{what}: {} byte message", st.message().len());
                assert!(
                    st.message().contains("(20000 bytes)") || st.message().contains("20000"),
                    "{what}: {}",
                    st.message()
                );
            }
        }
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_too_large_to_send_are_refused_while_built_with_how_many_fitted() {
    let mut n = TestNode::start(EU).await;
    create(&mut n, spec("faces", 2, v1::Metric::L2, EU)).await;
    let blob = "p".repeat(60_000);
    for chunk in (0..400u64).collect::<Vec<_>>().chunks(100) {
        let points = chunk
            .iter()
            .map(|&i| {
                let mut p = point(i, vec![i as f32, 0.0], EU);
                p.payload.insert(
                    "blob".into(),
                    v1::Value {
                        kind: Some(v1::value::Kind::StringValue(blob.clone())),
                    },
                );
                p
            })
            .collect();
        n.points
            .upsert(v1::UpsertRequest {
                collection: "faces".into(),
                points,
            })
            .await
            .unwrap();
    }
    let ids: Vec<v1::PointId> = (0..400).map(num).collect();
    let st = n
        .points
        .get(v1::GetPointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: ids.clone(),
            with_payload: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("of the 400 points asked for fitted"), "{}", st.message());
    // What it says fits does fit, on a default client (4 MiB receive limit).
    let fits: usize = st
        .message()
        .split("at most ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let got = n
        .points
        .get(v1::GetPointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: ids[..fits].to_vec(),
            with_payload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.points.len(), fits);
    // Without payloads all 400 fit.
    let got = n
        .points
        .get(v1::GetPointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.points.len(), 400);

    let search = |k: u32, with_payload: bool| v1::SearchRequest {
        collection: "faces".into(),
        vector: vec![0.0, 0.0],
        k,
        with_payload,
        ..Default::default()
    };
    let st = n.search.search(search(400, true)).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(
        st.message().contains("of the 400 hits asked for fitted") && st.message().contains("lower k"),
        "{}",
        st.message()
    );
    assert_eq!(n.search.search(search(400, false)).await.unwrap().into_inner().hits.len(), 400);
    assert_eq!(n.search.search(search(60, true)).await.unwrap().into_inner().hits.len(), 60);
    n.stop().await;
}

/// Digests of every replica of shard 0, as each node reports its own.
async fn digests(nodes: &mut [TestNode]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for n in nodes.iter_mut() {
        let s = &info(n, "faces", true).await.shards[0];
        out.push((s.digest.unwrap(), s.applied_index));
    }
    out
}

async fn converged(nodes: &mut [TestNode]) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = digests(nodes).await;
        if d.windows(2).all(|w| w[0] == w[1]) {
            return d[0];
        }
        assert!(std::time::Instant::now() < deadline, "replicas did not converge: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_entry_leaves_every_replica_running_and_restartable_with_equal_digests() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU), (3, EU)]).await;
    let mut s = spec("faces", 4, v1::Metric::L2, EU);
    s.regions[0].shard_count = 1;
    s.replication_factor = 3;
    create(&mut nodes[0], s).await;
    nodes[0]
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: (0..10).map(|i| point(i, vec![i as f32, 0.0, 0.0, 1.0], EU)).collect(),
        })
        .await
        .unwrap();
    // What the public path now refuses, proposed past the edge: a 2-d vector
    // in a 4-d collection (it used to panic every replica, for good), and a
    // us-east point in an eu-west shard (R2).
    let shard = sovra_types::ShardId {
        collection: sovra_types::CollectionName::parse("faces").unwrap(),
        region: sovra_types::RegionId::parse(EU).unwrap(),
        number: 0,
    };
    let record = |id: u64, vector: Vec<f32>, region: &str| sovra_types::PointRecord {
        id: sovra_types::PointId::Num(id),
        region: sovra_types::RegionId::parse(region).unwrap(),
        vector,
        subject: "s".into(),
        payload: Default::default(),
        lawful_basis: sovra_types::LawfulBasis::Consent,
        source: String::new(),
        expires_at_ms: 0,
        consent_at_ms: 0,
    };
    let leader = info(&mut nodes[0], "faces", false).await.shards[0].leader;
    let host = nodes[(leader - 1) as usize].node().state.host.clone();
    for poison in [record(50, vec![1.0, 2.0], EU), record(51, vec![1.0; 4], US)] {
        let err = host
            .write_unvalidated(&shard, sovra_types::ShardCommand::Upsert(vec![poison]))
            .await
            .unwrap_err();
        assert_eq!(err.code, sovra_types::ErrorCode::FailedPrecondition, "{err:?}");
        assert!(err.message.contains("refused the write on apply"), "{}", err.message);
    }
    drop(host);
    let before = converged(&mut nodes).await;
    for n in nodes.iter_mut() {
        assert_eq!(live_points(n, "faces").await, 10);
    }
    // Every replica restarts, loads, and agrees.
    let mut restarted = Vec::new();
    for n in nodes {
        restarted.push(n.restart().await);
    }
    assert_eq!(converged(&mut restarted).await, before, "state changed across the restart");
    let r = restarted[1]
        .search
        .search(v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![0.0, 0.0, 0.0, 1.0],
            k: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&r), vec![0, 1, 2]);
    for n in restarted {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_node_that_cannot_load_one_collection_serves_the_others_and_reports_it() {
    let mut n = TestNode::start(EU).await;
    for name in ["good", "broken"] {
        line(&mut n, name, 30).await;
    }
    let key = n.key.clone();
    let dir = n.stop().await;
    // A record an older build could have stored: 3-d in a 2-d collection.
    {
        let id = sovra_types::ShardId {
            collection: sovra_types::CollectionName::parse("broken").unwrap(),
            region: sovra_types::RegionId::parse(EU).unwrap(),
            number: 1,
        };
        let budget = sovra_shard::CacheBudget::new(8 << 20, 1);
        let store =
            sovra_shard::ReplicaStore::open(&sovra_shard::replica::replica_dir(&dir.path().join("replicas"), &id), &budget).unwrap();
        let raw = sovra_shard::store::ShardStore::new(store.points().clone());
        let mut b = raw.batch();
        let mut rec = raw.points().next().unwrap().unwrap();
        rec.vector = vec![1.0, 2.0, 3.0];
        b.upsert(&rec).unwrap();
        b.commit(raw.last_applied().unwrap()).unwrap();
        store.db().flush().unwrap();
    }
    let mut config = sovra_node::NodeConfig::local(1, EU, dir.path().to_path_buf());
    config.grpc_listen = "127.0.0.1:0".parse().unwrap();
    let node = sovra_node::start(config).await.unwrap();
    let ch = sovra_node::dev::wait_serving(node.grpc_addr, Duration::from_secs(60))
        .await
        .unwrap();
    let clients = sovra_tests::Clients::new(&ch, &key);
    let mut search = clients.search.clone();
    let q = |c: &str, allow_partial| v1::SearchRequest {
        collection: c.into(),
        vector: vec![0.0, 0.0],
        k: 30,
        allow_partial,
        ..Default::default()
    };
    assert_eq!(search.search(q("good", false)).await.unwrap().into_inner().hits.len(), 30);
    let st = search.search(q("broken", false)).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("eu-west/1"), "{}", st.message());
    let partial = search.search(q("broken", true)).await.unwrap().into_inner();
    assert!(partial.partial && partial.hits.len() < 30 && !partial.hits.is_empty());
    let failed = partial.shards.iter().find(|s| !s.answered).unwrap();
    assert!(
        failed.error.contains("failed to open") && failed.error.contains("dimension 3"),
        "{}",
        failed.error
    );
    let info = clients
        .collections
        .clone()
        .get_collection(v1::GetCollectionRequest {
            name: "broken".into(),
            with_digest: false,
        })
        .await
        .unwrap()
        .into_inner();
    let errors: Vec<&str> = info.shards.iter().map(|s| s.error.as_str()).collect();
    assert!(
        errors[0].is_empty() && errors[1].contains("invalid") && errors[2].is_empty(),
        "{errors:?}"
    );
    node.stop().await.unwrap();
}
