//! `sovra.v1.Admin`: API keys (made, listed, revoked through the meta group;
//! a secret is shown once and only its SHA-256 kept) and region policies.
//! Every call needs the admin scope.

use super::{audited, observe};
use crate::audit::Note;
use crate::state::NodeState;
use sovra_meta::MetaCommand;
use sovra_meta::keys::{ApiKeyRecord, KeyRate, Regions, Scopes, format_key, hash_secret, valid_key_id};
use sovra_meta::state::{RATES_LEVEL, RegionPolicy};
use sovra_proto::v1::{self, admin_server::Admin};
use sovra_types::{ApiError, CollectionName, RegionId, quote};
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminService {
    pub state: Arc<NodeState>,
}

impl AdminService {
    /// Proposes `cmd` (starting or ending job `job`), waits until this
    /// node's view has it, and answers the job as recorded.
    async fn start_job(&self, cmd: MetaCommand, job: &str, what: &str) -> Result<v1::OpJob, ApiError> {
        let index = self.state.meta_change(cmd, what).await?;
        self.state.caught_up(index).await?;
        let view = self.state.view();
        let j = view.state.ops.jobs.get(job).ok_or_else(|| ApiError::internal("the job vanished"))?;
        Ok(op_to(j, &view.state))
    }
}

fn regions_from(list: &[String], field: &str) -> Result<Regions, ApiError> {
    if list.iter().any(|r| r == "*") {
        if list.len() > 1 {
            return Err(ApiError::invalid(format!(
                "{field}: \"*\" (every region) stands alone; drop the other entries"
            )));
        }
        return Ok(Regions::All);
    }
    let mut out = BTreeSet::new();
    for (i, r) in list.iter().enumerate() {
        out.insert(RegionId::parse(r).map_err(|e| e.at(&format!("{field}[{i}]")))?);
    }
    Ok(Regions::Only(out))
}

fn regions_to(r: &Regions) -> Vec<String> {
    match r {
        Regions::All => vec!["*".into()],
        Regions::Only(s) => s.iter().map(ToString::to_string).collect(),
    }
}

fn scopes_from(s: v1::KeyScopes) -> Result<Scopes, ApiError> {
    let read = regions_from(&s.read_regions, "scopes.read_regions")?;
    let write = regions_from(&s.write_regions, "scopes.write_regions")?;
    let collections = if s.collections.is_empty() {
        None
    } else {
        let mut set = BTreeSet::new();
        for (i, c) in s.collections.iter().enumerate() {
            set.insert(CollectionName::parse(c).map_err(|e| e.at(&format!("scopes.collections[{i}]")))?);
        }
        Some(set)
    };
    let scopes = Scopes {
        read,
        write,
        collections,
        admin: s.admin,
        data_protection: s.data_protection,
    };
    if scopes.read == Regions::none() && scopes.write == Regions::none() && !scopes.admin && !scopes.data_protection {
        return Err(ApiError::invalid(
            "scopes: a key with no read region, no write region, no admin and no data_protection could do nothing; give it at least one",
        ));
    }
    Ok(scopes)
}

fn scopes_to(s: &Scopes) -> v1::KeyScopes {
    v1::KeyScopes {
        read_regions: regions_to(&s.read),
        write_regions: regions_to(&s.write),
        collections: s.collections.iter().flatten().map(ToString::to_string).collect(),
        admin: s.admin,
        data_protection: s.data_protection,
    }
}

/// A key's rate from the request (`None`: no rate), INVALID_ARGUMENT when
/// out of bounds; a burst of 0 is the rate itself.
fn rate_from(r: Option<v1::KeyRate>, field: &str) -> Result<Option<KeyRate>, ApiError> {
    let Some(r) = r else { return Ok(None) };
    let rate = KeyRate {
        per_second: r.per_second,
        burst: if r.burst == 0 { r.per_second } else { r.burst },
    };
    rate.check().map_err(|why| ApiError::invalid(format!("{field}: {why}")))?;
    Ok(Some(rate))
}

