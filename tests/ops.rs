//! Operations on a real in-process cluster: a replica move under write and
//! search load loses no acknowledged write, keeps searches answering, and
//! leaves the source without a copy; a move to another region is refused by
//! meta (R1); a cancelled move leaves the shard map and the group's members
//! as they were.

use sovra_proto::v1;
use sovra_tests::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::Code;

const UK: &str = "uk";
const US: &str = "us";

fn vector(i: u64) -> Vec<f32> {
    vec![(i % 11) as f32, (i / 11 % 7) as f32, 1.0, (i % 3) as f32]
}

async fn job_state(n: &TestNode, job: &str) -> Option<v1::OpJob> {
    let mut a = n.admin.clone();
    a.list_jobs(v1::ListJobsRequest {})
        .await
        .ok()?
        .into_inner()
        .jobs
        .into_iter()
        .find(|j| j.job == job)
}

async fn shard_replicas(n: &TestNode) -> BTreeSet<u64> {
    let mut c = n.collections.clone();
    let info = c
        .get_collection(v1::GetCollectionRequest {
            name: "people".into(),
            with_digest: false,
        })
        .await
        .unwrap()
        .into_inner();
    info.shards[0].replicas.iter().copied().collect()
}

/// The Raft voters of the shard as its leader knows them.
fn group_members(nodes: &[TestNode]) -> Option<BTreeSet<u64>> {
    for n in nodes {
        for g in n.node().state.host.groups() {
            if g.leader() == Some(n.node().state.config.node_id) {
                let raft = g.raft();
                let m = raft.metrics();
                let m = m.borrow();
                return Some(m.membership_config.membership().nodes().map(|(id, _)| *id).collect());
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_move_under_load_loses_no_acknowledged_write_and_stays_in_its_region() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, US)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 1, 2)),
    })
    .await
    .unwrap();
    let before = shard_replicas(&nodes[0]).await;
    let from = *before.iter().next().unwrap();
    let to = (1..=3).find(|n| !before.contains(n)).unwrap();

    // R1: a node of another region is refused, naming the rule.
    let mut admin = nodes[0].admin.clone();
    let e = admin
        .move_replica(v1::MoveReplicaRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            from,
            to: 4,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("R1"), "{}", e.message());

    // Load: a writer and a searcher, each bounded, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(nodes[2].points.clone(), stop.clone());
    let searcher = {
        let mut s = nodes[1].search.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                match s
                    .search(v1::SearchRequest {
                        collection: "people".into(),
                        vector: vector(i),
                        k: 5,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.message().to_string()),
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    let job = admin
        .move_replica(v1::MoveReplicaRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            from,
            to,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, "running");
    let done = eventually("the move is done", Duration::from_secs(90), async || {
        job_state(&nodes[0], &job.job).await.filter(|j| j.state != "running")
    })
    .await;
    assert_eq!(done.state, "done", "{done:?}");
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    let (searched, failed) = searcher.await.unwrap();
    assert!(!acked.is_empty() && searched > 0);
    assert!(failed.is_empty(), "searches failed during the move: {failed:?}");

    let mut want = before.clone();
    want.remove(&from);
    want.insert(to);
    assert_eq!(shard_replicas(&nodes[0]).await, want);
    eventually("the group's members follow the shard map", Duration::from_secs(30), async || {
        (group_members(&nodes) == Some(want.clone())).then_some(())
    })
    .await;
    // Every acknowledged write is there, read through the group.
    all_there(&nodes[0], &acked).await;
    // The source destroys its copy; the target holds one.
    let fi = (from - 1) as usize;
    eventually("the source destroyed its replica", Duration::from_secs(30), async || {
        nodes[fi].node().state.engines().is_empty().then_some(())
    })
    .await;
    assert_eq!(nodes[(to - 1) as usize].node().state.engines().len(), 1);
    // `sovra ctl jobs` lists it, done.
    let table = sovra_node::ctl_ops::jobs(
        &sovra_node::ctl::Conn::to(
            nodes[3].node().grpc_addr.to_string(),
            nodes[0].key.clone(),
            sovra_node::ctl::Format::Table,
        ),
        None,
        None,
    )
    .await
    .unwrap();
    let row = table.lines().find(|l| l.starts_with(&job.job)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" done ") && row.contains("people/uk/0"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_move_leaves_the_shard_map_and_the_group_as_they_were_or_as_after() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 1, 2)),
    })
    .await
    .unwrap();
    let mut p = nodes[0].points.clone();
    p.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: (0..200).map(|i| point(i, vector(i), UK)).collect(),
    })
    .await
    .unwrap();
    let before = shard_replicas(&nodes[0]).await;
    let from = *before.iter().next().unwrap();
    let to = (1..=3).find(|n| !before.contains(n)).unwrap();
    let mut admin = nodes[0].admin.clone();
    let job = admin
        .move_replica(v1::MoveReplicaRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            from,
            to,
        })
        .await
        .unwrap()
        .into_inner();
    // A second job on the same shard is refused while it runs (or, if the
    // first already finished, the source no longer holds the replica).
    let e = admin
        .move_replica(v1::MoveReplicaRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            from,
            to,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let cancelled = admin.cancel_job(v1::CancelJobRequest { job: job.job.clone() }).await;
    let settled: BTreeSet<u64> = match cancelled {
        Ok(j) => {
            assert_eq!(j.into_inner().state, "cancelled");
            eprintln!("the cancel came first: the shard map and group stay as before");
            before.clone()
        }
        // The move won the race: it is done, and the map shows it.
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("done"), "{}", e.message());
            eprintln!("the move finished first: the cancel is refused and the map shows the move");
            let mut after = before.clone();
            after.remove(&from);
            after.insert(to);
            after
        }
    };
    assert_eq!(shard_replicas(&nodes[0]).await, settled);
    eventually("the group's members follow the shard map", Duration::from_secs(60), async || {
        (group_members(&nodes) == Some(settled.clone())).then_some(())
    })
    .await;
    // Nothing was lost either way.
    let got = p
        .get(v1::GetPointsRequest {
            collection: "people".into(),
            region: UK.into(),
            ids: (0..200).map(num).collect(),
            consistency: v1::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.points.len(), 200);
    // The node outside the map holds no copy.
    let outside = (1..=3u64).find(|n| !settled.contains(n)).unwrap();
    eventually("the node outside the map holds no replica", Duration::from_secs(30), async || {
        nodes[(outside - 1) as usize].node().state.engines().is_empty().then_some(())
    })
    .await;
}

