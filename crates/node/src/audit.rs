//! Auditing every call: the record a handler fills in ([`Note`]), the
//! group commit that writes records to their regions' audit groups
//! ([`Auditor`]), fail closed (a call whose record is not committed fails),
//! and the duties that keep each region's audit group placed and its members
//! in line with meta ([`audit_loop`]).
//!
//! A record goes to the audit log of every region whose data the call read
//! or wrote (so a region's log says who searched its people), or, for a call
//! that touched no region's data (key calls), to the answering node's region.
//! Records hold no vector and no subject id: a query vector is kept as its
//! SHA-256, and a call's subject ids are not recorded at all.

use crate::auth::Caller;
use crate::state::NodeState;
use sovra_audit::Record;
use sovra_meta::MetaCommand;
use sovra_raft::AuditBatch;
use sovra_types::{ApiError, CollectionSpec, ErrorCode, RegionId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Request metadata naming why the call uses the data.
pub const PURPOSE_HEADER: &str = "x-purpose";
/// Longest `x-purpose` taken.
pub const MAX_PURPOSE: usize = 200;
/// Records in one audit batch at most.
const MAX_BATCH: usize = 512;
/// Batches of one region in flight at once: while they commit, the next
/// calls' records gather into the following batch (group commit: the busier
/// the node, the bigger the batch, the fewer Raft rounds and fsyncs per
/// record). `sovra bench cluster` at 64 clients measured 1 and 2 alike within
/// this machine's noise (audited/unaudited QPS 0.56 and 0.62).
const IN_FLIGHT: usize = 2;
/// A region's log is founded on fewer than [`sovra_meta::audit::AUDIT_REPLICAS`]
/// nodes only once its set of data nodes has not changed for this long.
const FOUNDING_SETTLE: Duration = Duration::from_millis(1500);
/// Records waiting per region before callers are held (back-pressure).
const QUEUE: usize = 8192;

/// What one call's audit record says, filled in by the handler as it learns
/// it; cheap to share with the handler's future.
pub struct Note {
    call: &'static str,
    /// `x-purpose`, or why it was refused.
    purpose: Result<String, ApiError>,
    inner: parking_lot::Mutex<NoteInner>,
}

#[derive(Default)]
struct NoteInner {
    /// Set once the caller is authenticated: unauthenticated calls are
    /// counted (metrics), not audited, so an anonymous flood cannot fill the log.
    key_id: Option<String>,
    collection: String,
    regions: BTreeSet<RegionId>,
    shards: u32,
    results: u64,
    query_sha256: Option<String>,
    target: Option<String>,
}

fn parse_purpose(md: &tonic::metadata::MetadataMap) -> Result<String, ApiError> {
    let Some(v) = md.get(PURPOSE_HEADER) else {
        return Ok(String::new());
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::invalid(format!("{PURPOSE_HEADER} must be printable ASCII")))?
        .trim();
    if text.len() > MAX_PURPOSE {
        return Err(ApiError::invalid(format!(
            "{PURPOSE_HEADER} is {} bytes: at most {MAX_PURPOSE}",
            text.len()
        )));
    }
    Ok(text.to_string())
}

impl Note {
    pub fn new(call: &'static str, md: &tonic::metadata::MetadataMap) -> Self {
        Self {
            call,
            purpose: parse_purpose(md),
            inner: Default::default(),
        }
    }

    /// The caller is known: its record will be written whatever the outcome.
    /// Refuses a malformed `x-purpose`.
    pub fn caller(&self, c: &Caller) -> Result<(), ApiError> {
        self.inner.lock().key_id = Some(c.key.clone().unwrap_or_else(|| "-".into()));
        self.purpose.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The collection the call uses; refuses the call when the collection
    /// requires a purpose and none was given.
    pub fn collection(&self, spec: &CollectionSpec) -> Result<(), ApiError> {
        self.inner.lock().collection = spec.name.to_string();
        if spec.require_purpose && self.purpose.as_ref().is_ok_and(String::is_empty) {
            return Err(ApiError::invalid(format!(
                "collection {} requires a purpose: send request metadata `{PURPOSE_HEADER}: <why this data is used>` (at most {MAX_PURPOSE} bytes)",
                spec.name
            )));
        }
        Ok(())
    }

    pub fn regions<'a>(&self, r: impl IntoIterator<Item = &'a RegionId>) {
        self.inner.lock().regions.extend(r.into_iter().cloned());
    }

    pub fn shards(&self, n: usize) {
        self.inner.lock().shards = n as u32;
    }

    pub fn results(&self, n: u64) {
        self.inner.lock().results = n;
    }

    /// What the call acted on, when that is no personal data: a key id, an
    /// erasure job, a template id, a region.
    pub fn target(&self, t: &str) {
        self.inner.lock().target = Some(t.to_string());
    }

    /// The query (or probe) vector, kept only as its SHA-256.
    pub fn query(&self, v: &[f32]) {
        self.inner.lock().query_sha256 = Some(sovra_audit::vector_sha256(v));
    }

    /// The record of the call as it ended, and the regions whose logs take
    /// it; `None` when the caller was never authenticated.
    fn record(&self, status: &str, own: &RegionId) -> Option<(Vec<RegionId>, Record)> {
        let i = self.inner.lock();
        let key_id = i.key_id.clone()?;
        let regions: Vec<RegionId> = if i.regions.is_empty() {
            vec![own.clone()]
        } else {
            i.regions.iter().cloned().collect()
        };
        Some((
            regions,
            Record {
                at_ms: crate::cluster::now_ms(),
                key_id,
                call: self.call.to_string(),
                purpose: self.purpose.clone().unwrap_or_default(),
                collection: i.collection.clone(),
                regions: i.regions.iter().map(|r| r.to_string()).collect(),
                shards: i.shards,
                results: i.results,
                query_sha256: i.query_sha256.clone(),
                target: i.target.clone(),
                status: status.to_string(),
            },
        ))
    }
}

/// The gRPC code name a record stores.
pub fn status_name(out: &Result<(), &ApiError>) -> &'static str {
    match out {
        Ok(()) => "OK",
        Err(e) => match e.code {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
        },
    }
}

