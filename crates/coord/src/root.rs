//! The coordinator side of a public read: one leaf request per shard, to a
//! replica chosen in order (this node, then its zone, then the rest; the
//! known leader first for linearizable reads; nodes marked down last), with a
//! per-shard deadline and one hedged request to the next replica after a delay
//! (configured, or from the shard's recent p95). A replica that fails is
//! followed at once by the next. Answers are merged by (distance, region, id).

use crate::leaf::{LeafAnswer, LeafCall};
use crate::wire::{Answer, GetQuery, LeafHit, Query, ScrollQuery, SearchQuery};
use crate::{Leaf, NodeContext};
use parking_lot::Mutex;
use sovra_meta::{NodeStatus, View};
use sovra_proto::raft as pb;
use sovra_raft::{GroupConfig, NodeId, ReadLevel, TypeConfig};
use sovra_types::{ApiError, CollectionName, PointId, PointRecord, RegionId, ShardId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::Status;

/// Largest leaf answer accepted (a leaf bounds its answers to the public 4 MiB).
const MAX_LEAF_MESSAGE: usize = 16 << 20;
/// Hedge delay while a shard has too few samples for a p95.
const DEFAULT_HEDGE: Duration = Duration::from_millis(20);
const MIN_SAMPLES: usize = 16;
const WINDOW: usize = 128;

#[derive(Debug, Clone)]
pub struct RootConfig {
    /// How long a shard has to answer (all its tries together).
    pub leaf_timeout: Duration,
    /// Ask a second replica when the first has not answered after this;
    /// `None`: the shard's recent p95 (at least 1 ms).
    pub hedge_after: Option<Duration>,
}

/// What happened on one shard.
#[derive(Debug, Clone)]
pub struct ShardReport {
    pub shard: ShardId,
    /// The node whose replica answered (0: none did).
    pub node: NodeId,
    pub hedged: bool,
    pub leaf_us: u64,
    /// Why no replica answered.
    pub error: Option<String>,
    /// The status of the last refusal (RESOURCE_EXHAUSTED: the answer is too
    /// large on any replica; PERMISSION_DENIED: a policy refused it).
    pub code: tonic::Code,
}

pub struct SearchResult {
    /// Merged, closest first, at most k.
    pub hits: Vec<(RegionId, LeafHit)>,
    pub shards: Vec<ShardReport>,
}

/// Counters of one coordinator.
#[derive(Default)]
pub struct RootStats {
    pub hedges: AtomicU64,
    pub map_refreshes: AtomicU64,
}

pub struct Root {
    pub leaf: Arc<Leaf>,
    ctx: Arc<dyn NodeContext>,
    me: NodeId,
    region: RegionId,
    zone: String,
    cfg: RootConfig,
    latency: Mutex<HashMap<ShardId, VecDeque<u32>>>,
    leaders: Mutex<HashMap<ShardId, NodeId>>,
    pub stats: RootStats,
}

/// One shard's outcome.
struct Outcome {
    answer: Result<LeafAnswer, (tonic::Code, String)>,
    node: NodeId,
    hedged: bool,
    /// Some replica said it holds no replica of the shard: the map moved.
    moved: bool,
}

impl Root {
    pub fn new(leaf: Arc<Leaf>, ctx: Arc<dyn NodeContext>, zone: String, cfg: RootConfig) -> Arc<Self> {
        Arc::new(Self {
            me: leaf.host.me,
            region: leaf.host.region.clone(),
            leaf,
            ctx,
            zone,
            cfg,
            latency: Mutex::default(),
            leaders: Mutex::default(),
            stats: RootStats::default(),
        })
    }

    pub fn region(&self) -> &RegionId {
        &self.region
    }

    /// The shard's replicas in the order to try them.
    fn order(&self, view: &View, shard: &ShardId, linearizable: bool) -> Vec<NodeId> {
        let replicas: Vec<NodeId> = view
            .state
            .collections
            .get(&shard.collection)
            .and_then(|c| c.shards.get(&(shard.region.clone(), shard.number)))
            .map(|s| s.replicas.clone())
            .unwrap_or_default();
        let leader = linearizable.then(|| self.leaders.lock().get(shard).copied()).flatten();
        let mut ranked: Vec<(u8, NodeId)> = replicas
            .into_iter()
            .map(|n| {
                let rec = view.state.nodes.get(&n);
                let rank = if Some(n) == leader {
                    0
                } else if rec.is_some_and(|r| r.status == NodeStatus::Down) {
                    4
                } else if n == self.me {
                    1
                } else if rec.is_some_and(|r| r.zone == self.zone) {
                    2
                } else {
                    3
                };
                (rank, n)
            })
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(_, n)| n).collect()
    }

    fn hedge_delay(&self, shard: &ShardId) -> Duration {
        if let Some(d) = self.cfg.hedge_after {
            return d;
        }
        let lat = self.latency.lock();
        match lat.get(shard) {
            Some(w) if w.len() >= MIN_SAMPLES => {
                let mut v: Vec<u32> = w.iter().copied().collect();
                v.sort_unstable();
                let p95 = v[(v.len() * 95 / 100).min(v.len() - 1)];
                Duration::from_micros(u64::from(p95)).max(Duration::from_millis(1))
            }
            _ => DEFAULT_HEDGE,
        }
    }

    fn observe(&self, shard: &ShardId, took: Duration) {
        let mut lat = self.latency.lock();
        let w = lat.entry(shard.clone()).or_default();
        if w.len() == WINDOW {
            w.pop_front();
        }
        w.push_back(took.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// One try on one replica: a direct call on this node, else `Leaf` over
    /// the cluster listener.
    async fn attempt(
        self: Arc<Self>,
        node: NodeId,
        call: LeafCall,
        query: Arc<Query>,
        bytes: Arc<Vec<u8>>,
        deadline: Instant,
    ) -> Result<LeafAnswer, Status> {
        if node == self.me {
            return self.leaf.answer(&call, (*query).clone()).await;
        }
        let svc = self.leaf.host.peers.service(node).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut client = pb::leaf_client::LeafClient::new(svc)
            .max_decoding_message_size(MAX_LEAF_MESSAGE)
            .max_encoding_message_size(MAX_LEAF_MESSAGE);
        let (linearizable, min_index) = match call.level {
            ReadLevel::Linearizable => (true, 0),
            ReadLevel::Any { min_index } => (false, min_index),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut req = tonic::Request::new(pb::LeafRequest {
            shard: Some(TypeConfig::group_pb(&call.shard)),
            from: self.me,
            coordinator_region: call.coordinator_region.to_string(),
            map_version: call.map_version,
            linearizable,
            min_index,
            query: bytes.to_vec(),
        });
        req.set_timeout(remaining);
        let fut = async {
            match &*query {
                Query::Search(_) => client.shard_search(req).await,
                Query::Get(_) => client.shard_get(req).await,
                Query::Scroll(_) => client.shard_scroll(req).await,
            }
        };
        let reply = tokio::time::timeout(remaining, fut)
            .await
            .map_err(|_| Status::deadline_exceeded("no answer within the shard's deadline"))??
            .into_inner();
        let answer: Answer =
            postcard::from_bytes(&reply.answer).map_err(|e| Status::internal(format!("leaf answer does not decode: {e}")))?;
        Ok(LeafAnswer {
            answer,
            leader: reply.leader,
            map_version: reply.map_version,
            took_us: reply.took_us,
        })
    }

    /// Asks the shard's replicas in order until one answers: the next is
    /// asked at once when one fails, and once (hedged) when the first is
    /// slower than the hedge delay. Gives up at `deadline`.
    async fn ask(self: &Arc<Self>, view: &View, shard: ShardId, level: ReadLevel, query: Arc<Query>, deadline: Instant) -> Outcome {
        let order = self.order(view, &shard, matches!(level, ReadLevel::Linearizable));
        if order.is_empty() {
            return Outcome {
                answer: Err((tonic::Code::Unavailable, format!("shard {shard} has no recorded replica"))),
                node: 0,
                hedged: false,
                moved: true,
            };
        }
        let bytes = Arc::new(if order.iter().any(|n| *n != self.me) {
            postcard::to_allocvec(&*query).unwrap_or_default()
        } else {
            Vec::new()
        });
        let call = LeafCall {
            shard: shard.clone(),
            coordinator_region: self.region.clone(),
            map_version: view.state.map_version,
            level,
        };
        let start = Instant::now();
        let mut set: JoinSet<(NodeId, Result<LeafAnswer, Status>)> = JoinSet::new();
        let spawn = |set: &mut JoinSet<_>, node: NodeId| {
            let fut = self.clone().attempt(node, call.clone(), query.clone(), bytes.clone(), deadline);
            set.spawn(async move { (node, fut.await) });
        };
        spawn(&mut set, order[0]);
        let mut next = 1;
        let mut hedged = false;
        let mut moved = false;
        let mut errors: Vec<String> = Vec::new();
        let hedge = tokio::time::sleep(self.hedge_delay(&shard));
        tokio::pin!(hedge);
        let give_up = tokio::time::sleep_until(deadline.into());
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                Some(done) = set.join_next() => {
                    let (node, result) = match done {
                        Ok(r) => r,
                        Err(e) => (0, Err(Status::internal(format!("leaf task failed: {e}")))),
                    };
                    match result {
                        Ok(a) => {
                            self.observe(&shard, start.elapsed());
                            if a.leader != 0 {
                                self.leaders.lock().insert(shard.clone(), a.leader);
                            }
                            if a.map_version > view.state.map_version {
                                moved = true;
                            }
                            set.abort_all();
                            return Outcome { answer: Ok(a), node, hedged, moved };
                        }
                        Err(s) => {
                            errors.push(format!("node {node}: {}", s.message()));
                            match s.code() {
                                tonic::Code::NotFound => moved = true,
                                // Every replica would say the same (policy, a bad query, an answer too large).
                                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted => {
                                    set.abort_all();
                                    return Outcome { answer: Err((s.code(), s.message().to_string())), node: 0, hedged, moved };
                                }
                                _ => {}
                            }
                            if next < order.len() {
                                spawn(&mut set, order[next]);
                                next += 1;
                            } else if set.is_empty() {
                                return Outcome { answer: Err((tonic::Code::Unavailable, errors.join("; "))), node: 0, hedged, moved };
                            }
                        }
                    }
                }
                _ = &mut hedge, if !hedged && next < order.len() => {
                    hedged = true;
                    self.stats.hedges.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("sovra_coordinator_hedges_total", "node" => self.me.to_string()).increment(1);
                    spawn(&mut set, order[next]);
                    next += 1;
                }
                _ = &mut give_up => {
                    set.abort_all();
                    errors.push(format!("no replica answered within {} ms", self.cfg.leaf_timeout.as_millis()));
                    return Outcome { answer: Err((tonic::Code::Unavailable, errors.join("; "))), node: 0, hedged, moved };
                }
            }
        }
    }

    /// Asks every shard in `shards` (each with its query) at once; a shard
    /// whose replicas say the map moved is asked again once after the view
    /// is refreshed.
    async fn fan_out(self: &Arc<Self>, shards: Vec<(ShardId, ReadLevel, Query)>) -> Vec<(ShardId, Outcome)> {
        let deadline = Instant::now() + self.cfg.leaf_timeout;
        let view = self.ctx.view();
        let mut tasks = JoinSet::new();
        for (i, (shard, level, query)) in shards.iter().cloned().enumerate() {
            let (this, view) = (self.clone(), view.clone());
            tasks.spawn(async move { (i, this.ask(&view, shard, level, Arc::new(query), deadline).await) });
        }
        let mut out: Vec<Option<Outcome>> = (0..shards.len()).map(|_| None).collect();
        while let Some(r) = tasks.join_next().await {
            if let Ok((i, o)) = r {
                out[i] = Some(o);
            }
        }
        let retry: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, o)| o.as_ref().is_some_and(|o| o.answer.is_err() && o.moved))
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() || out.iter().any(|o| o.as_ref().is_some_and(|o| o.moved)) {
            self.stats.map_refreshes.fetch_add(1, Ordering::Relaxed);
            self.ctx.refresh().await;
        }
        if !retry.is_empty() {
            let mut fresh = self.ctx.view();
            let split = retry.iter().any(|&i| {
                out[i]
                    .as_ref()
                    .is_some_and(|o| matches!(&o.answer, Err((_, m)) if m.contains(SPLIT_MARK)))
            });
            // A split retires its shard just before the map switches to its
            // halves: wait (within the deadline) for the switch.
            while split && fresh.state.map_version == view.state.map_version && Instant::now() + Duration::from_millis(100) < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.ctx.refresh().await;
                fresh = self.ctx.view();
            }
            if fresh.state.map_version != view.state.map_version {
                for i in retry {
                    let (shard, level, query) = shards[i].clone();
                    let halves = split_into(&view, &fresh, &shard);
                    out[i] = Some(if !halves.is_empty() && matches!(query, Query::Scroll(_)) {
                        // A scroll walks one shard in id order: it cannot go on
                        // across the halves.
                        Outcome {
                            answer: Err((
                                tonic::Code::FailedPrecondition,
                                format!("shard {shard} was split while the scroll read it; start the scroll again with an empty cursor"),
                            )),
                            node: 0,
                            hedged: false,
                            moved: true,
                        }
                    } else if halves.is_empty() {
                        self.ask(&fresh, shard, level, Arc::new(query), deadline).await
                    } else {
                        self.ask_halves(&fresh, halves, level, Arc::new(query), deadline).await
                    });
                }
            }
        }
        shards
            .into_iter()
            .zip(out)
            .map(|((s, _, _), o)| {
                (
                    s,
                    o.unwrap_or(Outcome {
                        answer: Err((tonic::Code::Internal, "the shard's task failed".into())),
                        node: 0,
                        hedged: false,
                        moved: false,
                    }),
                )
            })
            .collect()
    }

    /// Asks the shards a split replaced one shard by, and answers for the
    /// old one: their hits or records together, or the first failure.
    async fn ask_halves(
        self: &Arc<Self>,
        view: &Arc<View>,
        halves: Vec<ShardId>,
        level: ReadLevel,
        query: Arc<Query>,
        deadline: Instant,
    ) -> Outcome {
        let mut joined: Option<LeafAnswer> = None;
        let mut last = None;
        for half in halves {
            let o = self.ask(view, half, level, query.clone(), deadline).await;
            let a = match o.answer {
                Ok(a) => a,
                Err(_) => return o,
            };
            joined = Some(match joined {
                None => a,
                Some(mut j) => {
                    match (&mut j.answer, a.answer) {
                        (Answer::Search(x), Answer::Search(y)) => x.hits.extend(y.hits),
                        (Answer::Records(x), Answer::Records(y)) => x.records.extend(y.records),
                        _ => {}
                    }
                    j.took_us = j.took_us.max(a.took_us);
                    j
                }
            });
            last = Some((o.node, o.hedged));
        }
        let (node, hedged) = last.unwrap_or((0, false));
        Outcome {
            answer: joined.ok_or_else(|| (tonic::Code::Internal, "a split shard with no halves".to_string())),
            node,
            hedged,
            moved: true,
        }
    }

    /// The shards of `regions` in the collection, from the view.
    fn shards_of(&self, name: &CollectionName, regions: &[RegionId]) -> Result<Vec<ShardId>, ApiError> {
        let view = self.ctx.view();
        let c = view
            .state
            .collections
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("collection {name} does not exist; create it first")))?;
        let mut out = Vec::new();
        for region in regions {
            let Ok(map) = c.spec.shard_map(region) else { continue };
            out.extend(map.numbers().map(|number| ShardId {
                collection: name.clone(),
                region: region.clone(),
                number,
            }));
        }
        Ok(out)
    }

    /// Searches every shard of `regions` (already checked against the key and
    /// policies) and merges their top-k. Shards that did not answer are in
    /// the reports with why; the caller decides whether that is acceptable.
    pub async fn search(
        self: &Arc<Self>,
        collection: &CollectionName,
        regions: &[RegionId],
        query: SearchQuery,
        level: impl Fn(&ShardId) -> ReadLevel,
    ) -> Result<SearchResult, ApiError> {
        let k = query.k as usize;
        let shards = self
            .shards_of(collection, regions)?
            .into_iter()
            .map(|s| {
                let l = level(&s);
                (s, l, Query::Search(query.clone()))
            })
            .collect();
        let outcomes = self.fan_out(shards).await;
        let mut hits: Vec<(RegionId, LeafHit)> = Vec::new();
        let mut reports = Vec::with_capacity(outcomes.len());
        for (shard, o) in outcomes {
            let mut report = ShardReport {
                shard: shard.clone(),
                node: o.node,
                hedged: o.hedged,
                leaf_us: 0,
                error: None,
                code: tonic::Code::Ok,
            };
            match o.answer {
                Ok(a) => {
                    report.leaf_us = a.took_us;
                    if let Answer::Search(s) = a.answer {
                        hits.extend(s.hits.into_iter().map(|h| (shard.region.clone(), h)));
                    }
                }
                Err((code, e)) => {
                    report.error = Some(e);
                    report.code = code;
                }
            }
            reports.push(report);
        }
        Ok(SearchResult {
            hits: merge(hits, k),
            shards: reports,
        })
    }

    /// Points by id in one region, in the order asked (absent ones left
    /// out). Every shard holding one of them must answer.
    pub async fn get(
        self: &Arc<Self>,
        collection: &CollectionName,
        spec: &sovra_types::CollectionSpec,
        region: &RegionId,
        ids: &[PointId],
        query: GetQuery,
        level: impl Fn(&ShardId) -> ReadLevel,
    ) -> Result<Vec<PointRecord>, ApiError> {
        let map = spec.shard_map(region)?;
        let mut by_shard: BTreeMap<u32, Vec<PointId>> = BTreeMap::new();
        for id in ids {
            by_shard.entry(map.shard_for(id)).or_default().push(*id);
        }
        let shards = by_shard
            .into_iter()
            .map(|(number, ids)| {
                let shard = ShardId {
                    collection: collection.clone(),
                    region: region.clone(),
                    number,
                };
                let l = level(&shard);
                (shard, l, Query::Get(GetQuery { ids, ..query.clone() }))
            })
            .collect();
        let mut found: HashMap<PointId, PointRecord> = HashMap::new();
        for (shard, o) in self.fan_out(shards).await {
            match o.answer {
                Ok(LeafAnswer {
                    answer: Answer::Records(r),
                    ..
                }) => found.extend(r.records.into_iter().map(|r| (r.id, r))),
                Ok(_) => return Err(ApiError::internal(format!("shard {shard} answered a get with search hits"))),
                Err((code, e)) => return Err(shard_failed(&shard, code, &e)),
            }
        }
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// One page of a region's points from `(shard, after)` on: shard by
    /// shard, in id order within each. Returns the points and where the next
    /// page starts (`None`: the scroll is complete).
    #[allow(clippy::too_many_arguments)]
    pub async fn scroll(
        self: &Arc<Self>,
        collection: &CollectionName,
        region: &RegionId,
        map: &sovra_types::RegionShardMap,
        mut at: (u32, Option<PointId>),
        query: ScrollQuery,
        limit: usize,
        level: impl Fn(&ShardId) -> ReadLevel,
    ) -> Result<(Vec<PointRecord>, Option<(u32, Option<PointId>)>), ApiError> {
        let mut out: Vec<PointRecord> = Vec::new();
        if map.range_of(at.0).is_none() {
            return Err(ApiError::precondition(format!(
                "the scroll's cursor names shard {} of region {region}, which a split has since replaced; start the scroll again with an empty cursor",
                at.0
            )));
        }
        loop {
            let shard = ShardId {
                collection: collection.clone(),
                region: region.clone(),
                number: at.0,
            };
            let q = ScrollQuery {
                after: at.1,
                limit: (limit - out.len()) as u32,
                ..query.clone()
            };
            let l = level(&shard);
            let (shard, o) = self
                .fan_out(vec![(shard, l, Query::Scroll(q))])
                .await
                .pop()
                .expect("one shard asked");
            let r = match o.answer {
                Ok(LeafAnswer {
                    answer: Answer::Records(r),
                    ..
                }) => r,
                Ok(_) => return Err(ApiError::internal(format!("shard {shard} answered a scroll with search hits"))),
                Err((code, e)) => return Err(shard_failed(&shard, code, &e)),
            };
            let last = r.records.last().map(|p| p.id);
            out.extend(r.records);
            if !r.done {
                return Ok((out, Some((at.0, last.or(at.1)))));
            }
            let Some(n) = map.next_after(at.0) else {
                return Ok((out, None));
            };
            at = (n, None);
            if out.len() >= limit {
                return Ok((out, Some(at)));
            }
        }
    }
}

