//! The public API of one real node over gRPC: happy paths, and every bad input
//! with its precise status, a message that says what to fix, and nothing written.

use sovra_proto::v1;
use sovra_tests::*;
use tonic::Code;

const EU: &str = "eu-west";

fn search_req(collection: &str, vector: Vec<f32>, k: u32) -> v1::SearchRequest {
    v1::SearchRequest {
        collection: collection.into(),
        vector,
        k,
        ..Default::default()
    }
}

async fn create(n: &mut TestNode, s: v1::CollectionSpec) -> Result<v1::CollectionInfo, tonic::Status> {
    n.collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(s) })
        .await
        .map(|r| r.into_inner())
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    let st = r.expect_err("expected an error");
    assert_eq!(st.code(), code, "{}", st.message());
    for n in needles {
        assert!(st.message().contains(n), "message {:?} lacks {n:?}", st.message());
    }
}

async fn live_points(n: &mut TestNode, name: &str) -> u64 {
    let info = n
        .collections
        .get_collection(v1::GetCollectionRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    info.shards.iter().map(|s| s.live_points).sum()
}

#[tokio::test]
async fn collections_lifecycle_and_errors() {
    let mut n = TestNode::start(EU).await;
    let info = create(&mut n, spec("faces", 4, v1::Metric::L2, EU)).await.unwrap();
    assert_eq!(info.shards.len(), 3);
    assert_eq!(info.shards[0].hash_start, 0);
    assert_eq!(info.shards[2].hash_end, u64::MAX);
    let hnsw = info.spec.unwrap().hnsw.unwrap();
    assert_eq!((hnsw.m, hnsw.ef_construction, hnsw.ef_search), (16, 200, 128), "defaults filled in");

    expect_err(
        create(&mut n, spec("faces", 4, v1::Metric::L2, EU)).await,
        Code::AlreadyExists,
        &["faces"],
    );
    expect_err(
        create(&mut n, spec("other", 4, v1::Metric::L2, "uk")).await,
        Code::FailedPrecondition,
        &["region uk", "eu-west"],
    );
    let mut s = spec("big", 4, v1::Metric::L2, EU);
    s.hnsw = Some(v1::HnswParams {
        m: 300,
        ..Default::default()
    });
    expect_err(
        create(&mut n, s).await,
        Code::InvalidArgument,
        &["collection.hnsw.m is 300", "4 and 128"],
    );
    let mut s = spec("big", 4, v1::Metric::L2, EU);
    s.hnsw = Some(v1::HnswParams {
        ef_construction: 5000,
        ..Default::default()
    });
    expect_err(create(&mut n, s).await, Code::InvalidArgument, &["ef_construction"]);
    expect_err(
        create(&mut n, spec("big", 0, v1::Metric::L2, EU)).await,
        Code::InvalidArgument,
        &["dimension is 0"],
    );
    expect_err(
        create(&mut n, spec("big", 4, v1::Metric::Unspecified, EU)).await,
        Code::InvalidArgument,
        &["metric"],
    );
    expect_err(
        create(&mut n, spec("Bad Name", 4, v1::Metric::L2, EU)).await,
        Code::InvalidArgument,
        &["collection.name"],
    );
    let mut s = spec("big", 4, v1::Metric::L2, EU);
    s.replication_factor = 3;
    expect_err(create(&mut n, s).await, Code::FailedPrecondition, &["replication_factor 3"]);
    let mut s = spec("big", 4, v1::Metric::L2, EU);
    s.regions[0].shard_count = 1000;
    expect_err(create(&mut n, s).await, Code::InvalidArgument, &["shard_count is 1000"]);

    let list = n
        .collections
        .list_collections(v1::ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.collections.len(), 1, "failed creates leave nothing behind");
    expect_err(
        n.collections
            .get_collection(v1::GetCollectionRequest {
                name: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["nope"],
    );
    // Each replica has a directory (and database) of its own; a drop deletes
    // them all, so nothing of the collection is left in the node's files.
    let faces = n.dir.path().join("replicas").join("faces");
    let shard_dirs = std::fs::read_dir(faces.join(EU)).unwrap().count();
    assert_eq!(shard_dirs, 3, "one directory per replica");
    let dropped = n
        .collections
        .drop_collection(v1::DropCollectionRequest { name: "faces".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.shards_dropped, 3);
    assert!(!faces.exists(), "{} is left after the drop", faces.display());
    expect_err(
        n.collections
            .drop_collection(v1::DropCollectionRequest { name: "faces".into() })
            .await,
        Code::NotFound,
        &[],
    );
    n.stop().await;
}

#[tokio::test]
async fn bad_points_are_refused_whole_with_the_offending_index() {
    let mut n = TestNode::start(EU).await;
    let mut s = spec("faces", 3, v1::Metric::Cosine, EU);
    s.require_lawful_basis = true;
    create(&mut n, s).await.unwrap();
    let good = || point(1, vec![1.0, 0.0, 0.0], EU);
    let mut cases: Vec<(v1::Point, Code, Vec<&str>)> = vec![
        (
            point(2, vec![1.0, 0.0], EU),
            Code::InvalidArgument,
            vec!["points[1].vector has dimension 2", "expects 3"],
        ),
        (
            point(2, vec![1.0, f32::NAN, 0.0], EU),
            Code::InvalidArgument,
            vec!["points[1].vector[1] is NaN"],
        ),
        (
            point(2, vec![f32::INFINITY, 0.0, 0.0], EU),
            Code::InvalidArgument,
            vec!["points[1].vector[0] is inf"],
        ),
        (
            point(2, vec![0.0, 0.0, 0.0], EU),
            Code::InvalidArgument,
            vec!["points[1].vector is a zero vector"],
        ),
        (
            point(2, vec![1.0, 0.0, 0.0], "us-east"),
            Code::InvalidArgument,
            vec!["points[1]: region us-east is not spanned", "spans: eu-west"],
        ),
        (
            point(2, vec![1.0, 0.0, 0.0], "Not A Region"),
            Code::InvalidArgument,
            vec!["points[1].region"],
        ),
    ];
    let mut no_basis = point(2, vec![1.0, 0.0, 0.0], EU);
    no_basis.lawful_basis = 0;
    cases.push((no_basis, Code::FailedPrecondition, vec!["points[1]", "lawful basis"]));
    let mut big = point(2, vec![1.0, 0.0, 0.0], EU);
    big.payload.insert(
        "blob".into(),
        v1::Value {
            kind: Some(v1::value::Kind::StringValue("x".repeat(70_000))),
        },
    );
    cases.push((big, Code::InvalidArgument, vec!["points[1].payload is", "at most 65536"]));
    let mut no_id = point(2, vec![1.0, 0.0, 0.0], EU);
    no_id.id = None;
    cases.push((no_id, Code::InvalidArgument, vec!["points[1].id is missing"]));
    let mut bad_uuid = point(2, vec![1.0, 0.0, 0.0], EU);
    bad_uuid.id = Some(v1::PointId {
        kind: Some(v1::point_id::Kind::Uuid("not-a-uuid".into())),
    });
    cases.push((bad_uuid, Code::InvalidArgument, vec!["points[1].id.uuid"]));

    for (bad, code, needles) in cases {
        let r = n
            .points
            .upsert(v1::UpsertRequest {
                collection: "faces".into(),
                points: vec![good(), bad],
            })
            .await;
        expect_err(r, code, &needles);
        assert_eq!(live_points(&mut n, "faces").await, 0, "a batch with one bad point writes none");
    }
    let many: Vec<_> = (0..1001).map(|i| point(i, vec![1.0, 0.0, 0.0], EU)).collect();
    expect_err(
        n.points
            .upsert(v1::UpsertRequest {
                collection: "faces".into(),
                points: many,
            })
            .await,
        Code::InvalidArgument,
        &["1001 points", "at most 1000"],
    );
    expect_err(
        n.points
            .upsert(v1::UpsertRequest {
                collection: "nope".into(),
                points: vec![good()],
            })
            .await,
        Code::NotFound,
        &["collection nope"],
    );
    // A message above the gRPC limit is refused by the transport, not half-read.
    let huge: Vec<_> = (0..1000)
        .map(|i| point(i, vec![1.0; 5000].into_iter().chain([0.0; 0]).collect(), EU))
        .collect();
    let st = n
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: huge,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(st.code(), Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument),
        "{st:?}"
    );
    assert_eq!(live_points(&mut n, "faces").await, 0);

    // Dot metric: vectors of norm above 1 would make the distance negative.
    create(&mut n, spec("dots", 2, v1::Metric::Dot, EU)).await.unwrap();
    let r = n
        .points
        .upsert(v1::UpsertRequest {
            collection: "dots".into(),
            points: vec![point(1, vec![3.0, 4.0], EU)],
        })
        .await;
    expect_err(r, Code::InvalidArgument, &["norm 5.0000", "norm <= 1"]);
    n.stop().await;
}

#[tokio::test]
async fn upsert_get_search_delete_round_trip() {
    let mut n = TestNode::start(EU).await;
    create(&mut n, spec("faces", 2, v1::Metric::L2, EU)).await.unwrap();
    let mut pts: Vec<v1::Point> = (0..300).map(|i| point(i, vec![i as f32, 0.0], EU)).collect();
    for p in &mut pts {
        let n = match p.id.as_ref().unwrap().kind {
            Some(v1::point_id::Kind::Num(n)) => n,
            _ => 0,
        };
        p.payload.insert(
            "even".into(),
            v1::Value {
                kind: Some(v1::value::Kind::BoolValue(n % 2 == 0)),
            },
        );
    }
    // One point already expired: it must never be returned.
    pts[10].expires_at_ms = 1;
    let w = n
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: pts,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.count, 300);
    assert!(!w.writes.is_empty() && w.writes.iter().all(|s| s.index >= 1));

    let r = n.search.search(search_req("faces", vec![10.2, 0.0], 3)).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![11, 9, 12], "10 is expired");
    assert!(!r.partial && r.shards.len() == 3 && r.shards.iter().all(|s| s.answered));

    let mut req = search_req("faces", vec![10.2, 0.0], 3);
    req.filter = Some(v1::Filter {
        kind: Some(v1::filter::Kind::Condition(v1::Condition {
            key: "even".into(),
            test: Some(v1::condition::Test::Match(v1::Value {
                kind: Some(v1::value::Kind::BoolValue(true)),
            })),
        })),
    });
    req.with_payload = true;
    let r = n.search.search(req).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![12, 8, 14]);
    assert!(r.hits[0].point.as_ref().unwrap().payload.contains_key("even"));

    let got = n
        .points
        .get(v1::GetPointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: vec![num(5), num(10), num(999)],
            with_vector: true,
            with_payload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.points.len(), 1, "expired 10 and unknown 999 are absent");
    assert_eq!(got.points[0].vector, vec![5.0, 0.0]);

    // T1 in a scroll too: every live point once, the expired one never; a
    // filter keeps only what it matches.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = n
            .points
            .scroll(v1::ScrollRequest {
                collection: "faces".into(),
                region: EU.into(),
                limit: 128,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for p in &page.points {
            let Some(v1::point_id::Kind::Num(i)) = p.id.as_ref().unwrap().kind else {
                unreachable!()
            };
            seen.push(i);
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..300).filter(|i| *i != 10).collect::<Vec<u64>>(), "10 is expired");
    let evens = n
        .points
        .scroll(v1::ScrollRequest {
            collection: "faces".into(),
            region: EU.into(),
            limit: 1000,
            filter: Some(v1::Filter {
                kind: Some(v1::filter::Kind::Condition(v1::Condition {
                    key: "even".into(),
                    test: Some(v1::condition::Test::Match(v1::Value {
                        kind: Some(v1::value::Kind::BoolValue(true)),
                    })),
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(evens.points.len(), 149, "150 even ids, 10 expired");
    assert!(evens.next_cursor.is_empty());

    let d = n
        .points
        .delete(v1::DeletePointsRequest {
            collection: "faces".into(),
            region: EU.into(),
            ids: vec![num(11), num(9), num(4242)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.count, 2);
    let r = n.search.search(search_req("faces", vec![10.2, 0.0], 3)).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![12, 8, 13]);

    // Bad reads.
    expect_err(
        n.search.search(search_req("faces", vec![1.0, 0.0], 0)).await,
        Code::InvalidArgument,
        &["k is 0", "1 and 1000"],
    );
    expect_err(
        n.search.search(search_req("faces", vec![1.0, 0.0], 1001)).await,
        Code::InvalidArgument,
        &["k is 1001"],
    );
    expect_err(
        n.search.search(search_req("faces", vec![1.0], 3)).await,
        Code::InvalidArgument,
        &["vector has dimension 1", "expects 2"],
    );
    expect_err(
        n.search.search(search_req("faces", vec![f32::NAN, 0.0], 3)).await,
        Code::InvalidArgument,
        &["vector[0] is NaN"],
    );
    expect_err(
        n.search.search(search_req("nope", vec![1.0, 0.0], 3)).await,
        Code::NotFound,
        &["collection nope"],
    );
    let mut req = search_req("faces", vec![1.0, 0.0], 3);
    req.ef = Some(100_000);
    expect_err(n.search.search(req).await, Code::InvalidArgument, &["ef is 100000"]);
    let mut req = search_req("faces", vec![1.0, 0.0], 3);
    req.filter = Some(v1::Filter {
        kind: Some(v1::filter::Kind::And(v1::FilterList { filters: vec![] })),
    });
    expect_err(n.search.search(req).await, Code::InvalidArgument, &["filter.and is empty"]);
    let mut req = search_req("faces", vec![1.0, 0.0], 3);
    req.regions = vec!["us-east".into()];
    expect_err(
        n.search.search(req).await,
        Code::InvalidArgument,
        &["regions[0]: region us-east is not spanned"],
    );
    expect_err(
        n.points
            .get(v1::GetPointsRequest {
                collection: "faces".into(),
                region: "us-east".into(),
                ids: vec![num(1)],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["region: region us-east is not spanned"],
    );
    expect_err(
        n.points
            .delete(v1::DeletePointsRequest {
                collection: "faces".into(),
                region: EU.into(),
                ids: vec![],
            })
            .await,
        Code::InvalidArgument,
        &["ids is empty"],
    );
    n.stop().await;
}

#[tokio::test]
async fn data_survives_a_clean_restart_and_metrics_are_served() {
    let mut n = TestNode::start(EU).await;
    create(&mut n, spec("faces", 2, v1::Metric::L2, EU)).await.unwrap();
    let pts: Vec<_> = (0..50).map(|i| point(i, vec![i as f32, 1.0], EU)).collect();
    n.points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: pts,
        })
        .await
        .unwrap();

    // Metrics over plain HTTP.
    let addr = n.node().metrics_addr;
    let body = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(body.contains("sovra_requests_total"), "{body}");
    assert!(body.contains("sovra_shard_live_points{collection=\"faces\""), "{body}");
    // The node's view of the cluster: itself, up; its meta replica leads.
    assert!(body.contains("sovra_cluster_nodes{node=\"1\",status=\"up\"} 1"), "{body}");
    assert!(body.contains("sovra_meta_is_leader{node=\"1\"} 1"), "{body}");
    assert!(
        body.contains("sovra_replicas_open{node=\"1\"} 5"),
        "three shards, the meta replica and the audit replica: {body}"
    );

    let key = n.key.clone();
    let dir = n.stop().await;
    let node = sovra_node::start(sovra_node::NodeConfig::local(1, EU, dir.path().to_path_buf()))
        .await
        .unwrap();
    let ch = sovra_node::dev::wait_serving(node.grpc_addr, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let mut search = sovra_tests::Clients::new(&ch, &key).search;
    let r = search.search(search_req("faces", vec![7.1, 1.0], 2)).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![7, 8]);
    node.stop().await.unwrap();
}