struct Pending {
    record: Record,
    done: oneshot::Sender<Result<(), ApiError>>,
}

/// Writes records to their regions' audit groups in group-committed batches.
pub struct Auditor {
    queues: parking_lot::Mutex<BTreeMap<RegionId, mpsc::Sender<Pending>>>,
}

impl Default for Auditor {
    fn default() -> Self {
        Self {
            queues: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }
}

impl Auditor {
    /// Commits `note`'s record (with the call's outcome) to every region it
    /// names; answers once all have committed. An error means the call must
    /// fail: its record is not known to be kept.
    pub async fn commit(&self, state: &Arc<NodeState>, note: &Note, outcome: Result<(), &ApiError>) -> Result<(), ApiError> {
        let Some((regions, record)) = note.record(status_name(&outcome), &state.region) else {
            return Ok(());
        };
        if state.unaudited_for_bench.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let waits: Vec<_> = regions
            .into_iter()
            .map(|region| {
                let (done, rx) = oneshot::channel();
                let tx = self.queue(state, &region);
                let record = record.clone();
                async move {
                    tx.send(Pending { record, done })
                        .await
                        .map_err(|_| ApiError::unavailable("the node is stopping"))?;
                    rx.await.map_err(|_| ApiError::unavailable("the node is stopping"))?
                }
            })
            .collect();
        for r in futures::future::join_all(waits).await {
            r.map_err(|e| {
                metrics::counter!(crate::metrics::AUDIT_FAILED).increment(1);
                ApiError::unavailable(format!(
                    "the call's audit record could not be committed, so the call fails (nothing it read is returned; a write it made stays, and retrying it is safe): {}",
                    e.message
                ))
            })?;
        }
        Ok(())
    }

    fn queue(&self, state: &Arc<NodeState>, region: &RegionId) -> mpsc::Sender<Pending> {
        let mut q = self.queues.lock();
        if let Some(tx) = q.get(region).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(batcher(Arc::downgrade(state), region.clone(), rx));
        q.insert(region.clone(), tx.clone());
        tx
    }
}

/// One region's group commit: takes what is queued (up to [`MAX_BATCH`]),
/// commits it as one entry, answers every caller in it.
async fn batcher(state: std::sync::Weak<NodeState>, region: RegionId, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(state) = state.upgrade() else { return };
        let region = region.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (records, waiters): (Vec<Record>, Vec<_>) = batch.into_iter().map(|p| (p.record, p.done)).unzip();
            metrics::histogram!(crate::metrics::AUDIT_BATCH).record(records.len() as f64);
            let out = commit_batch(&state, &region, AuditBatch { records }).await;
            for w in waiters {
                let _ = w.send(out.clone());
            }
        });
    }
}

