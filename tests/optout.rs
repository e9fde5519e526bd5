//! The opt-out registry and subject access on a real in-process cluster: an
//! opt-out erases what is within its threshold (a job with a signed receipt),
//! refuses later writes within it at apply (also writes racing the
//! registration), is audited, and its removal too; subject access lists a
//! subject's points and answers whether a likeness is held, both audited, the
//! probe kept only as its hash.

use sovra_proto::v1::{self, erasure_client::ErasureClient};
use sovra_tests::*;
use std::time::Duration;
use tonic::Code;

const UK: &str = "uk";
const SUBJECT: &str = "person-opted-out-4417";
/// The opted-out likeness (4-d, L2).
const FACE: [f32; 4] = [10.0, 10.0, 10.0, 10.0];
const THRESHOLD: f32 = 1.0;

fn erasure(n: &TestNode) -> ErasureClient<Keyed> {
    ErasureClient::new(keyed(&n.channel, &n.key))
}

/// A point at `FACE` plus `off` on the first axis (squared L2 = off^2).
fn near(i: u64, off: f32) -> v1::Point {
    let mut v = FACE.to_vec();
    v[0] += off;
    let mut p = point(i, v, UK);
    p.subject = SUBJECT.into();
    p.source = "camera-7".into();
    p
}

fn far(i: u64) -> v1::Point {
    point(i, vec![i as f32 * 0.01, -3.0, 2.0, 0.5], UK)
}

async fn upsert(n: &TestNode, pts: Vec<v1::Point>) -> Result<v1::WriteResponse, tonic::Status> {
    let mut c = n.points.clone();
    c.upsert(v1::UpsertRequest {
        collection: "people".into(),
        points: pts,
    })
    .await
    .map(|r| r.into_inner())
}

fn field(line: &str, name: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(line).unwrap()[name].clone()
}

