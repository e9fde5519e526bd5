//! TLS with node identities: a three-node cluster whose every port is TLS
//! (mutual on the cluster listener) replicates and serves; plaintext clients,
//! peers from another CA, and a node presenting another node's certificate
//! are refused; a certificate rotated on disk is used without a restart.

use sovra_node::NodeConfig;
use sovra_node::certs::{Ca, node_files};
use sovra_proto::raft as pb;
use sovra_proto::v1;
use sovra_raft::tls::{TlsFiles, TlsState};
use sovra_tests::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const UK: &str = "uk";

/// A CA in `dir` (ca.pem) with certificates for `ids` of region uk.
fn ca_with(dir: &Path, ids: &[u64]) -> Ca {
    let nodes: Vec<(u64, &str)> = ids.iter().map(|id| (*id, UK)).collect();
    sovra_node::certs::throwaway(dir, &nodes).unwrap()
}

fn use_tls(cfg: &mut NodeConfig, dir: &Path) {
    let (cert, key) = node_files(dir, cfg.node_id);
    cfg.tls = Some(true);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.tls_ca = Some(dir.join("ca.pem"));
    cfg.tls_reload_ms = 200;
}

/// What a node at `addr` presents as its certificate to a fresh connection.
async fn presented(addr: std::net::SocketAddr, ca: &Path) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)] // ring's provider, as the nodes use (STACK.md: no aws-lc here)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// A node-to-node client of `addr` that is node `me` by its secret, showing
/// the certificate in `files` (which must name `cert_id`).
fn peer(me: u64, cert_id: u64, files: TlsFiles) -> sovra_raft::network::Peers {
    let tls = TlsState::load(files, cert_id, UK).unwrap();
    sovra_raft::network::Peers::new(
        me,
        Default::default(),
        Default::default(),
        1 << 20,
        sovra_raft::ClusterSecret::new(CLUSTER_SECRET).unwrap(),
    )
    .with_tls(Some(tls))
}

