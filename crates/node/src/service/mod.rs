//! The public gRPC services (`sovra.v1`). Handlers convert and validate, then
//! call the node state and shard engines on the blocking pool (HNSW searches and
//! sled flushes must not stall the async runtime).

mod admin;
mod audit;
mod collections;
mod erasure;
mod points;
mod search;

pub use admin::AdminService;
pub use audit::AuditService;
pub use collections::CollectionsService;
pub use erasure::ErasureService;
pub use points::PointsService;
pub use search::SearchService;

use crate::metrics as m;
use sovra_proto::status_of;
use sovra_types::ApiError;
use sovra_types::limits::MAX_ANSWER_BYTES;
use std::future::Future;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tonic::{Response, Status};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker task failed: {e}")))
}

/// Runs a handler body, maps its error to a status and records the request.
pub(crate) async fn observe<T>(method: &'static str, body: impl Future<Output = Result<T, ApiError>>) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let out = body.await;
    let code = match &out {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{:?}", e.code),
    };
    metrics::counter!(m::REQUESTS, "method" => method, "code" => code).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "method" => method).record(start.elapsed().as_secs_f64());
    out.map(Response::new).map_err(|e| status_of(&e))
}

/// As [`observe`], for a call that is audited: once the body has an
/// outcome, its record (`note`) is committed to its regions' audit logs, and
/// only then is the call answered; if the record cannot be committed the call
/// fails (fail closed), whatever the body answered.
pub(crate) async fn audited<T>(
    state: &std::sync::Arc<crate::state::NodeState>,
    method: &'static str,
    note: &crate::audit::Note,
    body: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    observe(method, async {
        let out = body.await;
        state.auditor.commit(state, note, out.as_ref().map(|_| ())).await?;
        out
    })
    .await
}

/// A request's optional payload filter, converted and checked.
pub(crate) fn parse_filter(f: Option<&sovra_proto::v1::Filter>) -> Result<Option<sovra_types::Filter>, ApiError> {
    let Some(f) = f else { return Ok(None) };
    let f = sovra_proto::convert::filter_from(f, "filter")?;
    f.validate()?;
    Ok(Some(f))
}

/// Counts the encoded size of an answer while it is assembled, so an answer
/// too large to send is refused part way, never built whole first.
pub(crate) struct AnswerBudget {
    used: usize,
}

impl AnswerBudget {
    pub(crate) fn new() -> Self {
        Self { used: 0 }
    }

    /// Adds one element of a repeated message field; false once the answer
    /// would pass [`MAX_ANSWER_BYTES`].
    pub(crate) fn add(&mut self, m: &impl prost::Message) -> bool {
        let n = m.encoded_len();
        // Tag byte, length prefix, body.
        self.used += 1 + prost::length_delimiter_len(n) + n;
        self.used <= MAX_ANSWER_BYTES
    }

    /// The refusal when only `fitted` of the `asked` `what` fit; `fix` says
    /// what to ask for instead.
    pub(crate) fn exceeded(what: &str, fitted: usize, asked: usize, fix: &str) -> ApiError {
        ApiError::new(
            sovra_types::ErrorCode::ResourceExhausted,
            format!("the answer would pass {MAX_ANSWER_BYTES} bytes: only {fitted} of the {asked} {what} asked for fitted; {fix}"),
        )
    }
}

/// The read level each shard must reach before it answers: `linearizable`, or
/// `any` after the writes in `after` that belong to it.
pub(crate) struct ReadLevels {
    linearizable: bool,
    after: std::collections::BTreeMap<(sovra_types::RegionId, u32), u64>,
}

impl ReadLevels {
    pub(crate) fn parse(consistency: i32, after: &[sovra_proto::v1::ShardWrite]) -> Result<Self, ApiError> {
        use sovra_proto::v1::Consistency;
        let linearizable = match Consistency::try_from(consistency) {
            Ok(Consistency::Linearizable) => true,
            Ok(_) => false,
            Err(_) => {
                return Err(ApiError::invalid(format!(
                    "consistency is {consistency}: use CONSISTENCY_ANY or CONSISTENCY_LINEARIZABLE"
                )));
            }
        };
        let mut map = std::collections::BTreeMap::new();
        for (i, w) in after.iter().enumerate() {
            let region = sovra_types::RegionId::parse(&w.region).map_err(|e| e.at(&format!("after[{i}].region")))?;
            let e = map.entry((region, w.shard)).or_insert(0);
            *e = (*e).max(w.index);
        }
        Ok(Self { linearizable, after: map })
    }

    pub(crate) fn for_shard(&self, shard: &sovra_types::ShardId) -> sovra_raft::ReadLevel {
        if self.linearizable {
            sovra_raft::ReadLevel::Linearizable
        } else {
            sovra_raft::ReadLevel::Any {
                min_index: self.after.get(&(shard.region.clone(), shard.number)).copied().unwrap_or(0),
            }
        }
    }
}
