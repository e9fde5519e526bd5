//! Planning replica moves inside one region, pure and deterministic: draining
//! a node (every replica it holds moved to another node of its region) and
//! rebalancing (moves until every node holds within one replica of the mean).
//! A plan never names a node of another region (R1), never puts two replicas
//! of a shard on one node, and never changes how many replicas a shard has.
//! Executing a plan (learner, catch-up, joint consensus, destroy) is the
//! caller's: this module only says which replica goes where.

use crate::placement::Candidate;
use sovra_types::{CollectionName, RegionId};
use std::collections::{BTreeMap, BTreeSet};

/// One shard of one collection in the region being planned.
pub type ShardRef = (CollectionName, u32);

/// Move the replica of `shard` on node `from` to node `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub shard: ShardRef,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("node {0} is not an up data node of region {1}")]
    UnknownNode(u64, RegionId),
    #[error(
        "draining node {node} would leave shard {collection}/{region}/{shard} with fewer than its {replicas} replicas: region {region} has no other node that does not hold it already; add a node to {region} first"
    )]
    BelowReplicationFactor {
        node: u64,
        collection: CollectionName,
        region: RegionId,
        shard: u32,
        replicas: usize,
    },
}

fn loads(nodes: &[&Candidate], shards: &BTreeMap<ShardRef, BTreeSet<u64>>) -> BTreeMap<u64, usize> {
    let mut l: BTreeMap<u64, usize> = nodes.iter().map(|n| (n.id, 0)).collect();
    for r in shards.values() {
        for id in r {
            if let Some(c) = l.get_mut(id) {
                *c += 1;
            }
        }
    }
    l
}

/// Where a replica of a shard held by `holders` goes, among `nodes` but
/// `not`: a zone the shard is not in yet first, then the least loaded node,
/// then the lowest id.
fn target(nodes: &[&Candidate], holders: &BTreeSet<u64>, not: u64, load: &BTreeMap<u64, usize>) -> Option<u64> {
    let zones: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| holders.contains(&n.id) && n.id != not)
        .map(|n| n.zone.as_str())
        .collect();
    nodes
        .iter()
        .filter(|n| n.id != not && !holders.contains(&n.id))
        .min_by_key(|n| (zones.contains(n.zone.as_str()), load[&n.id], n.id))
        .map(|n| n.id)
}

/// The moves that take every replica off `node`. `nodes` are the cluster's
/// up data nodes (only those of `region` are used; `node` itself may be
/// among them or not); `shards` are the region's shards and their replicas.
/// Refused when some shard has no other node to go to.
pub fn plan_drain(
    region: &RegionId,
    node: u64,
    nodes: &[Candidate],
    shards: &BTreeMap<ShardRef, BTreeSet<u64>>,
) -> Result<Vec<Move>, PlanError> {
    let pool: Vec<&Candidate> = nodes.iter().filter(|n| &n.region == region && n.id != node).collect();
    let mut all = pool.clone();
    if let Some(n) = nodes.iter().find(|n| n.id == node && &n.region == region) {
        all.push(n);
    }
    let mut load = loads(&all, shards);
    let mut out = Vec::new();
    for (shard, holders) in shards {
        if !holders.contains(&node) {
            continue;
        }
        let to = target(&pool, holders, node, &load).ok_or_else(|| PlanError::BelowReplicationFactor {
            node,
            collection: shard.0.clone(),
            region: region.clone(),
            shard: shard.1,
            replicas: holders.len(),
        })?;
        *load.entry(to).or_default() += 1;
        out.push(Move {
            shard: shard.clone(),
            from: node,
            to,
        });
    }
    Ok(out)
}

/// The moves that leave every up data node of `region` within one replica
/// of the mean: repeatedly the most loaded node gives a shard the least
/// loaded one lacks (lowest shard first). Each move lowers the sum of
/// squared loads, so the plan is finite; a shard the least loaded node lacks
/// always exists while the gap is two or more. Replicas on nodes outside the
/// pool (down, or of another region) are left where they are.
pub fn plan_rebalance(region: &RegionId, nodes: &[Candidate], shards: &BTreeMap<ShardRef, BTreeSet<u64>>) -> Vec<Move> {
    let pool: Vec<&Candidate> = nodes.iter().filter(|n| &n.region == region).collect();
    if pool.len() < 2 {
        return Vec::new();
    }
    let mut shards = shards.clone();
    let mut load = loads(&pool, &shards);
    let mut out = Vec::new();
    loop {
        let (&hi, &most) = load.iter().max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id))).expect("two nodes");
        let (&lo, &least) = load.iter().min_by_key(|(id, l)| (**l, **id)).expect("two nodes");
        if most - least <= 1 {
            return out;
        }
        let lo_zone = pool.iter().find(|n| n.id == lo).map(|n| n.zone.as_str());
        // Among the shards `hi` holds and `lo` lacks, prefer one whose move
        // does not put two of its replicas in one zone.
        let pick = shards
            .iter()
            .filter(|(_, h)| h.contains(&hi) && !h.contains(&lo))
            .min_by_key(|(_, h)| {
                pool.iter()
                    .any(|n| h.contains(&n.id) && n.id != hi && Some(n.zone.as_str()) == lo_zone)
            })
            .map(|(s, _)| s.clone())
            .expect("a node with fewer replicas lacks a shard the fuller one holds");
        let h = shards.get_mut(&pick).expect("picked from the map");
        h.remove(&hi);
        h.insert(lo);
        *load.get_mut(&hi).expect("in the pool") -= 1;
        *load.get_mut(&lo).expect("in the pool") += 1;
        out.push(Move {
            shard: pick,
            from: hi,
            to: lo,
        });
    }
}