async fn fetch_meta(p: &sovra_raft::network::Peers, addr: &str, from: u64) -> Result<u64, tonic::Status> {
    p.client_at(addr, 0)
        .unwrap()
        .fetch_meta(pb::FetchMetaRequest {
            from,
            meta_level: sovra_meta::state::META_LEVEL,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_over_mutual_tls_serves_refuses_strangers_and_impostors_and_takes_a_rotated_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = ca_with(certs.path(), &[1, 2, 3, 4]);
    let dir = certs.path().to_path_buf();
    let mut nodes = TestNode::start_cluster_with(&[(1, UK), (2, UK), (3, UK)], |c| use_tls(c, &dir)).await;

    // Replicated writes and searches, every hop over TLS.
    nodes[0]
        .collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(spec("people", 4, v1::Metric::L2, UK)),
        })
        .await
        .unwrap();
    let pts: Vec<v1::Point> = (0..30).map(|i| point(i, vec![i as f32, 1.0, 0.0, 0.5], UK)).collect();
    nodes[1]
        .points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: pts,
        })
        .await
        .unwrap();
    let search = |k| v1::SearchRequest {
        collection: "people".into(),
        vector: vec![3.0, 1.0, 0.0, 0.5],
        k,
        exact: true,
        ..Default::default()
    };
    let r = nodes[2].search.search(search(3)).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![3, 2, 4]);

    // A plaintext client gets no answer from a TLS port.
    let plain = sovra_node::dev::wait_serving(nodes[0].node().grpc_addr, Duration::from_millis(500)).await;
    assert!(plain.is_err(), "a plaintext client was served by a TLS port");

    let cluster = nodes[0].cluster_addr();
    let files = |d: &Path, id: u64| {
        let (cert, key) = node_files(d, id);
        TlsFiles {
            cert,
            key,
            ca: d.join("ca.pem"),
        }
    };
    // Node 4's real certificate: node 1's cluster port answers it (the control).
    let member = peer(4, 4, files(certs.path(), 4));
    fetch_meta(&member, &cluster, 4).await.unwrap();

    // A certificate from another CA, for the same node id: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    ca_with(other.path(), &[4]);
    let stranger = peer(4, 4, files(other.path(), 4));
    let e = fetch_meta(&stranger, &cluster, 4).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // Node 4's certificate used by a sender that says it is node 2: refused,
    // naming the node it claimed to be.
    let e = fetch_meta(&member, &cluster, 2).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not name node 2"), "{}", e.message());
    // And a Raft message to a group, the same.
    let e = member
        .client_at(&cluster, 0)
        .unwrap()
        .vote(pb::RaftRequest {
            from: 2,
            group: Some(pb::GroupId {
                kind: pb::GroupKind::Meta as i32,
                ..Default::default()
            }),
            payload: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Node 4 (a uk certificate) registering itself in us, or registering
    // node 5: refused, and meta records neither.
    let register = |id: u64, region: &str| pb::ProposeRequest {
        group: Some(pb::GroupId {
            kind: pb::GroupKind::Meta as i32,
            ..Default::default()
        }),
        from: 4,
        command: postcard::to_allocvec(&sovra_meta::MetaCommand::RegisterNode(sovra_meta::NodeRecord {
            id,
            region: sovra_types::RegionId::parse(region).unwrap(),
            zone: "z".into(),
            roles: Default::default(),
            cluster_addr: "127.0.0.1:1".into(),
            public_addr: "127.0.0.1:2".into(),
            status: sovra_meta::NodeStatus::Up,
            last_heartbeat_ms: 0,
            incarnation: 1,
        }))
        .unwrap(),
    };
    for (id, region, says) in [(4, "us", "says it is in region us"), (5, UK, "may register only itself")] {
        let e = member
            .client_at(&cluster, 0)
            .unwrap()
            .propose(register(id, region))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    let view = nodes[0].node().state.view();
    assert!(!view.state.nodes.contains_key(&4) && !view.state.nodes.contains_key(&5));

    // A node started with another node's certificate does not start.
    let d5 = tempfile::tempdir().unwrap();
    let mut c5 = NodeConfig::local(5, UK, d5.path().to_path_buf());
    use_tls(&mut c5, certs.path());
    let (cert4, key4) = node_files(certs.path(), 4);
    c5.tls_cert = Some(cert4);
    c5.tls_key = Some(key4);
    let e = sovra_node::start(c5).await.err().expect("node 5 started with node 4's certificate");
    assert!(format!("{e:#}").contains("not node 5's"), "{e:#}");

    // Rotation: node 1's certificate replaced on disk (a new key, the same
    // CA) is what new connections get, with no restart.
    let ca_pem = certs.path().join("ca.pem");
    let addr = nodes[0].node().grpc_addr;
    let before = presented(addr, &ca_pem).await;
    let fresh = ca.node(1, UK, &[], 30).unwrap();
    let (cert1, key1) = node_files(certs.path(), 1);
    // Key then certificate, each by rename: a reload between the two sees a
    // mismatched pair and keeps the old one until the next look.
    for (path, text) in [(&key1, &fresh.key_pem), (&cert1, &fresh.cert_pem)] {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let want = CertificateDer::from_pem_slice(fresh.cert_pem.as_bytes()).unwrap();
    assert_ne!(before, want);
    eventually("node 1 presents its rotated certificate", Duration::from_secs(20), async || {
        (presented(addr, &ca_pem).await == want).then_some(())
    })
    .await;
    // The cluster goes on: node 1's peers' channels were made again with the
    // new certificate; a write through it commits on the others.
    nodes[0]
        .points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: vec![point(100, vec![3.0, 1.0, 0.0, 0.5], UK)],
        })
        .await
        .unwrap();
    let r = nodes[2].search.search(search(1)).await.unwrap().into_inner();
    assert_eq!(ids_of(&r), vec![3]);
    let r = nodes[0]
        .search
        .search(v1::SearchRequest {
            consistency: v1::Consistency::Linearizable as i32,
            ..search(2)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ids_of(&r).contains(&100), "{:?}", ids_of(&r));
}
