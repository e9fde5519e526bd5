use super::*;
use crate::placement::{Candidate, place_collection};
use sovra_types::{HnswParams, Metric, RegionShards};

fn eu() -> RegionId {
    RegionId::parse("eu-west").unwrap()
}
fn us() -> RegionId {
    RegionId::parse("us-east").unwrap()
}

fn node(id: u64, region: RegionId, zone: &str) -> NodeRecord {
    NodeRecord {
        id,
        region,
        zone: zone.into(),
        roles: Roles::default(),
        cluster_addr: format!("10.0.0.{id}:7400"),
        public_addr: format!("10.0.0.{id}:7300"),
        status: NodeStatus::Up,
        last_heartbeat_ms: 0,
        incarnation: 1,
    }
}

fn spec(rf: u32) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("faces").unwrap(),
        dimension: 4,
        metric: Metric::L2,
        hnsw: HnswParams::default(),
        regions: vec![
            RegionShards {
                region: eu(),
                shard_count: 2,
                split_map: None,
            },
            RegionShards {
                region: us(),
                shard_count: 1,
                split_map: None,
            },
        ],
        replication_factor: rf,
        default_retention_seconds: 0,
        require_lawful_basis: false,
        require_purpose: false,
    }
}

/// Nodes 1-3 in eu-west (zones a, b, c), 4-5 in us-east.
fn cluster() -> MetaState {
    let mut s = MetaState::default();
    for n in [
        node(1, eu(), "a"),
        node(2, eu(), "b"),
        node(3, eu(), "c"),
        node(4, us(), "a"),
        node(5, us(), "b"),
    ] {
        s.apply(MetaCommand::RegisterNode(n)).unwrap();
    }
    s
}

fn candidates(s: &MetaState) -> Vec<Candidate> {
    s.nodes
        .values()
        .map(|n| Candidate {
            id: n.id,
            region: n.region.clone(),
            zone: n.zone.clone(),
            load: 0,
        })
        .collect()
}

#[test]
fn a_placed_collection_is_recorded_with_its_ranges_and_a_new_map_version() {
    let mut s = cluster();
    let replicas = place_collection(&spec(2), &candidates(&s)).unwrap();
    assert_eq!(
        s.apply(MetaCommand::CreateCollection { spec: spec(2), replicas }),
        Ok(Applied::MapVersion(1))
    );
    let c = &s.collections[&CollectionName::parse("faces").unwrap()];
    assert_eq!(c.shards.len(), 3);
    assert_eq!(c.shards[&(us(), 0)].replicas, vec![4, 5]);
    assert_eq!(c.shards[&(eu(), 0)].range.start, 0);
    assert_eq!(c.shards[&(eu(), 1)].range.end, u64::MAX);
}

#[test]
fn r1_an_off_region_placement_submitted_directly_is_refused_and_changes_nothing() {
    let mut s = cluster();
    let mut replicas = place_collection(&spec(2), &candidates(&s)).unwrap();
    // A us-east node in an eu-west shard.
    replicas.insert((eu(), 1), vec![1, 4]);
    let before = s.clone();
    let err = s
        .apply(MetaCommand::CreateCollection {
            spec: spec(2),
            replicas: replicas.clone(),
        })
        .unwrap_err();
    assert!(matches!(err, Refused::OffRegion { node: 4, .. }), "{err}");
    assert!(err.to_string().starts_with("R1: node 4 is in region us-east"), "{err}");
    assert_eq!(s, before);

    // And a move after creation.
    replicas.insert((eu(), 1), vec![1, 2]);
    s.apply(MetaCommand::CreateCollection { spec: spec(2), replicas }).unwrap();
    let before = s.clone();
    let err = s
        .apply(MetaCommand::SetReplicas {
            collection: CollectionName::parse("faces").unwrap(),
            shard: (eu(), 0),
            replicas: vec![2, 5],
        })
        .unwrap_err();
    assert!(matches!(err, Refused::OffRegion { node: 5, .. }), "{err}");
    assert_eq!(s, before);
}

