//! Where each region's audit log lives: its replicas, on data nodes of the
//! region (the records never leave it, R2), at most [`AUDIT_REPLICAS`]
//! spread over zones. The meta leader keeps them in line with the region's
//! nodes ([`choose_audit_replicas`]) once the group has formed; the first set
//! founds the group, and only until it has formed, so exactly one group is
//! ever initialised per region. Pure and deterministic.

use crate::state::{NodeRecord, NodeStatus};
use serde::{Deserialize, Serialize};
use sovra_types::RegionId;
use std::collections::{BTreeMap, BTreeSet};

/// Replicas of a region's audit log (fewer when the region has fewer data nodes).
pub const AUDIT_REPLICAS: usize = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditGroup {
    /// The replicas that initialised the group (the first set chosen).
    pub founders: BTreeSet<u64>,
    pub replicas: BTreeSet<u64>,
    /// Set once the group has elected a leader (its leader says so). Only
    /// then may its replicas change, and from then on no replica initialises
    /// it again: a founder that lost its data waits to be added back like
    /// any new replica, so no second group can form and acknowledge records
    /// the first one never sees.
    pub formed: bool,
}

/// The audit replicas region `region` should have, given its current ones:
/// up data nodes kept; a replica that is not up is replaced only when an up
/// node can take its place (so a region never loses its only copies for a
/// node that is merely restarting); then filled to [`AUDIT_REPLICAS`] with up
/// nodes, zones not yet holding one first, lowest id first. `None` when the
/// region has no replica and no up data node to found one on.
pub fn choose_audit_replicas<'a>(
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    region: &RegionId,
    current: &BTreeSet<u64>,
) -> Option<BTreeSet<u64>> {
    let region_nodes: BTreeMap<u64, &NodeRecord> = nodes
        .into_iter()
        .filter(|n| &n.region == region && n.roles.data)
        .map(|n| (n.id, n))
        .collect();
    let up = |id: &u64| region_nodes.get(id).is_some_and(|n| n.status == NodeStatus::Up);
    let mut keep: BTreeSet<u64> = current.iter().copied().filter(|id| region_nodes.contains_key(id)).collect();
    let mut spare: Vec<&NodeRecord> = region_nodes
        .values()
        .filter(|n| n.status == NodeStatus::Up && !keep.contains(&n.id))
        .copied()
        .collect();
    let zone_of = |id: u64| region_nodes.get(&id).map(|n| n.zone.clone()).unwrap_or_default();
    // Next spare: a zone not yet holding a replica, then the lowest id.
    let take = |keep: &BTreeSet<u64>, spare: &mut Vec<&NodeRecord>| -> Option<u64> {
        let zones: BTreeSet<String> = keep.iter().map(|&id| zone_of(id)).collect();
        let i = spare
            .iter()
            .position(|n| !zones.contains(&n.zone))
            .or((!spare.is_empty()).then_some(0))?;
        Some(spare.remove(i).id)
    };
    for id in current.iter().filter(|id| !up(id)).copied().collect::<Vec<_>>() {
        if let Some(n) = take(&keep, &mut spare) {
            keep.remove(&id);
            keep.insert(n);
        }
    }
    while keep.len() < AUDIT_REPLICAS {
        let Some(n) = take(&keep, &mut spare) else { break };
        keep.insert(n);
    }
    (!keep.is_empty()).then_some(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Roles;

    fn node(id: u64, region: &str, zone: &str, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id,
            region: RegionId::parse(region).unwrap(),
            zone: zone.into(),
            roles: Roles {
                meta: true,
                data: true,
                coordinator: true,
            },
            cluster_addr: String::new(),
            public_addr: String::new(),
            status,
            last_heartbeat_ms: 0,
            incarnation: 0,
        }
    }

    #[test]
    fn audit_replicas_stay_in_region_spread_zones_and_survive_restarts() {
        let uk = RegionId::parse("uk").unwrap();
        let mut nodes = vec![
            node(1, "uk", "a", NodeStatus::Up),
            node(2, "uk", "a", NodeStatus::Up),
            node(3, "uk", "b", NodeStatus::Up),
            node(4, "us", "a", NodeStatus::Up),
            node(5, "uk", "c", NodeStatus::Up),
        ];
        let none = BTreeSet::new();
        // Zones first: 1 (a), 3 (b), 5 (c); never node 4 of another region.
        let first = choose_audit_replicas(&nodes, &uk, &none).unwrap();
        assert_eq!(first, BTreeSet::from([1, 3, 5]));
        assert_eq!(choose_audit_replicas(&nodes, &uk, &first).unwrap(), first);
        // A down replica is replaced by an up node of the region.
        nodes[2].status = NodeStatus::Down;
        assert_eq!(choose_audit_replicas(&nodes, &uk, &first).unwrap(), BTreeSet::from([1, 2, 5]));
        // With no node to take its place, it is kept (it may be restarting).
        let only = vec![node(1, "uk", "a", NodeStatus::Down)];
        assert_eq!(
            choose_audit_replicas(&only, &uk, &BTreeSet::from([1])).unwrap(),
            BTreeSet::from([1])
        );
        assert_eq!(choose_audit_replicas(&only, &uk, &none), None);
        // A region that grows from one node is filled up to three.
        let grown = choose_audit_replicas(&nodes, &uk, &BTreeSet::from([2])).unwrap();
        assert_eq!(grown.len(), AUDIT_REPLICAS);
        assert!(grown.contains(&2) && !grown.contains(&4) && !grown.contains(&3));
    }
}
