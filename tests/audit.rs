//! The audit log on real in-process clusters: every call writes its record to
//! the log of each region whose data it touched, on nodes of that region only;
//! a collection can require `x-purpose`; records hold no vector or subject id;
//! an export verifies against a signed checkpoint, and an edited, removed,
//! reordered or truncated record is named; a call whose record cannot be
//! committed fails (fail closed). Also `sovra ctl status` and `shards`, which
//! read the same cluster through the admin API.

use sovra_audit::Bad;
use sovra_proto::v1::{self, audit_client::AuditClient};
use sovra_tests::*;
use std::time::Duration;
use tonic::Code;

const EU: &str = "eu";
const US: &str = "us";
/// A subject id that must never appear in the audit log.
const SUBJECT: &str = "person-alpha-7731";

fn audit(n: &TestNode) -> AuditClient<Keyed> {
    AuditClient::new(keyed(&n.channel, &n.key))
}

fn with_purpose<T>(msg: T, purpose: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-purpose", purpose.parse().unwrap());
    r
}

fn vector(i: u64) -> Vec<f32> {
    vec![i as f32 * 0.25 + 0.125, 1.5, -(i as f32), 0.375]
}

fn person(i: u64, region: &str) -> v1::Point {
    let mut p = point(i, vector(i), region);
    p.subject = SUBJECT.into();
    p
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn field(line: &str, name: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(line).unwrap()[name].clone()
}

fn checkpoint(c: &v1::AuditCheckpoint) -> (sovra_audit::Checkpoint, ed25519_dalek::VerifyingKey) {
    let key: [u8; 32] = hex::decode(&c.public_key).unwrap().try_into().unwrap();
    (
        sovra_audit::Checkpoint {
            origin: c.origin.clone(),
            size: c.size,
            root: c.root.clone(),
            signature: c.signature.clone(),
        },
        ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_is_audited_in_the_regions_it_touched_and_the_export_verifies() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU), (3, US)]).await;
    let mut spec = sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[EU, US], 1, 1);
    spec.require_purpose = true;
    nodes[0]
        .collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await
        .unwrap();
    // us results may come to eu coordinators, so a search from eu reads both.
    nodes[0]
        .admin
        .set_region_policy(v1::SetRegionPolicyRequest {
            policy: Some(v1::RegionPolicy {
                region: US.into(),
                results_may_go_to: vec![EU.into()],
            }),
        })
        .await
        .unwrap();

    // Without a purpose the collection refuses the call, and says how to fix it.
    let e = nodes[0]
        .points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: vec![person(1, EU)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("x-purpose"), "{}", e.message());

    for (n, region, ids) in [(0, EU, 1..4), (2, US, 10..12)] {
        let pts = ids.map(|i| person(i, region)).collect();
        nodes[n]
            .points
            .upsert(with_purpose(
                v1::UpsertRequest {
                    collection: "people".into(),
                    points: pts,
                },
                "onboarding",
            ))
            .await
            .unwrap();
    }
    let query = vector(2);
    let before_search = sovra_node::cluster::now_ms();
    let hits = nodes[0]
        .search
        .search(with_purpose(
            v1::SearchRequest {
                collection: "people".into(),
                vector: query.clone(),
                k: 3,
                consistency: v1::Consistency::Linearizable as i32,
                ..Default::default()
            },
            "fraud-check",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hits.hits.len(), 3);
    let after_search = sovra_node::cluster::now_ms() + 1;

    // Each region's log lives on its own nodes only.
    let view = nodes[0].node().state.view();
    assert!(
        view.state.audit[&sovra_types::RegionId::parse(EU).unwrap()]
            .replicas
            .iter()
            .all(|n| [1, 2].contains(n))
    );
    assert_eq!(
        view.state.audit[&sovra_types::RegionId::parse(US).unwrap()].replicas,
        [3].into_iter().collect()
    );
    let e = audit(&nodes[0])
        .export_audit(v1::ExportAuditRequest {
            region: US.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let eu = audit_export(&nodes[1], EU, 7).await;
    let us = audit_export(&nodes[2], US, 7).await;
    let calls = |lines: &[String]| {
        lines
            .iter()
            .map(|l| field(l, "call").as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // eu: the policy change (no region's data: the answering node's region),
    // the refused upsert, eu's upsert and the search; us: its upsert and the search.
    let (eu_calls, us_calls) = (calls(&eu), calls(&us));
    for c in ["set_region_policy", "upsert", "search"] {
        assert!(eu_calls.contains(&c.to_string()), "eu log {eu_calls:?} lacks {c}");
    }
    assert!(
        us_calls.contains(&"upsert".to_string()) && us_calls.contains(&"search".to_string()),
        "{us_calls:?}"
    );
    assert!(!us_calls.contains(&"set_region_policy".to_string()), "{us_calls:?}");
    let refused = eu
        .iter()
        .find(|l| field(l, "status") == "INVALID_ARGUMENT")
        .expect("the refused upsert is audited");
    assert_eq!(field(refused, "call"), "upsert");
    for log in [&eu, &us] {
        let search = log.iter().find(|l| field(l, "call") == "search").unwrap();
        assert_eq!(field(search, "purpose"), "fraud-check");
        assert_eq!(field(search, "collection"), "people");
        assert_eq!(field(search, "results"), 3);
        assert_eq!(field(search, "shards"), 2);
        assert_eq!(field(search, "status"), "OK");
        assert_eq!(field(search, "query_sha256"), sovra_audit::vector_sha256(&query).as_str());
        assert_eq!(field(search, "key_id"), nodes[0].key.split('_').nth(1).unwrap());
        let regions: Vec<String> = serde_json::from_value(field(search, "regions")).unwrap();
        assert_eq!(regions, [EU, US]);
        // Never a subject id or a vector in the clear.
        for l in log {
            assert!(!l.contains(SUBJECT), "a subject id in the audit log: {l}");
            assert!(
                !l.contains("0.125") && !l.contains("0.375"),
                "a vector component in the audit log: {l}"
            );
        }
    }

    // By time: the search (and whatever else fell in that window), nothing before.
    let page = audit(&nodes[0])
        .query_audit(v1::QueryAuditRequest {
            region: EU.into(),
            from_ms: before_search,
            to_ms: after_search,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(calls(&page.lines).contains(&"search".to_string()), "{:?}", page.lines);
    for l in &page.lines {
        let at = field(l, "at_ms").as_u64().unwrap();
        assert!((before_search..after_search).contains(&at), "{l}");
    }

    // A signed checkpoint, under the cluster's audit key; the export verifies.
    let c = audit(&nodes[0])
        .get_audit_checkpoint(v1::GetAuditCheckpointRequest { region: EU.into() })
        .await
        .unwrap()
        .into_inner();
    let expected_key = sovra_node::receipt::ReceiptKey::derived(CLUSTER_SECRET.as_bytes(), sovra_node::receipt::AUDIT_LABEL);
    assert_eq!(c.public_key, expected_key.public_hex());
    assert_eq!(c.origin, "sovra-audit/eu");
    let (cp, key) = checkpoint(&c);
    let eu = audit_export(&nodes[1], EU, 7).await;
    assert!(eu.len() as u64 >= cp.size);
    assert_eq!(sovra_audit::verify_export(refs(&eu), &cp, &key), Ok(cp.size));

    // Tampering with the export is named.
    let size = cp.size as usize;
    assert!(size >= 4, "{size}");
    let mut edited = eu[..size].to_vec();
    edited[1] = edited[1]
        .replace("\"OK\"", "\"PERMISSION_DENIED\"")
        .replace("\"INVALID_ARGUMENT\"", "\"OK\"");
    assert_ne!(edited[1], eu[1]);
    assert_eq!(sovra_audit::verify_export(refs(&edited), &cp, &key), Err(Bad::Altered { seq: 1 }));
    let mut removed = eu[..size].to_vec();
    removed.remove(2);
    assert!(matches!(
        sovra_audit::verify_export(refs(&removed), &cp, &key),
        Err(Bad::Sequence { expected: 2, found: 3, .. })
    ));
    let mut swapped = eu[..size].to_vec();
    swapped.swap(1, 2);
    assert!(matches!(
        sovra_audit::verify_export(refs(&swapped), &cp, &key),
        Err(Bad::Sequence { expected: 1, found: 2, .. })
    ));
    assert_eq!(
        sovra_audit::verify_export(refs(&eu[..size - 1]), &cp, &key),
        Err(Bad::Truncated {
            have: cp.size - 1,
            want: cp.size
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_whose_audit_record_cannot_be_committed_fails() {
    let faults = sovra_raft::Faults::default();
    let nodes = TestNode::start_cluster_faults(&[(1, EU), (2, EU), (3, EU)], |c| c.key_lease_ms = 120_000, faults.clone()).await;
    let mut n0 = nodes.into_iter().collect::<Vec<_>>();
    // One shard, one replica: a node that holds it answers a search alone.
    n0[0]
        .collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[EU], 1, 1)),
        })
        .await
        .unwrap();
    let info = n0[0]
        .collections
        .get_collection(v1::GetCollectionRequest {
            name: "people".into(),
            with_digest: false,
        })
        .await
        .unwrap()
        .into_inner();
    let holder = info.shards[0].replicas[0];
    let at = n0.iter().position(|n| n.node().state.config.node_id == holder).unwrap();
    let n = &mut n0[at];
    n.points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: (1..4).map(|i| person(i, EU)).collect(),
        })
        .await
        .unwrap();
    let search = v1::SearchRequest {
        collection: "people".into(),
        vector: vector(1),
        k: 2,
        ..Default::default()
    };
    n.search.search(search.clone()).await.unwrap();
    let audit_replicas = sovra_node::audit::replicas_of(&n.node().state, &sovra_types::RegionId::parse(EU).unwrap());
    assert_eq!(audit_replicas.len(), 3, "{audit_replicas:?}");

    // Cut the holder off from the other two: its shard still answers (a
    // group of one), its key lease holds, but the region's audit log has no
    // quorum on its side. The search must fail, saying why.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != holder).collect();
    faults.partition([holder], others);
    let e = n.search.search(search.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit record could not be committed"), "{}", e.message());

    faults.heal();
    eventually(
        "searches pass again once the audit log has its quorum",
        Duration::from_secs(30),
        async || n.search.search(search.clone()).await.ok(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sovra_ctl_status_and_shards_list_every_node_and_shard_as_tables_and_json() {
    let mut nodes = TestNode::start_cluster(&[(1, EU), (2, EU), (3, US)]).await;
    nodes[0]
        .collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(sovra_node::dev::spanning_spec("people", 4, v1::Metric::L2, &[EU, US], 2, 1)),
        })
        .await
        .unwrap();
    let (addr, key) = (nodes[1].node().grpc_addr.to_string(), nodes[0].key.clone());
    let conn = |format| sovra_node::ctl::Conn::to(addr.clone(), key.clone(), format);
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&sovra_node::ctl::status(&conn(sovra_node::ctl::Format::Json)).await.unwrap()).unwrap();
    assert_eq!(json.len(), 3, "{json:?}");
    assert_eq!(json.iter().filter(|n| n["meta"] == "leader").count(), 1, "{json:?}");
    assert!(json.iter().all(|n| n["state"] == "up"));
    let audit: Vec<u64> = json
        .iter()
        .filter(|n| n["audit"] == "yes")
        .map(|n| n["node"].as_u64().unwrap())
        .collect();
    assert_eq!(audit, [1, 2, 3], "every node holds its region's audit log");
    let replicas: u64 = json.iter().map(|n| n["replicas"].as_u64().unwrap()).sum();
    assert_eq!(replicas, 4, "2 shards x 2 regions, rf 1");
    let status = sovra_node::ctl::status(&conn(sovra_node::ctl::Format::Table)).await.unwrap();
    assert!(
        status.lines().last().unwrap().starts_with("meta level 2, shard map version"),
        "{status}"
    );
    let table = sovra_node::ctl::collections(&conn(sovra_node::ctl::Format::Table), true, Some("people"))
        .await
        .unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("collection region shard replicas leader"), "{table}");
    assert_eq!(lines.len(), 5, "{table}");
    // Aligned: every row's second column starts where the header's does.
    let at = lines[0].find("region").unwrap();
    assert!(
        lines[1..].iter().all(|l| &l[at..at + 2] == "eu" || &l[at..at + 2] == "us"),
        "{table}"
    );
    // A key without the admin scope is refused, saying so.
    let reader = nodes[0]
        .make_key(
            "reader",
            v1::KeyScopes {
                read_regions: vec!["*".into()],
                ..Default::default()
            },
        )
        .await;
    let e = sovra_node::ctl::status(&sovra_node::ctl::Conn {
        key: Some(reader),
        ..conn(sovra_node::ctl::Format::Table)
    })
    .await
    .unwrap_err();
    assert!(e.to_string().contains("admin"), "{e}");
}