#[test]
fn replica_sets_must_be_known_distinct_data_nodes_of_the_right_size() {
    let mut s = cluster();
    let good = place_collection(&spec(2), &candidates(&s)).unwrap();
    let faces = CollectionName::parse("faces").unwrap();
    let cases: Vec<(Vec<u64>, &str)> = vec![
        (vec![1, 1], "named twice"),
        (vec![1], "needs 2"),
        (vec![1, 9], "node 9 is not registered"),
    ];
    for (bad, needle) in cases {
        let mut r = good.clone();
        r.insert((eu(), 0), bad);
        let err = s
            .apply(MetaCommand::CreateCollection {
                spec: spec(2),
                replicas: r,
            })
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let mut missing = good.clone();
    missing.remove(&(us(), 0));
    assert!(
        s.apply(MetaCommand::CreateCollection {
            spec: spec(2),
            replicas: missing
        })
        .is_err()
    );
    let mut extra = good.clone();
    extra.insert((eu(), 7), vec![1, 2]);
    assert!(matches!(
        s.apply(MetaCommand::CreateCollection {
            spec: spec(2),
            replicas: extra
        }),
        Err(Refused::UnknownShard { .. })
    ));
    let mut no_data = node(6, eu(), "a");
    no_data.roles.data = false;
    s.apply(MetaCommand::RegisterNode(no_data)).unwrap();
    let mut r = good.clone();
    r.insert((eu(), 0), vec![1, 6]);
    assert_eq!(
        s.apply(MetaCommand::CreateCollection {
            spec: spec(2),
            replicas: r
        }),
        Err(Refused::NotDataNode(6))
    );
    assert!(s.collections.is_empty() && s.map_version == 0);

    s.apply(MetaCommand::CreateCollection {
        spec: spec(2),
        replicas: good,
    })
    .unwrap();
    assert_eq!(
        s.apply(MetaCommand::CreateCollection {
            spec: spec(2),
            replicas: BTreeMap::new()
        }),
        Err(Refused::CollectionExists(faces.clone()))
    );
    assert_eq!(
        s.apply(MetaCommand::DropCollection { name: faces.clone() }),
        Ok(Applied::MapVersion(2))
    );
    assert_eq!(
        s.apply(MetaCommand::DropCollection { name: faces.clone() }),
        Err(Refused::UnknownCollection(faces))
    );
}

#[test]
fn a_node_id_keeps_its_region_and_heartbeats_only_move_forward() {
    let mut s = cluster();
    let err = s.apply(MetaCommand::RegisterNode(node(1, us(), "a"))).unwrap_err();
    assert!(matches!(err, Refused::RegionChanged { node: 1, .. }), "{err}");
    // Same region, new address: accepted (a restart on a new port).
    let mut moved = node(1, eu(), "a");
    moved.cluster_addr = "10.0.0.1:9999".into();
    s.apply(MetaCommand::RegisterNode(moved)).unwrap();
    assert_eq!(s.nodes[&1].cluster_addr, "10.0.0.1:9999");
    s.apply(MetaCommand::Heartbeat { node: 2, at_ms: 50 }).unwrap();
    s.apply(MetaCommand::Heartbeat { node: 2, at_ms: 40 }).unwrap();
    assert_eq!(s.nodes[&2].last_heartbeat_ms, 50);
    assert_eq!(s.apply(MetaCommand::Heartbeat { node: 9, at_ms: 1 }), Err(Refused::UnknownNode(9)));
    s.apply(MetaCommand::SetNodeStatus {
        node: 3,
        status: NodeStatus::Down,
    })
    .unwrap();
    assert_eq!(s.nodes[&3].status, NodeStatus::Down);
    // At 1,000 ms with a 500 ms timeout: node 2 (heard at 50) and the others
    // (registered at 0) are overdue; node 3 is already down.
    s.apply(MetaCommand::Heartbeat { node: 4, at_ms: 900 }).unwrap();
    assert_eq!(s.overdue(1000, 500), vec![1, 2, 5]);
    assert!(s.overdue(400, 500).is_empty());
}

#[test]
fn a_heartbeat_alone_leaves_the_state_the_same_but_for_heartbeats_and_anything_else_does_not() {
    let mut s = MetaState::default();
    s.apply(MetaCommand::RegisterNode(node(1, eu(), "a"))).unwrap();
    s.apply(MetaCommand::RegisterNode(node(2, eu(), "b"))).unwrap();
    let before = s.clone();
    s.apply(MetaCommand::Heartbeat { node: 2, at_ms: 50 }).unwrap();
    assert_ne!(before, s);
    assert!(before.same_but_progress(&s));

    let mut down = s.clone();
    down.apply(MetaCommand::SetNodeStatus {
        node: 2,
        status: NodeStatus::Down,
    })
    .unwrap();
    assert!(!s.same_but_progress(&down), "a status change matters");

    let mut moved = s.clone();
    moved
        .apply(MetaCommand::RegisterNode(NodeRecord {
            cluster_addr: "10.0.0.9:7400".into(),
            incarnation: 2,
            ..node(2, eu(), "b")
        }))
        .unwrap();
    assert!(!s.same_but_progress(&moved), "a new address matters");

    let mut more = s.clone();
    more.apply(MetaCommand::RegisterNode(node(3, eu(), "c"))).unwrap();
    assert!(!s.same_but_progress(&more), "a new node matters");
}

mod erasure_jobs {
    use super::*;
    use crate::erasure::{EraseKind, JobState, PurgeReport, Receipt, ReplicaPurge};

    fn faces() -> CollectionName {
        CollectionName::parse("faces").unwrap()
    }

    /// `faces` with rf 3 on eu-west's two shards: every eu node holds both.
    fn with_collection() -> MetaState {
        let mut s = cluster();
        let mut r = BTreeMap::new();
        r.insert((eu(), 0), vec![1, 2, 3]);
        r.insert((eu(), 1), vec![1, 2, 3]);
        // us-east has two nodes only: the collection spans eu-west alone.
        let mut sp = spec(3);
        sp.regions.retain(|r| r.region == eu());
        s.apply(MetaCommand::CreateCollection { spec: sp, replicas: r }).unwrap();
        s
    }

    fn start(s: &mut MetaState, job: &str) -> Result<Applied, Refused> {
        s.apply(MetaCommand::StartErasure {
            job: job.into(),
            kind: EraseKind::Subject,
            collection: faces(),
            region: eu(),
            shards: vec![0, 1],
            at_ms: 1_000,
        })
    }

    fn report(s: &mut MetaState, shard: u32, node: u64, through: u64, applied: Vec<(String, u64, u64)>) {
        s.apply(MetaCommand::ReplicaPurged(PurgeReport {
            collection: faces(),
            shard: (eu(), shard),
            node,
            through,
            at_ms: 5_000 + node,
            applied,
        }))
        .unwrap();
    }

    #[test]
    fn a_job_is_done_when_every_replica_of_every_shard_purged_through_its_erase() {
        let mut s = with_collection();
        start(&mut s, "j1").unwrap();
        assert_eq!(
            start(&mut s, "j1"),
            Err(Refused::Job(crate::erasure::JobRefused::Exists("j1".into())))
        );
        s.apply(MetaCommand::ErasureCommitted {
            job: "j1".into(),
            at_ms: 1_010,
            shards: vec![(0, 40, 3), (1, 17, 2)],
            failed: None,
        })
        .unwrap();
        let j = &s.erasures.jobs["j1"];
        assert_eq!(j.state, JobState::Acknowledged);
        assert_eq!(j.pending().len(), 6);
        // A purge short of the erase's index does not count.
        report(&mut s, 0, 1, 39, vec![]);
        assert_eq!(s.erasures.jobs["j1"].pending().len(), 6);
        for n in [1, 2, 3] {
            report(&mut s, 0, n, 40, vec![("j1".into(), 40, 3)]);
        }
        report(&mut s, 1, 1, 20, vec![("j1".into(), 17, 2)]);
        report(&mut s, 1, 2, 17, vec![]);
        assert_eq!(s.erasures.jobs["j1"].pending(), vec![(1, 3)], "node 3 has not purged shard 1");
        assert!(
            Receipt::of(&s.erasures.jobs["j1"]).is_none(),
            "no receipt while a replica is pending"
        );
        report(&mut s, 1, 3, 18, vec![("j1".into(), 17, 2)]);
        let j = &s.erasures.jobs["j1"];
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.done_at_ms, Some(5_003));
        let r = Receipt::of(j).unwrap();
        assert_eq!((r.erased, r.shards.len()), (5, 2));
        assert_eq!(r.shards[1].log_index, 17);
        let n2 = &r.shards[1].replicas[1];
        assert_eq!(
            (n2.node, n2.purged_through, n2.removed),
            (2, Some(17), None),
            "node 2 reported no count"
        );
        assert_eq!(r.shards[1].replicas[2].removed, Some(2));
    }

    #[test]
    fn a_purge_reported_before_the_acknowledgement_settles_the_job_and_a_moved_replica_ends_removed() {
        let mut s = with_collection();
        start(&mut s, "j2").unwrap();
        for n in [1, 2] {
            report(&mut s, 0, n, 50, vec![]);
            report(&mut s, 1, n, 50, vec![]);
        }
        s.apply(MetaCommand::ErasureCommitted {
            job: "j2".into(),
            at_ms: 1_010,
            shards: vec![(0, 40, 1), (1, 41, 1)],
            failed: None,
        })
        .unwrap();
        assert_eq!(s.erasures.jobs["j2"].pending(), vec![(0, 3), (1, 3)]);
        // Node 3 is down; it is replaced in shard 0 only: shard 1 still waits.
        s.apply(MetaCommand::SetReplicas {
            collection: faces(),
            shard: (eu(), 0),
            replicas: vec![1, 2],
        })
        .unwrap();
        assert_eq!(s.erasures.jobs["j2"].shards[&0].replicas[&3], ReplicaPurge::Removed);
        assert_eq!(s.erasures.jobs["j2"].pending(), vec![(1, 3)]);
        assert!(!s.erasures.purged.contains_key(&(faces(), (eu(), 0), 3)));
        s.apply(MetaCommand::DropCollection { name: faces() }).unwrap();
        assert_eq!(
            s.erasures.jobs["j2"].state,
            JobState::Done,
            "a dropped collection destroys every replica"
        );
    }

    #[test]
    fn a_shard_where_the_erase_removed_nothing_has_nothing_to_purge() {
        let mut s = with_collection();
        start(&mut s, "j4").unwrap();
        // Shard 1's replicas say so before the acknowledgement is recorded.
        for n in [1, 2, 3] {
            report(&mut s, 1, n, 0, vec![("j4".into(), 12, 0)]);
        }
        assert_eq!(s.erasures.jobs["j4"].shards[&1].replicas[&2], ReplicaPurge::NothingErased);
        s.apply(MetaCommand::ErasureCommitted {
            job: "j4".into(),
            at_ms: 3,
            shards: vec![(0, 11, 0), (1, 12, 0)],
            failed: None,
        })
        .unwrap();
        let j = &s.erasures.jobs["j4"];
        assert_eq!(j.state, JobState::Done);
        let r = Receipt::of(j).unwrap();
        assert!(r.shards.iter().flat_map(|s| &s.replicas).all(|r| r.outcome == "nothing-erased"));
    }

    #[test]
    fn a_failed_erase_ends_failed_and_unknown_shards_or_jobs_are_refused() {
        let mut s = with_collection();
        let bad = s.apply(MetaCommand::StartErasure {
            job: "j3".into(),
            kind: EraseKind::Ids,
            collection: faces(),
            region: eu(),
            shards: vec![7],
            at_ms: 1,
        });
        assert!(matches!(bad, Err(Refused::UnknownShard { .. })), "{bad:?}");
        assert!(s.erasures.jobs.is_empty(), "a refused start leaves nothing");
        start(&mut s, "j3").unwrap();
        s.apply(MetaCommand::ErasureCommitted {
            job: "j3".into(),
            at_ms: 2,
            shards: vec![(0, 9, 1)],
            failed: Some("shard 1 unavailable".into()),
        })
        .unwrap();
        assert!(matches!(s.erasures.jobs["j3"].state, JobState::Failed { .. }));
        let unknown = s.apply(MetaCommand::ErasureCommitted {
            job: "nope".into(),
            at_ms: 2,
            shards: vec![],
            failed: None,
        });
        assert!(matches!(unknown, Err(Refused::Job(_))), "{unknown:?}");
    }

    #[test]
    fn replicas_rewrite_one_at_a_time_in_id_order_by_their_marks() {
        let mut s = with_collection();
        let shard = (eu(), 0);
        let behind = |s: &MetaState, node| s.erasures.behind_before(&faces(), &shard, &[1, 2, 3], node, None, 40);
        assert_eq!(behind(&s, 1), Vec::<u64>::new());
        assert_eq!(behind(&s, 3), vec![1, 2]);
        report(&mut s, 0, 1, 40, vec![]);
        assert_eq!(behind(&s, 3), vec![2]);
        report(&mut s, 0, 2, 45, vec![]);
        assert_eq!(behind(&s, 3), Vec::<u64>::new());
    }

    #[test]
    fn the_leader_rewrites_last() {
        let mut s = with_collection();
        let shard = (eu(), 0);
        let behind = |s: &MetaState, node| s.erasures.behind_before(&faces(), &shard, &[1, 2, 3], node, Some(1), 40);
        // Node 1 leads: it waits for both followers; they skip it.
        assert_eq!(behind(&s, 1), vec![2, 3]);
        assert_eq!(behind(&s, 2), Vec::<u64>::new());
        assert_eq!(behind(&s, 3), vec![2]);
        report(&mut s, 0, 2, 40, vec![]);
        assert_eq!(behind(&s, 3), Vec::<u64>::new());
        assert_eq!(behind(&s, 1), vec![3]);
        report(&mut s, 0, 3, 40, vec![]);
        assert_eq!(behind(&s, 1), Vec::<u64>::new());
    }

    #[test]
    fn finished_jobs_past_the_limit_go_oldest_first() {
        let mut s = with_collection();
        let n = crate::erasure::KEPT_FINISHED_JOBS + 5;
        for i in 0..n {
            let id = format!("j{i}");
            start(&mut s, &id).unwrap();
            s.apply(MetaCommand::ErasureCommitted {
                job: id,
                at_ms: 2,
                shards: vec![],
                failed: Some("test".into()),
            })
            .unwrap();
        }
        assert_eq!(s.erasures.jobs.len(), crate::erasure::KEPT_FINISHED_JOBS);
        assert!(!s.erasures.jobs.contains_key("j4") && s.erasures.jobs.contains_key("j5"));
    }
}

