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
    let writer = {
        let mut p = nodes[2].points.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 3000 {
                let batch: Vec<v1::Point> = (i..i + 10).map(|j| point(j, vector(j), UK)).collect();
                if p.upsert(v1::UpsertRequest {
                    collection: "people".into(),
                    points: batch,
                })
                .await
                .is_ok()
                {
                    acked.extend(i..i + 10);
                }
                i += 10;
            }
            acked
        })
    };
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
    let mut p = nodes[0].points.clone();
    for chunk in acked.chunks(500) {
        let got = p
            .get(v1::GetPointsRequest {
                collection: "people".into(),
                region: UK.into(),
                ids: chunk.iter().map(|&i| num(i)).collect(),
                consistency: v1::Consistency::Linearizable as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.points.len(), chunk.len(), "acknowledged writes were lost in the move");
    }
    // The source destroys its copy; the target holds one.
    let fi = (from - 1) as usize;
    eventually("the source destroyed its replica", Duration::from_secs(30), async || {
        nodes[fi].node().state.engines().is_empty().then_some(())
    })
    .await;
    assert_eq!(nodes[(to - 1) as usize].node().state.engines().len(), 1);
    // `sovra ctl jobs` lists it, done.
    let table = sovra_node::ctl::jobs(
        &sovra_node::ctl::Conn {
            addr: nodes[3].node().grpc_addr.to_string(),
            key: nodes[0].key.clone(),
            format: sovra_node::ctl::Format::Table,
        },
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