fn rate_to(r: Option<&KeyRate>) -> Option<v1::KeyRate> {
    r.map(|r| v1::KeyRate {
        per_second: r.per_second,
        burst: r.burst,
    })
}

/// FAILED_PRECONDITION unless the cluster's meta level is at least `level`
/// (the state machine's own check, [`sovra_meta::MetaState::need_level`]).
/// Checked before proposing: a command of a higher level would stop a
/// replica of an older build at the entry it cannot decode. The view's
/// level never runs ahead of the committed one, so this never lets one by.
fn need_level(state: &NodeState, level: u32, what: &str) -> Result<(), ApiError> {
    state
        .view()
        .state
        .need_level(level, what)
        .map_err(|e| ApiError::precondition(e.to_string()))
}

fn key_to(k: &ApiKeyRecord, state: &sovra_meta::MetaState) -> v1::ApiKey {
    v1::ApiKey {
        id: k.id.clone(),
        scopes: Some(scopes_to(&k.scopes)),
        created_ms: k.created_ms,
        rate: rate_to(state.ext.key_rates.get(&k.id)),
    }
}

fn policy_to(region: &RegionId, p: &RegionPolicy) -> v1::RegionPolicy {
    v1::RegionPolicy {
        region: region.to_string(),
        results_may_go_to: p.results_may_go_to.iter().map(ToString::to_string).collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_key(&self, req: Request<v1::CreateKeyRequest>) -> Result<Response<v1::CreateKeyResponse>, Status> {
        let note = Note::new("create_key", req.metadata());
        audited(&self.state, "create_key", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("CreateKey")?;
            let req = req.into_inner();
            if !valid_key_id(&req.id) {
                return Err(ApiError::invalid(format!(
                    "id {} is not a key id: lowercase letters, digits and '-', 1 to 32 characters, starting with a letter",
                    quote(&req.id)
                )));
            }
            let scopes = scopes_from(
                req.scopes
                    .ok_or_else(|| ApiError::invalid("scopes is missing: say what the key may do"))?,
            )?;
            let rate = rate_from(req.rate, "rate")?;
            note.target(&req.id);
            let secret = crate::cluster::new_secret();
            let rec = ApiKeyRecord {
                id: req.id.clone(),
                sha256: hash_secret(&secret),
                scopes: scopes.clone(),
                created_ms: crate::cluster::now_ms(),
            };
            // One command either way: a key is never left without the rate
            // it was asked with.
            let cmd = match rate {
                None => MetaCommand::AddApiKey(rec),
                Some(rate) => {
                    need_level(&self.state, RATES_LEVEL, "a key with a rate")?;
                    MetaCommand::AddRatedKey { key: rec, rate }
                }
            };
            let index = self.state.meta_change(cmd, &format!("create key {}", req.id)).await?;
            self.state.caught_up(index).await?;
            tracing::info!(key = %req.id, by = ?caller.key, "API key created");
            Ok(v1::CreateKeyResponse {
                key: format_key(&req.id, &secret),
                id: req.id,
                scopes: Some(scopes_to(&scopes)),
                rate: rate_to(rate.as_ref()),
            })
        })
        .await
    }

    async fn set_key_rate(&self, req: Request<v1::SetKeyRateRequest>) -> Result<Response<v1::ApiKey>, Status> {
        let note = Note::new("set_key_rate", req.metadata());
        audited(&self.state, "set_key_rate", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("SetKeyRate")?;
            let req = req.into_inner();
            note.target(&req.id);
            let rate = rate_from(req.rate, "rate")?;
            need_level(&self.state, RATES_LEVEL, "a key's rate")?;
            let index = self
                .state
                .meta_change(
                    MetaCommand::SetKeyRate { id: req.id.clone(), rate },
                    &format!("set the rate of key {}", quote(&req.id)),
                )
                .await?;
            self.state.caught_up(index).await?;
            tracing::info!(key = %req.id, ?rate, by = ?caller.key, "API key rate set");
            let view = self.state.view();
            let k = view
                .state
                .api_keys
                .get(&req.id)
                .ok_or_else(|| ApiError::not_found(format!("API key {} was revoked meanwhile", quote(&req.id))))?;
            Ok(key_to(k, &view.state))
        })
        .await
    }

    async fn list_keys(&self, req: Request<v1::ListKeysRequest>) -> Result<Response<v1::ListKeysResponse>, Status> {
        let note = Note::new("list_keys", req.metadata());
        audited(&self.state, "list_keys", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("ListKeys")?;
            self.state.refresh_view().await;
            let view = self.state.view();
            Ok(v1::ListKeysResponse {
                keys: view.state.api_keys.values().map(|k| key_to(k, &view.state)).collect(),
            })
        })
        .await
    }

    async fn revoke_key(&self, req: Request<v1::RevokeKeyRequest>) -> Result<Response<v1::RevokeKeyResponse>, Status> {
        let note = Note::new("revoke_key", req.metadata());
        audited(&self.state, "revoke_key", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("RevokeKey")?;
            let id = req.into_inner().id;
            note.target(&id);
            let view = self.state.view();
            let admins = view.state.api_keys.values().filter(|k| k.scopes.admin).count();
            if view.state.api_keys.get(&id).is_some_and(|k| k.scopes.admin) && admins == 1 {
                return Err(ApiError::precondition(format!(
                    "key {id} is the cluster's only admin key: revoking it would leave nobody able to manage keys; create another admin key first"
                )));
            }
            let index = self
                .state
                .meta_change(MetaCommand::RevokeApiKey { id: id.clone() }, &format!("revoke key {}", quote(&id)))
                .await?;
            self.state.caught_up(index).await?;
            tracing::info!(key = %id, by = ?caller.key, "API key revoked");
            Ok(v1::RevokeKeyResponse {})
        })
        .await
    }

    async fn set_region_policy(&self, req: Request<v1::SetRegionPolicyRequest>) -> Result<Response<v1::RegionPolicy>, Status> {
        let note = Note::new("set_region_policy", req.metadata());
        audited(&self.state, "set_region_policy", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("SetRegionPolicy")?;
            let p = req
                .into_inner()
                .policy
                .ok_or_else(|| ApiError::invalid("policy is missing: name the region and where its results may go"))?;
            let region = RegionId::parse(&p.region).map_err(|e| e.at("policy.region"))?;
            note.target(region.as_str());
            let mut to = BTreeSet::new();
            for (i, r) in p.results_may_go_to.iter().enumerate() {
                let r = RegionId::parse(r).map_err(|e| e.at(&format!("policy.results_may_go_to[{i}]")))?;
                if r != region {
                    to.insert(r);
                }
            }
            let policy = RegionPolicy { results_may_go_to: to };
            let index = self
                .state
                .meta_change(
                    MetaCommand::SetRegionPolicy {
                        region: region.clone(),
                        policy: policy.clone(),
                    },
                    &format!("set the policy of region {region}"),
                )
                .await?;
            self.state.caught_up(index).await?;
            tracing::info!(%region, to = ?policy.results_may_go_to, by = ?caller.key, "region policy set");
            Ok(policy_to(&region, &policy))
        })
        .await
    }

    async fn list_region_policies(
        &self,
        req: Request<v1::ListRegionPoliciesRequest>,
    ) -> Result<Response<v1::ListRegionPoliciesResponse>, Status> {
        observe("list_region_policies", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_admin("ListRegionPolicies")?;
            let view = self.state.view();
            Ok(v1::ListRegionPoliciesResponse {
                policies: view.state.policies.iter().map(|(r, p)| policy_to(r, p)).collect(),
            })
        })
        .await
    }

    async fn cluster_status(&self, req: Request<v1::ClusterStatusRequest>) -> Result<Response<v1::ClusterStatusResponse>, Status> {
        let note = Note::new("cluster_status", req.metadata());
        audited(&self.state, "cluster_status", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("ClusterStatus")?;
            self.state.refresh_view().await;
            let view = self.state.view();
            let now = crate::cluster::now_ms();
            let mut replicas: std::collections::BTreeMap<u64, u32> = Default::default();
            for c in view.state.collections.values() {
                for s in c.shards.values() {
                    for n in &s.replicas {
                        *replicas.entry(*n).or_default() += 1;
                    }
                }
            }
            let nodes: Vec<v1::NodeInfo> = view
                .state
                .nodes
                .values()
                .map(|n| {
                    let mut roles = Vec::new();
                    for (on, name) in [(n.roles.meta, "meta"), (n.roles.data, "data"), (n.roles.coordinator, "coordinator")] {
                        if on {
                            roles.push(name.to_string());
                        }
                    }
                    v1::NodeInfo {
                        id: n.id,
                        region: n.region.to_string(),
                        zone: n.zone.clone(),
                        roles,
                        state: format!("{:?}", n.status).to_lowercase(),
                        public_addr: n.public_addr.clone(),
                        cluster_addr: n.cluster_addr.clone(),
                        heartbeat_age_ms: now.saturating_sub(n.last_heartbeat_ms),
                        replicas: replicas.get(&n.id).copied().unwrap_or(0),
                        audit_replica: view.state.audit.get(&n.region).is_some_and(|g| g.replicas.contains(&n.id)),
                    }
                })
                .collect();
            note.results(nodes.len() as u64);
            Ok(v1::ClusterStatusResponse {
                nodes,
                meta_leader: self.state.host.meta().and_then(|m| m.leader()).unwrap_or(0),
                map_version: view.state.map_version,
                meta_index: view.index,
                meta_level: view.state.ext.level,
            })
        })
        .await
    }

    async fn move_replica(&self, req: Request<v1::MoveReplicaRequest>) -> Result<Response<v1::OpJob>, Status> {
        let note = Note::new("move_replica", req.metadata());
        audited(&self.state, "move_replica", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("MoveReplica")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            note.collection(&c.spec)?;
            let region = sovra_types::validate::check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let job = format!("move-{}", uuid::Uuid::new_v4().simple());
            note.target(&job);
            let cmd = MetaCommand::StartMove {
                job: job.clone(),
                collection: c.spec.name.clone(),
                shard: (region.clone(), req.shard),
                from: req.from,
                to: req.to,
                at_ms: crate::cluster::now_ms(),
            };
            let what = format!(
                "move shard {}/{region}/{} from node {} to node {}",
                c.spec.name, req.shard, req.from, req.to
            );
            let out = self.start_job(cmd, &job, &what).await?;
            tracing::info!(job = %job, by = ?caller.key, "replica move started");
            Ok(out)
        })
        .await
    }

    async fn split_shard(&self, req: Request<v1::SplitShardRequest>) -> Result<Response<v1::OpJob>, Status> {
        let note = Note::new("split_shard", req.metadata());
        audited(&self.state, "split_shard", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("SplitShard")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            note.collection(&c.spec)?;
            let region = sovra_types::validate::check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            if c.maps.get(&region).is_none_or(|m| m.range_of(req.shard).is_none()) {
                let numbers: Vec<String> = c
                    .maps
                    .get(&region)
                    .map(|m| m.numbers().map(|n| n.to_string()).collect())
                    .unwrap_or_default();
                return Err(ApiError::not_found(format!(
                    "shard: collection {} has no shard {} in region {region}; its shards there are {}",
                    c.spec.name,
                    req.shard,
                    numbers.join(", ")
                )));
            }
            let job = format!("split-{}", uuid::Uuid::new_v4().simple());
            note.target(&job);
            let cmd = MetaCommand::StartSplit {
                job: job.clone(),
                collection: c.spec.name.clone(),
                shard: (region.clone(), req.shard),
                at_ms: crate::cluster::now_ms(),
            };
            let what = format!("split shard {}/{region}/{}", c.spec.name, req.shard);
            let out = self.start_job(cmd, &job, &what).await?;
            tracing::info!(job = %job, by = ?caller.key, "shard split started");
            Ok(out)
        })
        .await
    }

    async fn recover_shard(&self, req: Request<v1::RecoverShardRequest>) -> Result<Response<v1::OpJob>, Status> {
        let note = Note::new("recover_shard", req.metadata());
        audited(&self.state, "recover_shard", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("RecoverShard")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            note.collection(&c.spec)?;
            let region = sovra_types::validate::check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let job = format!("recover-{}", uuid::Uuid::new_v4().simple());
            note.target(&job);
            let cmd = MetaCommand::StartRecover {
                job: job.clone(),
                collection: c.spec.name.clone(),
                shard: (region.clone(), req.shard),
                survivor: req.survivor,
                accept_lost_erasures: req.accept_lost_erasures,
                at_ms: crate::cluster::now_ms(),
            };
            let what = format!("rebuilding shard {}/{region}/{} from node {}", c.spec.name, req.shard, req.survivor);
            let out = self.start_job(cmd, &job, &what).await?;
            tracing::warn!(job = %job, by = ?caller.key, survivor = req.survivor, "rebuilding a shard that lost its quorum: writes after the survivor's last entry are lost");
            Ok(out)
        })
        .await
    }

    type ExportShardStream = tokio_stream::wrappers::ReceiverStream<Result<v1::ExportChunk, Status>>;

    async fn export_shard(&self, req: Request<v1::ExportShardRequest>) -> Result<Response<Self::ExportShardStream>, Status> {
        let note = Note::new("export_shard", req.metadata());
        audited(&self.state, "export_shard", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("ExportShard")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            caller.require_collection(&c.spec.name)?;
            note.collection(&c.spec)?;
            let region = sovra_types::validate::check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            caller.require_read(&region)?;
            note.regions([&region]);
            // R2: a region's data leaves the cluster only through its own nodes.
            if region != self.state.region {
                return Err(ApiError::precondition(format!(
                    "R2: data of region {region} is exported only through a node of {region} (at {}); this node is in {}",
                    self.state.region_addresses(&region).join(", "),
                    self.state.region
                )));
            }
            let shard = sovra_types::ShardId {
                collection: c.spec.name.clone(),
                region,
                number: req.shard,
            };
            let (path, index) = crate::backup::export_shard(&self.state, &shard).await?;
            tracing::warn!(shard = %shard, index, by = ?caller.key, "a shard was exported (a backup)");
            Ok(crate::backup::stream_file(path))
        })
        .await
    }

    async fn restore_shard_state(
        &self,
        req: Request<v1::RestoreShardStateRequest>,
    ) -> Result<Response<v1::RestoreShardStateResponse>, Status> {
        let note = Note::new("restore_shard_state", req.metadata());
        audited(&self.state, "restore_shard_state", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("RestoreShardState")?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            caller.require_collection(&c.spec.name)?;
            note.collection(&c.spec)?;
            let region = sovra_types::validate::check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            caller.require_write(&region)?;
            note.regions([&region]);
            if region != self.state.region {
                return Err(ApiError::precondition(format!(
                    "R2: data of region {region} is restored only through a node of {region} (at {}); this node is in {}",
                    self.state.region_addresses(&region).join(", "),
                    self.state.region
                )));
            }
            let side: sovra_types::Suppression = postcard::from_bytes(&req.state)
                .map_err(|e| ApiError::invalid(format!("state: not a shard's side state as a backup holds it ({e})")).at("state"))?;
            let shard = sovra_types::ShardId {
                collection: c.spec.name.clone(),
                region,
                number: req.shard,
            };
            crate::backup::restore_side(&self.state, &shard, side).await?;
            Ok(v1::RestoreShardStateResponse {})
        })
        .await
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        observe("list_jobs", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_admin("ListJobs")?;
            self.state.refresh_view().await;
            let view = self.state.view();
            let mut jobs: Vec<&sovra_meta::ops::Job> = view.state.ops.jobs.values().collect();
            jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
            Ok(v1::ListJobsResponse {
                jobs: jobs.into_iter().map(|j| op_to(j, &view.state)).collect(),
            })
        })
        .await
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::OpJob>, Status> {
        let note = Note::new("cancel_job", req.metadata());
        audited(&self.state, "cancel_job", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("CancelJob")?;
            let job = req.into_inner().job;
            note.target(&job);
            self.state.refresh_view().await;
            if !self.state.view().state.ops.jobs.contains_key(&job) {
                return Err(ApiError::not_found(format!(
                    "no job {}; sovra ctl jobs lists them (the last 200 finished are kept)",
                    quote(&job)
                )));
            }
            let cmd = MetaCommand::EndOp {
                job: job.clone(),
                failed: None,
                at_ms: crate::cluster::now_ms(),
            };
            self.start_job(cmd, &job, &format!("cancel job {}", quote(&job))).await
        })
        .await
    }

    async fn drain_node(&self, req: Request<v1::DrainNodeRequest>) -> Result<Response<v1::OpJob>, Status> {
        let note = Note::new("drain_node", req.metadata());
        audited(&self.state, "drain_node", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("DrainNode")?;
            let req = req.into_inner();
            self.state.refresh_view().await;
            if !self.state.view().state.nodes.contains_key(&req.node) {
                return Err(ApiError::not_found(format!(
                    "node: no node {} is registered; sovra ctl status lists them",
                    req.node
                )));
            }
            let job = format!("drain-{}", uuid::Uuid::new_v4().simple());
            note.target(&job);
            let cmd = MetaCommand::StartDrain {
                job: job.clone(),
                node: req.node,
                concurrency: req.concurrency,
                at_ms: crate::cluster::now_ms(),
            };
            let out = self.start_job(cmd, &job, &format!("draining node {}", req.node)).await?;
            tracing::info!(job = %job, node = req.node, by = ?caller.key, "node drain started");
            Ok(out)
        })
        .await
    }

    async fn undrain_node(&self, req: Request<v1::UndrainNodeRequest>) -> Result<Response<v1::UndrainNodeResponse>, Status> {
        let note = Note::new("undrain_node", req.metadata());
        audited(&self.state, "undrain_node", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("UndrainNode")?;
            let node = req.into_inner().node;
            let index = self
                .state
                .meta_change(MetaCommand::Undrain { node }, &format!("undraining node {node}"))
                .await?;
            self.state.caught_up(index).await?;
            Ok(v1::UndrainNodeResponse {})
        })
        .await
    }

    async fn rebalance(&self, req: Request<v1::RebalanceRequest>) -> Result<Response<v1::RebalanceResponse>, Status> {
        let note = Note::new("rebalance", req.metadata());
        audited(&self.state, "rebalance", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            caller.require_admin("Rebalance")?;
            let req = req.into_inner();
            let region = RegionId::parse(&req.region).map_err(|e| e.at("region"))?;
            self.state.refresh_view().await;
            let before = self.state.view();
            if !before.state.nodes.values().any(|n| n.region == region) {
                return Err(ApiError::not_found(format!("region: no node is registered in region {region}")));
            }
            let (plan, job) = if req.dry_run {
                (before.state.rebalance_plan(&region), None)
            } else {
                let job = format!("rebalance-{}", uuid::Uuid::new_v4().simple());
                note.target(&job);
                let cmd = MetaCommand::StartRebalance {
                    job: job.clone(),
                    region: region.clone(),
                    concurrency: req.concurrency,
                    at_ms: crate::cluster::now_ms(),
                };
                let out = self.start_job(cmd, &job, &format!("rebalancing region {region}")).await?;
                let plan = self
                    .state
                    .view()
                    .state
                    .ops
                    .jobs
                    .get(&job)
                    .and_then(|j| match &j.kind {
                        sovra_meta::ops::JobKind::Rebalance(r) => Some(r.plan.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                tracing::info!(job = %job, region = %region, moves = plan.len(), by = ?caller.key, "rebalance started");
                (plan, Some(out))
            };
            let cands = before.state.move_candidates(&region);
            let shards = before.state.region_shards(&region);
            let moves: Vec<sovra_meta::rebalance::Move> = plan
                .iter()
                .map(|m| sovra_meta::rebalance::Move {
                    shard: (m.collection.clone(), m.shard.1),
                    from: m.from,
                    to: m.to,
                })
                .collect();
            let after = sovra_meta::rebalance::apply_moves(&shards, &moves);
            let count = |map: &std::collections::BTreeMap<sovra_meta::rebalance::ShardRef, BTreeSet<u64>>, id: u64| {
                map.values().filter(|h| h.contains(&id)).count() as u32
            };
            let loads = cands
                .iter()
                .map(|c| v1::NodeLoad {
                    node: c.id,
                    zone: c.zone.clone(),
                    before: count(&shards, c.id),
                    after: count(&after, c.id),
                })
                .collect();
            Ok(v1::RebalanceResponse {
                plan: plan.iter().map(planned_to).collect(),
                loads,
                job,
            })
        })
        .await
    }
}

fn planned_to(m: &sovra_meta::ops::MoveSpec) -> v1::PlannedMove {
    v1::PlannedMove {
        collection: m.collection.to_string(),
        region: m.shard.0.to_string(),
        shard: m.shard.1,
        from: m.from,
        to: m.to,
    }
}

/// A job as listed: a drain's or rebalance's counts come from its children
/// and (a drain) the replicas its node still holds in `meta`.
pub(crate) fn op_to(j: &sovra_meta::ops::Job, meta: &sovra_meta::MetaState) -> v1::OpJob {
    use sovra_meta::ops::{JobKind, OpState};
    let done = meta.ops.children(&j.id).filter(|c| c.state == OpState::Done).count() as u32;
    let running = meta.ops.children(&j.id).filter(|c| c.state == OpState::Running).count() as u32;
    let mut out = v1::OpJob {
        job: j.id.clone(),
        kind: j.kind.name().into(),
        state: j.state.as_str().into(),
        progress: j.progress.clone(),
        error: match &j.state {
            OpState::Failed(why) => why.clone(),
            _ => String::new(),
        },
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
        parent: j.parent.clone().unwrap_or_default(),
        ..Default::default()
    };
    match &j.kind {
        JobKind::Move(m) => {
            out.collection = m.collection.to_string();
            out.region = m.shard.0.to_string();
            out.shard = m.shard.1;
            out.from = m.from;
            out.to = m.to;
            out.moves_total = 1;
            out.moves_done = u32::from(j.state == OpState::Done);
        }
        JobKind::Drain(d) => {
            out.region = d.region.to_string();
            out.node = d.node;
            out.from = d.node;
            out.concurrency = d.concurrency;
            let holding = meta.region_shards(&d.region).values().filter(|h| h.contains(&d.node)).count() as u32;
            out.moves_done = done;
            // What is left now, the moves under way counted once.
            out.moves_total = done + holding.max(running);
        }
        JobKind::Split(sp) => {
            out.collection = sp.collection.to_string();
            out.region = sp.shard.0.to_string();
            out.shard = sp.shard.1;
            out.new_shards = vec![sp.low, sp.high];
            out.moves_total = 1;
            out.moves_done = u32::from(j.state == OpState::Done);
        }
        JobKind::Recover(r) => {
            out.collection = r.collection.to_string();
            out.region = r.shard.0.to_string();
            out.shard = r.shard.1;
            out.from = r.survivor;
            out.new_shards = vec![r.number];
            out.moves_total = 1;
            out.moves_done = u32::from(j.state == OpState::Done);
        }
        JobKind::Rebalance(r) => {
            out.region = r.region.to_string();
            out.concurrency = r.concurrency;
            out.plan = r.plan.iter().map(planned_to).collect();
            out.moves_done = done + r.skipped.len() as u32;
            out.moves_total = r.plan.len() as u32;
        }
    }
    out
}
