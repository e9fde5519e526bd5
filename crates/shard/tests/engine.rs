//! Behaviour of one shard engine: what is never returned, determinism of apply,
//! idempotent replay, reopening from disk, compaction under concurrent writes.

mod common;

use common::*;
use sovra_shard::{NodeStore, SearchParams, ShardEngine};
use sovra_types::*;
use std::collections::HashSet;

fn v(i: u64) -> Vec<f32> {
    vec![(i % 17) as f32, (i / 17) as f32, 1.0, (i % 5) as f32]
}

fn ids(engine: &ShardEngine, q: &[f32], k: usize, now_ms: u64) -> Vec<u64> {
    let (hits, _) = engine.search(&SearchParams {
        vector: q,
        k,
        ef: 64,
        filter: None,
        now_ms,
    });
    hits.iter()
        .map(|h| match h.id {
            PointId::Num(n) => n,
            PointId::Uuid(_) => panic!(),
        })
        .collect()
}

/// Upserts in batches the log accepts (at most 1,000 points each).
fn upsert(engine: &ShardEngine, range: std::ops::Range<u64>) {
    let recs: Vec<_> = range.map(|i| record(i, v(i), Payload::new())).collect();
    for batch in recs.chunks(1000) {
        let out = engine.apply_next(&ShardCommand::Upsert(batch.to_vec())).unwrap();
        assert_eq!(out.rejected, None);
    }
}

#[test]
fn deleted_overwritten_and_expired_points_never_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    upsert(&e, 0..500);
    // Delete the nearest neighbours of the query, overwrite one far away so that
    // its new vector sits on the query, and expire another.
    let q = v(40);
    let near = ids(&e, &q, 20, 0);
    let deleted: Vec<PointId> = near.iter().take(10).map(|&n| PointId::Num(n)).collect();
    e.apply_next(&ShardCommand::Delete(deleted.clone())).unwrap();
    let mut moved = record(499, q.clone(), Payload::new());
    moved.vector[2] = 1.0;
    let mut expiring = record(near[10], v(near[10]), Payload::new());
    expiring.expires_at_ms = 1_000;
    e.apply_next(&ShardCommand::Upsert(vec![moved, expiring])).unwrap();

    for phase in ["before compaction", "after compaction"] {
        let got = ids(&e, &q, 50, 2_000);
        assert_eq!(got.len(), 50, "{phase}");
        for d in &deleted {
            let PointId::Num(n) = d else { unreachable!() };
            assert!(!got.contains(n), "{phase}: deleted {n} returned");
            assert!(e.get(d, 2_000).unwrap().is_none());
        }
        assert!(!got.contains(&near[10]), "{phase}: expired point returned");
        assert!(e.get(&PointId::Num(near[10]), 2_000).unwrap().is_none());
        assert!(ids(&e, &q, 50, 999).contains(&near[10]), "{phase}: not yet expired at 999");
        assert_eq!(got[0], 499, "{phase}: overwritten point is found at its new place");
        // The old vector of 499 must not be found: only one hit for 499.
        assert_eq!(got.iter().filter(|&&n| n == 499).count(), 1);
        e.compact();
    }
}

#[test]
fn nothing_is_returned_when_no_live_point_is_reachable() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    upsert(&e, 0..200);
    let all: Vec<PointId> = (0..200).map(PointId::Num).collect();
    e.apply_next(&ShardCommand::Delete(all[..199].to_vec())).unwrap();
    assert_eq!(ids(&e, &v(3), 10, 0), vec![199]);
    e.apply_next(&ShardCommand::Delete(vec![PointId::Num(199)])).unwrap();
    assert!(ids(&e, &v(3), 10, 0).is_empty());
    // All expired rather than deleted: same answer.
    let recs: Vec<_> = (0..50)
        .map(|i| {
            let mut r = record(i, v(i), Payload::new());
            r.expires_at_ms = 10;
            r
        })
        .collect();
    e.apply_next(&ShardCommand::Upsert(recs)).unwrap();
    assert!(ids(&e, &v(3), 10, 10).is_empty());
    // A filter no point matches: nothing, not the entry point.
    let f = Filter::Condition(Condition::Match {
        key: "none".into(),
        value: Value::Bool(true),
    });
    let (hits, _) = e.search(&SearchParams {
        vector: &v(3),
        k: 5,
        ef: 64,
        filter: Some(&f),
        now_ms: 0,
    });
    assert!(hits.is_empty());
}

fn commands() -> Vec<ShardCommand> {
    let mut out = Vec::new();
    for round in 0..6u64 {
        let recs = (0..80).map(|i| {
            let id = (i * 7 + round * 13) % 150;
            let mut p = Payload::new();
            p.insert("round".into(), Value::Integer(round as i64));
            let mut r = record(id, v(id + round), p);
            if i % 9 == 0 {
                r.expires_at_ms = 1000 + round;
            }
            r
        });
        out.push(ShardCommand::Upsert(recs.collect()));
        out.push(ShardCommand::Delete((0..10).map(|i| PointId::Num(i * 11 + round)).collect()));
    }
    out
}

