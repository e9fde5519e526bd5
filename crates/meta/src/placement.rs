//! Where a new collection's replicas go: for every shard of every region it
//! spans, `replication_factor` distinct nodes of that region (R1), in distinct
//! zones first, then the least loaded, then the lowest id, so the choice is
//! deterministic and spreads both across failure domains and across nodes.
//! Pure: the caller passes the candidates and their current load.

use sovra_types::{CollectionSpec, RegionId};
use std::collections::{BTreeMap, BTreeSet};

/// A node that may hold replicas: up, with the data role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub region: RegionId,
    pub zone: String,
    /// Replicas it holds already.
    pub load: usize,
}

/// A shard of a collection: its region and number.
pub type ShardKey = (RegionId, u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "region {region} has {have} node(s) that can hold data; replication_factor {need} needs {need}: add nodes in {region} or lower the replication factor"
    )]
    TooFewNodes { region: RegionId, have: usize, need: usize },
}

/// Replicas for every shard of `spec`, from `candidates` (of any region; only
/// those of a shard's region are considered for it).
pub fn place_collection(spec: &CollectionSpec, candidates: &[Candidate]) -> Result<BTreeMap<ShardKey, Vec<u64>>, PlacementError> {
    let need = spec.replication_factor as usize;
    let mut out = BTreeMap::new();
    for r in &spec.regions {
        let mut pool: Vec<Candidate> = candidates.iter().filter(|c| c.region == r.region).cloned().collect();
        if pool.len() < need {
            return Err(PlacementError::TooFewNodes {
                region: r.region.clone(),
                have: pool.len(),
                need,
            });
        }
        for number in 0..r.shard_count {
            out.insert((r.region.clone(), number), place_shard(&mut pool, need));
        }
    }
    Ok(out)
}

/// `need` distinct nodes of `pool` (which has at least that many), counting
/// the new replicas into their load.
fn place_shard(pool: &mut [Candidate], need: usize) -> Vec<u64> {
    let mut chosen: Vec<usize> = Vec::with_capacity(need);
    let mut zones: BTreeSet<String> = BTreeSet::new();
    for _ in 0..need {
        let best = (0..pool.len())
            .filter(|i| !chosen.contains(i))
            .min_by_key(|&i| (zones.contains(&pool[i].zone), pool[i].load, pool[i].id))
            .expect("the pool holds at least `need` nodes");
        zones.insert(pool[best].zone.clone());
        pool[best].load += 1;
        chosen.push(best);
    }
    let mut ids: Vec<u64> = chosen.into_iter().map(|i| pool[i].id).collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests;
