//! The meta group on the same Raft machinery as the shard groups: bootstrapped
//! by one node, grown by adding learners then voters, refusing off-region
//! placements in its state machine (R1), serving with a minority down, and
//! catching a lagging replica up by snapshot.

use crate::harness::*;
use sovra_meta::state::CollectionRecord;
use sovra_meta::{Applied, MetaCommand, MetaState, NodeRecord, NodeStatus, Refused, Roles};
use sovra_types::RegionId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

fn node(id: u64, region: &str) -> NodeRecord {
    NodeRecord {
        id,
        region: RegionId::parse(region).unwrap(),
        zone: format!("z{id}"),
        roles: Roles::default(),
        cluster_addr: format!("10.0.0.{id}:7400"),
        public_addr: format!("10.0.0.{id}:7300"),
        status: NodeStatus::Up,
        last_heartbeat_ms: 1,
        incarnation: 1,
    }
}

fn state_of(c: &Cluster, id: u64) -> MetaState {
    c.node(id).host.meta().unwrap().sm.state()
}

/// Three nodes: node 1 bootstraps alone, then makes 2 and 3 voters.
async fn grown(settings: sovra_raft::RaftSettings) -> Cluster {
    let c = Cluster::bare(3, settings, 11).await;
    c.open_meta(1, Some(BTreeSet::from([1]))).await;
    c.open_meta(2, None).await;
    c.open_meta(3, None).await;
    eventually(
        "the bootstrap node leads its one-voter group",
        Duration::from_secs(10),
        async || (c.node(1).host.meta().unwrap().leader() == Some(1)).then_some(()),
    )
    .await;
    let all = BTreeSet::from([1, 2, 3]);
    let changed = c.node(1).host.meta_set_members(all.clone(), BTreeSet::new()).await.unwrap();
    assert!(changed);
    eventually("every replica sees three voters", Duration::from_secs(10), async || {
        c.live()
            .all(|n| n.host.meta_members().is_some_and(|(v, l)| v == all && l.is_empty()))
            .then_some(())
    })
    .await;
    assert!(
        !c.node(1).host.meta_set_members(all, BTreeSet::new()).await.unwrap(),
        "already so: no change"
    );
    c
}

async fn converged(c: &Cluster) -> MetaState {
    eventually("identical meta state on every live replica", Duration::from_secs(10), async || {
        let states: Vec<MetaState> = c.live().map(|n| state_of(c, n.id)).collect();
        states.windows(2).all(|w| w[0] == w[1]).then(|| states[0].clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_group_refuses_an_off_region_placement_itself_and_serves_with_a_minority_down() {
    let mut c = grown(fast_settings()).await;
    // Registered through a follower: forwarded to the leader.
    for (id, region) in [(1, "eu-west"), (2, "eu-west"), (3, "us-east")] {
        let (_, r) = c
            .node(3)
            .host
            .meta_write(MetaCommand::RegisterNode(node(id, region)))
            .await
            .unwrap();
        assert_eq!(r, Ok(Applied::Done));
    }
    let mut spec = spec(4);
    spec.replication_factor = 1;
    // Submitted directly, as a buggy placement or a hostile operator might:
    // an eu-west shard with its replica on the us-east node.
    let off = MetaCommand::CreateCollection {
        spec: spec.clone(),
        replicas: BTreeMap::from([((region(), 0), vec![3])]),
    };
    let before = converged(&c).await;
    let (_, r) = c.node(2).host.meta_write(off).await.unwrap();
    match r {
        Err(Refused::OffRegion { node, .. }) => assert_eq!(node, 3),
        other => panic!("an off-region replica must be refused, got {other:?}"),
    }
    assert_eq!(converged(&c).await, before, "a refused command changes nothing on any replica");

    let ok = MetaCommand::CreateCollection {
        spec: spec.clone(),
        replicas: BTreeMap::from([((region(), 0), vec![2])]),
    };
    let (_, r) = c.node(1).host.meta_write(ok).await.unwrap();
    assert!(matches!(r, Ok(Applied::MapVersion(_))), "{r:?}");
    let s = converged(&c).await;
    let rec: &CollectionRecord = &s.collections[&spec.name];
    assert_eq!(rec.shards[&(region(), 0)].replicas, vec![2]);

    // One voter down (a minority): the other two still commit.
    let leader = c.meta_leader().await;
    let victim = if leader == 3 { 2 } else { 3 };
    c.kill(victim).await;
    for at in 2..6u64 {
        let via = c.live().map(|n| n.id).next().unwrap();
        let (_, r) = c
            .node(via)
            .host
            .meta_write(MetaCommand::Heartbeat { node: 1, at_ms: at })
            .await
            .unwrap();
        assert_eq!(r, Ok(Applied::Done));
    }
    let s = converged(&c).await;
    assert_eq!(s.nodes[&1].last_heartbeat_ms, 5);
    // Linearizable reads of the metadata keep working on both survivors.
    for n in c.live() {
        let g = n.host.meta_barrier().await.unwrap();
        assert_eq!(g.sm.state().nodes[&1].last_heartbeat_ms, 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_group_writes_wait_for_a_quorum_and_a_lagging_replica_catches_up_by_snapshot() {
    let mut settings = fast_settings();
    settings.snapshot_after_logs = 5;
    settings.keep_logs = 0;
    settings.write_timeout = Duration::from_millis(1500);
    let c = grown(settings).await;
    let (_, r) = c
        .node(1)
        .host
        .meta_write(MetaCommand::RegisterNode(node(1, "eu-west")))
        .await
        .unwrap();
    assert_eq!(r, Ok(Applied::Done));
    let leader = c.meta_leader().await;
    // The leader alone (cut off from both followers, as a region cut off from
    // the others would be): metadata changes wait for a quorum and fail
    // UNAVAILABLE at the deadline, naming the leader they tried.
    c.faults.isolate(leader);
    let e = c
        .node(leader)
        .host
        .meta_write(MetaCommand::Heartbeat { node: 1, at_ms: 99 })
        .await
        .unwrap_err();
    assert_eq!(e.code, sovra_types::ErrorCode::Unavailable, "{e:?}");
    c.faults.heal();
    let leader = c.meta_leader().await;
    let lagging = c.live().map(|n| n.id).find(|&n| n != leader).unwrap();
    c.faults.isolate(lagging);
    for at in 100..130u64 {
        let (_, r) = c
            .node(leader)
            .host
            .meta_write(MetaCommand::Heartbeat { node: 1, at_ms: at })
            .await
            .unwrap();
        assert_eq!(r, Ok(Applied::Done));
    }
    let snap = c.node(leader).host.meta().unwrap().sm.dir().join("current.snap");
    eventually("a meta snapshot on the leader", Duration::from_secs(10), async || {
        snap.exists().then_some(())
    })
    .await;
    c.faults.heal();
    let s = converged(&c).await;
    assert_eq!(s.nodes[&1].last_heartbeat_ms, 129);
    let lag_snap = c.node(lagging).host.meta().unwrap().sm.dir().join("current.snap");
    assert!(lag_snap.exists(), "the lagging replica was caught up by a snapshot");
}