mod ops_jobs {
    use super::*;
    use crate::erasure::{EraseKind, ReplicaPurge};
    use crate::ops::{JobKind, OpState};

    fn faces() -> CollectionName {
        CollectionName::parse("faces").unwrap()
    }

    /// eu-west nodes 1-3 (zones a, b, c) and 6 (zone a); `faces` with rf 2
    /// on eu-west's two shards, both on nodes 1 and 2.
    fn with_collection() -> MetaState {
        let mut s = cluster();
        s.apply(MetaCommand::RegisterNode(node(6, eu(), "a"))).unwrap();
        let mut r = BTreeMap::new();
        r.insert((eu(), 0), vec![1, 2]);
        r.insert((eu(), 1), vec![1, 2]);
        let mut sp = spec(2);
        sp.regions.retain(|r| r.region == eu());
        s.apply(MetaCommand::CreateCollection { spec: sp, replicas: r }).unwrap();
        s
    }

    /// Plays the shard leaders: every running move is carried out, and the
    /// meta leader advances, until `job` ends (bounded).
    fn run(s: &mut MetaState, job: &str) -> Vec<String> {
        let mut moves = Vec::new();
        for t in 0..100 {
            let running: Vec<String> = s
                .ops
                .running()
                .filter(|j| matches!(j.kind, JobKind::Move(_)))
                .map(|j| j.id.clone())
                .collect();
            for m in running {
                s.apply(MetaCommand::MoveDone {
                    job: m.clone(),
                    at_ms: 100 + t,
                })
                .unwrap();
                moves.push(m);
            }
            s.apply(MetaCommand::AdvanceOps { at_ms: 100 + t }).unwrap();
            if s.ops.jobs[job].state.finished() {
                return moves;
            }
        }
        panic!("job {job} did not finish: {:?}", s.ops.jobs[job]);
    }

