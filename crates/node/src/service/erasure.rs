//! `sovra.v1.Erasure`: a data-protection erasure becomes one `Erase` command
//! in the Raft log of every shard it touches (the shards owning the named ids,
//! or every shard of the region for a subject, a filter or the whole region).
//! The answer comes once each command is committed and applied on its leader
//! and every replica has either confirmed it applied it or been waited out for
//! its read lease (E1): from then on no replica answers a read with the erased
//! points. The criteria travel only inside the region (R2).

use super::points::{check_writes, group, ids_from, record_ack, with_committed};
use super::{now_ms, observe, parse_filter};
use crate::state::NodeState;
use sovra_proto::v1::{self, erasure_server::Erasure as ErasureRpc};
use sovra_types::validate::{check_region, check_subject};
use sovra_types::{ApiError, Erase, EraseTarget, ShardCommand, ShardId};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct ErasureService {
    pub state: Arc<NodeState>,
}

#[tonic::async_trait]
impl ErasureRpc for ErasureService {
    async fn erase(&self, req: Request<v1::EraseRequest>) -> Result<Response<v1::EraseResponse>, Status> {
        observe("erase", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_data_protection("erasure")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            caller.require_collection(&c.spec.name)?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
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
                    return Err(ApiError::invalid("all is false: set it true to erase the whole region, or name a target"));
                }
            };
            let kind = target.kind();
            let job = format!("erase-{}", uuid::Uuid::new_v4().simple());
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
                    group(&c, keyed)?
                        .into_iter()
                        .map(|(shard, ids)| (shard, command(EraseTarget::Ids(ids))))
                        .collect()
                }
                other => {
                    let map = c.maps.get(&region).ok_or_else(|| c.spec.region_not_spanned(&region))?;
                    map.shards()
                        .map(|(number, _)| {
                            let shard = ShardId {
                                collection: c.spec.name.clone(),
                                region: region.clone(),
                                number,
                            };
                            (shard, command(other.clone()))
                        })
                        .collect()
                }
            };
            // R2 (the criteria are the region's personal data) and validation
            // of every command, before anything is written.
            check_writes(&self.state, &c, &per_shard)?;
            let shards = per_shard.len();
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
            for (shard, ack, missed) in futures::future::join_all(each).await {
                match ack {
                    Ok(a) => {
                        record_ack(&mut written, &shard, &a);
                        waited_out.extend(missed.into_iter().map(|n| format!("node {n} (shard {shard})")));
                    }
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            if let Some(e) = failed {
                return Err(with_committed(e, &written.writes));
            }
            if !waited_out.is_empty() {
                tracing::warn!(job = %job, waited_out = ?waited_out, "erasure acknowledged after waiting out replicas that did not confirm it");
            }
            tracing::info!(job = %job, kind, shards, erased = written.count, "erasure committed");
            Ok(v1::EraseResponse {
                job,
                erased: written.count,
                writes: written.writes,
                erased_at_ms: at_ms,
                waited_out,
            })
        })
        .await
    }
}
