//! Erasure on real in-process clusters: E1 (an acknowledged erasure is
//! visible on every replica, also one cut off from its leader during the
//! erasure), the re-ingest rule of E3 (an erased subject comes back only with
//! consent given after the erasure), R2 for the erasure's criteria, the
//! data-protection scope, E2 (every replica purges every file; the job ends
//! with a receipt signed by the cluster key, also after a replica was cut off
//! during the purge) and E3 after restarts and a lagging replica's snapshot
//! install.

use sovra_chaos::residency::files_holding;
use sovra_proto::v1::{self, erasure_client::ErasureClient};
use sovra_tests::*;
use std::time::Duration;
use tonic::Code;

const UK: &str = "uk";
const DIM: usize = 4;

fn vector(i: u64) -> Vec<f32> {
    vec![(i % 13) as f32, (i / 13) as f32, (i % 7) as f32 * 0.5, 1.0]
}

/// Point `i` of region `region`; ids below `alice` belong to subject "alice".
fn person(i: u64, region: &str, alice: u64) -> v1::Point {
    let mut p = point(i, vector(i), region);
    if i < alice {
        p.subject = "alice".into();
    }
    p
}

async fn upsert(n: &mut TestNode, pts: Vec<v1::Point>) -> Result<v1::WriteResponse, tonic::Status> {
    n.points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: pts,
        })
        .await
        .map(|r| r.into_inner())
}

/// Collection "people" in uk with `shards` shards, replication factor 3.
async fn create(n: &mut TestNode, shards: u32) {
    n.collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(sovra_node::dev::spanning_spec(
                "people",
                DIM as u32,
                v1::Metric::L2,
                &[UK],
                shards,
                3,
            )),
        })
        .await
        .unwrap();
}

fn erasure(n: &TestNode, key: &str) -> ErasureClient<Keyed> {
    ErasureClient::new(keyed(&n.channel, key))
}

fn erase_subject(region: &str, subject: &str) -> v1::EraseRequest {
    v1::EraseRequest {
        collection: "people".into(),
        region: region.into(),
        target: Some(v1::erase_request::Target::Subject(subject.into())),
    }
}

/// Ids a search through `n` returns for the vector of point `i`, at `any`.
async fn searched(n: &mut TestNode, i: u64, k: u32) -> Result<Vec<u64>, tonic::Status> {
    n.search
        .search(v1::SearchRequest {
            collection: "people".into(),
            vector: vector(i),
            k,
            ..Default::default()
        })
        .await
        .map(|r| ids_of(&r.into_inner()))
}

