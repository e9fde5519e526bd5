//! `sovra.v1.Erasure`: a data-protection erasure becomes one `Erase` command
//! in the Raft log of every shard it touches (the shards owning the named ids,
//! or every shard of the region for a subject, a filter or the whole region).
//! The answer comes once each command is committed and applied on its leader
//! and every replica has either confirmed it applied it or been waited out for
//! its read lease (E1): from then on no replica answers a read with the erased
//! points. The criteria travel only inside the region (R2).
//!
//! Each erase is a job in the meta group, started while the shards commit
//! (the erasure waits for neither meta's round trip nor its availability)
//! and given each shard's index and count after the answer; both retried in
//! the background for a while when meta does not take them at once. Replicas report their purges
//! to it; `GetErasureJob` shows its progress and, once done, the receipt
//! signed with the cluster's key.

use super::points::{check_writes, group, ids_from, record_ack, with_committed};
use super::{audited, now_ms, observe, parse_filter};
use crate::audit::Note;
use crate::state::{Collection, NodeState};
use sovra_meta::MetaCommand;
use sovra_meta::erasure::{EraseKind, JobState, Receipt};
use sovra_proto::v1::{self, erasure_server::Erasure as ErasureRpc};
use sovra_types::validate::{check_likeness, check_region, check_subject, check_template_id, prepare_vector};
use sovra_types::{ApiError, Erase, EraseTarget, RegionId, ShardCommand, ShardId};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct ErasureService {
    pub state: Arc<NodeState>,
}