#[test]
fn replaying_the_same_commands_gives_the_same_digest() {
    let run = |compact_midway: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let e = open(tmp.path(), &spec("c", 4, Metric::L2));
        for (i, c) in commands().iter().enumerate() {
            assert!(e.apply(i as u64 + 1, c).unwrap().applied);
            if compact_midway && i == 5 {
                e.compact();
            }
        }
        let d = e.digest().unwrap();
        // Replaying the whole log again is a no-op.
        for (i, c) in commands().iter().enumerate() {
            assert!(!e.apply(i as u64 + 1, c).unwrap().applied);
        }
        assert_eq!(e.digest().unwrap(), d);
        assert_eq!(e.last_applied(), commands().len() as u64);
        (d, e.stats().live_points)
    };
    let a = run(false);
    assert_eq!(a, run(false));
    assert_eq!(a, run(true));
    // A different history gives a different digest (the digest is not constant).
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    e.apply(1, &commands()[0]).unwrap();
    assert_ne!(e.digest().unwrap(), a.0);
}

#[test]
fn reopening_rebuilds_the_index_and_keeps_last_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let c = spec("c", 4, Metric::L2);
    let (digest, before) = {
        let store = NodeStore::open(&tmp.path().join("node"), 8 << 20).unwrap();
        store.put_collection(&c).unwrap();
        let e = open(tmp.path(), &c);
        upsert(&e, 0..300);
        e.apply_next(&ShardCommand::Delete(vec![PointId::Num(5)])).unwrap();
        (e.digest().unwrap(), ids(&e, &v(7), 10, 0))
    };
    let store = NodeStore::open(&tmp.path().join("node"), 8 << 20).unwrap();
    assert_eq!(store.collections().unwrap(), vec![c.clone()]);
    let e = open(tmp.path(), &c);
    assert_eq!(e.last_applied(), 2);
    assert_eq!(e.digest().unwrap(), digest);
    assert_eq!(e.stats().live_points, 299);
    assert_eq!(ids(&e, &v(7), 10, 0), before);
    assert!(e.get(&PointId::Num(5), 0).unwrap().is_none());
}

#[test]
fn subject_and_expiry_indexes_follow_overwrites_and_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    let mut a = record(1, v(1), Payload::new());
    a.subject = "alice".into();
    a.expires_at_ms = 50;
    let mut b = record(2, v(2), Payload::new());
    b.subject = "alice".into();
    e.apply_next(&ShardCommand::Upsert(vec![a.clone(), b])).unwrap();
    assert_eq!(e.store().ids_of_subject("alice").unwrap(), vec![PointId::Num(1), PointId::Num(2)]);
    assert_eq!(e.store().expired_ids(60, 10).unwrap(), vec![PointId::Num(1)]);
    // Overwrite 1 with another subject and no expiry; delete 2.
    a.subject = "bob".into();
    a.expires_at_ms = 0;
    e.apply_next(&ShardCommand::Upsert(vec![a])).unwrap();
    e.apply_next(&ShardCommand::Delete(vec![PointId::Num(2)])).unwrap();
    assert!(e.store().ids_of_subject("alice").unwrap().is_empty());
    assert_eq!(e.store().ids_of_subject("bob").unwrap(), vec![PointId::Num(1)]);
    assert!(e.store().expired_ids(u64::MAX, 10).unwrap().is_empty());
}

