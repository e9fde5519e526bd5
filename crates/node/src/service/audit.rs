//! `sovra.v1.Audit`: reading a region's audit log (by time, or in order for
//! an export) and signed checkpoints of it, on a node that holds a replica of
//! it. Reads are linearizable: a record whose call was answered is in them.

use super::{audited, blocking};
use crate::audit::Note;
use crate::state::NodeState;
use sovra_proto::v1::{self, audit_server::Audit};
use sovra_types::{ApiError, RegionId};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AuditService {
    pub state: Arc<NodeState>,
}

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// Bytes of lines in one page at most (well under a client's 4 MiB default).
const MAX_PAGE_BYTES: usize = 3 << 20;

fn limit_of(n: u32) -> Result<usize, ApiError> {
    match n as usize {
        0 => Ok(DEFAULT_LIMIT),
        n if n > MAX_LIMIT => Err(ApiError::invalid(format!(
            "limit is {n}: at most {MAX_LIMIT} records per page (0 for {DEFAULT_LIMIT})"
        ))),
        n => Ok(n),
    }
}

fn token_of(at: (u64, u64)) -> String {
    format!("t1.{}.{}", at.0, at.1)
}

fn token_from(t: &str) -> Result<Option<(u64, u64)>, ApiError> {
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token is not one QueryAudit returned; start again without it");
    let mut parts = t.split('.');
    let (Some("t1"), Some(at), Some(seq), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    Ok(Some((at.parse().map_err(|_| bad())?, seq.parse().map_err(|_| bad())?)))
}

impl AuditService {
    /// The region named (this node's when empty), and this node's replica of
    /// its log once it reflects every committed record.
    async fn replica(&self, region: &str, note: &Note) -> Result<(RegionId, Arc<sovra_raft::AuditReplica>), ApiError> {
        let region = if region.is_empty() {
            self.state.region.clone()
        } else {
            RegionId::parse(region).map_err(|e| e.at("region"))?
        };
        note.regions([&region]);
        note.target(region.as_str());
        if region != self.state.region {
            return Err(ApiError::precondition(format!(
                "region {region}'s audit log stays in {region}; this node is in {}: ask a node of {region} (at {})",
                self.state.region,
                self.state.region_addresses(&region).join(", ")
            )));
        }
        let a = self.state.host.audit_barrier().await.map_err(|e| {
            let holders: Vec<String> = crate::audit::replicas_of(&self.state, &region)
                .into_iter()
                .filter_map(|n| self.state.view().state.nodes.get(&n).map(|r| r.public_addr.clone()))
                .collect();
            ApiError::new(
                e.code,
                format!(
                    "{}; the nodes holding region {region}'s audit log are at {}",
                    e.message,
                    holders.join(", ")
                ),
            )
        })?;
        Ok((region, a))
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn query_audit(&self, req: Request<v1::QueryAuditRequest>) -> Result<Response<v1::AuditPage>, Status> {
        let note = Note::new("audit_query", req.metadata());
        audited(&self.state, "query_audit", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("reading the audit log")?;
            let req = req.into_inner();
            let limit = limit_of(req.limit)?;
            let to_ms = if req.to_ms == 0 { u64::MAX } else { req.to_ms };
            if req.from_ms >= to_ms {
                return Err(ApiError::invalid(format!(
                    "from_ms ({}) is not before to_ms ({}): the range is empty",
                    req.from_ms, req.to_ms
                )));
            }
            let after = token_from(&req.page_token).map_err(|e| e.at("page_token"))?;
            let (_, a) = self.replica(&req.region, &note).await?;
            let from = req.from_ms;
            let page = blocking(move || a.sm.lines_between(from, to_ms, after, limit, MAX_PAGE_BYTES))
                .await?
                .map_err(|e| ApiError::internal(format!("reading the audit log failed: {e}")))?;
            note.results(page.lines.len() as u64);
            Ok(v1::AuditPage {
                lines: page.lines,
                next_page_token: page.next.map(token_of).unwrap_or_default(),
                next_seq: 0,
                more: page.next.is_some(),
            })
        })
        .await
    }

    async fn export_audit(&self, req: Request<v1::ExportAuditRequest>) -> Result<Response<v1::AuditPage>, Status> {
        let note = Note::new("audit_export", req.metadata());
        audited(&self.state, "export_audit", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("exporting the audit log")?;
            let req = req.into_inner();
            let limit = limit_of(req.limit)?;
            let (_, a) = self.replica(&req.region, &note).await?;
            let from = req.from_seq;
            let sm = a.sm.clone();
            let page = blocking(move || sm.lines_from(from, limit, MAX_PAGE_BYTES))
                .await?
                .map_err(|e| ApiError::internal(format!("reading the audit log failed: {e}")))?;
            let next_seq = from + page.lines.len() as u64;
            note.results(page.lines.len() as u64);
            Ok(v1::AuditPage {
                lines: page.lines,
                next_page_token: String::new(),
                next_seq,
                more: page.next.is_some(),
            })
        })
        .await
    }

    async fn get_audit_checkpoint(&self, req: Request<v1::GetAuditCheckpointRequest>) -> Result<Response<v1::AuditCheckpoint>, Status> {
        let note = Note::new("audit_checkpoint", req.metadata());
        audited(&self.state, "get_audit_checkpoint", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("audit checkpoints")?;
            let req = req.into_inner();
            let (region, a) = self.replica(&req.region, &note).await?;
            let origin = format!("sovra-audit/{region}");
            let c = sovra_audit::Checkpoint::sign(self.state.audit_key.signing(), &origin, &a.sm.tree());
            note.results(c.size);
            Ok(v1::AuditCheckpoint {
                origin: c.origin,
                size: c.size,
                root: c.root,
                signature: c.signature,
                public_key: self.state.audit_key.public_hex(),
            })
        })
        .await
    }
}