#[tonic::async_trait]
impl ErasureRpc for ErasureService {
    async fn erase(&self, req: Request<v1::EraseRequest>) -> Result<Response<v1::EraseResponse>, Status> {
        let note = Note::new("erase", req.metadata());
        audited(&self.state, "erase", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("erasure")?;
            let req = req.into_inner();
            let (c, region) = self.target_region(&caller, &note, &req.collection, &req.region).await?;
            let target = match req.target {
                None => {
                    return Err(ApiError::invalid(
                        "target is unset: name ids, a subject, a filter, or all = true for the whole region",
                    ));
                }
                Some(v1::erase_request::Target::Ids(ids)) => EraseTarget::Ids(ids_from(&ids.ids)?),
                Some(v1::erase_request::Target::Subject(s)) => {
                    check_subject(&s, "subject")?;
                    EraseTarget::Subject(s)
                }
                Some(v1::erase_request::Target::Filter(f)) => EraseTarget::Filter(
                    parse_filter(Some(&f))?.ok_or_else(|| ApiError::invalid("filter is empty: give at least one condition"))?,
                ),
                Some(v1::erase_request::Target::All(true)) => EraseTarget::All,
                Some(v1::erase_request::Target::All(false)) => {
                    return Err(ApiError::invalid(
                        "all is false: set it true to erase the whole region, or name a target",
                    ));
                }
            };
            self.erase_in(&note, &c, region, target).await
        })
        .await
    }

    async fn register_opt_out(&self, req: Request<v1::RegisterOptOutRequest>) -> Result<Response<v1::RegisterOptOutResponse>, Status> {
        let note = Note::new("opt_out", req.metadata());
        audited(&self.state, "register_opt_out", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("the opt-out registry")?;
            let req = req.into_inner();
            let (c, region) = self.target_region(&caller, &note, &req.collection, &req.region).await?;
            let vector = prepare_vector(&c.spec, req.vector, "vector")?;
            check_likeness(&c.spec, &vector, req.threshold, "vector")?;
            note.query(&vector);
            let subject = (!req.subject.is_empty()).then_some(req.subject);
            if let Some(s) = &subject {
                check_subject(s, "subject")?;
            }
            let template = format!("optout-{}", uuid::Uuid::new_v4().simple());
            let target = EraseTarget::Likeness {
                template: template.clone(),
                vector,
                threshold: req.threshold,
                subject,
            };
            let erasure = self.erase_in(&note, &c, region, target).await?;
            note.target(&format!("{template} job {}", erasure.job));
            tracing::info!(template = %template, job = %erasure.job, erased = erasure.erased, "likeness opted out");
            Ok(v1::RegisterOptOutResponse {
                template,
                erasure: Some(erasure),
            })
        })
        .await
    }

    async fn remove_opt_out(&self, req: Request<v1::RemoveOptOutRequest>) -> Result<Response<v1::RemoveOptOutResponse>, Status> {
        let note = Note::new("remove_opt_out", req.metadata());
        audited(&self.state, "remove_opt_out", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("the opt-out registry")?;
            let req = req.into_inner();
            let (c, region) = self.target_region(&caller, &note, &req.collection, &req.region).await?;
            check_template_id(&req.template).map_err(|e| e.at("template"))?;
            note.target(&req.template);
            let per_shard = every_shard(&c, &region, || ShardCommand::RemoveOptOut {
                template: req.template.clone(),
            })?;
            note.shards(per_shard.len());
            let out = super::points::write(&self.state, &c, per_shard).await?;
            if out.count == 0 {
                return Err(ApiError::not_found(format!(
                    "template {} is not on region {region}'s opt-out registry of collection {}",
                    req.template, c.spec.name
                )));
            }
            note.results(out.count);
            tracing::info!(template = %req.template, "opt-out removed");
            Ok(v1::RemoveOptOutResponse {
                removed: out.count,
                writes: out.writes,
            })
        })
        .await
    }

    async fn subject_access(&self, req: Request<v1::SubjectAccessRequest>) -> Result<Response<v1::SubjectAccessResponse>, Status> {
        let note = Note::new("subject_access", req.metadata());
        audited(&self.state, "subject_access", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("subject access")?;
            let req = req.into_inner();
            check_subject(&req.subject, "subject")?;
            let (c, region) = super::points::readable(&self.state, &caller, &req.collection, &req.region, &note).await?;
            let limit = match req.limit {
                0 => 100,
                n if n > 1000 => return Err(ApiError::invalid(format!("limit is {n}: at most 1000 points per page (0 for 100)"))),
                n => n as usize,
            };
            let map = c.maps.get(&region).ok_or_else(|| c.spec.region_not_spanned(&region))?;
            let at = super::points::cursor_from(&req.cursor, &region, map).map_err(|e| e.at("cursor"))?;
            let query = sovra_coord::wire::ScrollQuery {
                after: None,
                limit: 0,
                filter: None,
                with_vector: false,
                with_payload: false,
                now_ms: now_ms(),
                subject: Some(req.subject.clone()),
            };
            let (records, next) = self
                .state
                .root()
                .scroll(&c.spec.name, &region, map, at, query, limit, |_| {
                    sovra_raft::ReadLevel::Linearizable
                })
                .await?;
            note.shards(map.len());
            note.results(records.len() as u64);
            Ok(v1::SubjectAccessResponse {
                points: records
                    .iter()
                    .map(|r| v1::SubjectPoint {
                        id: Some(sovra_proto::convert::point_id_to(&r.id)),
                        region: r.region.to_string(),
                        source: r.source.clone(),
                        lawful_basis: sovra_proto::convert::lawful_basis_to(r.lawful_basis) as i32,
                        expires_at_ms: r.expires_at_ms,
                        consent_at_ms: r.consent_at_ms,
                    })
                    .collect(),
                next_cursor: next.map(|at| super::points::cursor_to(&region, &at)).unwrap_or_default(),
            })
        })
        .await
    }

    async fn likeness_access(&self, req: Request<v1::LikenessAccessRequest>) -> Result<Response<v1::LikenessAccessResponse>, Status> {
        let note = Note::new("likeness_access", req.metadata());
        audited(&self.state, "likeness_access", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_data_protection("likeness access")?;
            let req = req.into_inner();
            let (c, region) = super::points::readable(&self.state, &caller, &req.collection, &req.region, &note).await?;
            // Used for this answer only: never stored, never logged; the
            // audit record keeps its SHA-256.
            let vector = prepare_vector(&c.spec, req.vector, "vector")?;
            check_likeness(&c.spec, &vector, req.threshold, "vector")?;
            note.query(&vector);
            let k = sovra_types::limits::MAX_K;
            let query = sovra_coord::wire::SearchQuery {
                vector,
                k,
                ef: k,
                filter: None,
                with_vector: false,
                with_payload: false,
                exact: true,
                now_ms: now_ms(),
            };
            let result = self
                .state
                .root()
                .search(&c.spec.name, std::slice::from_ref(&region), query, |_| {
                    sovra_raft::ReadLevel::Linearizable
                })
                .await?;
            if let Some(r) = result.shards.iter().find(|r| r.error.is_some()) {
                return Err(sovra_coord::root::shard_failed(&r.shard, r.code, r.error.as_deref().unwrap_or("")));
            }
            note.shards(result.shards.len());
            let count = result.hits.iter().filter(|(_, h)| h.distance <= req.threshold).count() as u64;
            note.results(count);
            Ok(v1::LikenessAccessResponse {
                present: count > 0,
                count,
                at_least: count == u64::from(k),
            })
        })
        .await
    }

    async fn get_erasure_job(&self, req: Request<v1::GetErasureJobRequest>) -> Result<Response<v1::ErasureJob>, Status> {
        observe("get_erasure_job", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_data_protection("erasure jobs")?;
            let id = req.into_inner().job;
            if id.is_empty() || id.len() > sovra_types::limits::MAX_JOB_ID_BYTES {
                return Err(ApiError::invalid(format!(
                    "job must be the id Erase returned (1 to {} bytes)",
                    sovra_types::limits::MAX_JOB_ID_BYTES
                )));
            }
            // A job just started elsewhere may reach this node's view a
            // moment later.
            let deadline = Instant::now() + self.state.host.settings.read_wait;
            let mut changes = self.state.view_changes();
            let (job, view) = loop {
                let view = self.state.view();
                if let Some(j) = view.state.erasures.jobs.get(&id) {
                    break (j.clone(), view);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                    return Err(ApiError::not_found(format!(
                        "erasure job {} is not known: check the id Erase returned (jobs are kept until {} newer ones have finished)",
                        sovra_types::error::quote(&id),
                        sovra_meta::erasure::KEPT_FINISHED_JOBS
                    )));
                }
            };
            caller.require_collection(&job.collection)?;
            Ok(job_status(&self.state, &job, &view.state))
        })
        .await
    }
}