/// Ids of every point within the threshold of `FACE` on every replica's store.
fn held_within(nodes: &[TestNode]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for n in nodes {
        for e in n.node().state.engines() {
            for r in e.store().points() {
                let r = r.unwrap();
                let d: f32 = r.vector.iter().zip(FACE).map(|(a, b)| (a - b) * (a - b)).sum();
                if d <= THRESHOLD {
                    out.push((n.node().state.config.node_id, format!("{:?}", r.id)));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opt_out_erases_with_a_receipt_refuses_later_and_racing_writes_and_is_audited() {
    let nodes = TestNode::start_cluster_with(&[(1, UK), (2, UK), (3, UK)], |c| c.purge_check_ms = 100).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 2, 3)),
    })
    .await
    .unwrap();
    // Three points of the person's likeness (within the threshold), one just
    // outside it, and others far away.
    let mut pts = vec![near(1, 0.0), near(2, 0.5), near(3, -0.9), near(4, 1.2)];
    pts.extend((10..40).map(far));
    upsert(&nodes[0], pts).await.unwrap();

    // Writes of the likeness racing the registration: each either committed
    // first (then the registration erased it) or after (then it is refused
    // at apply). Either way, none is held afterwards.
    let racers: Vec<_> = (100..110u64)
        .map(|i| {
            let n = nodes[(i % 3) as usize].points.clone();
            tokio::spawn(async move {
                let mut n = n;
                n.upsert(v1::UpsertRequest {
                    collection: "people".into(),
                    points: vec![near(i, 0.1)],
                })
                .await
            })
        })
        .collect();
    let reg = erasure(&nodes[0])
        .register_opt_out(v1::RegisterOptOutRequest {
            collection: "people".into(),
            region: UK.into(),
            vector: FACE.to_vec(),
            threshold: THRESHOLD,
            subject: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut refused = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("a likeness opted out"), "{}", e.message());
                refused += 1;
            }
        }
    }
    let erasure_ack = reg.erasure.unwrap();
    assert!(reg.template.starts_with("optout-"), "{}", reg.template);
    // The three, plus every racer that committed before the registration.
    assert_eq!(erasure_ack.erased, 3 + (10 - refused), "refused {refused}");
    assert!(held_within(&nodes).is_empty(), "{:?}", held_within(&nodes));

    // A later write within the threshold is refused, never echoing the template.
    let e = upsert(&nodes[1], vec![near(50, 0.2)]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("a likeness opted out"), "{}", e.message());
    assert!(
        !e.message().contains("10.0") && !e.message().contains(&reg.template),
        "{}",
        e.message()
    );
    // Outside it, writes go on.
    upsert(&nodes[1], vec![near(51, 1.5)]).await.unwrap();
    // Searches near the likeness return nothing within it. (Retried while
    // UNAVAILABLE, as a client would: the purge that follows the erasure
    // takes each replica out for its rewrite, the leader last, and the
    // shard's reads fenced by the erasure wait for the next leader.)
    let hits = eventually("a search near the likeness", Duration::from_secs(30), async || {
        match nodes[2]
            .search
            .clone()
            .search(v1::SearchRequest {
                collection: "people".into(),
                vector: FACE.to_vec(),
                k: 10,
                ..Default::default()
            })
            .await
        {
            Ok(r) => Some(r.into_inner()),
            Err(e) if e.code() == Code::Unavailable => None,
            Err(e) => panic!("{e:?}"),
        }
    })
    .await;
    assert!(hits.hits.iter().all(|h| h.distance > THRESHOLD), "{hits:?}");

    // The registration is an erasure job that ends with a receipt. (Once in
    // a full-suite run a replica's rewrite waited out its turn, 60 s, for a
    // replica before it: allow for that fallback.)
    let job = eventually("the opt-out's erasure job is done", Duration::from_secs(120), async || {
        let j = erasure(&nodes[0])
            .get_erasure_job(v1::GetErasureJobRequest {
                job: erasure_ack.job.clone(),
            })
            .await
            .ok()?
            .into_inner();
        (j.state == "done").then_some(j)
    })
    .await;
    assert_eq!(job.kind, "likeness");
    sovra_node::receipt::verify(&job.receipt_json, &job.signature, &nodes[0].node().state.receipt_key.public_hex()).unwrap();

    // Removing the template is audited, and the likeness may be written again.
    let removed = erasure(&nodes[0])
        .remove_opt_out(v1::RemoveOptOutRequest {
            collection: "people".into(),
            region: UK.into(),
            template: reg.template.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, 2, "both shards held it");
    let e = erasure(&nodes[0])
        .remove_opt_out(v1::RemoveOptOutRequest {
            collection: "people".into(),
            region: UK.into(),
            template: reg.template.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    upsert(&nodes[0], vec![near(60, 0.0)]).await.unwrap();

    let log = audit_export(&nodes[0], UK, 0).await;
    let opt_out = log.iter().find(|l| field(l, "call") == "opt_out").expect("the opt-out is audited");
    assert_eq!(field(opt_out, "query_sha256"), sovra_audit::vector_sha256(&FACE).as_str());
    assert!(field(opt_out, "target").as_str().unwrap().contains(&reg.template));
    assert_eq!(field(opt_out, "results"), erasure_ack.erased);
    let removals: Vec<&String> = log.iter().filter(|l| field(l, "call") == "remove_opt_out").collect();
    assert_eq!(removals.len(), 2, "the removal and the refused second one");
    assert_eq!(field(removals[0], "status"), "OK");
    assert_eq!(field(removals[1], "status"), "NOT_FOUND");
    for l in &log {
        assert!(!l.contains(SUBJECT) && !l.contains("10.0"), "personal data in the audit log: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subject_access_by_subject_and_by_likeness_is_answered_and_audited() {
    let mut nodes = TestNode::start_cluster(&[(1, UK), (2, UK), (3, UK)]).await;
    let mut c = nodes[0].collections.clone();
    c.create_collection(v1::CreateCollectionRequest {
        collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[UK], 3, 1)),
    })
    .await
    .unwrap();
    let mut pts: Vec<v1::Point> = (1..=7).map(|i| near(i, i as f32 * 0.1)).collect();
    pts[0].expires_at_ms = sovra_node::cluster::now_ms() + 3_600_000;
    pts.extend((10..40).map(far));
    upsert(&nodes[0], pts).await.unwrap();

    // By subject, in pages: every point of theirs, with what it was kept for.
    let mut got = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = erasure(&nodes[1])
            .subject_access(v1::SubjectAccessRequest {
                collection: "people".into(),
                region: UK.into(),
                subject: SUBJECT.into(),
                limit: 3,
                cursor: cursor.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.points.len() <= 3);
        got.extend(page.points);
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    let mut ids: Vec<u64> = got
        .iter()
        .map(|p| match p.id.as_ref().unwrap().kind {
            Some(v1::point_id::Kind::Num(n)) => n,
            _ => panic!(),
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=7).collect::<Vec<_>>());
    assert!(got.iter().all(|p| p.source == "camera-7" && p.region == UK));
    assert!(got.iter().all(|p| p.lawful_basis == v1::LawfulBasis::Consent as i32));
    assert_eq!(got.iter().filter(|p| p.expires_at_ms > 0).count(), 1);

    // By likeness: within 0.5 (squared L2) of the face are points 1..=7 at
    // offsets 0.1..0.7 (squared 0.01..0.49).
    let probe = FACE.to_vec();
    let mut e = erasure(&nodes[2]);
    let yes = e
        .likeness_access(v1::LikenessAccessRequest {
            collection: "people".into(),
            region: UK.into(),
            vector: probe.clone(),
            threshold: 0.5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(yes.present && yes.count == 7 && !yes.at_least, "{yes:?}");
    let no = e
        .likeness_access(v1::LikenessAccessRequest {
            collection: "people".into(),
            region: UK.into(),
            vector: vec![-50.0; 4],
            threshold: 0.5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!no.present && no.count == 0, "{no:?}");
    // Bad input is refused with what to fix.
    let bad = e
        .likeness_access(v1::LikenessAccessRequest {
            collection: "people".into(),
            region: UK.into(),
            vector: vec![1.0; 3],
            threshold: 0.5,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    // The data_protection scope is needed.
    let reader = nodes[0]
        .make_key(
            "reader",
            v1::KeyScopes {
                read_regions: vec!["*".into()],
                ..Default::default()
            },
        )
        .await;
    let denied = ErasureClient::new(keyed(&nodes[0].channel, &reader))
        .subject_access(v1::SubjectAccessRequest {
            collection: "people".into(),
            region: UK.into(),
            subject: SUBJECT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Audited: the calls and their counts, the probe as its hash only, never the subject.
    let log = audit_export(&nodes[0], UK, 0).await;
    let by_subject: Vec<&String> = log.iter().filter(|l| field(l, "call") == "subject_access").collect();
    assert_eq!(by_subject.len(), 4, "three pages and the denied call");
    assert_eq!(field(by_subject[3], "status"), "PERMISSION_DENIED");
    let by_likeness: Vec<&String> = log.iter().filter(|l| field(l, "call") == "likeness_access").collect();
    assert_eq!(by_likeness.len(), 3);
    assert_eq!(field(by_likeness[0], "query_sha256"), sovra_audit::vector_sha256(&probe).as_str());
    assert_eq!(field(by_likeness[0], "results"), 7);
    for l in &log {
        assert!(!l.contains(SUBJECT) && !l.contains("10.0"), "personal data in the audit log: {l}");
    }
}
