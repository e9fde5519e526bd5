use super::{blocking, observe};
use crate::state::{Collection, NodeState};
use sovra_proto::convert::{spec_from, spec_to};
use sovra_proto::v1::{self, collections_server::Collections};
use sovra_types::{ApiError, ShardId};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CollectionsService {
    pub state: Arc<NodeState>,
}

fn info(state: &NodeState, c: &Collection, with_digest: bool) -> Result<v1::CollectionInfo, ApiError> {
    let mut shards = Vec::new();
    for r in &c.spec.regions {
        for (number, range) in c.maps[&r.region].shards() {
            let id = ShardId {
                collection: c.spec.name.clone(),
                region: r.region.clone(),
                number,
            };
            let engine = c.local(&id);
            let stats = engine.map(|e| e.stats());
            let raft = state.host.group(&id).map(|g| g.raft().metrics().borrow().clone());
            let digest = match (with_digest, engine) {
                (true, Some(e)) => Some(e.digest().map_err(|e| state.storage_failed(e))?),
                _ => None,
            };
            shards.push(v1::ShardInfo {
                region: r.region.to_string(),
                number,
                hash_start: range.start,
                hash_end: range.end,
                live_points: stats.map_or(0, |s| s.live_points as u64),
                tombstones: stats.map_or(0, |s| s.tombstones as u64),
                applied_index: stats.map_or(0, |s| s.last_applied),
                held: engine.is_some(),
                error: c.failure(&id).map(str::to_string).unwrap_or_default(),
                replicas: state.replicas(&c.spec, &id).into_iter().collect(),
                leader: raft.as_ref().and_then(|m| m.current_leader).unwrap_or(0),
                term: raft.as_ref().map_or(0, |m| m.current_term),
                digest,
            });
        }
    }
    Ok(v1::CollectionInfo {
        spec: Some(spec_to(&c.spec)),
        shards,
    })
}

#[tonic::async_trait]
impl Collections for CollectionsService {
    async fn create_collection(&self, req: Request<v1::CreateCollectionRequest>) -> Result<Response<v1::CollectionInfo>, Status> {
        observe("create_collection", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_admin("CreateCollection")?;
            let spec = req
                .into_inner()
                .collection
                .ok_or_else(|| ApiError::invalid("collection is missing: send a CollectionSpec"))?;
            let spec = spec_from(spec)?;
            let c = self.state.create(spec).await?;
            info(&self.state, &c, false)
        })
        .await
    }

    async fn get_collection(&self, req: Request<v1::GetCollectionRequest>) -> Result<Response<v1::CollectionInfo>, Status> {
        observe("get_collection", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            let r = req.get_ref();
            let c = self.state.collection_now(&r.name).await?;
            caller.require_collection(&c.spec.name)?;
            let (state, with_digest) = (self.state.clone(), r.with_digest);
            blocking(move || info(&state, &c, with_digest)).await?
        })
        .await
    }

    async fn list_collections(&self, req: Request<v1::ListCollectionsRequest>) -> Result<Response<v1::ListCollectionsResponse>, Status> {
        observe("list_collections", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            self.state.ensure_ready()?;
            Ok(v1::ListCollectionsResponse {
                // Only the collections the key may use.
                collections: self
                    .state
                    .list()
                    .iter()
                    .filter(|c| caller.scopes.may_use(&c.spec.name))
                    .map(|c| info(&self.state, c, false))
                    .collect::<Result<_, _>>()?,
            })
        })
        .await
    }

    async fn drop_collection(&self, req: Request<v1::DropCollectionRequest>) -> Result<Response<v1::DropCollectionResponse>, Status> {
        observe("drop_collection", async {
            let caller = self.state.authenticate(req.metadata()).await?;
            caller.require_admin("DropCollection")?;
            let n = self.state.drop_collection(&req.get_ref().name).await?;
            Ok(v1::DropCollectionResponse { shards_dropped: n as u32 })
        })
        .await
    }
}