    fn drain(s: &mut MetaState, job: &str, node: u64, concurrency: u32) -> Result<Applied, Refused> {
        s.apply(MetaCommand::StartDrain {
            job: job.into(),
            node,
            concurrency,
            at_ms: 1,
        })
    }

    fn rebalance(s: &mut MetaState, job: &str, region: RegionId, concurrency: u32) -> Result<Applied, Refused> {
        s.apply(MetaCommand::StartRebalance {
            job: job.into(),
            region,
            concurrency,
            at_ms: 1,
        })
    }

    fn held(s: &MetaState, node: u64) -> usize {
        s.collections
            .values()
            .flat_map(|c| c.shards.values())
            .filter(|r| r.replicas.contains(&node))
            .count()
    }

    #[test]
    fn a_drain_moves_every_replica_off_the_node_inside_its_region_and_marks_it_drained() {
        let mut s = with_collection();
        drain(&mut s, "d", 1, 1).unwrap();
        assert_eq!(s.nodes[&1].status, NodeStatus::Draining);
        // Concurrency 1: one move at a time, a child of the drain.
        let children: Vec<&crate::ops::Job> = s.ops.children("d").collect();
        assert_eq!(children.len(), 1);
        assert_eq!(children[0].id, "d.0");
        let moves = run(&mut s, "d");
        assert_eq!(moves, ["d.0", "d.1"]);
        assert_eq!(s.ops.jobs["d"].state, OpState::Done);
        assert_eq!(s.nodes[&1].status, NodeStatus::Drained);
        assert_eq!(held(&s, 1), 0);
        for c in s.collections.values() {
            for ((region, _), r) in &c.shards {
                assert_eq!(r.replicas.len(), 2);
                assert!(r.replicas.iter().all(|n| s.nodes[n].region == *region), "R1: {r:?}");
            }
        }
        // Drained survives a restart's re-registration and a missed heartbeat.
        s.apply(MetaCommand::RegisterNode(node(1, eu(), "a"))).unwrap();
        assert_eq!(s.nodes[&1].status, NodeStatus::Drained);
        s.apply(MetaCommand::SetNodeStatus {
            node: 1,
            status: NodeStatus::Down,
        })
        .unwrap();
        s.apply(MetaCommand::Heartbeat { node: 1, at_ms: 9 }).unwrap();
        assert_eq!(s.nodes[&1].status, NodeStatus::Drained);
        // A drained node is no move target; undrained, it is again.
        let e = s
            .apply(MetaCommand::StartMove {
                job: "m".into(),
                collection: faces(),
                shard: (eu(), 0),
                from: 2,
                to: 1,
                at_ms: 2,
            })
            .unwrap_err();
        assert!(e.to_string().contains("must be up"), "{e}");
        s.apply(MetaCommand::Undrain { node: 1 }).unwrap();
        assert_eq!(s.nodes[&1].status, NodeStatus::Up);
    }

