//! Starting and stopping a node: `start(config)` binds the ports and returns at
//! once (health says NOT_SERVING while shards load); `run(config, shutdown)`
//! serves until `shutdown` resolves or a fatal error (storage, failed load) stops it. Several nodes can run in
//! one process (tests, `sovra dev`).

use crate::config::NodeConfig;
use crate::metrics as m;
use crate::service::{AdminService, AuditService, CollectionsService, ErasureService, PointsService, SearchService};
use crate::state::NodeState;
use anyhow::Context;
use sovra_proto::v1::{
    admin_server::AdminServer, audit_server::AuditServer, collections_server::CollectionsServer, erasure_server::ErasureServer,
    points_server::PointsServer, search_server::SearchServer,
};
use sovra_raft::Faults;
use sovra_raft::server::{RaftService, cluster_service};
use sovra_types::limits::MAX_MESSAGE_BYTES;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub struct RunningNode {
    /// The public API.
    pub grpc_addr: SocketAddr,
    /// The node-to-node API (Raft, forwarded writes, catalog changes).
    pub cluster_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: Arc<NodeState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// The accepted connections of a gRPC listener, with TCP_NODELAY on each:
/// without it a reply written in several small pieces waits for the client's
/// delayed ACK (about 40 ms on Linux) before its last piece is sent. tonic's
/// own `tcp_nodelay` applies only to listeners it binds itself.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

const SERVICES: [&str; 4] = ["sovra.v1.Collections", "sovra.v1.Points", "sovra.v1.Search", "sovra.v1.Admin"];

pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    start_with_faults(config, Faults::default()).await
}

