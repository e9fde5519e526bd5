//! Erasure on one replica: what each kind of erasure removes, the suppression
//! list it leaves (keyed hashes only), the consent rule for re-ingest checked
//! at apply, and that all of it survives a reopen and is covered by the digest.

mod common;

use common::*;
use sovra_shard::{SearchParams, ShardEngine, id_tag};
use sovra_types::*;

fn v(i: u64) -> Vec<f32> {
    vec![(i % 17) as f32, (i / 17) as f32, 1.0, (i % 5) as f32]
}

/// Points 0..n; subject "alice" for ids below 10, else `subject-<id % 97>`;
/// payload `team` = id % 3.
fn fill(e: &ShardEngine, n: u64) {
    let recs: Vec<PointRecord> = (0..n)
        .map(|i| {
            let mut payload = Payload::new();
            payload.insert("team".into(), Value::Integer((i % 3) as i64));
            let mut r = record(i, v(i), payload);
            if i < 10 {
                r.subject = "alice".into();
            }
            r
        })
        .collect();
    let out = e.apply_next(&ShardCommand::Upsert(recs)).unwrap();
    assert_eq!(out.rejected, None);
}

fn erase(target: EraseTarget, at_ms: u64) -> ShardCommand {
    ShardCommand::Erase(Erase {
        job: "erase-test".into(),
        target,
        at_ms,
        salt: [7; 32],
    })
}

fn live_ids(e: &ShardEngine) -> Vec<u64> {
    e.store()
        .points()
        .map(|r| match r.unwrap().id {
            PointId::Num(n) => n,
            PointId::Uuid(_) => unreachable!(),
        })
        .collect()
}

fn found(e: &ShardEngine, q: &[f32], k: usize) -> Vec<u64> {
    let (hits, _) = e.search(&SearchParams {
        vector: q,
        k,
        ef: 64,
        filter: None,
        now_ms: 1,
    });
    hits.iter()
        .map(|h| match h.id {
            PointId::Num(n) => n,
            PointId::Uuid(_) => unreachable!(),
        })
        .collect()
}

fn alice(id: u64, basis: LawfulBasis, consent_at_ms: u64) -> PointRecord {
    let mut r = record(id, v(id), Payload::new());
    r.subject = "alice".into();
    r.lawful_basis = basis;
    r.consent_at_ms = consent_at_ms;
    r
}

#[test]
fn erasing_a_subject_removes_its_points_everywhere_and_suppresses_it_by_a_keyed_hash_only() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    fill(&e, 200);
    let out = e.apply_next(&erase(EraseTarget::Subject("alice".into()), 1_000)).unwrap();
    assert_eq!((out.changed, out.rejected), (10, None));
    assert!(live_ids(&e).iter().all(|&n| n >= 10), "an erased point is still stored");
    assert_eq!(e.store().ids_of_subject("alice").unwrap(), Vec::<PointId>::new());
    for i in 0..10 {
        assert!(e.get(&PointId::Num(i), 1).unwrap().is_none());
        assert!(!found(&e, &v(i), 20).iter().any(|&n| n < 10), "search returned an erased point");
    }
    let s = e.store().suppression().unwrap();
    assert_eq!(s.key, Some([7; 32]), "the first erasure's salt became the key");
    assert_eq!(s.entries, vec![(sovra_shard::subject_tag(&[7; 32], "alice"), 1_000)]);
    // No key or value of the store holds the subject id in the clear.
    for kv in e.replica().points().iter() {
        let (k, val) = kv.unwrap();
        let has = |b: &[u8]| b.windows(5).any(|w| w == b"alice");
        assert!(!has(&k) && !has(&val), "the subject id is stored in the clear");
    }
}

#[test]
fn a_suppressed_subject_is_written_again_only_with_consent_given_after_the_erasure() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    fill(&e, 50);
    e.apply_next(&erase(EraseTarget::Subject("alice".into()), 5_000)).unwrap();
    // A write validated before the erasure committed arrives after it: the
    // check runs at apply, so it is refused, and nothing of the batch is written.
    for (basis, consent) in [
        (LawfulBasis::Consent, 0),
        (LawfulBasis::Consent, 4_999),
        (LawfulBasis::Consent, 5_000),
        (LawfulBasis::LegitimateInterests, 0),
    ] {
        let batch = vec![record(900, v(900), Payload::new()), alice(901, basis, consent)];
        let out = e.apply_next(&ShardCommand::Upsert(batch)).unwrap();
        let why = out.rejected.unwrap_or_else(|| panic!("{basis:?} consent {consent} was let in"));
        assert!(
            why.contains("points[1]") && why.contains("suppression list") && !why.contains("alice"),
            "{why}"
        );
        assert!(
            e.get(&PointId::Num(900), 1).unwrap().is_none(),
            "part of a refused batch was written"
        );
        assert!(e.get(&PointId::Num(901), 1).unwrap().is_none());
    }
    let out = e
        .apply_next(&ShardCommand::Upsert(vec![alice(901, LawfulBasis::Consent, 5_001)]))
        .unwrap();
    assert_eq!(out.rejected, None, "consent after the erasure lets the subject back in");
    assert!(e.get(&PointId::Num(901), 1).unwrap().is_some());
    // Other subjects were never affected.
    assert_eq!(
        e.apply_next(&ShardCommand::Upsert(vec![record(902, v(902), Payload::new())]))
            .unwrap()
            .rejected,
        None
    );
}