/// Records `cmds` (a job's start, then its outcome) in meta in order, each
/// retried for a while (bounded, backing off). A start refused because the
/// job exists was taken by an earlier try.
async fn record_job(state: Arc<NodeState>, cmds: Vec<MetaCommand>) {
    'next: for cmd in cmds {
        for attempt in 0..60u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt.min(10)))).await;
            }
            match crate::cluster::meta_write(&state, cmd.clone()).await {
                Ok((_, Ok(_))) => continue 'next,
                Ok((_, Err(sovra_meta::Refused::Job(sovra_meta::erasure::JobRefused::Exists(_))))) => continue 'next,
                Ok((_, Err(refused))) => {
                    tracing::error!(?cmd, %refused, "the meta group refused an erasure job record; the job has no receipt");
                    return;
                }
                Err(e) => tracing::debug!(error = %e.message, "erasure job record not taken yet"),
            }
        }
        tracing::error!(?cmd, "erasure job record never taken by meta; the job has no receipt");
        return;
    }
}

fn job_status(state: &NodeState, job: &sovra_meta::erasure::ErasureJob, meta: &sovra_meta::MetaState) -> v1::ErasureJob {
    let (state_name, failed_reason) = match &job.state {
        JobState::Requested => ("requested", String::new()),
        JobState::Acknowledged => ("acknowledged", String::new()),
        JobState::Done => ("done", String::new()),
        JobState::Failed { why } => ("failed", why.clone()),
    };
    let replicas = job
        .shards
        .iter()
        .flat_map(|(n, s)| {
            s.replicas.iter().map(move |(node, p)| v1::ErasureJobReplica {
                shard: *n,
                node: *node,
                outcome: p.outcome().into(),
                purged_through: p.purged_through().unwrap_or(0),
                node_down: meta.nodes.get(node).is_none_or(|r| r.status == sovra_meta::NodeStatus::Down),
            })
        })
        .collect();
    let signed = Receipt::of(job).map(|r| state.receipt_key.sign(&r));
    v1::ErasureJob {
        job: job.id.clone(),
        kind: job.kind.as_str().into(),
        collection: job.collection.to_string(),
        region: job.region.to_string(),
        state: state_name.into(),
        failed_reason,
        requested_at_ms: job.requested_at_ms,
        acknowledged_at_ms: job.acknowledged_at_ms.unwrap_or(0),
        done_at_ms: job.done_at_ms.unwrap_or(0),
        erased: job.shards.values().filter_map(|s| s.erased).sum(),
        replicas,
        receipt_json: signed.as_ref().map(|s| s.receipt_json.clone()).unwrap_or_default(),
        signature: signed.as_ref().map(|s| s.signature.clone()).unwrap_or_default(),
        public_key: signed.map(|s| s.public_key).unwrap_or_default(),
    }
}

/// `cmd` for every shard of `region` of `c` (a criterion any shard may match).
fn every_shard(c: &Collection, region: &RegionId, cmd: impl Fn() -> ShardCommand) -> Result<Vec<(ShardId, ShardCommand)>, ApiError> {
    let map = c.maps.get(region).ok_or_else(|| c.spec.region_not_spanned(region))?;
    Ok(map
        .shards()
        .map(|(number, _)| {
            let shard = ShardId {
                collection: c.spec.name.clone(),
                region: region.clone(),
                number,
            };
            (shard, cmd())
        })
        .collect())
}

impl ErasureService {
    /// The collection and region a data-protection call names, once the
    /// key may use the collection (and the collection's purpose rule holds),
    /// both noted for the call's audit record.
    async fn target_region(
        &self,
        caller: &crate::auth::Caller,
        note: &Note,
        collection: &str,
        region: &str,
    ) -> Result<(Arc<Collection>, RegionId), ApiError> {
        let c = self.state.collection_now(collection).await?;
        caller.require_collection(&c.spec.name)?;
        note.collection(&c.spec)?;
        let region = check_region(&c.spec, region).map_err(|e| e.at("region"))?;
        note.regions([&region]);
        Ok((c, region))
    }