#[test]
fn compaction_keeps_writes_made_while_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    upsert(&e, 0..3000);
    e.apply_next(&ShardCommand::Delete((0..1000).map(PointId::Num).collect())).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for round in 0..20u64 {
                upsert(&e, 3000 + round * 10..3010 + round * 10);
                e.apply_next(&ShardCommand::Delete(vec![PointId::Num(1000 + round)])).unwrap();
            }
        });
        e.compact();
        writer.join().unwrap();
    });
    let want: HashSet<u64> = (1020..3200).collect();
    assert_eq!(e.stats().live_points, want.len());
    // Every live point is findable by its own vector; none of the deleted ones.
    for probe in [1000u64, 1019, 1020, 2500, 3000, 3199] {
        let got = ids(&e, &v(probe), 200, 0);
        assert!(got.iter().all(|n| want.contains(n)), "deleted point returned near {probe}");
    }
    let (hits, _) = e.search(&SearchParams {
        vector: &v(0),
        k: 5000,
        ef: 5000,
        filter: None,
        now_ms: 0,
    });
    let got: HashSet<u64> = hits
        .iter()
        .map(|h| match h.id {
            PointId::Num(n) => n,
            _ => 0,
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn invalid_commands_are_recorded_rejections_and_invalid_stored_records_fail_the_load() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec("c", 4, Metric::L2);
    let e = open(tmp.path(), &s);
    upsert(&e, 0..10);
    let before = e.digest().unwrap();
    // A 2-d vector in a 4-d collection would panic inside the index.
    let bad = ShardCommand::Upsert(vec![record(99, vec![1.0, 2.0], Payload::new())]);
    let out = e.apply_next(&bad).unwrap();
    assert!(out.applied && out.changed == 0);
    assert!(out.rejected.as_deref().unwrap().contains("dimension 2"), "{out:?}");
    assert_eq!(e.stats().live_points, 10);
    assert!(e.get(&PointId::Num(99), 0).unwrap().is_none());
    let r = e.rejections().unwrap();
    assert_eq!((r.count, r.recent[0].index), (1, out.index));
    assert_ne!(e.digest().unwrap(), before, "the digest covers rejections");
    // Replayed on another replica, the same entries give the same state.
    let tmp2 = tempfile::tempdir().unwrap();
    let e2 = open(tmp2.path(), &s);
    upsert(&e2, 0..10);
    e2.apply_next(&bad).unwrap();
    assert_eq!(e2.digest().unwrap(), e.digest().unwrap());

    // A record an older build might have stored: the shard refuses to load,
    // naming it, instead of panicking in the index.
    drop(e);
    let id = shard_id(&s);
    let replica = common::replica(tmp.path());
    let raw = sovra_shard::store::ShardStore::new(replica.points().clone());
    let mut b = raw.batch();
    b.upsert(&record(7, vec![1.0], Payload::new())).unwrap();
    b.commit(100).unwrap();
    let err = ShardEngine::open(id, std::sync::Arc::new(s), &replica, Default::default())
        .err()
        .expect("an invalid stored record fails the load");
    assert!(err.to_string().contains("record 7") && err.to_string().contains("invalid"), "{err}");
}

/// Every id the engine returns for a handful of queries, with ef high enough to
/// be exact on these sizes.
fn answers(engine: &ShardEngine) -> Vec<Vec<u64>> {
    (0..20u64).map(|i| ids(engine, &v(i * 37), 10, 1)).collect()
}

/// The distances of `answers`: a rebuilt graph may pick other points among
/// those at an equal distance (the test vectors have integer coordinates, so
/// ties are common), never farther ones.
fn answer_distances(engine: &ShardEngine) -> Vec<Vec<f32>> {
    (0..20u64)
        .map(|i| {
            let (hits, _) = engine.search(&SearchParams {
                vector: &v(i * 37),
                k: 10,
                ef: 64,
                filter: None,
                now_ms: 1,
            });
            hits.iter().map(|h| h.distance).collect()
        })
        .collect()
}

#[test]
fn a_saved_index_is_loaded_on_open_and_its_file_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("saved", 4, Metric::L2);
    let before = {
        let e = open(dir.path(), &s);
        upsert(&e, 0..3000);
        e.apply_next(&ShardCommand::Delete((0..3000).step_by(4).map(PointId::Num).collect()))
            .unwrap();
        assert!(!e.loaded_saved_index());
        assert!(e.save_index().unwrap());
        (answers(&e), e.stats())
    };
    let file = dir.path().join("replica").join(sovra_shard::engine::INDEX_FILE);
    assert!(file.exists());
    let e = open(dir.path(), &s);
    assert!(e.loaded_saved_index(), "the saved index was rebuilt instead of loaded");
    assert!(!file.exists(), "the file stays behind after it was loaded");
    assert_eq!(answers(&e), before.0);
    assert_eq!(
        (e.stats().live_points, e.stats().tombstones),
        (before.1.live_points, before.1.tombstones)
    );
    assert!(answers(&e).iter().flatten().all(|id| id % 4 != 0), "a deleted point came back");
    // It keeps taking writes.
    upsert(&e, 3000..3100);
    assert_eq!(ids(&e, &v(3050), 1, 1), vec![3050]);
}

#[test]
fn a_stale_or_damaged_saved_index_is_rebuilt_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("stale", 4, Metric::L2);
    let file = dir.path().join("replica").join(sovra_shard::engine::INDEX_FILE);
    let want = {
        let e = open(dir.path(), &s);
        upsert(&e, 0..2000);
        e.save_index().unwrap();
        // A write after the save makes the file stale.
        upsert(&e, 2000..2100);
        answer_distances(&e)
    };
    let e = open(dir.path(), &s);
    assert!(!e.loaded_saved_index(), "a stale index was trusted");
    assert!(!file.exists());
    assert_eq!(answer_distances(&e), want);
    assert_eq!(ids(&e, &v(2050), 1, 1), vec![2050]);
    e.save_index().unwrap();
    drop(e);

    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let e = open(dir.path(), &s);
    assert!(!e.loaded_saved_index(), "a damaged index was trusted");
    assert!(!file.exists());
    assert_eq!(answer_distances(&e), want);
}
