use super::{AnswerBudget, ReadLevels, audited, now_ms, parse_filter};
use crate::audit::Note;
use crate::state::{Collection, NodeState};
use sovra_coord::wire::{GetQuery, ScrollQuery};
use sovra_proto::convert::{point_from, point_id_from, point_to};
use sovra_proto::v1::{self, points_server::Points};
use sovra_types::limits::{MAX_ANSWER_BYTES, MAX_IDS_PER_REQUEST};
use sovra_types::validate::{check_command, check_region, prepare_batch};
use sovra_types::{ApiError, ErrorCode, PointId, RegionId, ShardCommand, ShardId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Points per scroll page when the request leaves `limit` at 0.
const DEFAULT_SCROLL_LIMIT: usize = 100;

pub struct PointsService {
    pub state: Arc<NodeState>,
}

pub(super) fn ids_from(ids: &[v1::PointId]) -> Result<Vec<PointId>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("ids is empty: name at least one point"));
    }
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(ApiError::invalid(format!(
            "ids has {} entries: at most {MAX_IDS_PER_REQUEST} per request",
            ids.len()
        )));
    }
    ids.iter()
        .enumerate()
        .map(|(i, p)| point_id_from(Some(p), &format!("ids[{i}]")))
        .collect()
}

/// Commits one command per shard touched, each through its Raft group. Every
/// point was validated, and every shard checked, before the first is written,
/// so any refusal writes nothing. Shards are independent groups: if one fails
/// to commit after others did, the error says which committed (retrying the
/// whole request is safe: writes are idempotent by id).
///
/// A shard being split refuses writes for a moment (its final state is being
/// copied to its halves): such a part, or one routed by a map a split has
/// since replaced, waits for the new map and goes to the halves.
pub(super) async fn write(
    state: &Arc<NodeState>,
    c: &Collection,
    per_shard: Vec<(ShardId, ShardCommand)>,
) -> Result<v1::WriteResponse, ApiError> {
    check_writes(state, c, &per_shard)?;
    let mut out = v1::WriteResponse::default();
    let mut queue: std::collections::VecDeque<(ShardId, ShardCommand)> = per_shard.into();
    // However many times a split turns a part away, the write ends by then.
    let deadline = std::time::Instant::now() + SPLIT_WAIT;
    while let Some((shard, cmd)) = queue.pop_front() {
        let members = state.replicas(&c.spec, &shard);
        match state.host.write_to(&shard, &members, cmd.clone()).await {
            Ok(ack) => record_ack(&mut out, &shard, &ack),
            Err(e) => match after_split(state, deadline, c, &shard, cmd, &e).await {
                Some((fresh, parts)) => {
                    check_writes(state, &fresh, &parts).map_err(|e| with_committed(e, &out.writes))?;
                    for p in parts.into_iter().rev() {
                        queue.push_front(p);
                    }
                }
                None => return Err(with_committed(e, &out.writes)),
            },
        }
    }
    Ok(out)
}