/// A shard's failure as the public error: a refusal every replica would
/// repeat keeps its code; anything else is UNAVAILABLE (retry).
pub fn shard_failed(shard: &ShardId, code: tonic::Code, why: &str) -> ApiError {
    match code {
        tonic::Code::ResourceExhausted => ApiError::new(sovra_types::ErrorCode::ResourceExhausted, why.to_string()),
        tonic::Code::PermissionDenied => ApiError::denied(why.to_string()),
        tonic::Code::InvalidArgument => ApiError::invalid(why.to_string()),
        tonic::Code::FailedPrecondition => ApiError::precondition(why.to_string()),
        _ => ApiError::unavailable(format!("shard {shard} did not answer ({why}); retry")),
    }
}

/// The top `k` of `hits` by (distance, region, id), each point once.
pub fn merge(mut hits: Vec<(RegionId, LeafHit)>, k: usize) -> Vec<(RegionId, LeafHit)> {
    hits.sort_by(|a, b| {
        a.1.distance
            .total_cmp(&b.1.distance)
            .then_with(|| a.0.cmp(&b.0))
            .then_with(|| a.1.id.cmp(&b.1.id))
    });
    hits.dedup_by(|b, a| a.0 == b.0 && a.1.id == b.1.id);
    hits.truncate(k);
    hits
}