#[test]
fn erasing_ids_or_a_filter_removes_exactly_those_points_and_suppresses_no_one() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    fill(&e, 90);
    let out = e
        .apply_next(&erase(
            EraseTarget::Ids(vec![PointId::Num(3), PointId::Num(40), PointId::Num(5_000)]),
            10,
        ))
        .unwrap();
    assert_eq!(out.changed, 2, "the unknown id counts nothing");
    let team1 = Filter::Condition(Condition::Match {
        key: "team".into(),
        value: Value::Integer(1),
    });
    let out = e.apply_next(&erase(EraseTarget::Filter(team1), 20)).unwrap();
    let left = live_ids(&e);
    assert_eq!(out.changed, (0..90).filter(|i| i % 3 == 1 && *i != 40).count());
    let want: Vec<u64> = (0..90).filter(|i| i % 3 != 1 && *i != 3).collect();
    assert_eq!(left, want);
    assert!(
        e.store().suppression().unwrap().entries.is_empty(),
        "ids and filters suppress no subject"
    );
    assert_eq!(
        e.apply_next(&ShardCommand::Upsert(vec![alice(3, LawfulBasis::Unspecified, 0)]))
            .unwrap()
            .rejected,
        None
    );
}

#[test]
fn erasing_the_region_empties_the_shard_and_suppresses_every_subject_it_held() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    fill(&e, 120);
    let out = e.apply_next(&erase(EraseTarget::All, 77)).unwrap();
    assert_eq!(out.changed, 120);
    assert!(live_ids(&e).is_empty());
    assert!(found(&e, &v(5), 10).is_empty());
    // alice plus subject-<n> for every n that ids 10..120 produce.
    let subjects: std::collections::BTreeSet<u64> = (10..120).map(|i| i % 97).collect();
    assert_eq!(e.store().suppression().unwrap().entries.len(), 1 + subjects.len());
    let out = e
        .apply_next(&ShardCommand::Upsert(vec![record(10, v(10), Payload::new())]))
        .unwrap();
    assert!(out.rejected.is_some(), "a subject of the erased region came back without consent");
}

#[test]
fn suppression_survives_a_reopen_and_replicas_that_applied_the_same_log_have_equal_digests() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = spec("c", 4, Metric::L2);
    let log = [
        ShardCommand::Upsert((0..60).map(|i| record(i, v(i), Payload::new())).collect()),
        erase(EraseTarget::Subject("subject-5".into()), 100),
        erase(EraseTarget::Subject("subject-6".into()), 200),
    ];
    let digests: Vec<u64> = [&a, &b]
        .iter()
        .map(|dir| {
            let e = open(dir.path(), &s);
            for (i, c) in log.iter().enumerate() {
                e.apply(i as u64 + 1, c).unwrap();
            }
            e.digest().unwrap()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    // Another salt in a later erasure does not change the key already adopted,
    // and a different suppression list changes the digest.
    let e = open(a.path(), &s);
    assert_eq!(e.digest().unwrap(), digests[0], "reopening changed the state");
    let mut later = Erase {
        job: "erase-later".into(),
        target: EraseTarget::Subject("subject-7".into()),
        at_ms: 300,
        salt: [9; 32],
    };
    e.apply(4, &ShardCommand::Erase(later.clone())).unwrap();
    assert_eq!(e.store().suppression().unwrap().key, Some([7; 32]));
    assert_ne!(e.digest().unwrap(), digests[0]);
    let out = e.apply(5, &ShardCommand::Upsert(vec![record(5, v(5), Payload::new())])).unwrap();
    assert!(out.rejected.is_some(), "suppression was lost on reopen");
    later.job = String::new();
    // An invalid erasure (no job id) is refused on apply like any invalid entry.
    let out = e.apply(6, &ShardCommand::Erase(later)).unwrap();
    assert!(out.rejected.is_some());
}

#[test]
fn the_sweepers_erasure_removes_only_points_still_expired_when_it_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(tmp.path(), &spec("c", 4, Metric::L2));
    let recs: Vec<PointRecord> = (0..10)
        .map(|i| {
            let mut r = record(i, v(i), Payload::new());
            r.expires_at_ms = 1_000;
            r
        })
        .collect();
    e.apply_next(&ShardCommand::Upsert(recs)).unwrap();
    let expired = e.store().expired_ids(1_500, 100).unwrap();
    assert_eq!(expired.len(), 10);
    // Point 4 is rewritten with a later expiry between the sweep's scan and
    // its command's apply: it stays.
    let mut renewed = record(4, v(4), Payload::new());
    renewed.expires_at_ms = 9_000;
    e.apply_next(&ShardCommand::Upsert(vec![renewed])).unwrap();
    let out = e
        .apply_next(&erase(
            EraseTarget::Expired {
                ids: expired,
                now_ms: 1_500,
            },
            1_500,
        ))
        .unwrap();
    assert_eq!(out.changed, 9);
    assert_eq!(live_ids(&e), vec![4]);
    assert!(e.store().expired_ids(1_500, 100).unwrap().is_empty());
    assert!(e.store().suppression().unwrap().entries.is_empty(), "expiry suppresses no subject");
}