async fn got(n: &mut TestNode, region: &str, ids: std::ops::Range<u64>) -> Result<Vec<v1::Point>, tonic::Status> {
    n.points
        .get(v1::GetPointsRequest {
            collection: "people".into(),
            region: region.into(),
            ids: ids.map(num).collect(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().points)
}

/// Points of subject "alice" in the stores of `n`'s replicas.
fn stored_alice(n: &TestNode) -> usize {
    n.node()
        .state
        .engines()
        .iter()
        .map(|e| e.store().ids_of_subject("alice").unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_erasure_is_gone_from_every_replica_and_the_subject_comes_back_only_with_later_consent() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK), (4, "us")]).await;
    create(&mut nodes[0], 2).await;
    upsert(&mut nodes[0], (0..300).map(|i| person(i, UK, 15)).collect()).await.unwrap();
    for n in &nodes[..3] {
        eventually("every uk replica holds alice's points", Duration::from_secs(30), async || {
            (stored_alice(n) == 15).then_some(())
        })
        .await;
    }

    // Only a data-protection key may erase; and only through a node of the region.
    let writer = nodes[0]
        .make_key(
            "writer",
            v1::KeyScopes {
                read_regions: vec!["*".into()],
                write_regions: vec!["*".into()],
                ..Default::default()
            },
        )
        .await;
    let st = erasure(&nodes[1], &writer).erase(erase_subject(UK, "alice")).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("data_protection"), "{}", st.message());
    let key = nodes[0].key.clone();
    let st = erasure(&nodes[3], &key).erase(erase_subject(UK, "alice")).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("through a node of uk"), "{}", st.message());
    assert_eq!(stored_alice(&nodes[0]), 15, "a refused erasure erased something");

    let ack = erasure(&nodes[1], &key)
        .erase(erase_subject(UK, "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.erased, 15);
    assert_eq!(ack.writes.len(), 2, "a subject's erasure reaches every shard of the region");
    assert!(ack.waited_out.is_empty(), "every replica was reachable: {:?}", ack.waited_out);
    // E1: from the acknowledgement on, no read on any replica returns alice
    // (each node's coordinator asks its own replica first). A replica may
    // answer the acknowledgement once it has appended the erasure; it then
    // applies it before its next read, so its store follows at once after.
    for n in nodes[..3].iter_mut() {
        for i in 0..15 {
            let ids = searched(n, i, 20).await.unwrap();
            assert!(ids.iter().all(|&id| id >= 15), "a search returned an erased point: {ids:?}");
        }
        assert!(got(n, UK, 0..15).await.unwrap().is_empty(), "a get returned an erased point");
        let page = n
            .points
            .scroll(v1::ScrollRequest {
                collection: "people".into(),
                region: UK.into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.points.iter().all(|p| p.subject != "alice"),
            "a scroll returned an erased point"
        );
        let id = n.node().state.config.node_id;
        eventually(&format!("node {id}'s store drops alice"), Duration::from_secs(10), async || {
            (stored_alice(n) == 0).then_some(())
        })
        .await;
    }

    // E3: alice's data comes back only with consent given after the erasure.
    let mut again = person(7, UK, 15);
    let st = upsert(&mut nodes[0], vec![again.clone()]).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(
        st.message().contains("suppression list") && !st.message().contains("alice"),
        "{}",
        st.message()
    );
    again.consent_at_ms = ack.erased_at_ms;
    assert_eq!(
        upsert(&mut nodes[0], vec![again.clone()]).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    again.consent_at_ms = ack.erased_at_ms + 1;
    let w = upsert(&mut nodes[0], vec![again]).await.unwrap();
    // Read your write: whichever replica answers has applied it.
    let back = nodes[0]
        .points
        .get(v1::GetPointsRequest {
            collection: "people".into(),
            region: UK.into(),
            ids: vec![num(7)],
            after: w.writes,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(back.len(), 1);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_during_an_erasure_is_waited_out_and_never_answers_with_the_erased_points() {
    let faults = sovra_raft::Faults::seeded(21);
    let mut nodes = TestNode::start_cluster_faults(&[(1, UK), (2, UK), (3, UK)], |_| {}, faults.clone()).await;
    create(&mut nodes[0], 1).await;
    upsert(&mut nodes[0], (0..100).map(|i| person(i, UK, 10)).collect()).await.unwrap();
    for n in &nodes {
        eventually("every replica holds alice's points", Duration::from_secs(30), async || {
            (stored_alice(n) == 10).then_some(())
        })
        .await;
    }
    // A follower that has just answered (its read lease is fresh) is cut off.
    let leader = eventually("the shard has a leader", Duration::from_secs(10), async || {
        nodes[0].node().state.host.groups().first().and_then(|g| g.leader())
    })
    .await;
    let f = (1..=3u64).find(|&n| n != leader).unwrap();
    let fi = (f - 1) as usize;
    let before = searched(&mut nodes[fi], 3, 5).await.unwrap();
    assert!(before.contains(&3), "{before:?}");
    faults.isolate(f);

    let li = (leader - 1) as usize;
    let key = nodes[li].key.clone();
    let ack = erasure(&nodes[li], &key)
        .erase(erase_subject(UK, "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.erased, 10);
    assert_eq!(ack.waited_out, vec![format!("node {f} (shard people/uk/0)")]);
    // The cut-off replica has not applied the erasure: it still holds alice...
    assert_eq!(stored_alice(&nodes[fi]), 10, "the scenario needs a replica that missed the erasure");
    // ...but its lease ran out before the acknowledgement, so it answers no
    // read: neither through its own coordinator nor as anyone's leaf.
    for i in [0, 3, 9] {
        match searched(&mut nodes[fi], i, 10).await {
            Ok(ids) => assert!(
                ids.iter().all(|&id| id >= 10),
                "the cut-off replica returned an erased point: {ids:?}"
            ),
            Err(st) => assert_eq!(st.code(), Code::Unavailable, "{st:?}"),
        }
    }
    match got(&mut nodes[fi], UK, 0..10).await {
        Ok(pts) => assert!(pts.is_empty(), "the cut-off replica returned an erased point"),
        Err(st) => assert_eq!(st.code(), Code::Unavailable, "{st:?}"),
    }
    // The others answer, without alice.
    let other = (1..=3u64).find(|&n| n != leader && n != f).unwrap();
    let ids = searched(&mut nodes[(other - 1) as usize], 3, 10).await.unwrap();
    assert!(!ids.is_empty() && ids.iter().all(|&id| id >= 10), "{ids:?}");

    // Healed, it applies the erasure and answers again, without alice.
    faults.heal();
    eventually("the cut-off replica applies the erasure", Duration::from_secs(30), async || {
        (stored_alice(&nodes[fi]) == 0).then_some(())
    })
    .await;
    let ids = eventually("the healed replica answers", Duration::from_secs(30), async || {
        searched(&mut nodes[fi], 3, 10).await.ok()
    })
    .await;
    assert!(!ids.is_empty() && ids.iter().all(|&id| id >= 10), "{ids:?}");
    for n in nodes {
        n.stop().await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_points_are_erased_from_every_replica_by_the_leaders_sweeper() {
    let mut nodes = TestNode::start_cluster_with(&[(1, UK), (2, UK), (3, UK)], |c| c.retention_sweep_ms = 200).await;
    create(&mut nodes[0], 2).await;
    let soon = now_ms() + 1_500;
    let pts: Vec<v1::Point> = (0..40)
        .map(|i| {
            let mut p = person(i, UK, 0);
            if i < 20 {
                p.expires_at_ms = soon;
            }
            p
        })
        .collect();
    upsert(&mut nodes[0], pts).await.unwrap();
    // Point 5 is renewed before it expires: it stays.
    let mut renewed = person(5, UK, 0);
    renewed.expires_at_ms = now_ms() + 3_600_000;
    upsert(&mut nodes[0], vec![renewed]).await.unwrap();
    let mut want: Vec<u64> = vec![5];
    want.extend(20..40);
    for n in &nodes {
        eventually(
            "every replica holds only the unexpired points",
            Duration::from_secs(20),
            async || {
                let mut held: Vec<u64> = n
                    .node()
                    .state
                    .engines()
                    .iter()
                    .flat_map(|e| e.store().points().map(|r| r.unwrap().id).collect::<Vec<_>>())
                    .map(|id| match id {
                        sovra_types::PointId::Num(n) => n,
                        sovra_types::PointId::Uuid(_) => unreachable!(),
                    })
                    .collect();
                held.sort();
                (held == want).then_some(())
            },
        )
        .await;
    }
    for n in nodes {
        n.stop().await;
    }
}

/// Whether any file under `dir` holds `needle`.
/// The job `job` as node `n` serves it, once `done` (within `within`).
async fn job_done(n: &TestNode, job: &str, within: Duration) -> v1::ErasureJob {
    let mut c = erasure(n, &n.key);
    eventually("the erasure job is done", within, async || {
        let j = c
            .get_erasure_job(v1::GetErasureJobRequest { job: job.into() })
            .await
            .ok()?
            .into_inner();
        (j.state == "done").then_some(j)
    })
    .await
}

/// Checks `j`'s receipt against the cluster key every node holds; returns it.
fn verified(nodes: &[TestNode], j: &v1::ErasureJob) -> sovra_meta::erasure::Receipt {
    let key = nodes[0].node().state.receipt_key.public_hex();
    for n in nodes {
        assert_eq!(
            n.node().state.receipt_key.public_hex(),
            key,
            "every node signs with the cluster key"
        );
    }
    assert_eq!(j.public_key, key);
    let r = sovra_node::receipt::verify(&j.receipt_json, &j.signature, &key).unwrap();
    assert_eq!(r.job, j.job);
    r
}

/// Point `i` of uk whose subject and payload carry `canary`, as stored (L2:
/// the vector is not rewritten either).
fn canary_person(i: u64, canary: &str) -> v1::Point {
    let mut p = person(i, UK, 0);
    p.subject = format!("{canary}-subject");
    p.payload.insert(
        "note".into(),
        v1::Value {
            kind: Some(v1::value::Kind::StringValue(format!("{canary}-payload"))),
        },
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_purges_an_erasure_from_every_file_of_its_data_directory() {
    let mut nodes = TestNode::start_cluster_with(&[(1, UK), (2, UK), (3, UK)], |c| c.purge_check_ms = 100).await;
    create(&mut nodes[0], 1).await;
    const CANARY: &str = "canary-9c1e-7f3a";
    let pts: Vec<v1::Point> = (0..60)
        .map(|i| if i < 5 { canary_person(i, CANARY) } else { person(i, UK, 0) })
        .collect();
    upsert(&mut nodes[0], pts).await.unwrap();
    // Positive control: a snapshot built now holds the canary.
    for n in &nodes {
        let g = n.node().state.host.groups()[0].clone();
        eventually("every replica applied the points", Duration::from_secs(30), async || {
            (g.engine().store().points().count() == 60).then_some(())
        })
        .await;
        g.raft().trigger().snapshot().await.unwrap();
        eventually("a snapshot is built", Duration::from_secs(30), async || {
            g.raft().metrics().borrow().snapshot.is_some().then_some(())
        })
        .await;
        let snaps = g.engine().replica().snapshot_dir();
        assert!(
            !files_holding(&snaps, CANARY.as_bytes()).is_empty(),
            "the positive control failed: no snapshot holds the canary"
        );
        let db = g.engine().replica().dir().join("db");
        assert!(
            !files_holding(&db, CANARY.as_bytes()).is_empty(),
            "the positive control failed: the database files do not hold the canary"
        );
    }
    let key = nodes[0].key.clone();
    let ack = erasure(&nodes[0], &key)
        .erase(erase_subject(UK, &format!("{CANARY}-subject")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.erased, 5);
    let index = ack.writes[0].index;
    for n in &nodes {
        // Nothing here may hold the replica open: the purge ends by closing
        // and rewriting its database.
        let group = || n.node().state.host.groups().first().cloned();
        eventually("the replica purged the erasure", Duration::from_secs(60), async || {
            let (pending, done) = group()?.engine().store().purge_state().unwrap();
            (pending == index && done >= index).then_some(())
        })
        .await;
        let g = group().unwrap();
        let m = g.raft().metrics().borrow().clone();
        assert!(
            m.purged.is_some_and(|l| l.index >= index),
            "the log still holds the erasure: {:?}",
            m.purged
        );
        assert_eq!(g.engine().stats().tombstones, 0, "the index still holds erased vectors");
        // What is left in the log store is above the erasure.
        let first = g.log.first_index().unwrap();
        assert!(
            first.is_none_or(|f| f > index),
            "log entry {first:?} at or below the erasure {index} is still stored"
        );
        // E2: no file under the node's data directory (database, log,
        // snapshots, index files) holds the canary any more.
        assert_eq!(files_holding(n.dir.path(), CANARY.as_bytes()), Vec::<std::path::PathBuf>::new());
        // The rewritten replica serves again, without the erased points.
        assert_eq!(g.engine().store().points().count(), 55);
    }
    let mut n0 = nodes.remove(0);
    let ids = searched(&mut n0, 2, 10).await.unwrap();
    assert!(!ids.is_empty() && ids.iter().all(|&id| id >= 5), "{ids:?}");
    nodes.insert(0, n0);
    // The job ends with a receipt, served by any node and signed by the
    // cluster key; it names every replica and none of the erased data.
    let j = job_done(&nodes[2], &ack.job, Duration::from_secs(30)).await;
    assert_eq!((j.kind.as_str(), j.erased), ("subject", 5));
    let r = verified(&nodes, &j);
    assert!(
        !j.receipt_json.contains(CANARY),
        "the receipt names erased data: {}",
        j.receipt_json
    );
    assert_eq!(r.shards.len(), 1);
    let shard = &r.shards[0];
    assert_eq!((shard.log_index, shard.erased), (index, 5));
    let replicas: Vec<(u64, &str, Option<u64>)> = shard.replicas.iter().map(|x| (x.node, x.outcome.as_str(), x.removed)).collect();
    assert_eq!(
        replicas,
        vec![(1, "purged", Some(5)), (2, "purged", Some(5)), (3, "purged", Some(5))]
    );
    assert!(shard.replicas.iter().all(|x| x.purged_through >= Some(index)));
    // One rewrite at a time, in the order the purge gives them: by node id,
    // except that the shard's leader goes last (its rewrite costs the group
    // an election, so it waits for every follower to be back first).
    let mut by_time: Vec<(u64, u64)> = shard.replicas.iter().map(|x| (x.at_ms.unwrap(), x.node)).collect();
    by_time.sort();
    let order: Vec<u64> = by_time.iter().map(|(_, n)| *n).collect();
    let ids: Vec<u64> = shard.replicas.iter().map(|x| x.node).collect();
    let leader_last = ids.iter().any(|last| {
        let mut want: Vec<u64> = ids.iter().copied().filter(|n| n != last).collect();
        want.sort();
        want.push(*last);
        want == order
    });
    assert!(leader_last, "replicas rewrote out of turn: {by_time:?}");
    assert!(r.acknowledged_at_ms >= r.requested_at_ms && r.done_at_ms >= r.acknowledged_at_ms);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_points_never_come_back_after_every_node_restarts_and_the_subject_stays_suppressed() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    create(&mut nodes[0], 2).await;
    upsert(&mut nodes[0], (0..120).map(|i| person(i, UK, 12)).collect()).await.unwrap();
    for n in &nodes {
        eventually("every replica holds alice's points", Duration::from_secs(30), async || {
            (stored_alice(n) == 12).then_some(())
        })
        .await;
    }
    let key = nodes[0].key.clone();
    let ack = erasure(&nodes[1], &key)
        .erase(erase_subject(UK, "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.erased, 12);
    // Every node restarts, one after another.
    let mut restarted = Vec::new();
    for n in nodes {
        restarted.push(n.restart().await);
    }
    let mut nodes = restarted;
    for n in nodes.iter_mut() {
        eventually("the restarted node serves its replicas", Duration::from_secs(30), async || {
            (n.node().state.engines().len() == 2).then_some(())
        })
        .await;
        assert_eq!(stored_alice(n), 0, "an erased point came back in a store after the restart");
        for i in [0, 5, 11] {
            let ids = eventually("a search answers after the restart", Duration::from_secs(30), async || {
                searched(n, i, 20).await.ok()
            })
            .await;
            assert!(ids.iter().all(|&id| id >= 12), "an erased point came back in a search: {ids:?}");
        }
        assert!(got(n, UK, 0..12).await.unwrap().is_empty(), "an erased point came back in a get");
    }
    // The suppression list outlived the restart.
    let st = upsert(&mut nodes[2], vec![person(3, UK, 12)]).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_through_the_purge_keeps_the_job_open_then_catches_up_by_snapshot_and_purges_too() {
    let faults = sovra_raft::Faults::seeded(33);
    let mut nodes = TestNode::start_cluster_faults(&[(1, UK), (2, UK), (3, UK)], |c| c.purge_check_ms = 100, faults.clone()).await;
    create(&mut nodes[0], 1).await;
    const CANARY: &str = "canary-51d0-a2e8";
    let canary_point = |i: u64| canary_person(i, CANARY);
    let pts: Vec<v1::Point> = (0..80).map(|i| if i < 6 { canary_point(i) } else { person(i, UK, 0) }).collect();
    upsert(&mut nodes[0], pts).await.unwrap();
    for n in &nodes {
        eventually("every replica applied the points", Duration::from_secs(30), async || {
            (n.node().state.engines().first()?.store().points().count() == 80).then_some(())
        })
        .await;
        assert!(
            !files_holding(n.dir.path(), CANARY.as_bytes()).is_empty(),
            "the positive control failed: node {} holds no canary",
            n.node().state.config.node_id
        );
    }
    let leader = eventually("the shard has a leader", Duration::from_secs(10), async || {
        nodes[0].node().state.host.groups().first().and_then(|g| g.leader())
    })
    .await;
    let f = (1..=3u64).find(|&n| n != leader).unwrap();
    let fi = (f - 1) as usize;
    faults.isolate(f);
    let li = (leader - 1) as usize;
    let key = nodes[li].key.clone();
    let ack = erasure(&nodes[li], &key)
        .erase(erase_subject(UK, &format!("{CANARY}-subject")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.erased, 6);
    let index = ack.writes[0].index;

    // The two replicas in touch purge; the job stays open on the third,
    // visibly, and serves no receipt.
    let mut c = erasure(&nodes[li], &key);
    let open = eventually("the replicas in touch purge", Duration::from_secs(60), async || {
        let j = c
            .get_erasure_job(v1::GetErasureJobRequest { job: ack.job.clone() })
            .await
            .ok()?
            .into_inner();
        let others_purged = j.replicas.iter().filter(|r| r.node != f).all(|r| r.outcome == "purged");
        others_purged.then_some(j)
    })
    .await;
    assert_eq!(open.state, "acknowledged");
    let cut: Vec<&str> = open.replicas.iter().filter(|r| r.node == f).map(|r| r.outcome.as_str()).collect();
    assert_eq!(cut, vec!["pending"]);
    assert!(
        open.receipt_json.is_empty() && open.signature.is_empty(),
        "a receipt before every replica purged"
    );
    for n in nodes.iter().filter(|n| n.node().state.config.node_id != f) {
        assert_eq!(files_holding(n.dir.path(), CANARY.as_bytes()), Vec::<std::path::PathBuf>::new());
    }
    // The cut-off replica still holds the canary (it never heard of the erase).
    assert!(!files_holding(nodes[fi].dir.path(), CANARY.as_bytes()).is_empty());

    // Healed: the leader's log no longer holds the erase, so the lagging
    // replica catches up by a snapshot install, which leaves a purge due.
    faults.heal();
    let j = job_done(&nodes[fi], &ack.job, Duration::from_secs(60)).await;
    let r = verified(&nodes, &j);
    let lagging = r.shards[0].replicas.iter().find(|x| x.node == f).unwrap();
    assert_eq!(lagging.outcome, "purged");
    assert!(lagging.purged_through >= Some(index), "{lagging:?}");
    let m = nodes[fi].node().state.host.groups()[0].raft().metrics().borrow().clone();
    assert!(
        m.snapshot.is_some_and(|s| s.index >= index) && m.purged.is_some_and(|p| p.index >= index),
        "the lagging replica did not catch up past the erase by a snapshot: {:?} {:?}",
        m.snapshot,
        m.purged
    );
    // E2 on the lagging replica too, and E3: what it installed holds none
    // of the erased points and agrees with the others.
    assert_eq!(
        files_holding(nodes[fi].dir.path(), CANARY.as_bytes()),
        Vec::<std::path::PathBuf>::new()
    );
    let digests: Vec<u64> = nodes
        .iter()
        .map(|n| n.node().state.engines()[0].store().digest().unwrap())
        .collect();
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas disagree after the install: {digests:?}"
    );
    let ids = eventually("the caught-up replica answers", Duration::from_secs(30), async || {
        searched(&mut nodes[fi], 2, 10).await.ok()
    })
    .await;
    assert!(!ids.is_empty() && ids.iter().all(|&id| id >= 6), "{ids:?}");
    // An old write of an erased point arriving late (a retry of one acked
    // before the erase) is refused at apply: the subject is suppressed.
    let st = upsert(&mut nodes[fi], vec![canary_point(3)]).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    for n in nodes {
        n.stop().await;
    }
}
