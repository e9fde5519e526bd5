//! Per-key rates (issue 15, part 6): a key's record in meta carries a rate
//! that every coordinator enforces with its own token bucket, refusing
//! RESOURCE_EXHAUSTED with a `retry-after-ms` header; and the meta level that
//! gates the new record: rates are refused until every registered node runs
//! a build that reads them, so a rolling upgrade never commits an entry an
//! older replica cannot decode.

use sovra_proto::v1;
use sovra_tests::{TestNode, eventually};
use std::time::Duration;
use tonic::Code;

fn reader() -> v1::KeyScopes {
    v1::KeyScopes {
        read_regions: vec!["uk".into()],
        ..Default::default()
    }
}

fn rate(per_second: u32, burst: u32) -> Option<v1::KeyRate> {
    Some(v1::KeyRate { per_second, burst })
}

async fn meta_level(n: &TestNode) -> u32 {
    n.admin
        .clone()
        .cluster_status(v1::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .meta_level
}

async fn create_key(n: &TestNode, id: &str, rate: Option<v1::KeyRate>) -> Result<v1::CreateKeyResponse, tonic::Status> {
    let req = v1::CreateKeyRequest {
        id: id.into(),
        scopes: Some(reader()),
        rate,
    };
    n.admin.clone().create_key(req).await.map(|r| r.into_inner())
}

async fn set_rate(c: &sovra_tests::Clients, id: &str, rate: Option<v1::KeyRate>) -> Result<v1::ApiKey, tonic::Status> {
    let req = v1::SetKeyRateRequest { id: id.into(), rate };
    c.admin.clone().set_key_rate(req).await.map(|r| r.into_inner())
}

/// One public call with `c`'s key (a cheap one: it reads the view only).
async fn call(c: &sovra_tests::Clients) -> Result<(), tonic::Status> {
    c.collections
        .clone()
        .list_collections(v1::ListCollectionsRequest {})
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_rate_holds_on_every_node_and_can_be_changed_or_cleared() {
    let mut nodes = TestNode::start_cluster(&[(1, "uk"), (2, "uk")]).await;
    // A new cluster is at this build's level as soon as it serves.
    for n in &nodes {
        assert_eq!(meta_level(n).await, 2);
    }

    // Bad rates are refused whole: no key is left behind.
    for (bad, what) in [
        (rate(0, 5), "per_second is 0"),
        (rate(2_000_000, 0), "per_second is 2000000"),
        (rate(5, 2_000_000), "burst is 2000000"),
    ] {
        let e = create_key(&nodes[0], "bad", bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{}", e.message());
    }
    let keys = nodes[0].admin.list_keys(v1::ListKeysRequest {}).await.unwrap().into_inner().keys;
    assert!(keys.iter().all(|k| k.id != "bad"));

    let made = create_key(&nodes[0], "slow", rate(1, 3)).await.unwrap();
    assert_eq!(made.rate, rate(1, 3));
    let slow: Vec<_> = nodes.iter().map(|n| n.clients(&made.key)).collect();
    // Node 2 has seen the rate once it lists it.
    eventually("node 2 sees the rate", Duration::from_secs(10), async || {
        let keys = nodes[1]
            .admin
            .clone()
            .list_keys(v1::ListKeysRequest {})
            .await
            .ok()?
            .into_inner()
            .keys;
        keys.iter().any(|k| k.id == "slow" && k.rate == rate(1, 3)).then_some(())
    })
    .await;

    // The burst, then a refusal that says when to come back. One token a
    // second comes back, so a slow machine may see a fourth call pass; the
    // fifth in a row cannot, within a second.
    for _ in 0..3 {
        call(&slow[0]).await.unwrap();
    }
    let refused = match call(&slow[0]).await {
        Err(e) => e,
        Ok(()) => call(&slow[0]).await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("API key slow is over its rate"), "{}", refused.message());
    let wait: u64 = refused
        .metadata()
        .get(sovra_proto::RETRY_AFTER_HEADER)
        .expect("retry-after-ms header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&wait), "retry after {wait} ms");
    // Other keys are not held back by it, and the other node has its own bucket.
    call(&nodes[0].clients(&nodes[0].key)).await.unwrap();
    for _ in 0..3 {
        call(&slow[1]).await.unwrap();
    }
    // A token comes back with time.
    eventually("a token comes back", Duration::from_secs(5), async || call(&slow[0]).await.ok()).await;

    // Only an admin sets rates; a bad rate or an unknown key is refused.
    let reader_key = nodes[0].make_key("reader", reader()).await;
    let e = set_rate(&nodes[0].clients(&reader_key), "slow", None).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let admin = nodes[0].clients(&nodes[0].key);
    let e = set_rate(&admin, "nobody", rate(1, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = set_rate(&admin, "slow", rate(0, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Cleared: no limit on the node that took the change.
    assert_eq!(set_rate(&admin, "slow", None).await.unwrap().rate, None);
    for _ in 0..30 {
        call(&slow[0]).await.unwrap();
    }
    // Set again, with a burst of one: the second call at once is refused.
    let k = set_rate(&admin, "slow", rate(1, 0)).await.unwrap();
    assert_eq!(k.rate, rate(1, 1), "a burst of 0 is the rate");
    let refusals = {
        let mut n = 0;
        for _ in 0..3 {
            if call(&slow[0]).await.is_err() {
                n += 1;
            }
        }
        n
    };
    assert!(refusals >= 1, "three calls at once with a burst of 1 were all taken");

    // The rate is in the state a restarted node reads back (format 4).
    let n1 = nodes.remove(0).restart().await;
    let slow1 = n1.clients(&made.key);
    let mut refused = false;
    for _ in 0..5 {
        if let Err(e) = call(&slow1).await {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            refused = true;
        }
    }
    assert!(refused, "the restarted node forgot the key's rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_rates_wait_until_every_registered_node_reads_meta_level_2() {
    // A cluster of a build before levels, stood in for by nodes that say
    // their build reads level 1 only.
    let mut nodes = TestNode::start_cluster_with(&[(1, "uk"), (2, "uk"), (3, "uk"), (4, "uk")], |c| c.claim_meta_level = Some(1)).await;
    assert_eq!(meta_level(&nodes[0]).await, 1);
    let refused_below = async |n: &TestNode| {
        let e = create_key(n, "rated", rate(5, 5)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("needs meta level 2"), "{}", e.message());
    };
    refused_below(&nodes[0]).await;
    // Keys without a rate are made as before.
    nodes[0].make_key("plain", reader()).await;
    // The level stays where it is for `secs` (the leader asks every 3 s).
    let held = async |n: &TestNode, secs: u64, why: &str| {
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            assert_eq!(meta_level(n).await, 1, "the level rose while {why}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };

    // Three of four upgraded: node 4, up on the old build, holds it back.
    let old = nodes.pop().unwrap();
    let mut upgraded = Vec::new();
    for n in nodes.drain(..) {
        upgraded.push(n.restart_with(|c| c.claim_meta_level = None).await);
    }
    held(&upgraded[0], 8, "node 4 reads level 1 only").await;
    refused_below(&upgraded[1]).await;

    // Node 4 stops: silent, it still holds the level (it may come back on
    // the old build) until an SRE drains it.
    let old_dir = old.stop().await;
    held(&upgraded[0], 6, "node 4 was silent but not drained").await;
    upgraded[0]
        .admin
        .drain_node(v1::DrainNodeRequest { node: 4, concurrency: 0 })
        .await
        .unwrap();
    eventually("meta level 2", Duration::from_secs(40), async || {
        (meta_level(&upgraded[0]).await == 2).then_some(())
    })
    .await;
    drop(old_dir);

    // A build that reads level 1 only is refused the metadata now, rather
    // than drop the rates it cannot read unnoticed.
    let old_build = sovra_raft::network::Peers::new(
        9,
        Default::default(),
        Default::default(),
        1 << 20,
        sovra_raft::ClusterSecret::new(sovra_tests::CLUSTER_SECRET).unwrap(),
    );
    let e = old_build
        .client_at(&upgraded[0].cluster_addr(), 0)
        .unwrap()
        .fetch_meta(sovra_proto::raft::FetchMetaRequest {
            from: 9,
            meta_level: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("reads level 1 only"), "{}", e.message());

    let made = create_key(&upgraded[0], "rated", rate(5, 5)).await.unwrap();
    assert_eq!(made.rate, rate(5, 5));
    let keys = upgraded[1]
        .admin
        .clone()
        .list_keys(v1::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().any(|k| k.id == "plain" && k.rate.is_none()));
    assert!(keys.iter().any(|k| k.id == "rated" && k.rate == rate(5, 5)));
}
