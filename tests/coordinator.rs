//! The coordinator's fan-out (root and leaf), API keys and query scope (R3),
//! residency on the wire (R2) and scroll, on real in-process clusters.

use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_proto::raft as rpb;
use sovra_proto::v1;
use sovra_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::Code;

const UK: &str = "uk";
const US: &str = "us";
const DIM: usize = 4;

fn two_regions() -> Vec<(u64, &'static str)> {
    vec![(1, UK), (2, UK), (3, UK), (4, US), (5, US), (6, US)]
}

fn spanning(name: &str, regions: &[&str], shards: u32, rf: u32) -> v1::CollectionSpec {
    sovra_node::dev::spanning_spec(name, DIM as u32, v1::Metric::L2, regions, shards, rf)
}

async fn create(n: &mut TestNode, spec: v1::CollectionSpec) -> v1::CollectionInfo {
    n.collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await
        .unwrap()
        .into_inner()
}

/// Seeded points of `region` with ids `ids`.
fn points(region: &str, ids: std::ops::Range<u64>, seed: u64) -> Vec<v1::Point> {
    let mut rng = StdRng::seed_from_u64(seed);
    ids.map(|i| point(i, (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect(), region))
        .collect()
}

async fn upsert(n: &mut TestNode, collection: &str, pts: Vec<v1::Point>) {
    for batch in pts.chunks(200) {
        n.points
            .upsert(v1::UpsertRequest {
                collection: collection.into(),
                points: batch.to_vec(),
            })
            .await
            .unwrap();
    }
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The exact top-k of `pts` for `q`, ties by (region, id), as the cluster orders them.
fn exact_top(pts: &[v1::Point], q: &[f32], k: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(f32, String, u64)> = pts
        .iter()
        .map(|p| {
            let id = match p.id.as_ref().unwrap().kind {
                Some(v1::point_id::Kind::Num(n)) => n,
                _ => unreachable!(),
            };
            (l2(&p.vector, q), p.region.clone(), id)
        })
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    all.into_iter().take(k).map(|(_, r, i)| (r, i)).collect()
}

fn hits_of(r: &v1::SearchResponse) -> Vec<(String, u64)> {
    let ids = ids_of(r);
    r.hits
        .iter()
        .zip(ids)
        .map(|(h, i)| (h.point.as_ref().unwrap().region.clone(), i))
        .collect()
}

fn search_req(collection: &str, q: &[f32], k: u32) -> v1::SearchRequest {
    v1::SearchRequest {
        collection: collection.into(),
        vector: q.to_vec(),
        k,
        ..Default::default()
    }
}

fn scopes(read: &[&str], write: &[&str]) -> v1::KeyScopes {
    v1::KeyScopes {
        read_regions: read.iter().map(|s| s.to_string()).collect(),
        write_regions: write.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_regions_every_nodes_store_holds_only_its_regions_points() {
    let mut nodes = TestNode::start_cluster(&two_regions()).await;
    create(&mut nodes[0], spanning("people", &[UK, US], 2, 3)).await;
    upsert(&mut nodes[0], "people", points(UK, 0..300, 1)).await;
    upsert(&mut nodes[3], "people", points(US, 1000..1300, 2)).await;
    for n in &nodes {
        let s = &n.node().state;
        let region = s.region.clone();
        // Every replica converges to the 300 points of its region's shards.
        eventually("replicas applied every write", Duration::from_secs(30), async || {
            let total: usize = s.engines().iter().map(|e| e.store().points().count()).sum();
            (total == 300).then_some(())
        })
        .await;
        for e in s.engines() {
            assert_eq!(e.id().region, region, "node {} holds a replica of {}", s.config.node_id, e.id());
            for p in e.store().points() {
                assert_eq!(p.unwrap().region, region, "node {} stores another region's point", s.config.node_id);
            }
        }
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_us_only_key_never_receives_a_uk_point_and_uk_nodes_serve_no_leaf_request_for_it() {
    let mut nodes = TestNode::start_cluster(&two_regions()).await;
    // us and uk results may go to either region's coordinators: only the key limits.
    for (region, to) in [(UK, US), (US, UK)] {
        nodes[0]
            .admin
            .set_region_policy(v1::SetRegionPolicyRequest {
                policy: Some(v1::RegionPolicy {
                    region: region.into(),
                    results_may_go_to: vec![to.into()],
                }),
            })
            .await
            .unwrap();
    }
    create(&mut nodes[0], spanning("people", &[UK, US], 2, 3)).await;
    // The same vectors in both regions: a uk point is always as near as a us one.
    let uk = points(UK, 0..200, 7);
    let us = points(US, 0..200, 7);
    upsert(&mut nodes[0], "people", uk.clone()).await;
    upsert(&mut nodes[3], "people", us.clone()).await;
    let key = nodes[0].make_key("us-only", scopes(&[US], &[US])).await;
    let served = |nodes: &[TestNode]| -> Vec<u64> {
        nodes[..3]
            .iter()
            .map(|n| n.node().state.root().leaf.stats.served.load(Ordering::Relaxed))
            .collect()
    };
    let before = served(&nodes);
    for coordinator in [0usize, 1, 3, 5] {
        let mut c = nodes[coordinator].clients(&key);
        for q in uk.iter().take(10) {
            let r = c
                .search
                .search(v1::SearchRequest {
                    with_payload: true,
                    with_vector: true,
                    ..search_req("people", &q.vector, 10)
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.hits.len(), 10);
            assert!(r.hits.iter().all(|h| h.point.as_ref().unwrap().region == US), "{:?}", r.hits);
            assert!(r.shards.iter().all(|s| s.region == US));
            assert_eq!(r.excluded.len(), 1);
            assert!(r.excluded[0].region == UK && r.excluded[0].reason.contains("may not read"));
        }
        // Named explicitly, uk is refused outright; gets and scrolls of uk too.
        let st = c
            .search
            .search(v1::SearchRequest {
                regions: vec![UK.into()],
                ..search_req("people", &uk[0].vector, 1)
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
        let st = c
            .points
            .get(v1::GetPointsRequest {
                collection: "people".into(),
                region: UK.into(),
                ids: vec![num(1)],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied);
        let st = c
            .points
            .upsert(v1::UpsertRequest {
                collection: "people".into(),
                points: points(UK, 5000..5001, 1),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    }
    assert_eq!(served(&nodes), before, "a uk node served a leaf request for a us-only key");
    // The denials are counted.
    let body = reqwest_metrics(&nodes[0]).await;
    assert!(
        body.contains("sovra_auth_denied_total{node=\"1\",reason=\"read_region\"}"),
        "{body}"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// The node's /metrics text.
async fn reqwest_metrics(n: &TestNode) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(n.node().metrics_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rf_1_a_search_from_any_node_returns_the_full_top_k_equal_to_the_global_exact_top_k() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create(&mut nodes[0], spanning("people", &[UK], 6, 1)).await;
    let pts = points(UK, 0..900, 3);
    upsert(&mut nodes[0], "people", pts.clone()).await;
    let queries = points(UK, 0..20, 99);
    for n in nodes.iter_mut() {
        for q in &queries {
            let want = exact_top(&pts, &q.vector, 10);
            // Exact per-shard search merged: the global exact top-k.
            let r = n
                .search
                .search(v1::SearchRequest {
                    exact: true,
                    ..search_req("people", &q.vector, 10)
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(hits_of(&r), want);
            assert_eq!(r.shards.len(), 6);
            assert!(r.shards.iter().all(|s| s.answered && s.node != 0 && s.leaf_us > 0));
            // The coordinator's own time covers every leaf's.
            let slowest = r.shards.iter().map(|s| s.leaf_us).max().unwrap();
            assert!(r.took_us >= slowest, "took {} us, slowest leaf {slowest} us", r.took_us);
            // And through the graphs: the full k from every shard, never partial.
            let r = n.search.search(search_req("people", &q.vector, 10)).await.unwrap().into_inner();
            assert_eq!(r.hits.len(), 10);
            assert!(!r.partial);
        }
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_replicas_of_a_shard_down_is_unavailable_naming_it_and_allow_partial_answers_the_rest_correctly() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    let info = create(&mut nodes[0], spanning("people", &[UK], 3, 1)).await;
    let pts = points(UK, 0..300, 4);
    upsert(&mut nodes[0], "people", pts.clone()).await;
    // The shard whose one replica is on node 3.
    let gone = info.shards.iter().find(|s| s.replicas == vec![3]).unwrap().number;
    nodes.pop().unwrap().stop().await;
    let q = &points(UK, 0..1, 42)[0].vector;
    let st = nodes[0].search.search(search_req("people", q, 10)).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains(&format!("people/uk/{gone}")), "{}", st.message());
    let r = nodes[0]
        .search
        .search(v1::SearchRequest {
            allow_partial: true,
            exact: true,
            ..search_req("people", q, 10)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.partial);
    let missing: Vec<&v1::ShardStatus> = r.shards.iter().filter(|s| !s.answered).collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].shard, gone);
    // The answer is the exact top-k of the points the other shards hold.
    let held: BTreeSet<u32> = r.shards.iter().filter(|s| s.answered).map(|s| s.shard).collect();
    let map = sovra_types::RegionShardMap::even(3);
    let alive: Vec<v1::Point> = pts
        .iter()
        .filter(|p| {
            let Some(v1::point_id::Kind::Num(n)) = p.id.as_ref().unwrap().kind else {
                unreachable!()
            };
            held.contains(&map.shard_for(&sovra_types::PointId::Num(n)))
        })
        .cloned()
        .collect();
    assert_eq!(hits_of(&r), exact_top(&alive, q, 10));
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_replica_is_hedged_and_the_answer_arrives_within_the_deadline() {
    let faults = sovra_raft::Faults::seeded(11);
    let mut nodes = TestNode::start_cluster_faults(
        &[(1, UK), (2, UK), (3, UK), (4, UK)],
        |c| {
            c.hedge_after_ms = 50;
            c.leaf_timeout_ms = 2_000;
        },
        faults.clone(),
    )
    .await;
    // Meta places the two replicas of the one shard on the least loaded nodes.
    let info = create(&mut nodes[0], spanning("people", &[UK], 1, 2)).await;
    let replicas = info.shards[0].replicas.clone();
    let coordinator = (1..=4u64).find(|n| !replicas.contains(n)).unwrap();
    let c = (coordinator - 1) as usize;
    let pts = points(UK, 0..100, 5);
    upsert(&mut nodes[c], "people", pts.clone()).await;
    let q = &pts[0].vector;
    // Warm up, then make the replica asked first (the lower id) answer later
    // than the shard's deadline: only a hedged request can answer in time.
    nodes[c].search.search(search_req("people", q, 5)).await.unwrap();
    let (slow, fast) = (replicas[0], replicas[1]);
    faults.add(sovra_raft::Rule::Delay {
        from: Some(coordinator),
        to: Some(slow),
        by: Duration::from_secs(5),
    });
    let hedges = nodes[c].node().state.root().stats.hedges.load(Ordering::Relaxed);
    let r = nodes[c].search.search(search_req("people", q, 5)).await.unwrap().into_inner();
    assert_eq!(r.shards.len(), 1);
    assert!(r.shards[0].answered && r.shards[0].hedged, "{:?}", r.shards);
    assert_eq!(r.shards[0].node, fast);
    assert_eq!(hits_of(&r), exact_top(&pts, q, 5));
    assert!(nodes[c].node().state.root().stats.hedges.load(Ordering::Relaxed) > hedges);
    faults.heal();
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_on_every_node_also_one_cut_off_from_meta_within_its_lease() {
    let faults = sovra_raft::Faults::seeded(3);
    let mut nodes = TestNode::start_cluster_faults(&[(1, UK), (2, UK), (3, US)], |c| c.key_lease_ms = 2_000, faults.clone()).await;
    create(&mut nodes[0], spanning("people", &[UK, US], 1, 1)).await;
    let key = nodes[0].make_key("reader", scopes(&["*"], &[])).await;
    let list = |n: &TestNode| {
        let mut c = n.clients(&key).collections;
        async move { c.list_collections(v1::ListCollectionsRequest {}).await }
    };
    for n in &nodes {
        eventually("every node takes the new key", Duration::from_secs(10), async || list(n).await.ok()).await;
    }
    // A key without admin scope may not manage keys; no key at all is unauthenticated.
    let st = nodes[0].clients(&key).admin.list_keys(v1::ListKeysRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = nodes[0]
        .clients("")
        .collections
        .list_collections(v1::ListCollectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    let listed = nodes[0].admin.list_keys(v1::ListKeysRequest {}).await.unwrap().into_inner();
    assert!(listed.keys.iter().any(|k| k.id == "reader"));
    assert!(
        !format!("{listed:?}").contains(key.split('_').next_back().unwrap()),
        "a secret was listed"
    );

    // Node 3 is cut off from meta; the key is revoked on the other side.
    faults.partition([3], [1, 2]);
    nodes[0]
        .admin
        .revoke_key(v1::RevokeKeyRequest { id: "reader".into() })
        .await
        .unwrap();
    // At once on the node that revoked it; within the lease on the other.
    let st = list(&nodes[0]).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let st = eventually("node 2 refuses the revoked key", Duration::from_secs(5), async || {
        list(&nodes[1]).await.err()
    })
    .await;
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    // The cut-off node cannot learn of the revocation: within its lease it
    // refuses every key (fail closed).
    let st = eventually("node 3 refuses the revoked key", Duration::from_secs(10), async || {
        list(&nodes[2]).await.err()
    })
    .await;
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("key lease"), "{}", st.message());
    faults.heal();
    // Back in touch, it knows the key is gone.
    let st = eventually("node 3 knows the key is revoked", Duration::from_secs(30), async || {
        list(&nodes[2]).await.err().filter(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    assert!(st.message().contains("not valid"), "{}", st.message());
    // The only admin key cannot be revoked.
    let st = nodes[0]
        .admin
        .revoke_key(v1::RevokeKeyRequest { id: "admin1".into() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scroll_returns_every_point_exactly_once_across_pages_also_while_points_are_written() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create(&mut nodes[0], spanning("people", &[UK], 3, 2)).await;
    let pts = points(UK, 0..500, 6);
    upsert(&mut nodes[0], "people", pts.clone()).await;
    // A writer adds new points and rewrites old ones while node 2 scrolls.
    let mut writer = nodes[0].points.clone();
    let write = tokio::spawn(async move {
        for round in 0..20u64 {
            let mut batch = points(UK, 10_000 + round * 10..10_000 + round * 10 + 10, round);
            batch.extend(points(UK, round * 20..round * 20 + 10, 100 + round));
            writer
                .upsert(v1::UpsertRequest {
                    collection: "people".into(),
                    points: batch,
                })
                .await
                .unwrap();
        }
    });
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let r = nodes[1]
            .points
            .scroll(v1::ScrollRequest {
                collection: "people".into(),
                region: UK.into(),
                limit: 37,
                cursor: cursor.clone(),
                with_payload: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.points.len() <= 37);
        pages += 1;
        for p in &r.points {
            let Some(v1::point_id::Kind::Num(n)) = p.id.as_ref().unwrap().kind else {
                unreachable!()
            };
            *seen.entry(n).or_default() += 1;
        }
        if r.next_cursor.is_empty() {
            break;
        }
        cursor = r.next_cursor;
        assert!(pages < 1000, "scroll did not end");
    }
    write.await.unwrap();
    assert!(seen.values().all(|c| *c == 1), "a point came twice");
    for i in 0..500 {
        assert!(seen.contains_key(&i), "point {i} was never returned");
    }
    assert!(pages >= 14);
    // With a filter and a bad cursor.
    let st = nodes[1]
        .points
        .scroll(v1::ScrollRequest {
            collection: "people".into(),
            region: UK.into(),
            cursor: "s1.us.0.".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("cursor"), "{}", st.message());
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_request_for_another_regions_shard_is_refused_and_counted() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, US)]).await;
    create(&mut nodes[0], spanning("people", &[UK, US], 1, 1)).await;
    let secret = sovra_raft::ClusterSecret::new(CLUSTER_SECRET).unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", nodes[1].cluster_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut leaf = rpb::leaf_client::LeafClient::with_interceptor(ch, sovra_raft::auth::AttachSecret(secret));
    let us_host = &nodes[1].node().state.host;
    let before = us_host.residency_refused.load(Ordering::Relaxed);
    let query = sovra_coord::wire::Query::Get(sovra_coord::wire::GetQuery {
        ids: vec![sovra_types::PointId::Num(1)],
        with_vector: true,
        with_payload: true,
        now_ms: 0,
    });
    let st = leaf
        .shard_get(rpb::LeafRequest {
            shard: Some(rpb::GroupId {
                collection: "people".into(),
                region: UK.into(),
                shard: 0,
                kind: rpb::GroupKind::Shard as i32,
            }),
            from: 1,
            coordinator_region: UK.into(),
            map_version: 0,
            linearizable: false,
            min_index: 0,
            query: postcard::to_allocvec(&query).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("R2"), "{}", st.message());
    assert_eq!(us_host.residency_refused.load(Ordering::Relaxed), before + 1);
    for n in nodes {
        n.stop().await;
    }
}
