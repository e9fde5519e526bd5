//! Membership through the meta group, against real in-process nodes on port 0:
//! joining, recorded placement on the nodes meta knows, losing a minority of
//! meta voters, nodes marked down when silent, and the first admin key.

use sovra_meta::NodeStatus;
use sovra_proto::v1;
use sovra_tests::*;
use std::time::Duration;
use tonic::Code;

const EU: &str = "eu-west";

async fn create(n: &mut TestNode, name: &str, shards: u32, rf: u32) -> Result<v1::CollectionInfo, tonic::Status> {
    let mut s = spec(name, 4, v1::Metric::L2, EU);
    s.regions[0].shard_count = shards;
    s.replication_factor = rf;
    n.collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(s) })
        .await
        .map(|r| r.into_inner())
}

fn status_of(n: &TestNode, id: u64) -> Option<NodeStatus> {
    n.node().state.view().state.nodes.get(&id).map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_later_holds_replicas_of_a_new_collection() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU)]).await;
    let e = create(&mut nodes[0], "early", 1, 3).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("region eu-west has 2 node(s)") && e.message().contains("needs 3"),
        "{}",
        e.message()
    );
    let seeds = vec![nodes[1].cluster_addr()];
    let mut third = TestNode::join(3, EU, seeds, &nodes[0].key).await;
    eventually("node 1 sees node 3 up", Duration::from_secs(30), async || {
        (status_of(&nodes[0], 3) == Some(NodeStatus::Up)).then_some(())
    })
    .await;
    let info = create(&mut nodes[0], "faces", 2, 3).await.unwrap();
    for s in &info.shards {
        assert_eq!(s.replicas, vec![1, 2, 3], "every shard on the three nodes");
    }
    // The joined node opened its replicas (each in its own directory) and serves them.
    let dir = third.dir.path().join("replicas").join("faces").join(EU);
    eventually("node 3's replica directories", Duration::from_secs(10), async || {
        (std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 2).then_some(())
    })
    .await;
    third
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: (0..20).map(|i| point(i, vec![i as f32, 0.0, 0.0, 1.0], EU)).collect(),
        })
        .await
        .unwrap();
    let r = nodes[1]
        .search
        .search(v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![0.0, 0.0, 0.0, 1.0],
            k: 2,
            consistency: v1::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&r), vec![0, 1]);
    // Dropped through another node: node 3 deletes its replicas' directories.
    nodes[0]
        .collections
        .drop_collection(v1::DropCollectionRequest { name: "faces".into() })
        .await
        .unwrap();
    let gone = third.dir.path().join("replicas").join("faces");
    eventually("node 3 destroys its replicas", Duration::from_secs(10), async || {
        (!gone.exists()).then_some(())
    })
    .await;
    third.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_keeps_changing_with_a_minority_of_voters_down_and_silent_nodes_are_marked_down() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU), (3, EU)]).await;
    eventually("three meta voters", Duration::from_secs(30), async || {
        let (voters, _) = nodes[0].node().state.host.meta_members()?;
        (voters.len() == 3).then_some(())
    })
    .await;
    let third = nodes.pop().unwrap();
    third.stop().await;
    // Two of three voters: a collection is still created, seen by both.
    create(&mut nodes[1], "faces", 1, 2).await.unwrap();
    for n in nodes.iter_mut() {
        n.collections
            .get_collection(v1::GetCollectionRequest {
                name: "faces".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // The silent node is marked down, and placement no longer counts it.
    eventually("node 3 marked down", Duration::from_secs(30), async || {
        (status_of(&nodes[0], 3) == Some(NodeStatus::Down)).then_some(())
    })
    .await;
    let e = create(&mut nodes[0], "wide", 1, 3).await.unwrap_err();
    assert!(e.message().contains("has 2 node(s)"), "{}", e.message());
    let info = create(&mut nodes[0], "narrow", 4, 2).await.unwrap();
    assert!(info.shards.iter().all(|s| !s.replicas.contains(&3)), "{info:?}");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_node_makes_one_admin_key_and_meta_keeps_only_its_hash() {
    let nodes = TestNode::start_cluster(&[(1, EU), (2, EU)]).await;
    let key = eventually("the first admin key", Duration::from_secs(20), async || {
        nodes[0].node().state.first_admin_key.lock().clone()
    })
    .await;
    assert!(
        nodes[1].node().state.first_admin_key.lock().is_none(),
        "only the bootstrap node makes it"
    );
    let (id, secret) = sovra_meta::keys::parse_key(&key).unwrap();
    let keys = eventually("the key in node 2's view", Duration::from_secs(10), async || {
        let k = nodes[1].node().state.view().state.api_keys.clone();
        (!k.is_empty()).then_some(k)
    })
    .await;
    assert_eq!(keys.len(), 1);
    let rec = &keys[id];
    assert!(rec.matches(secret));
    assert_eq!(rec.scopes, sovra_meta::keys::Scopes::all());
    let stored = format!("{:?}", nodes[1].node().state.view().state);
    assert!(!stored.contains(secret), "the secret itself is never stored");
    // A restart of the bootstrap node makes no second key.
    let mut nodes = nodes;
    let second = nodes.pop().unwrap();
    let first = nodes.pop().unwrap().restart().await;
    eventually("node 1 registered again", Duration::from_secs(20), async || {
        let v = first.node().state.view();
        (v.state.nodes.get(&1)?.incarnation == first.node().state.incarnation).then_some(())
    })
    .await;
    assert!(first.node().state.first_admin_key.lock().is_none());
    assert_eq!(first.node().state.view().state.api_keys.len(), 1);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_off_serves_its_shards_within_the_key_lease_then_fails_closed_while_metadata_changes_wait_for_a_quorum() {
    const US: &str = "us-east";
    let faults = sovra_raft::Faults::seeded(5);
    let mut nodes = TestNode::start_cluster_faults(&[(1, EU), (2, EU), (3, US)], |c| c.key_lease_ms = 4_000, faults.clone()).await;
    eventually("three meta voters", Duration::from_secs(30), async || {
        let (voters, _) = nodes[0].node().state.host.meta_members()?;
        (voters.len() == 3).then_some(())
    })
    .await;
    let mut s = spec("faces", 4, v1::Metric::L2, EU);
    s.regions.push(v1::RegionShards {
        region: US.into(),
        shard_count: 1,
    });
    s.regions[0].shard_count = 1;
    s.replication_factor = 1;
    nodes[0]
        .collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(s) })
        .await
        .unwrap();
    // Once us-east holds its replica of the collection, it (one of three meta
    // voters) loses every link to eu-west.
    eventually(
        "node 3 holds its us-east replica and a fresh key lease",
        Duration::from_secs(30),
        async || {
            let s = &nodes[2].node().state;
            (!s.engines().is_empty() && s.lease_age_ms().is_some_and(|a| a < 500)).then_some(())
        },
    )
    .await;
    faults.partition([3], [1, 2]);
    // Within its key lease (4 s, renewed every second) the cut-off node
    // still takes keys: its region's shards take writes and answer.
    let us = &mut nodes[2];
    us.points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: (0..5).map(|i| point(i, vec![i as f32, 0.0, 0.0, 1.0], US)).collect(),
        })
        .await
        .expect("a cut-off region's shards take writes");
    let r = us
        .search
        .search(v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![0.0, 0.0, 0.0, 1.0],
            k: 2,
            regions: vec![US.into()],
            consistency: v1::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .expect("and answers searches")
        .into_inner();
    assert_eq!(ids_of(&r), vec![0, 1]);
    let e = create(us, "later", 1, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "metadata changes wait for a quorum: {e:?}");
    // Once the lease runs out without a quorum, it refuses every key (a key
    // revoked meanwhile could not be known here): fail closed.
    let st = eventually("node 3's key lease runs out", Duration::from_secs(15), async || {
        nodes[2]
            .search
            .search(v1::SearchRequest {
                collection: "faces".into(),
                vector: vec![0.0, 0.0, 0.0, 1.0],
                k: 1,
                regions: vec![US.into()],
                ..Default::default()
            })
            .await
            .err()
    })
    .await;
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("key lease"), "{}", st.message());
    // The side with the quorum changes metadata and serves its own region.
    create(&mut nodes[0], "eu-only", 1, 2).await.unwrap();
    nodes[1]
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: (10..15).map(|i| point(i, vec![i as f32, 0.0, 0.0, 1.0], EU)).collect(),
        })
        .await
        .unwrap();
    faults.heal();
    eventually(
        "node 3 takes keys again once it reaches meta",
        Duration::from_secs(30),
        async || {
            nodes[2]
                .search
                .search(v1::SearchRequest {
                    collection: "faces".into(),
                    vector: vec![0.0, 0.0, 0.0, 1.0],
                    k: 1,
                    regions: vec![US.into()],
                    ..Default::default()
                })
                .await
                .ok()
        },
    )
    .await;
    eventually(
        "us-east sees the change made while it was cut off",
        Duration::from_secs(30),
        async || {
            nodes[2]
                .node()
                .state
                .view()
                .state
                .collections
                .keys()
                .any(|c| c.as_str() == "eu-only")
                .then_some(())
        },
    )
    .await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_keeps_its_region_a_restart_claiming_another_is_refused_and_stops() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU)]).await;
    let second = nodes.pop().unwrap();
    let mut config = second.node().state.config.clone();
    let dir = second.stop().await;
    config.region = "us-east".into();
    config.join = vec![nodes[0].cluster_addr()];
    let node = sovra_node::start(config).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(30), node.fatal())
        .await
        .expect("the node stops on its own");
    assert!(why.contains("keeps its region") && why.contains("eu-west"), "{why}");
    node.stop().await.unwrap();
    let v = nodes[0].node().state.view();
    assert_eq!(v.state.nodes[&2].region.as_str(), EU, "meta still pins node 2 to eu-west");
    drop(dir);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_with_a_future_incarnation_or_the_receivers_own_id_are_refused_and_change_nothing() {
    use sovra_proto::raft as rpb;
    let nodes = TestNode::start_cluster(&[(1, EU), (2, EU)]).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", nodes[0].cluster_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let secret = sovra_raft::auth::AttachSecret(sovra_raft::ClusterSecret::new(CLUSTER_SECRET).unwrap());
    let mut client = rpb::raft_client::RaftClient::with_interceptor(ch, secret);
    let before = nodes[0].node().state.host.peers.book.get(2);
    let st = client
        .join(rpb::JoinRequest {
            from: 2,
            cluster_addr: "203.0.113.9:7400".into(),
            incarnation: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("ahead of this node's clock"), "{}", st.message());
    let st = client
        .join(rpb::JoinRequest {
            from: 1,
            cluster_addr: "203.0.113.9:7400".into(),
            incarnation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
    assert_eq!(
        nodes[0].node().state.host.peers.book.get(2),
        before,
        "node 2's address is unchanged"
    );
    for n in nodes {
        n.stop().await;
    }
}