/// Replicas per node and each node's state, as `ClusterStatus` reports them.
async fn loads(n: &TestNode) -> (std::collections::BTreeMap<u64, u32>, std::collections::BTreeMap<u64, String>, u64) {
    let mut a = n.admin.clone();
    let r = a.cluster_status(v1::ClusterStatusRequest {}).await.unwrap().into_inner();
    (
        r.nodes.iter().map(|x| (x.id, x.replicas)).collect(),
        r.nodes.iter().map(|x| (x.id, x.state.clone())).collect(),
        r.meta_leader,
    )
}

/// Every id in `acked` reads back through `n` at linearizable. A group whose
/// leader was the replica moved away has no leader for up to an election
/// timeout (openraft 0.9 has no leadership transfer): such a read fails
/// UNAVAILABLE ("retry") and is retried within a deadline; a read that
/// answers must hold every id.
async fn all_there(n: &TestNode, acked: &[u64]) {
    let p = n.points.clone();
    for chunk in acked.chunks(500) {
        let got = eventually("a linearizable read answers", Duration::from_secs(20), async || {
            let req = v1::GetPointsRequest {
                collection: "people".into(),
                region: UK.into(),
                ids: chunk.iter().map(|&i| num(i)).collect(),
                consistency: v1::Consistency::Linearizable as i32,
                ..Default::default()
            };
            match p.clone().get(req).await {
                Ok(r) => Some(r.into_inner()),
                Err(e) if e.code() == Code::Unavailable => None,
                Err(e) => panic!("{e:?}"),
            }
        })
        .await;
        assert_eq!(got.points.len(), chunk.len(), "acknowledged writes were lost");
    }
}