/// What a leaf says of a shard a split retired.
pub const SPLIT_MARK: &str = "was split (job";

/// The shards of `fresh` that took over `shard` of `old` in a split: those
/// whose hash range lies inside its old one (empty if it still exists).
fn split_into(old: &View, fresh: &View, shard: &ShardId) -> Vec<ShardId> {
    let map_of = |v: &View| {
        v.state
            .collections
            .get(&shard.collection)
            .and_then(|c| c.spec.shard_map(&shard.region).ok())
    };
    let (Some(before), Some(after)) = (map_of(old), map_of(fresh)) else {
        return Vec::new();
    };
    if after.range_of(shard.number).is_some() {
        return Vec::new();
    }
    let Some(was) = before.range_of(shard.number) else {
        return Vec::new();
    };
    after
        .shards()
        .filter(|(_, r)| was.start <= r.start && r.end <= was.end)
        .map(|(number, _)| ShardId {
            collection: shard.collection.clone(),
            region: shard.region.clone(),
            number,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: u64, d: f32) -> LeafHit {
        LeafHit {
            id: PointId::Num(id),
            distance: d,
            record: None,
        }
    }

    #[test]
    fn merge_orders_by_distance_region_id_and_drops_duplicates() {
        let uk = RegionId::parse("uk").unwrap();
        let us = RegionId::parse("us").unwrap();
        let hits = vec![
            (us.clone(), hit(1, 0.5)),
            (uk.clone(), hit(9, 0.5)),
            (uk.clone(), hit(2, 0.1)),
            (uk.clone(), hit(2, 0.1)),
            (uk.clone(), hit(1, 0.5)),
            (us.clone(), hit(3, 0.9)),
        ];
        let m = merge(hits, 4);
        let got: Vec<(String, u64)> = m
            .iter()
            .map(|(r, h)| {
                (
                    r.to_string(),
                    match h.id {
                        PointId::Num(n) => n,
                        _ => 0,
                    },
                )
            })
            .collect();
        assert_eq!(got, vec![("uk".into(), 2), ("uk".into(), 1), ("uk".into(), 9), ("us".into(), 1)]);
    }
}
