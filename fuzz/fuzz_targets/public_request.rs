//! Every public call's request: the first byte picks the call, the rest is
//! its body. The body is decoded as the server decodes it (prost, as
//! `sovra_proto::codec::StrictCodec` does), then taken through the wire-to-
//! domain conversions and the validation against a collection that the
//! services run before anything touches state. Nothing here may panic,
//! overflow, or allocate without bound, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sovra_proto::convert;
use sovra_proto::v1;
use sovra_types::validate;
use std::sync::OnceLock;

const NOW_MS: u64 = 1_780_000_000_000;

/// The collection requests are checked against: 4-d, L2, uk and us.
fn spec() -> &'static sovra_types::CollectionSpec {
    static SPEC: OnceLock<sovra_types::CollectionSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        convert::spec_from(v1::CollectionSpec {
            name: "people".into(),
            dimension: 4,
            metric: v1::Metric::L2 as i32,
            regions: ["uk", "us"]
                .iter()
                .map(|r| v1::RegionShards {
                    region: (*r).into(),
                    shard_count: 2,
                })
                .collect(),
            replication_factor: 3,
            ..Default::default()
        })
        .expect("a valid spec")
    })
}

fn ids(ids: &[v1::PointId]) {
    for (i, id) in ids.iter().enumerate() {
        let _ = convert::point_id_from(Some(id), &format!("ids[{i}]"));
    }
}

fn filter(f: Option<&v1::Filter>) {
    if let Some(f) = f {
        let _ = convert::filter_from(f, "filter");
    }
}

fn region(r: &str) {
    let _ = validate::check_region(spec(), r);
}

/// Decodes `body` as `T` and hands it to `then` (a body that does not decode
/// is refused INVALID_ARGUMENT before any of this).
fn with<T: Message + Default>(body: &[u8], then: impl FnOnce(T)) {
    if let Ok(m) = T::decode(body) {
        then(m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 35 {
        0 => with(body, |r: v1::CreateCollectionRequest| {
            if let Some(s) = r.collection {
                let _ = convert::spec_from(s);
            }
        }),
        1 => with(body, |r: v1::UpsertRequest| {
            let mut records = Vec::new();
            for (i, p) in r.points.into_iter().enumerate() {
                if let Ok(rec) = convert::point_from(p, i) {
                    records.push(rec);
                }
            }
            let _ = validate::prepare_batch(spec(), records, NOW_MS);
        }),
        2 => with(body, |r: v1::DeletePointsRequest| {
            region(&r.region);
            ids(&r.ids);
        }),
        3 => with(body, |r: v1::GetPointsRequest| {
            region(&r.region);
            ids(&r.ids);
        }),
        4 => with(body, |r: v1::ScrollRequest| {
            region(&r.region);
            filter(r.filter.as_ref());
        }),
        5 => with(body, |r: v1::SearchRequest| {
            let _ = validate::prepare_vector(spec(), r.vector, "vector");
            filter(r.filter.as_ref());
        }),
        6 => with(body, |r: v1::RegisterOptOutRequest| {
            region(&r.region);
            let _ = validate::check_likeness(spec(), &r.vector, r.threshold, "vector");
            if !r.subject.is_empty() {
                let _ = validate::check_subject(&r.subject, "subject");
            }
        }),
        7 => with(body, |r: v1::LikenessAccessRequest| {
            region(&r.region);
            let _ = validate::check_likeness(spec(), &r.vector, r.threshold, "vector");
        }),
        8 => with(body, |r: v1::SubjectAccessRequest| {
            region(&r.region);
            let _ = validate::check_subject(&r.subject, "subject");
        }),
        9 => with(body, |r: v1::EraseRequest| {
            region(&r.region);
            match r.target {
                Some(v1::erase_request::Target::Ids(e)) => ids(&e.ids),
                Some(v1::erase_request::Target::Subject(s)) => {
                    let _ = validate::check_subject(&s, "subject");
                }
                Some(v1::erase_request::Target::Filter(f)) => filter(Some(&f)),
                _ => {}
            }
        }),
        10 => with(body, |r: v1::GetCollectionRequest| {
            let _ = sovra_types::CollectionName::parse(&r.name);
        }),
        11 => with(body, |r: v1::DropCollectionRequest| {
            let _ = sovra_types::CollectionName::parse(&r.name);
        }),
        12 => with(body, |_: v1::ListCollectionsRequest| {}),
        13 => with(body, |_: v1::RemoveOptOutRequest| {}),
        14 => with(body, |_: v1::GetErasureJobRequest| {}),
        15 => with(body, |_: v1::QueryAuditRequest| {}),
        16 => with(body, |_: v1::ExportAuditRequest| {}),
        17 => with(body, |_: v1::GetAuditCheckpointRequest| {}),
        18 => with(body, |_: v1::DrainNodeRequest| {}),
        19 => with(body, |_: v1::UndrainNodeRequest| {}),
        20 => with(body, |_: v1::RebalanceRequest| {}),
        21 => with(body, |_: v1::MoveReplicaRequest| {}),
        22 => with(body, |_: v1::SplitShardRequest| {}),
        23 => with(body, |_: v1::ExportShardRequest| {}),
        24 => with(body, |_: v1::RestoreShardStateRequest| {}),
        25 => with(body, |_: v1::RecoverShardRequest| {}),
        26 => with(body, |_: v1::ListJobsRequest| {}),
        27 => with(body, |_: v1::CancelJobRequest| {}),
        28 => with(body, |_: v1::ClusterStatusRequest| {}),
        29 => with(body, |_: v1::CreateKeyRequest| {}),
        30 => with(body, |_: v1::ListKeysRequest| {}),
        31 => with(body, |_: v1::RevokeKeyRequest| {}),
        32 => with(body, |r: v1::SetRegionPolicyRequest| {
            if let Some(p) = r.policy {
                let _ = sovra_types::RegionId::parse(&p.region);
            }
        }),
        33 => with(body, |_: v1::ListRegionPoliciesRequest| {}),
        _ => with(body, |_: v1::SetKeyRateRequest| {}),
    }
});