/// As [`start`], with node-to-node calls passing through `faults` (tests share
/// one plan between the nodes of a cluster and switch it at run time).
pub async fn start_with_faults(config: NodeConfig, faults: Faults) -> anyhow::Result<RunningNode> {
    config.validate()?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding grpc_listen {}", config.grpc_listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics_listen {}", config.metrics_listen))?;
    let cluster = tokio::net::TcpListener::bind(config.cluster_listen)
        .await
        .with_context(|| format!("binding cluster_listen {}", config.cluster_listen))?;
    let grpc_addr = grpc.local_addr()?;
    let cluster_addr = cluster.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let secret = config.cluster_secret()?;
    let tls = match config.tls_files()? {
        Some(files) => Some(
            sovra_raft::tls::TlsState::load(files, config.node_id, &config.region).context("loading the TLS certificate, key and CA")?,
        ),
        None => None,
    };
    let advertise_grpc = config.advertise_grpc_addr.clone().unwrap_or_else(|| grpc_addr.to_string());
    let advertise_cluster = config.advertise_cluster_addr.clone().unwrap_or_else(|| cluster_addr.to_string());
    let state = tokio::task::spawn_blocking({
        let (secret, tls) = (secret.clone(), tls.clone());
        move || NodeState::open(config, faults, secret, tls)
    })
    .await?
    .context("opening the data directory")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    for s in std::iter::once("").chain(SERVICES) {
        health.set_service_status(s, ServingStatus::NotServing).await;
    }
    // Both reflection versions: grpcurl 1.8 and Python's grpcio-reflection
    // speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sovra_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let (stop, stop_rx) = watch::channel(false);
    let shutdown = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // The public listener serves the public API only; the cluster listener
    // serves the node-to-node API only, behind the cluster secret.
    let budget = crate::limits::Budget::new(state.config.max_inflight_bytes, state.config.max_inflight_requests);
    let per_conn = state.config.max_requests_per_connection;
    let public = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(per_conn)
        .max_concurrent_streams(Some(u32::try_from(per_conn * 2).unwrap_or(u32::MAX)))
        .layer(crate::limits::BudgetLayer {
            budget,
            max_message: MAX_MESSAGE_BYTES,
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CollectionsServer::new(CollectionsService { state: state.clone() }))
        .add_service(
            PointsServer::new(PointsService { state: state.clone() })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            SearchServer::new(SearchService { state: state.clone() })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AdminServer::new(AdminService { state: state.clone() }))
        .add_service(ErasureServer::new(ErasureService { state: state.clone() }))
        .add_service(AuditServer::new(AuditService { state: state.clone() }));
    let leaf = tonic::service::interceptor::InterceptedService::new(
        sovra_proto::raft::leaf_server::LeafServer::new(sovra_coord::LeafService {
            leaf: state.root().leaf.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(16 << 20),
        sovra_raft::auth::RequireSecret(secret.clone()),
    );
    let cluster_server = tonic::transport::Server::builder()
        .add_service(cluster_service(
            RaftService {
                host: state.host.clone(),
                cluster: Arc::new(crate::cluster::Membership {
                    state: state.clone(),
                    cluster_addr: advertise_cluster.clone(),
                }),
            },
            secret,
        ))
        .add_service(leaf);
    let servers = match &tls {
        Some(t) => vec![
            tokio::spawn(public.serve_with_incoming_shutdown(t.incoming(grpc, false), shutdown())),
            tokio::spawn(cluster_server.serve_with_incoming_shutdown(t.incoming(cluster, true), shutdown())),
        ],
        None => vec![
            tokio::spawn(public.serve_with_incoming_shutdown(incoming(grpc), shutdown())),
            tokio::spawn(cluster_server.serve_with_incoming_shutdown(incoming(cluster), shutdown())),
        ],
    };

    let mut tasks = Vec::new();
    match &tls {
        Some(t) => tasks.push(tokio::spawn(
            t.clone()
                .reload_loop(Duration::from_millis(state.config.tls_reload_ms), stop_rx.clone()),
        )),
        None => tracing::warn!("tls = false: the public and cluster listeners are plaintext; use this only on a trusted network"),
    }
    tasks.push(tokio::spawn(serve_metrics(metrics_listener, state.clone(), stop_rx.clone())));
    // Load shards off the runtime, then report SERVING.
    {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            match state.load().await {
                Ok(()) => {
                    for s in std::iter::once("").chain(SERVICES) {
                        health.set_service_status(s, ServingStatus::Serving).await;
                    }
                    tracing::info!("all shards loaded; serving");
                }
                Err(e) => {
                    state.stop_with(format!("loading shards failed: {e:#}"));
                }
            }
        }));
    }
    tasks.push(tokio::spawn(compaction_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(retention_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(purge_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(
        state.host.clone().run_watchdog(Duration::from_millis(500), stop_rx.clone()),
    ));
    tasks.push(tokio::spawn(crate::cluster::view_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(crate::cluster::reconcile_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(crate::cluster::lease_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(crate::audit::audit_loop(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(crate::ops::ops_loop(state.clone(), stop_rx.clone())));
    if !state.config.auth {
        tracing::warn!("auth = false: every public call is taken without an API key, with every scope; use this only on a trusted network");
    }
    tasks.push(tokio::spawn(crate::cluster::membership_loop(
        state.clone(),
        advertise_grpc,
        advertise_cluster,
        stop_rx.clone(),
    )));
    if state.config.has_role("meta") {
        tasks.push(tokio::spawn(crate::cluster::leader_loop(state.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(crate::cluster::level_loop(state.clone(), stop_rx)));
    }
    Ok(RunningNode {
        grpc_addr,
        cluster_addr,
        metrics_addr,
        state,
        stop,
        tasks,
        servers,
    })
}

/// Starts a cluster in this process from `configs`: the first bootstraps it,
/// the others join it (their `join` is set to the first node's cluster
/// address). Returns once every node is serving and sees every node
/// registered and up, or fails after `within`. For tests, benches and `dev`.
pub async fn start_joined(mut configs: Vec<NodeConfig>, faults: Faults, within: Duration) -> anyhow::Result<Vec<RunningNode>> {
    anyhow::ensure!(!configs.is_empty(), "no node to start");
    let deadline = std::time::Instant::now() + within;
    let mut first = configs.remove(0);
    first.bootstrap = true;
    let mut nodes = vec![start_with_faults(first, faults.clone()).await?];
    let seed = nodes[0].cluster_addr.to_string();
    for mut c in configs {
        c.bootstrap = false;
        c.join = vec![seed.clone()];
        nodes.push(start_with_faults(c, faults.clone()).await?);
    }
    let ids: Vec<u64> = nodes.iter().map(|n| n.state.config.node_id).collect();
    for n in &nodes {
        loop {
            let v = n.state.view();
            let all_up = ids
                .iter()
                .all(|id| v.state.nodes.get(id).is_some_and(|r| r.status == sovra_meta::NodeStatus::Up));
            if all_up && n.state.is_ready() {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node {} did not see every node registered within {within:?}",
                n.state.config.node_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // And once every region's audit log is on all the replicas it will have
    // (so a test that stops a node at once does not stop its only copy).
    loop {
        let v = nodes[0].state.view();
        let ready = nodes.iter().all(|n| {
            let region = &n.state.region;
            let data_nodes = v.state.nodes.values().filter(|r| &r.region == region && r.roles.data).count();
            let Some(g) = v.state.audit.get(region) else {
                return data_nodes == 0;
            };
            let want = data_nodes.min(sovra_meta::audit::AUDIT_REPLICAS);
            let me = n.state.config.node_id;
            let held = !g.replicas.contains(&me)
                || n.state.host.audit().is_some_and(|a| {
                    let raft = a.raft();
                    let m = raft.metrics();
                    let m = m.borrow();
                    m.current_leader.is_some() && m.membership_config.membership().voter_ids().collect::<BTreeSet<_>>() == g.replicas
                });
            g.formed && g.replicas.len() == want && held
        });
        if ready {
            return Ok(nodes);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the regions' audit logs were not placed on all their replicas within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        nodes[0].state.refresh_view().await;
    }
}

impl RunningNode {
    /// Resolves when the node must stop (storage failed, shards failed to load), with the reason.
    pub async fn fatal(&self) -> String {
        let mut rx = self.state.fatal();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        for s in self.servers {
            s.await?.context("gRPC server")?;
        }
        for t in &self.tasks {
            t.abort();
        }
        // Wait until the aborted tasks are gone, so what they held (the node
        // state, its store) is released when this returns.
        for t in self.tasks {
            let _ = t.await;
        }
        self.state.host.shutdown().await;
        // Everything acknowledged was flushed already; this flush only shortens
        // the next start's recovery.
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            state.save_indexes();
            state.flush()
        })
        .await??;
        Ok(())
    }
}

/// Serves until `shutdown` resolves (clean exit) or a fatal error stops it (error).
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>, on_start: impl FnOnce(&RunningNode)) -> anyhow::Result<()> {
    let node = start(config).await?;
    on_start(&node);
    let failure = tokio::select! {
        _ = shutdown => None,
        reason = node.fatal() => Some(reason),
    };
    node.stop().await?;
    match failure {
        None => Ok(()),
        Some(reason) => anyhow::bail!("node stopped on a fatal error: {reason}"),
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let handle = m::handle();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            let handle = handle.clone();
            async move {
                for e in state.engines() {
                    let s = e.stats();
                    let id = e.id();
                    let labels = [
                        ("collection", id.collection.to_string()),
                        ("region", id.region.to_string()),
                        ("shard", id.number.to_string()),
                    ];
                    metrics::gauge!(m::SHARD_LIVE_POINTS, &labels).set(s.live_points as f64);
                    metrics::gauge!(m::SHARD_TOMBSTONES, &labels).set(s.tombstones as f64);
                    metrics::gauge!(m::SHARD_APPLIED_INDEX, &labels).set(s.last_applied as f64);
                    metrics::gauge!(m::SHARD_INDEX_BYTES, &labels).set(s.index_bytes as f64);
                    if let Ok(r) = e.rejections() {
                        metrics::gauge!(m::SHARD_REJECTED_ENTRIES, &labels).set(r.count as f64);
                    }
                }
                let failed: usize = state.list().iter().map(|c| c.failed.len()).sum();
                metrics::gauge!(m::SHARDS_FAILED).set(failed as f64);
                let node = [("node", state.config.node_id.to_string())];
                let view = state.view();
                metrics::gauge!(m::META_VIEW_INDEX, &node).set(view.index as f64);
                for (status, name) in [
                    (sovra_meta::NodeStatus::Joining, "joining"),
                    (sovra_meta::NodeStatus::Up, "up"),
                    (sovra_meta::NodeStatus::Draining, "draining"),
                    (sovra_meta::NodeStatus::Down, "down"),
                    (sovra_meta::NodeStatus::Drained, "drained"),
                ] {
                    let n = view.state.nodes.values().filter(|r| r.status == status).count();
                    let labels = [("node", state.config.node_id.to_string()), ("status", name.to_string())];
                    metrics::gauge!(m::CLUSTER_NODES, &labels).set(n as f64);
                }
                let leads = state.host.meta().is_some_and(|g| g.leader() == Some(state.config.node_id));
                metrics::gauge!(m::META_IS_LEADER, &node).set(f64::from(u8::from(leads)));
                if let Some(age) = state.lease_age_ms() {
                    metrics::gauge!(m::KEY_LEASE_AGE_MS, &node).set(age as f64);
                }
                let (open, shares) = state.replica_budget();
                metrics::gauge!(m::REPLICAS_OPEN, &node).set(open as f64);
                metrics::gauge!(m::REPLICA_SHARES, &node).set(shares as f64);
                state.host.export_metrics();
                handle.render()
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

/// E2 on every replica of this node: purges applied erasures from the index,
/// the snapshots and the Raft log (`RaftHost::purge_erasures`; every replica
/// at once), then rewrites the replica's database (one replica of a shard at
/// a time: each waits for the replicas before it, by id, to report theirs,
/// or for `TURN_WAIT`), then reports the purge to the meta group's jobs.
async fn purge_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.purge_check_ms);
    // While a rewrite waits its turn, look again sooner than `every`.
    let soon = every.min(Duration::from_millis(500));
    // Shards whose index is compacted past their pending erasure (in this
    // run: a restart compacts again), and since when each has waited.
    let mut compacted: BTreeMap<sovra_types::ShardId, u64> = BTreeMap::new();
    let mut waiting: BTreeMap<sovra_types::ShardId, std::time::Instant> = BTreeMap::new();
    loop {
        let pause = if waiting.is_empty() { every } else { soon };
        if crate::cluster::stopped(&mut stop, pause).await {
            return;
        }
        if state.purges_held.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        let ids: Vec<sovra_types::ShardId> = state.host.groups().iter().map(|g| g.id.clone()).collect();
        for id in ids {
            let Some(g) = state.host.group(&id) else { continue };
            let done_before = compacted.get(&id).copied();
            let purged = state.host.purge_erasures(&g, done_before).await;
            // The rewrite needs every handle on the replica's database closed.
            drop(g);
            match purged {
                Ok(Some(through)) => {
                    compacted.insert(id.clone(), through);
                    let blocked = state.rewrite_blocked_by(&id, through);
                    let since = *waiting.entry(id.clone()).or_insert_with(std::time::Instant::now);
                    if !blocked.is_empty() && since.elapsed() < TURN_WAIT {
                        tracing::debug!(shard = %id, ?blocked, "rewrite waits for the replicas before it");
                        continue;
                    }
                    if !blocked.is_empty() {
                        tracing::warn!(shard = %id, ?blocked, waited = ?since.elapsed(), "replicas before this one have not purged; rewriting anyway");
                    }
                    waiting.remove(&id);
                    compacted.remove(&id);
                    match state.rewrite_replica(&id, through).await {
                        Ok(()) => metrics::counter!(m::ERASURE_PURGES).increment(1),
                        Err(why) => tracing::warn!(shard = %id, why = %format!("{why:#}"), "replica rewrite not finished; tried again"),
                    }
                }
                Ok(None) => {
                    waiting.remove(&id);
                }
                Err(why) => tracing::warn!(shard = %id, %why, "erasure purge not finished; tried again"),
            }
            if let Err(e) = state.report_purge(&id).await {
                tracing::warn!(shard = %id, error = %e.message, "purge not reported to meta; reported again next time");
            }
        }
    }
}

/// How long a replica's rewrite waits for the replicas before it in its
/// shard; past it (one of them is stuck) it goes anyway: the purge matters
/// more than one shard's spare replica.
const TURN_WAIT: Duration = Duration::from_secs(60);

/// Expired points per sweep command: bounded so one entry stays small.
const SWEEP_BATCH: usize = 1_000;

/// T1: on every shard this node leads, erases points past their `expires_at`
/// through the shard's log (so every replica removes them alike), in bounded
/// batches, every `retention_sweep_ms`. The command carries the sweep's clock
/// and removes only points still expired when it applies.
async fn retention_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.retention_sweep_ms);
    loop {
        if crate::cluster::stopped(&mut stop, every).await {
            return;
        }
        for g in state.host.groups() {
            if g.leader() != Some(state.config.node_id) {
                continue;
            }
            loop {
                let now = crate::service::now_ms();
                let engine = g.engine().clone();
                let found = tokio::task::spawn_blocking(move || engine.store().expired_ids(now, SWEEP_BATCH)).await;
                let ids = match found {
                    Ok(Ok(ids)) if !ids.is_empty() => ids,
                    Ok(Err(e)) => {
                        tracing::warn!(shard = %g.id, error = %e, "retention sweep could not read the expiry index");
                        break;
                    }
                    _ => break,
                };
                let full = ids.len() == SWEEP_BATCH;
                let cmd = sovra_types::ShardCommand::Erase(sovra_types::Erase {
                    job: format!("expiry-{}", uuid::Uuid::new_v4().simple()),
                    target: sovra_types::EraseTarget::Expired { ids, now_ms: now },
                    at_ms: now,
                    salt: rand::random(),
                });
                match state.host.write(&g.id, cmd).await {
                    Ok(ack) => {
                        metrics::counter!(m::EXPIRED_ERASED).increment(ack.changed);
                        tracing::debug!(shard = %g.id, erased = ack.changed, "retention sweep");
                    }
                    Err(e) => {
                        tracing::warn!(shard = %g.id, error = %e.message, "retention sweep not committed; the next sweep retries");
                        break;
                    }
                }
                if !full {
                    break;
                }
            }
        }
    }
}

/// Rebuilds the graph of any shard whose tombstones pass the configured share.
async fn compaction_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(state.config.compaction_check_seconds);
    loop {
        if crate::cluster::stopped(&mut stop, every).await {
            return;
        }
        let ratio = state.config.compaction_tombstone_ratio;
        for engine in state.engines() {
            if engine.needs_compaction(ratio) {
                let e = engine.clone();
                if let Ok(report) = tokio::task::spawn_blocking(move || e.compact()).await {
                    metrics::counter!(m::COMPACTIONS).increment(1);
                    metrics::histogram!(m::COMPACTION_PAUSE_SECONDS).record(report.pause.as_secs_f64());
                    tracing::info!(shard = %engine.id(), dropped = report.tombstones_dropped, pause = ?report.pause, "compacted");
                }
            }
        }
    }
}
