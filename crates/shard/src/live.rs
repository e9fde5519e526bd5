//! The searchable view of a shard: an index of slots plus the slot table that
//! maps slots to points and marks tombstones.
//!
//! Search strategy, so that a filter never starves the top-k:
//! 1. If a filter is given and a sample says it matches under
//!    [`EXACT_SCAN_FRACTION`] of live points, scan exactly the matching set.
//! 2. Otherwise search the HNSW graph with the full predicate (tombstone, expiry,
//!    filter) applied inside the search.
//! 3. Re-check every hit (hnsw_rs can return its unfiltered entry point).
//! 4. If fewer than `k` survive, fall back to an exact scan of every accepted
//!    slot: a search returns `k` results whenever `k` points are accepted.

use parking_lot::RwLock;
use sovra_index::file::IndexFileError;
use sovra_index::{IndexOptions, Neighbour, VectorIndex};
use sovra_types::point::expired;
use sovra_types::{CollectionSpec, Filter, Payload, PointId, PointRecord};
use std::collections::HashMap;
use std::sync::Arc;

/// Below this estimated share of matching live points, an exact scan of the
/// matching set beats walking the graph past mostly-refused nodes.
pub const EXACT_SCAN_FRACTION: f64 = 0.03;
/// Slots sampled to estimate a filter's selectivity.
const SAMPLE: usize = 512;

/// Most points carry no payload: they share one empty map instead of each
/// holding an allocation.
fn shared_payload(p: &Payload) -> Arc<Payload> {
    static EMPTY: std::sync::LazyLock<Arc<Payload>> = std::sync::LazyLock::new(|| Arc::new(Payload::new()));
    if p.is_empty() { EMPTY.clone() } else { Arc::new(p.clone()) }
}

/// What the index file carries besides the graph.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedTable {
    applied: u64,
    slots: Vec<(PointId, bool)>,
}

pub(crate) struct SlotMeta {
    pub id: PointId,
    pub expires_at_ms: u64,
    pub payload: Arc<Payload>,
    pub live: bool,
}

#[derive(Default)]
pub(crate) struct SlotTable {
    pub slots: Vec<SlotMeta>,
    pub by_id: HashMap<PointId, usize>,
    pub live: usize,
    /// Slots (live or not) with an expiry: while there are none and no
    /// tombstones, a search without a filter needs no predicate at all.
    pub expiring: usize,
}

impl SlotTable {
    fn accepts(&self, slot: usize, now_ms: u64, filter: Option<&Filter>) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|m| m.live && !expired(m.expires_at_ms, now_ms) && filter.is_none_or(|f| f.matches(&m.payload)))
    }

    fn kill(&mut self, slot: usize) {
        if let Some(m) = self.slots.get_mut(slot)
            && m.live
        {
            m.live = false;
            self.live -= 1;
        }
    }
}

/// What a search found, before the engine attaches payloads and vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveHit {
    pub id: PointId,
    pub slot: usize,
    pub distance: f32,
}

/// Which path answered, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchPath {
    Graph,
    ExactFiltered,
    ExactFallback,
    /// Asked for: every live point compared with the query.
    Exact,
}

/// Points stored but not yet linked into the graph, at most: past it, a write
/// links them itself before it is acknowledged (back-pressure), so the exact scan
/// of the unlinked tail every search makes stays short.
pub const MAX_PENDING: usize = 10_000;

pub struct LiveIndex {
    index: Arc<dyn VectorIndex>,
    table: RwLock<SlotTable>,
}

impl LiveIndex {
    pub fn new(index: Box<dyn VectorIndex>) -> Self {
        Self {
            index: Arc::from(index),
            table: RwLock::new(SlotTable::default()),
        }
    }

    /// A view over an index that already holds `records`' vectors in slots
    /// `0..records.len()` (built elsewhere, e.g. by a benchmark).
    pub fn adopt(index: Box<dyn VectorIndex>, records: &[PointRecord]) -> Self {
        assert_eq!(index.len(), records.len(), "one slot per record");
        let me = Self::new(index);
        {
            let mut t = me.table.write();
            for (slot, r) in records.iter().enumerate() {
                t.expiring += (r.expires_at_ms != 0) as usize;
                t.slots.push(SlotMeta {
                    id: r.id,
                    expires_at_ms: r.expires_at_ms,
                    payload: shared_payload(&r.payload),
                    live: true,
                });
                t.live += 1;
                if let Some(old) = t.by_id.insert(r.id, slot) {
                    t.kill(old);
                }
            }
        }
        me
    }

    /// Saves the index and its slot table to `path` as of `applied` (the last
    /// log index applied). Tombstoned slots are saved without their vectors.
    pub fn save(&self, path: &std::path::Path, applied: u64) -> Result<(), IndexFileError> {
        let t = self.table.read();
        let saved = SavedTable {
            applied,
            slots: t.slots.iter().map(|m| (m.id, m.live)).collect(),
        };
        let meta = postcard::to_allocvec(&saved).map_err(|e| IndexFileError::Corrupt(format!("encoding the slot table: {e}")))?;
        self.index.save(path, &meta, &|s| t.slots.get(s).is_some_and(|m| m.live))
    }