/// Commits one batch, retrying within the write timeout while the region's
/// log cannot take it yet (just placed, electing, a replica opening).
async fn commit_batch(state: &Arc<NodeState>, region: &RegionId, batch: AuditBatch) -> Result<(), ApiError> {
    let deadline = std::time::Instant::now() + state.host.settings.write_timeout;
    loop {
        let via = replicas_of(state, region);
        let placed = !via.is_empty() || (*region == state.region && state.host.audit().is_some());
        let out = if placed {
            state.host.audit_write(region, batch.clone(), &via).await.map(|_| ())
        } else {
            Err(ApiError::unavailable(format!(
                "region {region}'s audit log is not placed yet (no node holds it)"
            )))
        };
        match out {
            Err(e) if e.code == ErrorCode::Unavailable && std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e.message, "audit batch not committed yet; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// The nodes holding `region`'s audit log, as this node's view says.
pub fn replicas_of(state: &NodeState, region: &RegionId) -> Vec<u64> {
    state
        .view()
        .state
        .audit
        .get(region)
        .map(|g| g.replicas.iter().copied().collect())
        .unwrap_or_default()
}

/// Keeps audit groups placed and their members in line: on the meta leader,
/// each region's replicas follow its nodes (`sovra_meta::audit`); on a
/// region's audit leader, the group's Raft members follow the replicas meta
/// records.
pub async fn audit_loop(state: Arc<NodeState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.heartbeat_ms.max(100));
    // Per region not placed yet: its data nodes as last seen, and since when
    // that set has not changed. A log is founded on all the nodes a starting
    // region brings up together, not on the first to register alone (whose
    // loss before the group grew would stall every call of the region).
    let mut settling: BTreeMap<RegionId, (BTreeSet<u64>, std::time::Instant)> = BTreeMap::new();
    loop {
        if crate::cluster::stopped(&mut stop, every).await {
            return;
        }
        let me = state.config.node_id;
        if let Some(m) = state.host.meta()
            && m.leader() == Some(me)
        {
            let view = m.sm.state();
            let regions: BTreeSet<RegionId> = view.nodes.values().filter(|n| n.roles.data).map(|n| n.region.clone()).collect();
            for region in regions {
                let placed = view.audit.get(&region);
                if placed.is_some_and(|g| !g.formed) {
                    continue; // founders first: nothing changes until they elect
                }
                let current = placed.map(|g| g.replicas.clone()).unwrap_or_default();
                let Some(want) = sovra_meta::audit::choose_audit_replicas(view.nodes.values(), &region, &current) else {
                    continue;
                };
                if placed.is_none() {
                    let seen: BTreeSet<u64> = view
                        .nodes
                        .values()
                        .filter(|n| n.region == region && n.roles.data)
                        .map(|n| n.id)
                        .collect();
                    let entry = settling
                        .entry(region.clone())
                        .or_insert_with(|| (seen.clone(), std::time::Instant::now()));
                    if entry.0 != seen {
                        *entry = (seen, std::time::Instant::now());
                    }
                    if want.len() < sovra_meta::audit::AUDIT_REPLICAS && entry.1.elapsed() < FOUNDING_SETTLE {
                        continue;
                    }
                    settling.remove(&region);
                }
                if want != current {
                    tracing::info!(region = %region, replicas = ?want, "placing the region's audit log");
                    if let Err(e) = state
                        .host
                        .meta_write(MetaCommand::SetAuditReplicas { region, replicas: want })
                        .await
                    {
                        tracing::warn!(error = %e.message, "placing an audit log failed; will retry");
                    }
                }
            }
        }
        if let Some(a) = state.host.audit()
            && a.leader() == Some(me)
        {
            let placed = state.view().state.audit.get(&state.region).cloned();
            if placed.as_ref().is_some_and(|g| !g.formed) {
                let formed = MetaCommand::AuditFormed {
                    region: state.region.clone(),
                };
                if let Err(e) = crate::cluster::meta_write(&state, formed).await {
                    tracing::warn!(error = %e.message, "reporting the audit group formed failed; will retry");
                }
                continue;
            }
            if let Some(want) = placed.map(|g| g.replicas).filter(|w| !w.is_empty()) {
                match state.host.audit_set_members(want.clone()).await {
                    Ok(true) => tracing::info!(members = ?want, "audit group membership changed"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e.message, "audit membership change did not complete; will retry"),
                }
            }
        }
    }
}
