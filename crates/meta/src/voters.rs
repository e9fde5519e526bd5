//! Which meta-role nodes vote in the meta group: at most five, always an odd
//! number (an even one adds no fault tolerance), spread over regions first and
//! zones second, so losing one region or zone costs as few votes as the nodes
//! allow. The other meta-role nodes are learners. Pure and deterministic: the
//! same nodes give the same voters on every node.

use crate::state::{NodeRecord, NodeStatus};
use std::collections::{BTreeMap, BTreeSet};

pub const MAX_VOTERS: usize = 5;

/// The voters among `nodes`: meta-role nodes that are not down.
pub fn choose_voters<'a>(nodes: impl IntoIterator<Item = &'a NodeRecord>) -> BTreeSet<u64> {
    // Per region, its nodes in zone round-robin order (one per zone in turn,
    // lowest id first within a zone).
    let mut by_region: BTreeMap<&str, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for n in nodes {
        if n.roles.meta && n.status != NodeStatus::Down {
            by_region
                .entry(n.region.as_str())
                .or_default()
                .entry(n.zone.as_str())
                .or_default()
                .push(n.id);
        }
    }
    let mut queues: Vec<Vec<u64>> = by_region
        .into_values()
        .map(|zones| {
            let mut zones: Vec<Vec<u64>> = zones
                .into_values()
                .map(|mut ids| {
                    ids.sort_unstable();
                    ids.reverse(); // popped from the back: lowest id first
                    ids
                })
                .collect();
            let mut order = Vec::new();
            while zones.iter().any(|z| !z.is_empty()) {
                for z in &mut zones {
                    order.extend(z.pop());
                }
            }
            order.reverse();
            order
        })
        .collect();
    let total: usize = queues.iter().map(Vec::len).sum();
    let mut want = total.min(MAX_VOTERS);
    if want.is_multiple_of(2) {
        want = want.saturating_sub(1);
    }
    let mut voters = BTreeSet::new();
    while voters.len() < want {
        for q in &mut queues {
            if voters.len() < want
                && let Some(id) = q.pop()
            {
                voters.insert(id);
            }
        }
    }
    voters
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Roles;
    use proptest::prelude::*;
    use sovra_types::RegionId;

    fn node(id: u64, region: usize, zone: usize, meta: bool, down: bool) -> NodeRecord {
        NodeRecord {
            id,
            region: RegionId::parse(["eu-west", "us-east", "uk-south"][region]).unwrap(),
            zone: format!("z{zone}"),
            roles: Roles { meta, ..Roles::default() },
            cluster_addr: String::new(),
            public_addr: String::new(),
            status: if down { NodeStatus::Down } else { NodeStatus::Up },
            last_heartbeat_ms: 0,
            incarnation: 1,
        }
    }

    #[test]
    fn two_regions_of_three_give_five_voters_three_and_two() {
        let nodes: Vec<_> = (0..6)
            .map(|i| node(i + 1, (i / 3) as usize, (i % 3) as usize, true, false))
            .collect();
        let v = choose_voters(&nodes);
        assert_eq!(v.len(), 5);
        let eu = v.iter().filter(|&&id| id <= 3).count();
        assert!(eu == 3 || eu == 2, "{v:?}");
        // Four nodes: three vote (an even count would add nothing).
        assert_eq!(choose_voters(&nodes[..4]).len(), 3);
        assert!(choose_voters(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn voters_are_odd_at_most_five_eligible_and_spread(
            spec in prop::collection::vec((0usize..3, 0usize..3, any::<bool>(), prop::bool::weighted(0.2)), 0..12),
        ) {
            let nodes: Vec<_> = spec.iter().enumerate().map(|(i, &(r, z, m, d))| node(i as u64 + 1, r, z, m, d)).collect();
            let v = choose_voters(&nodes);
            let eligible: Vec<&NodeRecord> = nodes.iter().filter(|n| n.roles.meta && n.status != NodeStatus::Down).collect();
            prop_assert!(v.len() <= MAX_VOTERS);
            prop_assert_eq!(v.is_empty(), eligible.is_empty());
            if !v.is_empty() {
                prop_assert!(!v.len().is_multiple_of(2));
                let want = eligible.len().min(MAX_VOTERS);
                prop_assert_eq!(v.len(), if want.is_multiple_of(2) { want - 1 } else { want });
            }
            let of = |id: &u64| &nodes[(*id - 1) as usize];
            prop_assert!(v.iter().all(|id| eligible.iter().any(|n| n.id == *id)));
            // Regions: as many as the voters and regions allow.
            let regions: BTreeSet<_> = eligible.iter().map(|n| &n.region).collect();
            let covered: BTreeSet<_> = v.iter().map(|id| &of(id).region).collect();
            prop_assert_eq!(covered.len(), regions.len().min(v.len()));
            // Within a region, as many zones as its voters and zones allow.
            for r in &covered {
                let zones: BTreeSet<_> = eligible.iter().filter(|n| &&n.region == r).map(|n| &n.zone).collect();
                let mine: Vec<_> = v.iter().filter(|id| &&of(id).region == r).collect();
                let used: BTreeSet<_> = mine.iter().map(|id| &of(id).zone).collect();
                prop_assert_eq!(used.len(), zones.len().min(mine.len()));
            }
        }
    }
}