    /// Erases `target` in `region` of `c`: one `Erase` per shard it touches,
    /// committed in parallel, a meta job with its receipt; answers once every
    /// replica has applied, appended (fenced) or been waited out (E1).
    async fn erase_in(&self, note: &Note, c: &Collection, region: RegionId, target: EraseTarget) -> Result<v1::EraseResponse, ApiError> {
        let kind = target.kind();
        let meta_kind = match &target {
            EraseTarget::Ids(_) => EraseKind::Ids,
            EraseTarget::Subject(_) => EraseKind::Subject,
            EraseTarget::Filter(_) => EraseKind::Filter,
            EraseTarget::Likeness { .. } => EraseKind::Likeness,
            _ => EraseKind::Region,
        };
        let job = format!("erase-{}", uuid::Uuid::new_v4().simple());
        note.target(&job);
        let at_ms = now_ms();
        let salt: [u8; 32] = rand::random();
        let command = |target: EraseTarget| {
            ShardCommand::Erase(Erase {
                job: job.clone(),
                target,
                at_ms,
                salt,
            })
        };
        let per_shard: Vec<(ShardId, ShardCommand)> = match target {
            EraseTarget::Ids(ids) => {
                let keyed = ids.into_iter().map(|id| (region.clone(), id, id)).collect();
                group(c, keyed)?
                    .into_iter()
                    .map(|(shard, ids)| (shard, command(EraseTarget::Ids(ids))))
                    .collect()
            }
            other => every_shard(c, &region, || command(other.clone()))?,
        };
        // R2 (the criteria are the region's personal data) and validation
        // of every command, before anything is written.
        check_writes(&self.state, c, &per_shard)?;
        let shards = per_shard.len();
        note.shards(shards);
        let start = MetaCommand::StartErasure {
            job: job.clone(),
            kind: meta_kind,
            collection: c.spec.name.clone(),
            region: region.clone(),
            shards: per_shard.iter().map(|(s, _)| s.number).collect(),
            at_ms,
        };
        // Every shard commits and then confirms (E1: each replica applied
        // it, or is waited out for its read lease) at the same time as the
        // others: one commit round trip and one confirmation round in all.
        let each = per_shard.into_iter().map(|(shard, cmd)| {
            let members = self.state.replicas(&c.spec, &shard);
            let host = self.state.host.clone();
            async move {
                let ack = host.write_to(&shard, &members, cmd).await;
                let committed = Instant::now();
                let missed = match &ack {
                    Ok(a) => host.confirm_applied(&shard, &members, a.index, committed).await,
                    Err(_) => Vec::new(),
                };
                (shard, ack, missed)
            }
        });
        let mut written = v1::WriteResponse::default();
        let mut failed = None;
        let mut waited_out = Vec::new();
        let mut committed = Vec::new();
        // The job starts in meta while the shards commit: the erasure
        // waits for neither meta's round trip nor its availability.
        let (started, acks) = tokio::join!(
            self.state.meta_change(start.clone(), "starting the erasure job"),
            futures::future::join_all(each)
        );
        for (shard, ack, missed) in acks {
            match ack {
                Ok(a) => {
                    record_ack(&mut written, &shard, &a);
                    committed.push((shard.number, a.index, a.changed));
                    waited_out.extend(missed.into_iter().map(|n| format!("node {n} (shard {shard})")));
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        // Meta learns the outcome after the answer (and the start, if it
        // did not take it), retried for a while: the job then settles (or
        // fails) and the receipt can be built.
        let outcome = MetaCommand::ErasureCommitted {
            job: job.clone(),
            at_ms: now_ms(),
            shards: committed,
            failed: failed.as_ref().map(|e: &ApiError| e.message.clone()),
        };
        let mut record = vec![outcome];
        if let Err(e) = started {
            tracing::warn!(job = %job, error = %e.message, "erasure job not started in meta yet; retrying in the background");
            record.insert(0, start);
        }
        tokio::spawn(record_job(self.state.clone(), record));
        if let Some(e) = failed {
            return Err(with_committed(e, &written.writes));
        }
        if !waited_out.is_empty() {
            tracing::warn!(job = %job, waited_out = ?waited_out, "erasure acknowledged after waiting out replicas that did not confirm it");
        }
        tracing::info!(job = %job, kind, shards, erased = written.count, "erasure committed");
        note.results(written.count);
        Ok(v1::EraseResponse {
            job,
            erased: written.count,
            writes: written.writes,
            erased_at_ms: at_ms,
            waited_out,
        })
    }
}