    #[test]
    fn a_drain_that_would_leave_a_shard_short_is_refused_naming_it_and_changes_nothing() {
        let mut s = cluster();
        let mut r = BTreeMap::new();
        r.insert((eu(), 0), vec![1, 2, 3]);
        r.insert((eu(), 1), vec![1, 2, 3]);
        let mut sp = spec(3);
        sp.regions.retain(|r| r.region == eu());
        s.apply(MetaCommand::CreateCollection { spec: sp, replicas: r }).unwrap();
        let before = s.clone();
        let e = drain(&mut s, "d", 2, 0).unwrap_err();
        assert!(
            e.to_string().contains("faces/eu-west/0") && e.to_string().contains("add a node"),
            "{e}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn cancelling_a_drain_cancels_its_running_moves_and_the_node_takes_replicas_again() {
        let mut s = with_collection();
        drain(&mut s, "d", 1, 2).unwrap();
        assert_eq!(s.ops.running().filter(|j| j.parent.is_some()).count(), 2);
        s.apply(MetaCommand::EndOp {
            job: "d".into(),
            failed: None,
            at_ms: 2,
        })
        .unwrap();
        assert_eq!(s.ops.running().count(), 0);
        assert_eq!(s.ops.jobs["d.0"].state, OpState::Cancelled);
        assert_eq!(s.nodes[&1].status, NodeStatus::Up);
        // The shard map is as before: nothing was moved.
        assert_eq!(held(&s, 1), 2);
        // A child cancelled alone fails its parent at the next advance.
        drain(&mut s, "d2", 1, 1).unwrap();
        s.apply(MetaCommand::EndOp {
            job: "d2.0".into(),
            failed: None,
            at_ms: 4,
        })
        .unwrap();
        s.apply(MetaCommand::AdvanceOps { at_ms: 5 }).unwrap();
        assert!(matches!(&s.ops.jobs["d2"].state, OpState::Failed(w) if w.contains("d2.0")));
        assert_eq!(s.nodes[&1].status, NodeStatus::Up);
    }

    #[test]
    fn a_rebalance_fixes_its_plan_runs_it_and_leaves_every_node_within_one_of_the_mean() {
        let mut s = with_collection();
        // Loads: 1 and 2 hold two each; 3 and 6 none.
        rebalance(&mut s, "r", eu(), 1).unwrap();
        let JobKind::Rebalance(r) = &s.ops.jobs["r"].kind else { panic!() };
        assert_eq!(r.plan.len(), 2, "{:?}", r.plan);
        let moves = run(&mut s, "r");
        assert_eq!(moves.len(), 2);
        for n in [1, 2, 3, 6] {
            assert_eq!(held(&s, n), 1, "node {n}");
        }
        // Nothing more to do: a new rebalance is done at once.
        rebalance(&mut s, "r2", eu(), 0).unwrap();
        assert_eq!(s.ops.jobs["r2"].state, OpState::Done);
        // A region with no node is refused.
        let e = rebalance(&mut s, "r3", RegionId::parse("ap-south").unwrap(), 0).unwrap_err();
        assert!(e.to_string().contains("no node"), "{e}");
    }

    #[test]
    fn a_planned_move_the_cluster_made_pointless_is_skipped_with_why() {
        let mut s = with_collection();
        rebalance(&mut s, "r", eu(), 1).unwrap();
        let JobKind::Rebalance(r) = s.ops.jobs["r"].kind.clone() else {
            panic!()
        };
        // The second planned move's target goes down before its turn.
        let second = &r.plan[1];
        s.apply(MetaCommand::SetNodeStatus {
            node: second.to,
            status: NodeStatus::Down,
        })
        .unwrap();
        run(&mut s, "r");
        let JobKind::Rebalance(r) = &s.ops.jobs["r"].kind else { panic!() };
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].1.contains("must be up"), "{:?}", r.skipped);
        assert_eq!(s.ops.jobs["r"].state, OpState::Done);
    }

    #[test]
    fn a_moves_target_joins_the_unfinished_erasure_jobs_of_its_shard_and_leaves_them_if_cancelled() {
        let mut s = with_collection();
        s.apply(MetaCommand::StartErasure {
            job: "e1".into(),
            kind: EraseKind::Subject,
            collection: faces(),
            region: eu(),
            shards: vec![0, 1],
            at_ms: 1,
        })
        .unwrap();
        s.apply(MetaCommand::StartMove {
            job: "m".into(),
            collection: faces(),
            shard: (eu(), 0),
            from: 1,
            to: 3,
            at_ms: 2,
        })
        .unwrap();
        // A job started during the move includes its target too.
        s.apply(MetaCommand::StartErasure {
            job: "e2".into(),
            kind: EraseKind::Subject,
            collection: faces(),
            region: eu(),
            shards: vec![0],
            at_ms: 3,
        })
        .unwrap();
        for e in ["e1", "e2"] {
            assert_eq!(s.erasures.jobs[e].shards[&0].replicas.get(&3), Some(&ReplicaPurge::Pending), "{e}");
            assert!(!s.erasures.jobs[e].shards.get(&1).is_some_and(|x| x.replicas.contains_key(&3)));
        }
        s.apply(MetaCommand::EndOp {
            job: "m".into(),
            failed: None,
            at_ms: 4,
        })
        .unwrap();
        for e in ["e1", "e2"] {
            assert_eq!(s.erasures.jobs[e].shards[&0].replicas.get(&3), Some(&ReplicaPurge::Removed), "{e}");
            assert_eq!(s.erasures.jobs[e].shards[&0].replicas.get(&1), Some(&ReplicaPurge::Pending), "{e}");
        }
    }
}

