use super::*;
use crate::collection::{HnswParams, RegionShards};
use crate::error::ErrorCode;
use crate::ids::{CollectionName, PointId};

fn spec(metric: Metric) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("faces").unwrap(),
        dimension: 3,
        metric,
        hnsw: HnswParams::default(),
        regions: vec![RegionShards {
            region: RegionId::parse("eu").unwrap(),
            shard_count: 1,
            split_map: None,
        }],
        replication_factor: 1,
        default_retention_seconds: 60,
        require_lawful_basis: true,
        require_purpose: false,
    }
}

fn point(v: Vec<f32>) -> PointRecord {
    PointRecord {
        id: PointId::Num(1),
        region: RegionId::parse("eu").unwrap(),
        vector: v,
        subject: "s".into(),
        payload: Default::default(),
        lawful_basis: LawfulBasis::Consent,
        source: String::new(),
        expires_at_ms: 0,
        consent_at_ms: 0,
    }
}

fn err(spec: &CollectionSpec, p: PointRecord) -> ApiError {
    prepare_batch(spec, vec![point(vec![1.0, 0.0, 0.0]), p], 1000).unwrap_err()
}

#[test]
fn bad_vectors_are_named() {
    let s = spec(Metric::Cosine);
    let e = err(&s, point(vec![1.0, 2.0]));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains("points[1].vector has dimension 2") && e.message.contains("expects 3"),
        "{}",
        e.message
    );
    let e = err(&s, point(vec![1.0, f32::NAN, 0.0]));
    assert!(e.message.contains("points[1].vector[1] is NaN"), "{}", e.message);
    let e = err(&s, point(vec![1.0, f32::INFINITY, 0.0]));
    assert!(e.message.contains("points[1].vector[1] is inf"), "{}", e.message);
    let e = err(&s, point(vec![0.0, 0.0, 0.0]));
    assert!(e.message.contains("zero vector"), "{}", e.message);
    let e = err(&spec(Metric::Dot), point(vec![3.0, 0.0, 0.0]));
    assert!(e.message.contains("norm 3.0000"), "{}", e.message);
}

#[test]
fn cosine_vectors_are_normalised_and_retention_resolved() {
    let out = prepare_batch(&spec(Metric::Cosine), vec![point(vec![3.0, 4.0, 0.0])], 1000).unwrap();
    assert!((out[0].vector[0] - 0.6).abs() < 1e-6 && (out[0].vector[1] - 0.8).abs() < 1e-6);
    assert_eq!(out[0].expires_at_ms, 1000 + 60_000);
    let mut keep = point(vec![1.0, 0.0, 0.0]);
    keep.expires_at_ms = 5;
    assert_eq!(prepare_batch(&spec(Metric::L2), vec![keep], 1000).unwrap()[0].expires_at_ms, 5);
}

#[test]
fn policy_and_size_errors() {
    let s = spec(Metric::L2);
    let mut p = point(vec![1.0, 0.0, 0.0]);
    p.lawful_basis = LawfulBasis::Unspecified;
    let e = err(&s, p);
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.contains("points[1]") && e.message.contains("lawful basis"));

    let mut p = point(vec![1.0, 0.0, 0.0]);
    p.region = RegionId::parse("us").unwrap();
    let e = err(&s, p);
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains("points[1]: region us is not spanned") && e.message.contains("spans: eu"),
        "{}",
        e.message
    );

    let mut p = point(vec![1.0, 0.0, 0.0]);
    p.payload
        .insert("blob".into(), crate::point::Value::String("x".repeat(MAX_PAYLOAD_BYTES)));
    assert!(err(&s, p).message.contains("points[1].payload is"));

    let many = vec![point(vec![1.0, 0.0, 0.0]); MAX_BATCH_POINTS + 1];
    assert!(prepare_batch(&s, many, 0).unwrap_err().message.contains("at most 1000 per request"));
    assert!(prepare_batch(&s, vec![], 0).unwrap_err().message.contains("empty"));
}

fn shard(number: u32) -> ShardId {
    ShardId {
        collection: CollectionName::parse("faces").unwrap(),
        region: RegionId::parse("eu").unwrap(),
        number,
    }
}

#[test]
fn commands_are_checked_against_their_shard() {
    let mut s = spec(Metric::Cosine);
    s.regions[0].shard_count = 4;
    s.regions.push(RegionShards {
        region: RegionId::parse("us").unwrap(),
        shard_count: 1,
        split_map: None,
    });
    let map = s.shard_map(&RegionId::parse("eu").unwrap()).unwrap();
    let owner = map.shard_for(&PointId::Num(1));
    let good = || ShardCommand::Upsert(vec![point(vec![1.0, 0.0, 0.0])]);
    check_command(&s, &shard(owner), &good()).unwrap();

    // Everything prepare_batch would refuse, and what only the shard can know.
    let other = (owner + 1) % 4;
    let e = check_command(&s, &shard(other), &good()).unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.contains(&format!("belongs to shard {owner}")), "{}", e.message);
    let e = check_command(&s, &shard(other), &ShardCommand::Delete(vec![PointId::Num(1)])).unwrap_err();
    assert!(e.message.contains("ids[0]"), "{}", e.message);

    let mut us = point(vec![1.0, 0.0, 0.0]);
    us.region = RegionId::parse("us").unwrap();
    let e = check_command(&s, &shard(owner), &ShardCommand::Upsert(vec![us])).unwrap_err();
    assert!(
        e.message.contains("region us may not be stored") && e.message.contains("R2"),
        "{}",
        e.message
    );

    let cases: Vec<(PointRecord, &str)> = vec![
        (point(vec![1.0, 0.0]), "dimension 2"),
        (point(vec![f32::NAN, 0.0, 0.0]), "vector[0] is NaN"),
        (point(vec![3.0, 4.0, 0.0]), "norm 5.0000"),
        (
            PointRecord {
                lawful_basis: LawfulBasis::Unspecified,
                ..point(vec![1.0, 0.0, 0.0])
            },
            "lawful basis",
        ),
        (
            PointRecord {
                subject: "s".repeat(MAX_SUBJECT_BYTES + 1),
                ..point(vec![1.0, 0.0, 0.0])
            },
            "subject is",
        ),
    ];
    for (p, needle) in cases {
        let e = check_command(&s, &shard(owner), &ShardCommand::Upsert(vec![p])).unwrap_err();
        assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
    }
    let mut wrong = shard(owner);
    wrong.collection = CollectionName::parse("other").unwrap();
    assert!(check_command(&s, &wrong, &good()).is_err());
}

#[test]
fn long_keys_are_quoted_short() {
    let s = spec(Metric::L2);
    let mut p = point(vec![1.0, 0.0, 0.0]);
    p.payload.insert("k".repeat(20_000), crate::point::Value::Bool(true));
    let e = err(&s, p);
    assert!(e.message.len() < 300 && e.message.contains("(20000 bytes)"), "{}", e.message);
}