/// A bounded writer through `p` until `stop`; the ids it had acknowledged.
fn write_load(
    mut p: sovra_proto::v1::points_client::PointsClient<sovra_node::dev::Keyed>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) && i < 3000 {
            let batch: Vec<v1::Point> = (i..i + 10).map(|j| point(j, vector(j), UK)).collect();
            let req = v1::UpsertRequest {
                collection: "people".into(),
                points: batch,
            };
            if p.upsert(req).await.is_ok() {
                acked.extend(i..i + 10);
            }
            i += 10;
        }
        acked
    })
}

fn conn(n: &TestNode) -> sovra_node::ctl::Conn {
    sovra_node::ctl::Conn::to(n.node().grpc_addr.to_string(), n.key.clone(), sovra_node::ctl::Format::Table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_under_load_empties_the_node_inside_its_region_and_one_that_would_leave_a_shard_short_is_refused() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, UK), (5, US)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 2, 3)),
    })
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(nodes[2].points.clone(), stop.clone());
    // Drain the node holding the most replicas, followed to the end by
    // `sovra ctl drain --wait` (exit 1 unless done).
    let (before, _, _) = loads(&nodes[0]).await;
    let drained = *before
        .iter()
        .filter(|(id, _)| **id <= 4)
        .max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id)))
        .unwrap()
        .0;
    assert!(before[&drained] > 0);
    let table = sovra_node::ctl_ops::drain(&conn(&nodes[1]), drained, 0, true).await.unwrap();
    assert!(table.contains(" done "), "{table}");
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty());

    let (after, states, _) = loads(&nodes[0]).await;
    assert_eq!(after[&drained], 0, "{after:?}");
    assert_eq!(states[&drained], "drained");
    // R1: the us node got nothing; every shard still has its three replicas.
    assert_eq!(after[&5], 0);
    assert_eq!(after.values().sum::<u32>(), before.values().sum::<u32>());
    let di = (drained - 1) as usize;
    eventually("the drained node destroyed its replicas", Duration::from_secs(60), async || {
        nodes[di].node().state.engines().is_empty().then_some(())
    })
    .await;
    all_there(&nodes[0], &acked).await;
    // Three up nodes for rf 3: draining another would leave shards short.
    let other = (1..=4).find(|n| *n != drained).unwrap();
    let e = nodes[0]
        .admin
        .clone()
        .drain_node(v1::DrainNodeRequest {
            node: other,
            concurrency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("add a node to uk") && e.message().contains("people/uk/"),
        "{}",
        e.message()
    );
    // Undrained, the node is up again and takes replicas from a rebalance.
    sovra_node::ctl_ops::undrain(&conn(&nodes[0]), drained).await.unwrap();
    let (_, states, _) = loads(&nodes[0]).await;
    assert_eq!(states[&drained], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_adding_a_node_a_rebalance_leaves_every_node_of_the_region_within_one_replica_of_the_mean() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 4, 2)),
    })
    .await
    .unwrap();
    let mut p = nodes[0].points.clone();
    p.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: (0..400).map(|i| point(i, vector(i), UK)).collect(),
    })
    .await
    .unwrap();
    let seeds = vec![nodes[0].cluster_addr()];
    let key = nodes[0].key.clone();
    nodes.push(TestNode::join(4, UK, seeds, &key).await);
    eventually("node 4 is up in meta", Duration::from_secs(30), async || {
        (loads(&nodes[0]).await.1.get(&4).map(String::as_str) == Some("up")).then_some(())
    })
    .await;
    // The dry run shows the plan and moves nothing.
    let dry = sovra_node::ctl_ops::rebalance(&conn(&nodes[1]), UK, 0, true, false).await.unwrap();
    assert!(dry.contains("dry run") && dry.contains("people/uk/"), "{dry}");
    assert_eq!(loads(&nodes[0]).await.0[&4], 0);
    let out = sovra_node::ctl_ops::rebalance(&conn(&nodes[1]), UK, 2, false, true).await.unwrap();
    assert!(out.contains(" done "), "{out}");
    let (after, _, _) = loads(&nodes[0]).await;
    let total: u32 = after.values().sum();
    assert_eq!(total, 8);
    for (n, l) in &after {
        assert!(l.abs_diff(2) <= 1, "node {n} holds {l} of 8 replicas over 4 nodes: {after:?}");
    }
    eventually("node 4 opened what it was given", Duration::from_secs(60), async || {
        (nodes[3].node().state.engines().len() as u32 == after[&4]).then_some(())
    })
    .await;
    all_there(&nodes[0], &(0..400).collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_survives_its_meta_leader_stopping_mid_drain_and_finishes() {
    let mut nodes: Vec<Option<TestNode>> = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, UK)])
        .await
        .into_iter()
        .map(Some)
        .collect();
    let n0 = |nodes: &[Option<TestNode>]| nodes.iter().flatten().next().unwrap().admin.clone();
    let mut c = nodes[0].as_ref().unwrap().collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 3, 3)),
    })
    .await
    .unwrap();
    let mut p = nodes[0].as_ref().unwrap().points.clone();
    p.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: (0..300).map(|i| point(i, vector(i), UK)).collect(),
    })
    .await
    .unwrap();
    let (before, _, leader) = loads(nodes[0].as_ref().unwrap()).await;
    // Drain a node that is not the meta leader, one move at a time.
    let drained = *before
        .iter()
        .filter(|(id, l)| **id != leader && **l > 0)
        .map(|(id, _)| id)
        .next()
        .unwrap();
    let job = n0(&nodes)
        .drain_node(v1::DrainNodeRequest {
            node: drained,
            concurrency: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, "running");
    // The meta leader stops mid-drain (its first move under way) and comes
    // back on the same data; another node leads meta meanwhile.
    let li = (leader - 1) as usize;
    let restarted = nodes[li].take().unwrap().restart().await;
    nodes[li] = Some(restarted);
    let seen = nodes.iter().flatten().find(|n| n.node().state.config.node_id != leader).unwrap();
    let done = eventually("the drain finishes", Duration::from_secs(120), async || {
        job_state(seen, &job.job).await.filter(|j| j.state != "running")
    })
    .await;
    assert_eq!(done.state, "done", "{done:?}");
    let (after, states, now_leader) = loads(seen).await;
    assert_eq!(after[&drained], 0, "{after:?}");
    assert_eq!(states[&drained], "drained");
    assert_eq!(after.values().sum::<u32>(), 9);
    eprintln!("meta leader {leader} stopped mid-drain; the drain finished under leader {now_leader}");
    all_there(seen, &(0..300).collect::<Vec<_>>()).await;
}