mod split {
    use super::*;
    use crate::erasure::EraseKind;
    use crate::ops::OpState;

    fn faces() -> CollectionName {
        CollectionName::parse("faces").unwrap()
    }

    fn with_collection() -> MetaState {
        let mut s = cluster();
        let replicas = place_collection(&spec(2), &candidates(&s)).unwrap();
        s.apply(MetaCommand::CreateCollection { spec: spec(2), replicas }).unwrap();
        s
    }

    fn start(s: &mut MetaState, job: &str, shard: u32) -> Result<Applied, Refused> {
        s.apply(MetaCommand::StartSplit {
            job: job.into(),
            collection: faces(),
            shard: (eu(), shard),
            at_ms: 1,
        })
    }

    #[test]
    fn a_split_switches_the_map_to_two_new_shards_in_one_version_and_numbers_are_never_reused() {
        let mut s = with_collection();
        let before = s.clone();
        let parent = s.collections[&faces()].shards[&(eu(), 1)].clone();
        start(&mut s, "s1", 1).unwrap();
        // Started, nothing routes differently yet.
        assert_eq!(s.map_version, before.map_version);
        assert_eq!(s.collections, before.collections);
        let j = s.ops.jobs["s1"].as_split().unwrap().clone();
        assert_eq!((j.low, j.high), (2, 3));
        assert_eq!(j.replicas, parent.replicas);
        // One job per shard; moves wait too.
        assert!(start(&mut s, "s2", 1).is_err());
        let mv = s.apply(MetaCommand::StartMove {
            job: "m".into(),
            collection: faces(),
            shard: (eu(), 1),
            from: parent.replicas[0],
            to: [1, 2, 3].into_iter().find(|n| !parent.replicas.contains(n)).unwrap(),
            at_ms: 1,
        });
        assert!(matches!(mv, Err(Refused::Op(ref m)) if m.contains("splitting")), "{mv:?}");
        assert_eq!(
            s.apply(MetaCommand::SplitDone {
                job: "s1".into(),
                at_ms: 2
            }),
            Ok(Applied::MapVersion(before.map_version + 1))
        );
        let c = &s.collections[&faces()];
        assert!(!c.shards.contains_key(&(eu(), 1)));
        let (lo, hi) = parent.range.split().unwrap();
        assert_eq!(c.shards[&(eu(), 2)].range, lo);
        assert_eq!(c.shards[&(eu(), 3)].range, hi);
        assert_eq!(c.shards[&(eu(), 2)].replicas, parent.replicas);
        let map = c.spec.shard_map(&eu()).unwrap();
        assert_eq!(map.numbers().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(c.spec.region(&eu()).unwrap().shard_count, 3);
        c.spec.validate().unwrap();
        // Done twice is done once.
        assert_eq!(
            s.apply(MetaCommand::SplitDone {
                job: "s1".into(),
                at_ms: 3
            }),
            Ok(Applied::Done)
        );
        // A cancelled split's numbers are not handed out again.
        start(&mut s, "s3", 0).unwrap();
        s.apply(MetaCommand::EndOp {
            job: "s3".into(),
            failed: None,
            at_ms: 4,
        })
        .unwrap();
        assert!(
            s.apply(MetaCommand::SplitDone {
                job: "s3".into(),
                at_ms: 5
            })
            .is_err(),
            "a cancelled split never switches"
        );
        start(&mut s, "s4", 0).unwrap();
        let j = s.ops.jobs["s4"].as_split().unwrap();
        assert_eq!((j.low, j.high), (6, 7));
    }

    #[test]
    fn an_erasure_cancels_a_split_of_its_shard_and_an_unfinished_one_holds_a_split_back() {
        let mut s = with_collection();
        start(&mut s, "s1", 0).unwrap();
        s.apply(MetaCommand::StartErasure {
            job: "e1".into(),
            kind: EraseKind::Subject,
            collection: faces(),
            region: eu(),
            shards: vec![0, 1],
            at_ms: 10,
        })
        .unwrap();
        let j = &s.ops.jobs["s1"];
        assert_eq!(j.state, OpState::Cancelled);
        assert!(j.progress.contains("erasure job e1"), "{}", j.progress);
        let again = start(&mut s, "s2", 0);
        assert!(matches!(again, Err(Refused::Op(ref m)) if m.contains("e1")), "{again:?}");
    }

    #[test]
    fn a_split_of_an_unknown_shard_is_refused_and_changes_nothing() {
        let mut s = with_collection();
        let before = s.clone();
        assert!(matches!(start(&mut s, "s1", 9), Err(Refused::UnknownShard { .. })));
        assert_eq!(s, before);
    }
}

#[test]
fn key_rates_need_meta_level_2_and_go_with_their_key() {
    use crate::keys::{ApiKeyRecord, KeyRate, Scopes, hash_secret};
    let key = |id: &str| ApiKeyRecord {
        id: id.into(),
        sha256: hash_secret("s"),
        scopes: Scopes::all(),
        created_ms: 1,
    };
    let rate = KeyRate { per_second: 10, burst: 20 };
    let mut s = cluster();
    assert_eq!(s.ext.level, BASE_LEVEL);
    s.apply(MetaCommand::AddApiKey(key("a"))).unwrap();
    // Below level 2 nothing about rates applies, and nothing changes.
    let before = s.clone();
    let e = s
        .apply(MetaCommand::SetKeyRate {
            id: "a".into(),
            rate: Some(rate),
        })
        .unwrap_err();
    assert!(e.to_string().contains("needs meta level 2"), "{e}");
    assert!(s.apply(MetaCommand::AddRatedKey { key: key("b"), rate }).is_err());
    assert_eq!(s, before);
    // A level above this build's is refused; the level never goes down.
    assert!(s.apply(MetaCommand::SetMetaLevel { level: META_LEVEL + 1 }).is_err());
    s.apply(MetaCommand::SetMetaLevel { level: 2 }).unwrap();
    s.apply(MetaCommand::SetMetaLevel { level: 1 }).unwrap();
    assert_eq!(s.ext.level, 2);
    // A bad rate or an unknown key is refused whole.
    let zero = KeyRate { per_second: 0, burst: 1 };
    assert!(
        s.apply(MetaCommand::SetKeyRate {
            id: "a".into(),
            rate: Some(zero)
        })
        .is_err()
    );
    assert!(s.apply(MetaCommand::AddRatedKey { key: key("b"), rate: zero }).is_err());
    assert!(!s.api_keys.contains_key("b"));
    assert_eq!(
        s.apply(MetaCommand::SetKeyRate {
            id: "nobody".into(),
            rate: Some(rate)
        }),
        Err(Refused::UnknownKey("nobody".into()))
    );
    s.apply(MetaCommand::SetKeyRate {
        id: "a".into(),
        rate: Some(rate),
    })
    .unwrap();
    s.apply(MetaCommand::AddRatedKey { key: key("b"), rate }).unwrap();
    assert_eq!(s.ext.key_rates.len(), 2);
    assert!(s.apply(MetaCommand::AddRatedKey { key: key("b"), rate }).is_err());
    // A heartbeat-only comparison sees a rate change.
    let mut t = s.clone();
    t.apply(MetaCommand::SetKeyRate {
        id: "a".into(),
        rate: None,
    })
    .unwrap();
    assert!(!s.same_but_progress(&t));
    // Revoking a key drops its rate: a new key of that id starts without it.
    s.apply(MetaCommand::RevokeApiKey { id: "b".into() }).unwrap();
    assert!(!s.ext.key_rates.contains_key("b"));
    s.apply(MetaCommand::AddApiKey(key("b"))).unwrap();
    assert!(!s.ext.key_rates.contains_key("b"));
}
