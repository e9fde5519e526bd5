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

/// Creates collection `people` in uk (`shards` shards of `rf` replicas)
/// through `n`; its collections client.
async fn create_people(n: &TestNode, dim: u32, shards: u32, rf: u32) -> v1::collections_client::CollectionsClient<sovra_node::dev::Keyed> {
    let mut c = n.collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", dim, v1::Metric::L2, &[UK], shards, rf)),
    })
    .await
    .unwrap();
    c
}

/// Points 0..100*batches (4-d, region uk) upserted through `p`, 100 at a time.
async fn preload(p: &mut sovra_proto::v1::points_client::PointsClient<sovra_node::dev::Keyed>, batches: u64) {
    for b in 0..batches {
        let points = (b * 100..b * 100 + 100).map(|j| point(j, vector(j), UK)).collect();
        p.upsert(v1::UpsertRequest {
            collection: "people".into(),
            points,
        })
        .await
        .unwrap();
    }
}

fn split_req(shard: u32) -> v1::SplitShardRequest {
    v1::SplitShardRequest {
        collection: "people".into(),
        region: UK.into(),
        shard,
    }
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

async fn people_info(n: &TestNode) -> v1::CollectionInfo {
    let mut c = n.collections.clone();
    c.get_collection(v1::GetCollectionRequest {
        name: "people".into(),
        with_digest: false,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn shard_replicas(n: &TestNode) -> BTreeSet<u64> {
    people_info(n).await.shards[0].replicas.iter().copied().collect()
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
    create_people(&nodes[0], 4, 1, 2).await;
    let before = shard_replicas(&nodes[0]).await;
    // A replica that does not lead the group moves. (Moving the leader
    // leaves the group leaderless for an election timeout: openraft 0.9
    // cannot hand the lead over, and a follower's election is refused while
    // the leader's lease holds; reads needing the leader and writes fail
    // UNAVAILABLE meanwhile, as the README says.)
    let leader = eventually("the shard has a leader", Duration::from_secs(10), async || {
        nodes.iter().flat_map(|n| n.node().state.host.groups()).find_map(|g| g.leader())
    })
    .await;
    let from = *before.iter().find(|&&n| n != leader).unwrap();
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
    create_people(&nodes[0], 4, 1, 2).await;
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
    create_people(&nodes[0], 4, 2, 3).await;
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
    create_people(&nodes[0], 4, 4, 2).await;
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
    create_people(&nodes[0], 128, 1, 3).await;
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

/// Ids a linearizable get through `p` finds among `ids` (`None`: the read
/// did not answer, UNAVAILABLE: retry).
async fn found(p: &mut sovra_proto::v1::points_client::PointsClient<sovra_node::dev::Keyed>, ids: &[u64]) -> Option<BTreeSet<u64>> {
    let req = v1::GetPointsRequest {
        collection: "people".into(),
        region: UK.into(),
        ids: ids.iter().map(|&i| num(i)).collect(),
        consistency: v1::Consistency::Linearizable as i32,
        ..Default::default()
    };
    match p.get(req).await {
        Ok(r) => Some(
            r.into_inner()
                .points
                .iter()
                .map(|p| match p.id.as_ref().and_then(|i| i.kind.clone()) {
                    Some(v1::point_id::Kind::Num(n)) => n,
                    other => panic!("unexpected id {other:?}"),
                })
                .collect(),
        ),
        Err(e) if e.code() == Code::Unavailable => None,
        Err(e) => panic!("{e:?}"),
    }
}

/// Ids upserted (acknowledged), deleted (acknowledged), and whose delete was sent.
type Acked = (Vec<u64>, Vec<u64>, Vec<u64>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_under_load_keeps_every_acknowledged_id_findable_and_routes_new_writes_to_the_right_half() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, US)]).await;
    create_people(&nodes[0], 4, 1, 3).await;
    let mut p = nodes[0].points.clone();
    // Enough that the first copy takes a while, so writes land between it
    // and the fence (the final copy carries them).
    preload(&mut p, 40).await;
    // Deleted and erased before the split: neither comes back after it, and
    // the erased subject stays suppressed in whichever half owns its points.
    p.delete(v1::DeletePointsRequest {
        collection: "people".into(),
        region: UK.into(),
        ids: (0..20).map(num).collect(),
    })
    .await
    .unwrap();
    let key = nodes[0].key.clone();
    let mut er = v1::erasure_client::ErasureClient::new(keyed(&nodes[0].channel, &key));
    let erased = er
        .erase(v1::EraseRequest {
            collection: "people".into(),
            region: UK.into(),
            target: Some(v1::erase_request::Target::Subject("s500".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.erased, 1);
    let mut admin = nodes[0].admin.clone();
    // An unfinished erasure holds a split back (its purge would be lost).
    let held = admin.split_shard(split_req(0)).await.unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition, "{held:?}");
    assert!(
        held.message().contains(&format!("erasure job {}", erased.job)),
        "{}",
        held.message()
    );
    // Its purge rewrites the replicas (writes wait meanwhile): let it end
    // before the load starts.
    eventually("the erasure job is done", Duration::from_secs(60), async || {
        let j = er
            .get_erasure_job(v1::GetErasureJobRequest { job: erased.job.clone() })
            .await
            .ok()?
            .into_inner();
        (j.state == "done").then_some(())
    })
    .await;
    let unknown = admin.split_shard(split_req(7)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Load: a writer (upserts, and a delete every fifth batch) and a reader
    // that checks every id acknowledged so far is found, and none deleted.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<parking_lot::Mutex<Acked>> = Default::default();
    let writer = {
        let (mut p, stop, acked) = (nodes[2].points.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut i = 10_000u64;
            while !stop.load(Ordering::Relaxed) && i < 14_000 {
                let req = v1::UpsertRequest {
                    collection: "people".into(),
                    points: (i..i + 10).map(|j| point(j, vector(j), UK)).collect(),
                };
                match p.upsert(req).await {
                    Ok(_) => acked.lock().0.extend(i..i + 10),
                    Err(e) => failed.push(e.message().to_string()),
                }
                if i.is_multiple_of(50) {
                    // From here until acknowledged, i may or may not be found.
                    acked.lock().2.push(i);
                    let req = v1::DeletePointsRequest {
                        collection: "people".into(),
                        region: UK.into(),
                        ids: vec![num(i)],
                    };
                    match p.delete(req).await {
                        Ok(_) => acked.lock().1.push(i),
                        Err(e) => failed.push(e.message().to_string()),
                    }
                }
                i += 10;
            }
            failed
        })
    };
    let searcher = {
        let (mut s, stop) = (nodes[2].search.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && ok < 5000 {
                let req = v1::SearchRequest {
                    collection: "people".into(),
                    vector: vector(u64::from(ok)),
                    k: 5,
                    ..Default::default()
                };
                match s.search(req).await {
                    Ok(r) if r.get_ref().hits.len() == 5 => ok += 1,
                    Ok(r) => failed.push(format!("{} hits", r.get_ref().hits.len())),
                    Err(e) => failed.push(e.message().to_string()),
                }
            }
            (ok, failed)
        })
    };
    let reader = {
        let (mut p, stop, acked) = (nodes[1].points.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let (mut reads, mut unavailable, mut misses) = (0u32, 0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && reads < 2000 {
                let (live, deleted): (Vec<u64>, BTreeSet<u64>) = {
                    let a = acked.lock();
                    (
                        a.0.iter().copied().filter(|i| !a.2.contains(i)).collect(),
                        a.1.iter().copied().collect(),
                    )
                };
                // The newest acknowledged ids, some older ones and the preload.
                let mut ask: Vec<u64> = live.iter().rev().take(100).copied().collect();
                ask.extend(live.iter().rev().skip(100).step_by(7).take(200));
                ask.extend((20..4000).step_by(37).filter(|&i| i != 500));
                ask.extend(deleted.iter().rev().take(20));
                match found(&mut p, &ask).await {
                    Some(got) => {
                        for i in &ask {
                            if deleted.contains(i) == got.contains(i) {
                                misses.push(*i);
                            }
                        }
                        reads += 1;
                    }
                    None => unavailable += 1,
                }
            }
            (reads, unavailable, misses)
        })
    };
    eventually("the writer has written through the old map", Duration::from_secs(30), async || {
        (acked.lock().0.len() >= 200).then_some(())
    })
    .await;
    let job = admin.split_shard(split_req(0)).await.unwrap().into_inner();
    assert_eq!((job.kind.as_str(), job.new_shards.as_slice()), ("split", &[1u32, 2][..]));
    let done = eventually("the split is done", Duration::from_secs(90), async || {
        job_state(&nodes[0], &job.job).await.filter(|j| j.state != "running")
    })
    .await;
    assert_eq!(done.state, "done", "{done:?}");
    eventually("the writer has written through the new map", Duration::from_secs(30), async || {
        let n = acked.lock().0.len();
        (n >= 400 && nodes[2].node().state.view().state.ops.jobs[&job.job].state == sovra_meta::ops::OpState::Done).then_some(())
    })
    .await;
    let mark = acked.lock().0.len();
    eventually("more writes after the switch", Duration::from_secs(30), async || {
        (acked.lock().0.len() >= mark + 100).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let failed = writer.await.unwrap();
    let (reads, unavailable, misses) = reader.await.unwrap();
    let (searched, search_failed) = searcher.await.unwrap();
    assert!(
        searched > 0 && search_failed.is_empty(),
        "{searched} searches; failed: {search_failed:?}"
    );
    assert!(failed.is_empty(), "writes failed during the split: {failed:?}");
    assert!(misses.is_empty(), "reads missed acknowledged ids or found deleted ones: {misses:?}");
    assert!(reads > 10, "{reads} reads ({unavailable} unavailable)");
    eprintln!(
        "split under load: {reads} reads checked, {unavailable} unavailable, {} writes",
        acked.lock().0.len()
    );

    // The map: shards 1 and 2 halve the old range; 0 is gone everywhere.
    let numbers: Vec<u32> = people_info(&nodes[0]).await.shards.iter().map(|s| s.number).collect();
    assert_eq!(numbers, vec![1, 2]);
    eventually("every node destroyed the parent", Duration::from_secs(30), async || {
        nodes[..3]
            .iter()
            .all(|n| n.node().state.engines().iter().all(|e| e.id().number != 0))
            .then_some(())
    })
    .await;
    // Every acknowledged id, and nothing deleted, erased or of the wrong
    // half, in each half's replicas.
    let (live, deleted) = {
        let a = acked.lock();
        let d: BTreeSet<u64> = a.1.iter().copied().chain(0..20).chain([500]).collect();
        let l: BTreeSet<u64> = a.0.iter().copied().chain(0..4000).filter(|i| !d.contains(i)).collect();
        (l, d)
    };
    let live_v: Vec<u64> = live.iter().copied().collect();
    all_there(&nodes[0], &live_v).await;
    let view = nodes[0].node().state.view();
    let map = view.state.collections[&sovra_types::CollectionName::parse("people").unwrap()]
        .spec
        .shard_map(&sovra_types::RegionId::parse(UK).unwrap())
        .unwrap();
    for n in &nodes[..3] {
        let engines = n.node().state.engines();
        assert_eq!(engines.len(), 2, "node {} holds both halves", n.node().state.config.node_id);
        eventually("the half replicas caught up", Duration::from_secs(30), async || {
            let total: usize = engines.iter().map(|e| e.stats().live_points).sum();
            (total == live.len()).then_some(())
        })
        .await;
        for e in &engines {
            let range = map.range_of(e.id().number).unwrap();
            for r in e.store().points() {
                let r = r.unwrap();
                assert!(
                    range.contains(sovra_types::point_hash(&r.id)),
                    "point {} in the wrong half {}",
                    r.id,
                    e.id()
                );
                let sovra_types::PointId::Num(i) = r.id else { panic!() };
                assert!(!deleted.contains(&i), "deleted or erased point {i} came back in {}", e.id());
            }
        }
    }
    // The erased point's tombstone came along to the half that owns it.
    for n in &nodes[..3] {
        let owner = n
            .node()
            .state
            .engines()
            .into_iter()
            .find(|e| {
                map.range_of(e.id().number)
                    .unwrap()
                    .contains(sovra_types::point_hash(&sovra_types::PointId::Num(500)))
            })
            .unwrap();
        let key = owner.store().suppress_key().unwrap().expect("the half has the parent's key");
        let tag = sovra_shard::id_tag(&key, &sovra_types::PointId::Num(500));
        assert!(
            owner.store().tombstone_at(&tag).unwrap().is_some(),
            "{} lost a tombstone",
            owner.id()
        );
    }
    // The suppression list came along: the erased subject is still refused.
    let again = p
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: vec![point(500, vector(500), UK)],
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("suppression list"), "{}", again.message());
    // `sovra ctl jobs` shows it, and a split of a shard that no longer exists is refused.
    let table = sovra_node::ctl_ops::jobs(&conn(&nodes[3]), None, None).await.unwrap();
    let row = table.lines().find(|l| l.starts_with(&job.job)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("people/uk/0 -> 1, 2") && row.contains(" done "), "{table}");
    let gone = admin.split_shard(split_req(0)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("1, 2"), "{}", gone.message());
}

/// A split cancelled at some point of its course leaves the shard map as
/// before (the parent takes writes again, the halves are destroyed) or, if
/// it had finished, as after: never between. Cancelled just after its start,
/// or after its fence, it is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_split_leaves_the_shard_map_as_before_or_as_after() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create_people(&nodes[0], 4, 1, 3).await;
    let mut p = nodes[0].points.clone();
    preload(&mut p, 20).await;
    let mut admin = nodes[0].admin.clone();
    let mut next = 2000u64;
    for attempt in 0..3 {
        let job = admin.split_shard(split_req(0)).await.unwrap().into_inner();
        // Later attempts let the split get further before the cancel: its
        // halves open, then its parent fenced.
        if attempt > 0 {
            let halves = job.new_shards.clone();
            eventually("the split gets under way", Duration::from_secs(30), async || {
                let engines: Vec<_> = nodes.iter().flat_map(|n| n.node().state.engines()).collect();
                let reached = if attempt == 1 {
                    engines.iter().any(|e| halves.contains(&e.id().number))
                } else {
                    engines.iter().any(|e| e.split_fence().is_some())
                };
                let over = !people_info(&nodes[0]).await.shards.iter().any(|s| s.number == 0);
                (reached || over).then_some(())
            })
            .await;
        }
        let numbers = match admin.cancel_job(v1::CancelJobRequest { job: job.job.clone() }).await {
            Ok(j) => {
                assert_eq!(j.into_inner().state, "cancelled");
                eprintln!("attempt {attempt}: cancelled");
                vec![0]
            }
            Err(e) => {
                assert!(e.message().contains("done"), "{e:?}");
                eprintln!("attempt {attempt}: the split finished first");
                job.new_shards.clone()
            }
        };
        let got: Vec<u32> = people_info(&nodes[0]).await.shards.iter().map(|s| s.number).collect();
        assert_eq!(got, numbers, "the map is as before or as after");
        if numbers == [0] {
            // The halves go from every node; the parent takes writes again.
            eventually("the halves are destroyed", Duration::from_secs(30), async || {
                nodes
                    .iter()
                    .all(|n| n.node().state.engines().iter().all(|e| e.id().number == 0))
                    .then_some(())
            })
            .await;
            let w = eventually("the parent takes writes again", Duration::from_secs(30), async || {
                let req = v1::UpsertRequest {
                    collection: "people".into(),
                    points: vec![point(next, vector(next), UK)],
                };
                p.upsert(req).await.ok()
            })
            .await;
            assert_eq!(w.into_inner().count, 1);
            next += 1;
            eventually("no replica is fenced", Duration::from_secs(30), async || {
                nodes
                    .iter()
                    .flat_map(|n| n.node().state.engines())
                    .all(|e| e.split_fence().is_none())
                    .then_some(())
            })
            .await;
        } else {
            break;
        }
    }
    let all: Vec<u64> = (0..next).collect();
    all_there(&nodes[0], &all).await;
}

/// The shard's replicas, the one to survive first. The region's audit log
/// (3 replicas) must keep its quorum, or no call of the region is answered:
/// at most one lost node may hold it. Where the shard and the audit log share
/// all three nodes, one replica moves first.
async fn survivor_first(nodes: &[Option<TestNode>]) -> Vec<u64> {
    let n0 = nodes.iter().flatten().next().unwrap();
    let uk = sovra_types::RegionId::parse(UK).unwrap();
    let audit: BTreeSet<u64> = n0.node().state.view().state.audit[&uk].replicas.clone();
    let mut replicas = shard_replicas(n0).await;
    if replicas.iter().all(|r| audit.contains(r)) {
        let from = *replicas.iter().next().unwrap();
        let to = (1..=5).find(|n| !audit.contains(n)).unwrap();
        let mut admin = n0.admin.clone();
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
        let done = eventually("the move is done", Duration::from_secs(60), async || {
            job_state(n0, &job.job).await.filter(|j| j.state != "running")
        })
        .await;
        assert_eq!(done.state, "done", "{done:?}");
        replicas = shard_replicas(n0).await;
    }
    // The survivor holds an audit replica if any does: the lost ones then
    // hold at most one.
    let survivor = *replicas
        .iter()
        .find(|r| audit.contains(r))
        .unwrap_or(replicas.iter().next().unwrap());
    std::iter::once(survivor)
        .chain(replicas.iter().copied().filter(|&r| r != survivor))
        .collect()
}

/// Two of a shard's three replicas are lost for good: the group has no
/// quorum and takes no write. `RecoverShard` rebuilds it from the survivor as
/// a new shard on the survivor and two other nodes of its region; every
/// point the survivor held is found, writes work again, and the lost shard's
/// replica is destroyed on the survivor. A survivor that holds no replica is
/// refused, and the CLI refuses without the explicit acceptance of lost writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_that_lost_its_quorum_is_rebuilt_from_its_surviving_replica() {
    let mut nodes: Vec<Option<TestNode>> = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, UK), (5, UK)])
        .await
        .into_iter()
        .map(Some)
        .collect();
    create_people(nodes[0].as_ref().unwrap(), 4, 1, 3).await;
    let mut p = nodes[0].as_ref().unwrap().points.clone();
    preload(&mut p, 5).await;
    let replicas = survivor_first(&nodes).await;
    let survivor = replicas[0];
    // Every replica applied everything before the loss.
    eventually("every replica applied the writes", Duration::from_secs(30), async || {
        replicas
            .iter()
            .all(|&r| {
                nodes[(r - 1) as usize]
                    .as_ref()
                    .unwrap()
                    .node()
                    .state
                    .engines()
                    .iter()
                    .any(|e| e.stats().live_points == 500)
            })
            .then_some(())
    })
    .await;
    for &lost in &replicas[1..] {
        let _ = nodes[(lost - 1) as usize].take().unwrap().stop().await;
    }
    let at = nodes.iter().flatten().find(|n| n.node().state.config.node_id != survivor).unwrap();
    let (mut admin, mut p) = (at.admin.clone(), at.points.clone());
    let spare = (1..=5u64).find(|n| !replicas.contains(n)).unwrap();
    let e = admin
        .recover_shard(v1::RecoverShardRequest {
            collection: "people".into(),
            region: UK.into(),
            shard: 0,
            survivor: spare,
            accept_lost_erasures: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("node {spare} holds no replica")), "{}", e.message());
    let conn = sovra_node::ctl::Conn::to(at.node().grpc_addr.to_string(), at.key.clone(), sovra_node::ctl::Format::Table);
    let req = v1::RecoverShardRequest {
        collection: "people".into(),
        region: UK.into(),
        shard: 0,
        survivor,
        accept_lost_erasures: false,
    };
    let refused = sovra_node::ctl_ops::recover(&conn, req.clone(), false, false).await.unwrap_err();
    assert!(refused.downcast_ref::<sovra_node::ctl::Usage>().is_some(), "{refused:?}");
    assert!(refused.to_string().contains("LOSES every write"), "{refused}");
    // The group has no quorum: a write is not acknowledged.
    let w = p
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: vec![point(9000, vector(9000), UK)],
        })
        .await
        .unwrap_err();
    assert_eq!(w.code(), Code::Unavailable, "{w:?}");

    let out = sovra_node::ctl_ops::recover(&conn, req, true, true).await.unwrap();
    assert!(out.contains("done"), "{out}");
    let info = people_info(at).await;
    assert_eq!(info.shards.len(), 1);
    let rebuilt = &info.shards[0];
    assert_eq!(rebuilt.number, 1, "a new shard number");
    assert!(rebuilt.replicas.contains(&survivor) && rebuilt.replicas.len() == 3, "{rebuilt:?}");
    assert!(
        rebuilt.replicas.iter().all(|r| !replicas[1..].contains(r)),
        "the lost nodes hold none: {rebuilt:?}"
    );
    all_there(at, &(0..500).collect::<Vec<_>>()).await;
    let w = eventually("writes work again", Duration::from_secs(30), async || {
        let req = v1::UpsertRequest {
            collection: "people".into(),
            points: vec![point(9001, vector(9001), UK)],
        };
        p.upsert(req).await.ok()
    })
    .await;
    assert_eq!(w.into_inner().count, 1);
    let s = nodes[(survivor - 1) as usize].as_ref().unwrap();
    eventually(
        "the survivor destroyed the lost shard's replica",
        Duration::from_secs(30),
        async || {
            let numbers: Vec<u32> = s.node().state.engines().iter().map(|e| e.id().number).collect();
            (numbers == [1]).then_some(())
        },
    )
    .await;
}