/// A move's target catches up through the log: replaying it, its replica
/// passes through the group's older memberships, which do not name it. The
/// watchdog (which deletes a replica a membership change took out of its
/// group) must not take it for a departed one: run here on the target in a
/// tight loop for the whole move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moves_target_replaying_older_memberships_is_not_deleted_as_departed() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, UK)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 128, v1::Metric::L2, &[UK], 1, 3)),
    })
    .await
    .unwrap();
    // 20 entries of 500 128-d points: more than one AppendEntries carries.
    let mut p = nodes[0].points.clone();
    for b in 0..20u64 {
        let points = (b * 500..b * 500 + 500)
            .map(|i| point(i, (0..128).map(|d| ((i + d) % 97) as f32).collect(), UK))
            .collect();
        p.upsert(v1::UpsertRequest {
            collection: "people".into(),
            points,
        })
        .await
        .unwrap();
    }
    let before = shard_replicas(&nodes[0]).await;
    assert!(!before.contains(&4));
    let from = *before.iter().next().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (stop, host) = (stop.clone(), nodes[3].node().state.host.clone());
        tokio::spawn(async move {
            // Bounded: at most 100,000 passes, the move's end first.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                host.watchdog_pass().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let job = nodes[0]
        .admin
        .clone()
        .move_replica(v1::MoveReplicaRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            from,
            to: 4,
        })
        .await
        .unwrap()
        .into_inner();
    let done = eventually("the move ends", Duration::from_secs(120), async || {
        job_state(&nodes[0], &job.job).await.filter(|j| j.state != "running")
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watchdog.await.unwrap();
    assert_eq!(done.state, "done", "{done:?}");
    eventually("the target holds every point", Duration::from_secs(60), async || {
        let e = nodes[3].node().state.engines();
        (e.len() == 1 && e[0].stats().live_points == 10_000).then_some(())
    })
    .await;
}
