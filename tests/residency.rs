//! R1 placement and R2 residency with nodes in two regions: a node opens
//! storage only for its own region's shards, accepts points only of its own
//! region, and never searches another region's shards.

use sovra_proto::v1;
use sovra_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_r2_each_region_holds_and_accepts_only_its_own_data() {
    let mut nodes = TestNode::start_cluster(&[(1, "eu-west"), (2, "us-east")]).await;
    let mut s = spec("faces", 2, v1::Metric::L2, "eu-west");
    s.regions.push(v1::RegionShards {
        region: "us-east".into(),
        shard_count: 2,
    });
    nodes[0]
        .collections
        .create_collection(v1::CreateCollectionRequest { collection: Some(s) })
        .await
        .unwrap();

    // R2: a us-east point sent to the eu-west node is refused, naming where to send it.
    let err = nodes[0]
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: vec![point(1, vec![1.0, 0.0], "us-east")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("through a node of us-east"), "{}", err.message());
    // Through its own region's node it is accepted.
    nodes[1]
        .points
        .upsert(v1::UpsertRequest {
            collection: "faces".into(),
            points: vec![point(1, vec![1.0, 0.0], "us-east")],
        })
        .await
        .unwrap();

    // R1: each node holds replicas of its own region's shards only.
    for (i, region) in [(0usize, "eu-west"), (1, "us-east")] {
        let info = nodes[i]
            .collections
            .get_collection(v1::GetCollectionRequest {
                name: "faces".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for sh in &info.shards {
            assert_eq!(sh.held, sh.region == region, "node {} shard {}/{}", i + 1, sh.region, sh.number);
            let expected = if sh.region == "eu-west" { vec![1] } else { vec![2] };
            assert_eq!(sh.replicas, expected);
        }
    }

    // The eu-west node never asks us-east shards: us-east has no policy
    // letting its results leave it, so the region is excluded, not searched.
    let r = nodes[0]
        .search
        .search(v1::SearchRequest {
            collection: "faces".into(),
            vector: vec![1.0, 0.0],
            k: 5,
            allow_partial: true,
            with_payload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.hits.is_empty(), "another region's point came back: {:?}", r.hits);
    assert!(!r.partial);
    assert!(r.shards.iter().all(|s| s.region == "eu-west" && s.answered), "{:?}", r.shards);
    assert_eq!(r.excluded.len(), 1);
    assert_eq!(r.excluded[0].region, "us-east");
    assert!(r.excluded[0].reason.contains("policy"), "{}", r.excluded[0].reason);
}