/// The survivor was cut off while an erasure committed on the other two
/// replicas, which are then lost: rebuilt from it, the erased points would
/// come back. The recovery fails, naming the erasure job; accepted, it goes
/// on and the erasure run again removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_from_a_replica_that_missed_an_erasure_is_refused_unless_accepted() {
    let faults = sovra_raft::Faults::seeded(41);
    let mut nodes: Vec<Option<TestNode>> =
        TestNode::start_cluster_faults(&[(1, UK), (2, UK), (3, UK), (4, UK), (5, UK)], |_| {}, faults.clone())
            .await
            .into_iter()
            .map(Some)
            .collect();
    create_people(nodes[0].as_ref().unwrap(), 4, 1, 3).await;
    let mut p = nodes[0].as_ref().unwrap().points.clone();
    p.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: (0..100).map(|j| point(j, vector(j), UK)).collect(),
    })
    .await
    .unwrap();
    let replicas = survivor_first(&nodes).await;
    let survivor = replicas[0];
    faults.isolate(survivor);
    let at = nodes
        .iter()
        .flatten()
        .find(|n| n.node().state.config.node_id == replicas[1])
        .unwrap();
    let mut er = v1::erasure_client::ErasureClient::new(keyed(&at.channel, &at.key));
    let subject = |s: &str| v1::EraseRequest {
        collection: "people".into(),
        region: UK.into(),
        target: Some(v1::erase_request::Target::Subject(s.into())),
    };
    assert_eq!(er.erase(subject("s7")).await.unwrap().into_inner().erased, 1);
    for &lost in &replicas[1..] {
        let _ = nodes[(lost - 1) as usize].take().unwrap().stop().await;
    }
    faults.heal();
    let at = nodes.iter().flatten().find(|n| n.node().state.config.node_id != survivor).unwrap();
    let mut admin = at.admin.clone();
    let req = |accept: bool| v1::RecoverShardRequest {
        collection: "people".into(),
        region: UK.into(),
        shard: 0,
        survivor,
        accept_lost_erasures: accept,
    };
    let job = eventually("meta takes the recovery", Duration::from_secs(30), async || {
        admin.recover_shard(req(false)).await.ok()
    })
    .await
    .into_inner();
    let failed = eventually("the recovery ends", Duration::from_secs(60), async || {
        job_state(at, &job.job).await.filter(|j| j.state != "running")
    })
    .await;
    assert_eq!(failed.state, "failed", "{failed:?}");
    assert!(
        failed.error.contains("erasure jobs") && failed.error.contains("(subject)"),
        "{}",
        failed.error
    );
    assert_eq!(
        people_info(at).await.shards[0].number,
        0,
        "a failed recovery leaves the map as it was"
    );

    // Just after the heal the region's audit log may be re-forming: a call
    // whose audit record did not commit is UNAVAILABLE (retry), though the
    // job it started may stand; then that job is the one to follow.
    let job = eventually("meta takes the accepted recovery", Duration::from_secs(30), async || {
        match admin.recover_shard(req(true)).await {
            Ok(j) => Some(j.into_inner().job),
            Err(e) if e.code() == Code::Unavailable => {
                let jobs = admin.list_jobs(v1::ListJobsRequest {}).await.ok()?.into_inner().jobs;
                jobs.into_iter().find(|j| j.kind == "recover" && j.state != "failed").map(|j| j.job)
            }
            Err(e) => panic!("{e:?}"),
        }
    })
    .await;
    let done = eventually("the recovery ends", Duration::from_secs(60), async || {
        job_state(at, &job).await.filter(|j| j.state != "running")
    })
    .await;
    assert_eq!(done.state, "done", "{done:?}");
    let mut p = at.points.clone();
    let back = eventually("the rebuilt shard answers", Duration::from_secs(30), async || {
        let req = v1::GetPointsRequest {
            collection: "people".into(),
            region: UK.into(),
            ids: vec![num(7)],
            consistency: v1::Consistency::Linearizable as i32,
            ..Default::default()
        };
        p.get(req).await.ok()
    })
    .await;
    assert_eq!(back.into_inner().points.len(), 1, "as the refusal said, the erased point came back");
    let mut er = v1::erasure_client::ErasureClient::new(keyed(&at.channel, &at.key));
    assert_eq!(er.erase(subject("s7")).await.unwrap().into_inner().erased, 1, "erased again");
    all_there(at, &(0..100).filter(|&i| i != 7).collect::<Vec<_>>()).await;
}