    /// Loads a saved index and checks it against the store, which stays the truth:
    /// saved at `applied`, one live slot per stored point, each holding exactly
    /// the stored vector. Payloads and expiry come from the store's records.
    pub fn load_verified(
        options: &IndexOptions,
        path: &std::path::Path,
        spec: &CollectionSpec,
        applied: u64,
        records: impl Iterator<Item = Result<PointRecord, String>>,
    ) -> Result<Self, String> {
        let (index, meta) = options
            .load(
                path,
                spec.dimension as usize,
                crate::engine::space_of(spec.metric),
                spec.hnsw.m as usize,
                spec.hnsw.ef_construction as usize,
            )
            .map_err(|e| e.to_string())?;
        let saved: SavedTable = postcard::from_bytes(&meta).map_err(|e| format!("the slot table does not decode: {e}"))?;
        if saved.applied != applied {
            return Err(format!("saved at log index {}, the store is at {applied}", saved.applied));
        }
        if saved.slots.len() != index.len() {
            return Err(format!("{} slots in the table, {} in the graph", saved.slots.len(), index.len()));
        }
        let mut by_id = HashMap::with_capacity(saved.slots.len());
        for (slot, (id, live)) in saved.slots.iter().enumerate() {
            if *live && by_id.insert(*id, slot).is_some() {
                return Err(format!("{id} is live in two slots"));
            }
        }
        let mut slots: Vec<SlotMeta> = saved
            .slots
            .iter()
            .map(|(id, _)| SlotMeta {
                id: *id,
                expires_at_ms: 0,
                payload: shared_payload(&Payload::new()),
                live: false,
            })
            .collect();
        let mut seen = 0usize;
        for rec in records {
            let rec = rec?;
            let slot = *by_id
                .get(&rec.id)
                .ok_or_else(|| format!("stored point {} has no live slot", rec.id))?;
            let row = index.vectors().get(slot).ok_or("a slot beyond the graph")?;
            if row.len() != rec.vector.len() || row.iter().zip(&rec.vector).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(format!("the vector of {} differs from the stored one", rec.id));
            }
            let m = &mut slots[slot];
            if m.live {
                return Err(format!("stored point {} appears twice", rec.id));
            }
            (m.live, m.expires_at_ms, m.payload) = (true, rec.expires_at_ms, shared_payload(&rec.payload));
            seen += 1;
        }
        if seen != by_id.len() {
            return Err(format!("{} live slots, {seen} stored points", by_id.len()));
        }
        let expiring = slots.iter().filter(|m| m.expires_at_ms != 0).count();
        let live = Self::new(index);
        *live.table.write() = SlotTable {
            slots,
            by_id,
            live: seen,
            expiring,
        };
        Ok(live)
    }

    /// Adds records (callers serialise writers); later records of one id win.
    pub fn upsert(&self, records: &[PointRecord]) {
        let vectors: Vec<&[f32]> = records.iter().map(|r| r.vector.as_slice()).collect();
        let metas = records.iter().map(|r| SlotMeta {
            id: r.id,
            expires_at_ms: r.expires_at_ms,
            payload: shared_payload(&r.payload),
            live: true,
        });
        self.insert(&vectors, metas.collect());
    }

    /// The one place slots become searchable: the graph first (while the slot is
    /// still unknown to the table and so refused), then the table, so a point is
    /// replaced atomically for readers.
    fn insert(&self, vectors: &[&[f32]], metas: Vec<SlotMeta>) {
        // Stored now, searchable at once (exactly, in the unlinked tail), linked
        // into the graph behind the write; unless too much is pending already.
        let defer = self.index.pending() + vectors.len() <= MAX_PENDING;
        let slots = if defer {
            self.index.append(vectors)
        } else {
            self.index.add_batch(vectors)
        };
        let mut t = self.table.write();
        debug_assert_eq!(slots.start, t.slots.len(), "one writer at a time keeps slots aligned");
        for (slot, meta) in slots.zip(metas) {
            let id = meta.id;
            t.expiring += (meta.expires_at_ms != 0) as usize;
            t.slots.push(meta);
            t.live += 1;
            if let Some(old) = t.by_id.insert(id, slot) {
                t.kill(old);
            }
        }
        drop(t);
        if defer {
            self.index.clone().schedule_linking();
        }
    }

    /// Points stored but not yet linked into the graph.
    pub fn pending(&self) -> usize {
        self.index.pending()
    }

    /// Links every pending point now (tests, benchmarks, saves).
    pub fn link_pending(&self) {
        self.index.link_pending();
    }

    pub fn delete(&self, ids: &[PointId]) {
        let mut t = self.table.write();
        for id in ids {
            if let Some(slot) = t.by_id.remove(id) {
                t.kill(slot);
            }
        }
    }

    pub fn live_count(&self) -> usize {
        self.table.read().live
    }

    pub fn tombstones(&self) -> usize {
        let t = self.table.read();
        t.slots.len() - t.live
    }

    pub fn memory_bytes(&self) -> usize {
        self.index.memory_bytes()
    }

    pub fn vector_of(&self, id: &PointId) -> Option<Vec<f32>> {
        let slot = *self.table.read().by_id.get(id)?;
        self.index.vectors().get(slot)
    }

    pub fn search(&self, query: &[f32], k: usize, ef: usize, filter: Option<&Filter>, now_ms: u64) -> (Vec<LiveHit>, SearchPath) {
        self.search_with(query, k, ef, filter, now_ms, false)
    }

    /// As [`Self::search`]; with `exact`, every accepted point is compared
    /// with the query (no graph).
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        now_ms: u64,
        exact: bool,
    ) -> (Vec<LiveHit>, SearchPath) {
        let t = self.table.read();
        if k == 0 || t.live == 0 {
            return (Vec::new(), SearchPath::Graph);
        }
        let accept = |slot: usize| t.accepts(slot, now_ms, filter);
        let to_hits = |ns: Vec<Neighbour>| -> Vec<LiveHit> {
            let mut hits: Vec<LiveHit> = ns
                .into_iter()
                .filter(|n| accept(n.slot)) // re-check every hit
                .map(|n| LiveHit {
                    id: t.slots[n.slot].id,
                    slot: n.slot,
                    distance: n.distance,
                })
                .collect();
            // Equal distances come back in graph order; break ties by id so that
            // answers are the same on every replica and after every rebuild.
            hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
            hits
        };
        if exact {
            let hits = self.index.vectors().exact_search(query, k, None, &accept);
            return (to_hits(hits), SearchPath::Exact);
        }
        if filter.is_some() && self.estimated_fraction(&t, &accept) < EXACT_SCAN_FRACTION {
            let matching: Vec<usize> = (0..t.slots.len()).filter(|&s| accept(s)).collect();
            let hits = self.index.vectors().exact_search(query, k, Some(&matching), &accept);
            return (to_hits(hits), SearchPath::ExactFiltered);
        }
        // Every slot the index holds is live, unexpiring and wanted: the graph
        // search runs without a predicate (the paper's search, nothing to skip).
        let all = filter.is_none() && t.live == t.slots.len() && t.expiring == 0 && self.index.len() == t.slots.len();
        let hits = to_hits(self.index.search(query, k, ef, if all { None } else { Some(&accept) }));
        if hits.len() >= k {
            return (hits, SearchPath::Graph);
        }
        let hits = self.index.vectors().exact_search(query, k, None, &accept);
        (to_hits(hits), SearchPath::ExactFallback)
    }

    /// Share of live slots the predicate accepts, from an evenly strided sample.
    fn estimated_fraction(&self, t: &SlotTable, accept: &dyn Fn(usize) -> bool) -> f64 {
        let n = t.slots.len();
        let step = (n / SAMPLE).max(1);
        let (mut seen, mut hit) = (0usize, 0usize);
        for s in (0..n).step_by(step) {
            if t.slots[s].live {
                seen += 1;
                hit += accept(s) as usize;
            }
        }
        if seen == 0 { 0.0 } else { hit as f64 / seen as f64 }
    }

    /// Copies the live points (vector and metadata) from slot `from` on, for a
    /// rebuild; returns them and the slot count at the time of the copy.
    fn live_from(&self, from: usize) -> (Vec<Vec<f32>>, Vec<SlotMeta>, usize) {
        let t = self.table.read();
        let mut vectors = Vec::new();
        let mut metas = Vec::new();
        for (slot, m) in t.slots.iter().enumerate().skip(from) {
            if m.live
                && let Some(v) = self.index.vectors().get(slot)
            {
                vectors.push(v);
                metas.push(SlotMeta {
                    id: m.id,
                    expires_at_ms: m.expires_at_ms,
                    payload: m.payload.clone(),
                    live: true,
                });
            }
        }
        (vectors, metas, t.slots.len())
    }

    /// Copies live slots from `from` on into `target`; returns the new mark.
    pub(crate) fn copy_into(&self, target: &LiveIndex, from: usize) -> usize {
        let (vectors, metas, mark) = self.live_from(from);
        let refs: Vec<&[f32]> = vectors.iter().map(Vec::as_slice).collect();
        target.insert(&refs, metas);
        mark
    }

    /// Final step of a rebuild (with writers stopped): anything deleted here since
    /// it was copied is deleted in `target` too.
    pub(crate) fn reconcile_deletes(&self, target: &LiveIndex) {
        let gone: Vec<PointId> = {
            let src = self.table.read();
            let dst = target.table.read();
            dst.by_id.keys().filter(|id| !src.by_id.contains_key(id)).copied().collect()
        };
        target.delete(&gone);
    }
}