fn holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            holds(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn a_rewrite_leaves_no_removed_value_in_the_files_and_one_cut_off_is_finished_on_open() {
    use sovra_shard::{CacheBudget, ReplicaStore};
    let tmp = tempfile::tempdir().unwrap();
    let budget = CacheBudget::new(8 << 20, 4);
    let dir = tmp.path().join("r");
    const CANARY: &[u8] = b"canary-removed-value";
    {
        let r = ReplicaStore::open(&dir, &budget).unwrap();
        for i in 0..2000u32 {
            let mut v = vec![b'.'; 200];
            if i % 10 == 0 {
                v[50..50 + CANARY.len()].copy_from_slice(CANARY);
            }
            r.points().insert(i.to_be_bytes(), v).unwrap();
        }
        r.db().flush().unwrap();
        for i in (0..2000u32).step_by(10) {
            r.points().remove(i.to_be_bytes()).unwrap();
        }
        r.db().flush().unwrap();
        // Positive control: removed and flushed, the values are still in sled's files.
        assert!(holds(&dir, CANARY), "the control failed: sled dropped the removed values itself");
        r.rewrite().unwrap();
    }
    assert!(!holds(&dir, CANARY), "a removed value is still in the files after the rewrite");
    let kept = |dir: &std::path::Path| {
        let r = ReplicaStore::open(dir, &budget).unwrap();
        let n = r.points().len();
        assert!(r.points().get(0u32.to_be_bytes()).unwrap().is_none());
        assert!(r.points().get(1u32.to_be_bytes()).unwrap().is_some());
        n
    };
    assert_eq!(kept(&dir), 1800);
    // Cut off between the two renames: the flushed copy waits under its own
    // name, the old database under its own; open swaps the copy in.
    std::fs::rename(dir.join("db"), dir.join("db.rewrite")).unwrap();
    std::fs::create_dir_all(dir.join("db.old")).unwrap();
    std::fs::write(dir.join("db.old").join("junk"), CANARY).unwrap();
    assert_eq!(kept(&dir), 1800);
    assert!(!dir.join("db.old").exists() && !dir.join("db.rewrite").exists());
    // Cut off while copying: the partial copy is dropped, the database kept.
    std::fs::create_dir_all(dir.join("db.rewrite")).unwrap();
    std::fs::write(dir.join("db.rewrite").join("partial"), CANARY).unwrap();
    assert_eq!(kept(&dir), 1800);
    assert!(!dir.join("db.rewrite").exists() && !holds(&dir, CANARY));
}

fn sq(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn opt_out(template: &str, vector: Vec<f32>, threshold: f32) -> ShardCommand {
    erase(
        EraseTarget::Likeness {
            template: template.into(),
            vector,
            threshold,
            subject: None,
        },
        5,
    )
}

#[test]
fn an_opt_out_erases_its_likeness_refuses_it_at_apply_and_suppresses_it_at_search_until_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec("faces", 4, Metric::L2);
    let e = open(tmp.path(), &s);
    fill(&e, 60);
    let face = v(3);
    let threshold = 2.5;
    let within: Vec<u64> = (0..60).filter(|&i| sq(&v(i), &face) <= threshold).collect();
    assert!(within.len() >= 2, "{within:?}");
    let template = "optout-0123456789abcdef0123456789abcdef";
    let out = e.apply_next(&opt_out(template, face.clone(), threshold)).unwrap();
    assert_eq!(out.changed, within.len());
    assert!(live_ids(&e).iter().all(|i| !within.contains(i)));
    assert_eq!(e.opt_out_ids(), [template]);
    // A later write within it is refused at apply, naming no template.
    let out = e
        .apply_next(&ShardCommand::Upsert(vec![record(500, face.clone(), Payload::new())]))
        .unwrap();
    let why = out.rejected.expect("refused");
    assert!(why.contains("a likeness opted out") && !why.contains(template), "{why}");
    // The registry survives a reopen and is in the digest.
    let digest = e.store().digest().unwrap();
    drop(e);
    let e = open(tmp.path(), &s);
    assert_eq!(e.store().digest().unwrap(), digest);
    assert!(
        e.apply_next(&ShardCommand::Upsert(vec![record(501, face.clone(), Payload::new())]))
            .unwrap()
            .rejected
            .is_some()
    );

    // A replica whose store holds a point within the template anyway (an
    // install from a snapshot written otherwise) never returns it.
    let mut records: Vec<PointRecord> = e.store().points().map(|r| r.unwrap()).collect();
    records.push(record(600, face.clone(), Payload::new()));
    let suppression = e.store().suppression().unwrap();
    let at = e.last_applied() + 1;
    e.install(records.into_iter().map(Ok::<_, String>), at, b"", &Default::default(), &suppression)
        .unwrap()
        .unwrap();
    assert!(live_ids(&e).contains(&600), "the crafted point is stored");
    assert!(!found(&e, &face, 10).contains(&600), "a point within an opt-out was returned");
    assert_eq!(found(&e, &face, 10).len(), 10);

    // Removed, the likeness may be written and found again.
    let out = e.apply_next(&ShardCommand::RemoveOptOut { template: template.into() }).unwrap();
    assert_eq!(out.changed, 1);
    assert!(e.opt_out_ids().is_empty());
    assert!(found(&e, &face, 10).contains(&600));
    let out = e
        .apply_next(&ShardCommand::Upsert(vec![record(502, face.clone(), Payload::new())]))
        .unwrap();
    assert_eq!(out.rejected, None);
}

/// Every erased point leaves a tombstone: the keyed hash of its id (never the
/// id) and when it was erased, the later time kept. Tombstones are in the
/// digest, survive a reopen, and a snapshot's install carries them, so a
/// restore can tell a backed-up point that was erased after its backup.
#[test]
fn erased_points_leave_keyed_tombstones_that_snapshots_carry() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec("c", 4, Metric::L2);
    let e = open(tmp.path(), &s);
    fill(&e, 30);
    let before = e.store().digest().unwrap();
    e.apply_next(&erase(EraseTarget::Ids(vec![PointId::Num(12), PointId::Num(13)]), 100))
        .unwrap();
    e.apply_next(&erase(EraseTarget::Subject("alice".into()), 200)).unwrap();
    let side = e.store().suppression().unwrap();
    let key = side.key.unwrap();
    let tag = |i: u64| id_tag(&key, &PointId::Num(i));
    let at: std::collections::BTreeMap<[u8; 32], u64> = side.tombstones.iter().copied().collect();
    assert_eq!(at.len(), 12, "two ids and alice's ten points");
    assert_eq!(at[&tag(12)], 100);
    assert_eq!(at[&tag(3)], 200);
    assert!(!at.contains_key(&tag(20)), "a live point has no tombstone");
    assert!(
        side.tombstones.iter().all(|(t, _)| !t.starts_with(&12u64.to_be_bytes())),
        "no id in clear"
    );
    // Erased again later (written anew, then erased): the later time is kept.
    e.apply_next(&ShardCommand::Upsert(vec![record(12, v(12), Payload::new())]))
        .unwrap();
    e.apply_next(&erase(EraseTarget::Ids(vec![PointId::Num(12)]), 300)).unwrap();
    assert_eq!(e.store().tombstone_at(&tag(12)).unwrap(), Some(300));
    let digest = e.store().digest().unwrap();
    assert_ne!(digest, before);
    drop(e);
    let e = open(tmp.path(), &s);
    assert_eq!(e.store().digest().unwrap(), digest, "tombstones survive a reopen");
    // A fresh replica installed from this one's records and side state holds
    // the same tombstones (and digest).
    let tmp2 = tempfile::tempdir().unwrap();
    let f = open(tmp2.path(), &s);
    let records: Vec<PointRecord> = e.store().points().map(|r| r.unwrap()).collect();
    let side = e.store().suppression().unwrap();
    f.install(
        records.into_iter().map(Ok::<_, String>),
        e.last_applied(),
        b"",
        &Default::default(),
        &side,
    )
    .unwrap()
    .unwrap();
    assert_eq!(f.store().suppression().unwrap().tombstones, side.tombstones);
    assert_eq!(f.store().digest().unwrap(), digest);
}