/// How long a write waits for a split's new shard map.
const SPLIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// When `shard` refused `cmd` because a split fenced it (or it is gone from
/// the map), waits for a map without it and routes `cmd` by that map, or,
/// if the split ended without switching it, sends `cmd` to `shard` again.
/// `None`: the failure has nothing to do with a split (or nothing changed
/// by `deadline`), and stands.
async fn after_split(
    state: &Arc<NodeState>,
    deadline: std::time::Instant,
    routed_by: &Collection,
    shard: &ShardId,
    cmd: ShardCommand,
    e: &ApiError,
) -> Option<(Arc<Collection>, Vec<(ShardId, ShardCommand)>)> {
    let gone = |c: &Collection| c.maps.get(&shard.region).is_none_or(|m| m.range_of(shard.number).is_none());
    let old_range = routed_by.maps.get(&shard.region).and_then(|m| m.range_of(shard.number));
    let split = e.message.contains(sovra_types::SPLIT_REFUSAL);
    if !split {
        state.refresh_view().await;
        if !state.collection(shard.collection.as_str()).is_ok_and(|c| gone(&c)) {
            return None;
        }
    }
    let key = (shard.region.clone(), shard.number);
    let fresh = loop {
        if let Ok(c) = state.collection(shard.collection.as_str())
            && gone(&c)
        {
            break c;
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        state.refresh_view().await;
        // The split ended without switching the map (cancelled): the shard
        // takes writes again once its leader lifts the fence; send it again.
        if split && state.view().state.ops.split_on(&shard.collection, &key).is_none() {
            let now = state.collection(shard.collection.as_str()).ok()?;
            if !gone(&now) {
                return Some((now, vec![(shard.clone(), cmd)]));
            }
        }
    };
    let parts = match cmd {
        ShardCommand::Upsert(recs) => {
            let keyed = recs.into_iter().map(|r| (r.region.clone(), r.id, r)).collect();
            group(&fresh, keyed)
                .ok()?
                .into_iter()
                .map(|(s, r)| (s, ShardCommand::Upsert(r)))
                .collect()
        }
        ShardCommand::Delete(ids) => {
            let keyed = ids.into_iter().map(|id| (shard.region.clone(), id, id)).collect();
            group(&fresh, keyed)
                .ok()?
                .into_iter()
                .map(|(s, ids)| (s, ShardCommand::Delete(ids)))
                .collect()
        }
        // Every shard that took over the old one's range.
        ShardCommand::RemoveOptOut { template } => {
            let was = old_range?;
            fresh
                .maps
                .get(&shard.region)?
                .shards()
                .filter(|(_, r)| was.start <= r.start && r.end <= was.end)
                .map(|(number, _)| {
                    let s = ShardId {
                        collection: shard.collection.clone(),
                        region: shard.region.clone(),
                        number,
                    };
                    (
                        s,
                        ShardCommand::RemoveOptOut {
                            template: template.clone(),
                        },
                    )
                })
                .collect()
        }
        _ => return None,
    };
    Some((fresh, parts))
}

/// Adds one shard's acknowledgement to a write's answer.
pub(super) fn record_ack(out: &mut v1::WriteResponse, shard: &ShardId, ack: &sovra_raft::WriteAck) {
    out.count += ack.changed;
    out.writes.push(v1::ShardWrite {
        region: shard.region.to_string(),
        shard: shard.number,
        index: ack.index,
    });
}

/// A write's failure, naming the shards that did commit their part.
pub(super) fn with_committed(mut e: ApiError, done: &[v1::ShardWrite]) -> ApiError {
    if !done.is_empty() {
        let done: Vec<String> = done
            .iter()
            .map(|w| format!("{}/{} at index {}", w.region, w.shard, w.index))
            .collect();
        e.message = format!(
            "{}; shards {} did commit their part (retrying the whole request is safe)",
            e.message,
            done.join(", ")
        );
    }
    e
}

/// R2 and the log's own validation for every shard's command, before any is
/// written, so a refusal writes nothing.
/// The chaos switch `ack-without-commit` (test builds only): every third
/// single-point upsert is answered as written without being proposed.
fn ack_without_commit(per_shard: &[(ShardId, ShardCommand)]) -> bool {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    sovra_types::chaos::broken(sovra_types::chaos::Switch::AckWithoutCommit)
        && matches!(per_shard, [(_, ShardCommand::Upsert(p))] if p.len() == 1)
        && N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 3 == 2
}

pub(super) fn check_writes(state: &Arc<NodeState>, c: &Collection, per_shard: &[(ShardId, ShardCommand)]) -> Result<(), ApiError> {
    for (shard, cmd) in per_shard {
        // R2: a region's data enters the cluster only through that region's nodes.
        if shard.region != state.region {
            state.host.residency_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!(sovra_raft::metrics::RESIDENCY_REFUSED, "node" => state.host.me.to_string(), "rpc" => "public_write")
                .increment(1);
            return Err(ApiError::precondition(format!(
                "data of region {} must be written through a node of {} (at {}); this node is in {}; nothing was written",
                shard.region,
                shard.region,
                addresses(state, &shard.region),
                state.region
            )));
        }
        // The same check every proposal path runs, here for all shards first.
        check_command(&c.spec, shard, cmd)?;
    }
    Ok(())
}

fn addresses(state: &NodeState, region: &RegionId) -> String {
    let a = state.region_addresses(region);
    if a.is_empty() {
        format!("no node of {region} is up now")
    } else {
        a.join(", ")
    }
}

/// R3 for reads by id or scroll: the region's policy must let its points go
/// to this node's region.
fn check_policy(state: &NodeState, region: &RegionId) -> Result<(), ApiError> {
    if sovra_coord::plan::results_may_go(&state.view().state.policies, region, &state.region) {
        return Ok(());
    }
    Err(ApiError::precondition(format!(
        "region {region}'s policy keeps its points in {region}; this node is in {}: read them through a node of {region} (at {})",
        state.region,
        addresses(state, region)
    )))
}

/// The collection and region a read (get, scroll) names, once the key may
/// read them and the region's policy lets its points come to this node.
pub(super) async fn readable(
    state: &Arc<NodeState>,
    caller: &crate::auth::Caller,
    collection: &str,
    region: &str,
    note: &Note,
) -> Result<(Arc<Collection>, RegionId), ApiError> {
    let c = state.collection_now(collection).await?;
    caller.require_collection(&c.spec.name)?;
    note.collection(&c.spec)?;
    let region = check_region(&c.spec, region).map_err(|e| e.at("region"))?;
    note.regions([&region]);
    caller.require_read(&region)?;
    check_policy(state, &region)?;
    Ok((c, region))
}

/// A scroll cursor: `s1.<region>.<shard>.<hex of the last id's key bytes>`
/// (no id: from the shard's start). Opaque to clients; checked on the way in.
pub(super) fn cursor_to(region: &RegionId, at: &(u32, Option<PointId>)) -> String {
    let hex: String =
        at.1.map(|id| id.key_bytes().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
    format!("s1.{region}.{}.{hex}", at.0)
}

pub(super) fn cursor_from(text: &str, region: &RegionId, map: &sovra_types::RegionShardMap) -> Result<(u32, Option<PointId>), ApiError> {
    if text.is_empty() {
        return Ok((map.numbers().next().unwrap_or(0), None));
    }
    let bad = || {
        ApiError::invalid(format!(
            "cursor {} is not one Scroll returned for region {region} of this collection; start again with an empty cursor",
            sovra_types::quote(text)
        ))
    };
    let parts: Vec<&str> = text.split('.').collect();
    let [version, r, shard, hex] = parts[..] else { return Err(bad()) };
    if version != "s1" || r != region.as_str() {
        return Err(bad());
    }
    let shard: u32 = shard.parse().map_err(|_| bad())?;
    if map.range_of(shard).is_none() {
        return Err(ApiError::precondition(format!(
            "the cursor names shard {shard} of region {region}, which this collection does not have (a split replaces a shard by two); start the scroll again with an empty cursor"
        )));
    }
    if hex.is_empty() {
        return Ok((shard, None));
    }
    if hex.len() % 2 != 0 || hex.len() > 128 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let id = PointId::from_key_bytes(&bytes).ok_or_else(bad)?;
    Ok((shard, Some(id)))
}

/// Items grouped by the shard that owns them, in shard order.
type PerShard<T> = Vec<(ShardId, Vec<T>)>;

pub(super) fn group<T>(c: &Collection, items: Vec<(RegionId, PointId, T)>) -> Result<PerShard<T>, ApiError> {
    let mut by_shard: BTreeMap<ShardId, Vec<T>> = BTreeMap::new();
    for (region, id, item) in items {
        by_shard.entry(c.route(&region, &id)?).or_default().push(item);
    }
    Ok(by_shard.into_iter().collect())
}

#[tonic::async_trait]
impl Points for PointsService {
    async fn upsert(&self, req: Request<v1::UpsertRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        let note = Note::new("upsert", req.metadata());
        audited(&self.state, "upsert", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            caller.require_collection(&c.spec.name)?;
            note.collection(&c.spec)?;
            let records = req
                .points
                .into_iter()
                .enumerate()
                .map(|(i, p)| point_from(p, i))
                .collect::<Result<Vec<_>, _>>()?;
            let records = prepare_batch(&c.spec, records, now_ms())?;
            // Every region's write scope before anything is written.
            for (i, r) in records.iter().enumerate() {
                caller.require_write(&r.region).map_err(|e| e.at(&format!("points[{i}].region")))?;
            }
            note.regions(records.iter().map(|r| &r.region));
            let foreign_here = sovra_types::chaos::broken(sovra_types::chaos::Switch::StoreForeignRegion);
            let keyed = records
                .into_iter()
                .map(|r| {
                    (
                        if foreign_here {
                            self.state.region.clone()
                        } else {
                            r.region.clone()
                        },
                        r.id,
                        r,
                    )
                })
                .collect();
            let per_shard: Vec<_> = group(&c, keyed)?
                .into_iter()
                .map(|(e, recs)| (e, ShardCommand::Upsert(recs)))
                .collect();
            note.shards(per_shard.len());
            if ack_without_commit(&per_shard) {
                check_writes(&self.state, &c, &per_shard)?;
                return Ok(v1::WriteResponse {
                    count: 1,
                    ..Default::default()
                });
            }
            let out = write(&self.state, &c, per_shard).await?;
            note.results(out.count);
            Ok(out)
        })
        .await
    }

    async fn get(&self, req: Request<v1::GetPointsRequest>) -> Result<Response<v1::GetPointsResponse>, Status> {
        let note = Note::new("get", req.metadata());
        audited(&self.state, "get", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            let req = req.into_inner();
            let (c, region) = readable(&self.state, &caller, &req.collection, &req.region, &note).await?;
            let ids = ids_from(&req.ids)?;
            let touched: std::collections::BTreeSet<u32> =
                ids.iter().filter_map(|id| c.route(&region, id).ok()).map(|s| s.number).collect();
            note.shards(touched.len());
            let levels = ReadLevels::parse(req.consistency, &req.after)?;
            let (with_vector, with_payload) = (req.with_vector, req.with_payload);
            let query = GetQuery {
                ids: Vec::new(),
                with_vector,
                with_payload,
                now_ms: now_ms(),
            };
            let records = self
                .state
                .root()
                .get(&c.spec.name, &c.spec, &region, &ids, query, |s| levels.for_shard(s))
                .await?;
            let asked = ids.len();
            let mut points = Vec::with_capacity(records.len());
            let mut budget = AnswerBudget::new();
            for r in &records {
                let p = point_to(r, with_vector, with_payload);
                if !budget.add(&p) {
                    return Err(AnswerBudget::exceeded(
                        "points",
                        points.len(),
                        asked,
                        &format!(
                            "ask for at most {} ids per request, or leave out with_payload / with_vector",
                            points.len().max(1)
                        ),
                    ));
                }
                points.push(p);
            }
            note.results(points.len() as u64);
            Ok(v1::GetPointsResponse { points })
        })
        .await
    }

    async fn scroll(&self, req: Request<v1::ScrollRequest>) -> Result<Response<v1::ScrollResponse>, Status> {
        let note = Note::new("scroll", req.metadata());
        audited(&self.state, "scroll", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            let req = req.into_inner();
            let (c, region) = readable(&self.state, &caller, &req.collection, &req.region, &note).await?;
            let limit = match req.limit {
                0 => DEFAULT_SCROLL_LIMIT,
                n if n as usize > MAX_IDS_PER_REQUEST => {
                    return Err(ApiError::invalid(format!(
                        "limit is {n}: at most {MAX_IDS_PER_REQUEST} points per page (0 for {DEFAULT_SCROLL_LIMIT})"
                    )));
                }
                n => n as usize,
            };
            let filter = parse_filter(req.filter.as_ref())?;
            let map = c.maps.get(&region).ok_or_else(|| c.spec.region_not_spanned(&region))?;
            let at = cursor_from(&req.cursor, &region, map).map_err(|e| e.at("cursor"))?;
            let levels = ReadLevels::parse(req.consistency, &req.after)?;
            let query = ScrollQuery {
                after: None,
                limit: 0,
                filter,
                with_vector: req.with_vector,
                with_payload: req.with_payload,
                now_ms: now_ms(),
                subject: None,
            };
            let (records, next) = self
                .state
                .root()
                .scroll(&c.spec.name, &region, map, at, query, limit, |s| levels.for_shard(s))
                .await?;
            let mut points = Vec::with_capacity(records.len());
            let mut budget = AnswerBudget::new();
            let mut next = next;
            for r in &records {
                let p = point_to(r, req.with_vector, req.with_payload);
                if !budget.add(&p) {
                    // Each leaf bounds its part; two parts together may not
                    // fit: end the page after the last point that does.
                    let Some(last) = points.len().checked_sub(1).map(|i| records[i].id) else {
                        return Err(ApiError::new(
                            ErrorCode::ResourceExhausted,
                            format!(
                                "one point alone passes the {MAX_ANSWER_BYTES}-byte answer bound; scroll without with_vector / with_payload"
                            ),
                        ));
                    };
                    next = Some((c.route(&region, &last)?.number, Some(last)));
                    break;
                }
                points.push(p);
            }
            note.results(points.len() as u64);
            Ok(v1::ScrollResponse {
                points,
                next_cursor: next.map(|at| cursor_to(&region, &at)).unwrap_or_default(),
            })
        })
        .await
    }

    async fn delete(&self, req: Request<v1::DeletePointsRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        let note = Note::new("delete", req.metadata());
        audited(&self.state, "delete", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            caller.require_collection(&c.spec.name)?;
            note.collection(&c.spec)?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            note.regions([&region]);
            caller.require_write(&region)?;
            let ids = ids_from(&req.ids)?;
            let keyed = ids.into_iter().map(|id| (region.clone(), id, id)).collect();
            let per_shard: Vec<_> = group(&c, keyed)?
                .into_iter()
                .map(|(e, ids)| (e, ShardCommand::Delete(ids)))
                .collect();
            note.shards(per_shard.len());
            let out = write(&self.state, &c, per_shard).await?;
            note.results(out.count);
            Ok(out)
        })
        .await
    }
}