/// The meta group loses two of its three voters for good: no metadata
/// change commits (nor any call: the region's audit log lost its quorum
/// too). `sovra recover-groups --meta --audit` on the stopped survivor makes
/// it the only voter of both; started again, it leads meta, keeps every key and collection
/// it had, and takes changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meta_group_that_lost_its_quorum_is_led_again_by_its_survivor_after_recover_groups() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create_people(&nodes[0], 4, 1, 1).await;
    let scopes = || v1::KeyScopes {
        read_regions: vec![UK.into()],
        ..Default::default()
    };
    let before = nodes[0].make_key("before", scopes()).await;
    assert!(!before.is_empty());
    let survivor = nodes.remove(0);
    for n in nodes {
        let _ = n.stop().await;
    }
    let mut admin = survivor.admin.clone();
    let e = admin
        .create_key(v1::CreateKeyRequest {
            rate: None,
            id: "during".into(),
            scopes: Some(scopes()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "no quorum, no change: {e:?}");
    let survivor = survivor
        .restart_after(|cfg| {
            let seen = sovra_node::recover::recover_groups(cfg, true, true, true)?;
            assert!(seen.contains("last log index"), "{seen}");
            sovra_node::recover::recover_groups(cfg, true, true, false).map(|msg| eprintln!("{msg}"))
        })
        .await;
    let mut admin = survivor.admin.clone();
    let made = eventually("meta takes changes again", Duration::from_secs(30), async || {
        admin
            .create_key(v1::CreateKeyRequest {
                rate: None,
                id: "after".into(),
                scopes: Some(scopes()),
            })
            .await
            .ok()
    })
    .await;
    assert!(!made.into_inner().key.is_empty());
    let keys: Vec<String> = admin
        .list_keys(v1::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert!(
        keys.contains(&"before".to_string()) && keys.contains(&"after".to_string()),
        "{keys:?}"
    );
    assert_eq!(people_info(&survivor).await.spec.unwrap().name, "people");
    let meta = survivor.node().state.host.meta().unwrap();
    assert_eq!(meta.leader(), Some(1));
}

/// A backup of a region, restored into a new cluster with a later backup as
/// its ledger: every point comes back except those erased (by ids or by
/// subject) after the backup, and the erased subject stays suppressed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_brings_back_the_backup_but_nothing_erased_after_it() {
    let nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create_people(&nodes[0], 4, 2, 2).await;
    let mut p = nodes[0].points.clone();
    p.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: (0..300).map(|j| point(j, vector(j), UK)).collect(),
    })
    .await
    .unwrap();
    let mut er = v1::erasure_client::ErasureClient::new(keyed(&nodes[0].channel, &nodes[0].key));
    let subject = |s: &str| v1::EraseRequest {
        collection: "people".into(),
        region: UK.into(),
        target: Some(v1::erase_request::Target::Subject(s.into())),
    };
    // Erased before the backup: not in it.
    er.erase(subject("s1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (b1, b2) = (dir.path().join("b1"), dir.path().join("b2"));
    let out = sovra_node::backup::backup(&conn(&nodes[1]), "people", UK, &b1).await.unwrap();
    assert!(out.contains("backed up 299 points"), "{out}");
    // Erased after the backup: a subject and two ids. The later backup is the ledger.
    er.erase(subject("s2")).await.unwrap();
    er.erase(v1::EraseRequest {
        collection: "people".into(),
        region: UK.into(),
        target: Some(v1::erase_request::Target::Ids(v1::EraseIds { ids: vec![num(3), num(4)] })),
    })
    .await
    .unwrap();
    sovra_node::backup::backup(&conn(&nodes[2]), "people", UK, &b2).await.unwrap();
    // A backup goes into an empty directory only.
    assert!(sovra_node::backup::backup(&conn(&nodes[1]), "people", UK, &b1).await.is_err());
    drop(nodes);

    let fresh = TestNode::start_cluster(&[(11, UK), (12, UK), (13, UK)]).await;
    let out = sovra_node::backup::restore(&conn(&fresh[0]), &b1, Some(&b2)).await.unwrap();
    assert!(out.contains("restored 296 points") && out.contains("left out 3"), "{out}");
    let back: Vec<u64> = (0..300).filter(|i| ![1, 2, 3, 4].contains(i)).collect();
    all_there(&fresh[0], &back).await;
    let mut fp = fresh[0].points.clone();
    let gone = fp
        .get(v1::GetPointsRequest {
            collection: "people".into(),
            region: UK.into(),
            ids: [1, 2, 3, 4].into_iter().map(num).collect(),
            consistency: v1::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.points.is_empty(), "erased points came back: {:?}", gone.points);
    // The suppression list came with it: s2 is refused without later consent.
    let again = fp
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: vec![point(2, vector(2), UK)],
        })
        .await
        .unwrap_err();
    assert!(again.message().contains("suppression list"), "{again:?}");
    // A second restore finds the shards holding points and is refused.
    let twice = sovra_node::backup::restore(&conn(&fresh[0]), &b1, None).await.unwrap_err();
    assert!(format!("{twice:#}").contains("not empty"), "{twice:#}");
}