/// `shards` after `moves` (for checking a plan, and for a dry run's table).
pub fn apply_moves(shards: &BTreeMap<ShardRef, BTreeSet<u64>>, moves: &[Move]) -> BTreeMap<ShardRef, BTreeSet<u64>> {
    let mut out = shards.clone();
    for m in moves {
        if let Some(h) = out.get_mut(&m.shard) {
            h.remove(&m.from);
            h.insert(m.to);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(r: &str) -> RegionId {
        RegionId::parse(r).unwrap()
    }

    fn node(id: u64, r: &str, zone: u64) -> Candidate {
        Candidate {
            id,
            region: region(r),
            zone: format!("z{zone}"),
            load: 0,
        }
    }

    /// A region "uk" of `n` nodes over `zones` zones (plus two "us" nodes
    /// that must never be chosen), and `shards` shards each with a
    /// replication factor and its replicas drawn from the uk nodes.
    fn layout() -> impl Strategy<Value = (Vec<Candidate>, BTreeMap<ShardRef, BTreeSet<u64>>)> {
        (1usize..8, 1u64..4, 0usize..24)
            .prop_flat_map(|(n, zones, count)| {
                let nodes: Vec<Candidate> = (1..=n as u64)
                    .map(|i| node(i, "uk", i % zones))
                    .chain([node(100, "us", 0), node(101, "us", 1)])
                    .collect();
                let shard =
                    (1usize..=n.min(3)).prop_flat_map(move |rf| proptest::sample::subsequence((1..=n as u64).collect::<Vec<_>>(), rf));
                (Just(nodes), proptest::collection::vec(shard, count))
            })
            .prop_map(|(nodes, reps)| {
                let c = CollectionName::parse("faces").unwrap();
                let shards = reps
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| ((c.clone(), i as u32), r.into_iter().collect()))
                    .collect();
                (nodes, shards)
            })
    }

    fn counts(shards: &BTreeMap<ShardRef, BTreeSet<u64>>) -> Vec<usize> {
        shards.values().map(BTreeSet::len).collect()
    }

    proptest! {
        #[test]
        fn a_rebalance_evens_nodes_to_within_one_of_the_mean_inside_the_region_keeping_every_shards_replicas(
            (nodes, shards) in layout()
        ) {
            let uk = region("uk");
            let moves = plan_rebalance(&uk, &nodes, &shards);
            let after = apply_moves(&shards, &moves);
            // Never across regions, never two replicas of a shard on a node.
            for m in &moves {
                prop_assert!(m.to < 100 && m.from < 100, "{m:?}");
                prop_assert!(shards[&m.shard].contains(&m.from));
            }
            prop_assert_eq!(counts(&after), counts(&shards));
            let pool: Vec<&Candidate> = nodes.iter().filter(|n| n.region == uk).collect();
            let load = loads(&pool, &after);
            let total: usize = load.values().sum();
            let mean = total as f64 / load.len() as f64;
            for (id, l) in &load {
                prop_assert!((*l as f64 - mean).abs() < 1.0 + 1e-9 || load.len() < 2, "node {} holds {} against a mean of {}", id, l, mean);
            }
            // A balanced region plans nothing more.
            prop_assert!(plan_rebalance(&uk, &nodes, &after).is_empty());
        }

        #[test]
        fn a_drain_empties_the_node_inside_the_region_or_is_refused_when_a_shard_has_nowhere_to_go(
            (nodes, shards) in layout(), pick in 0usize..8
        ) {
            let uk = region("uk");
            let n = nodes.iter().filter(|c| c.region == uk).count();
            let drained = (pick % n) as u64 + 1;
            match plan_drain(&uk, drained, &nodes, &shards) {
                Ok(moves) => {
                    let after = apply_moves(&shards, &moves);
                    prop_assert!(after.values().all(|h| !h.contains(&drained)));
                    prop_assert_eq!(counts(&after), counts(&shards));
                    prop_assert!(moves.iter().all(|m| m.to < 100 && m.to != drained));
                }
                Err(PlanError::BelowReplicationFactor { replicas, .. }) => {
                    // Only when some shard of the node already spans every other node.
                    prop_assert!(replicas >= n);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }

    #[test]
    fn a_drain_prefers_a_zone_the_shard_is_not_in_then_the_least_loaded_node() {
        let uk = region("uk");
        let nodes = vec![node(1, "uk", 0), node(2, "uk", 1), node(3, "uk", 1), node(4, "uk", 0)];
        let c = CollectionName::parse("faces").unwrap();
        // Shard 0 on 1 (z0) and 2 (z1); node 3 (z1) is emptier than 4 (z0),
        // but 4's zone is the one draining 1 leaves the shard without.
        let mut shards = BTreeMap::new();
        shards.insert((c.clone(), 0), BTreeSet::from([1, 2]));
        shards.insert((c.clone(), 1), BTreeSet::from([4]));
        let moves = plan_drain(&uk, 1, &nodes, &shards).unwrap();
        assert_eq!(
            moves,
            [Move {
                shard: (c.clone(), 0),
                from: 1,
                to: 4
            }]
        );
        // A shard already on every other node of the region cannot leave.
        let two = vec![node(1, "uk", 0), node(2, "uk", 1)];
        let e = plan_drain(&uk, 1, &two, &shards).unwrap_err();
        assert!(e.to_string().contains("add a node to uk"), "{e}");
    }
}
