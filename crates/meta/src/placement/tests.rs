use super::*;
use proptest::prelude::*;
use sovra_types::{CollectionName, HnswParams, Metric, RegionShards};

fn region(i: usize) -> RegionId {
    RegionId::parse(["eu-west", "us-east", "uk-south"][i]).unwrap()
}

fn spec(regions: &[(usize, u32)], rf: u32) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("faces").unwrap(),
        dimension: 4,
        metric: Metric::L2,
        hnsw: HnswParams::default(),
        regions: regions
            .iter()
            .map(|&(r, shard_count)| RegionShards {
                region: region(r),
                shard_count,
                split_map: None,
            })
            .collect(),
        replication_factor: rf,
        default_retention_seconds: 0,
        require_lawful_basis: false,
        require_purpose: false,
    }
}

fn candidates(nodes: &[(usize, usize)]) -> Vec<Candidate> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, &(r, zone))| Candidate {
            id: i as u64 + 1,
            region: region(r),
            zone: format!("z{zone}"),
            load: 0,
        })
        .collect()
}

#[test]
fn zones_first_then_load_then_id() {
    // Region 0: nodes 1, 2 in zone a; node 3 in zone b.
    let c = candidates(&[(0, 0), (0, 0), (0, 1)]);
    let p = place_collection(&spec(&[(0, 3)], 2), &c).unwrap();
    // Every shard spans both zones, and the three shards spread the load.
    for replicas in p.values() {
        assert!(replicas.contains(&3), "{p:?}");
    }
    let mut load = BTreeMap::new();
    for r in p.values().flatten() {
        *load.entry(*r).or_insert(0usize) += 1;
    }
    assert_eq!(load[&1] + load[&2], 3);
    assert!(load[&1].abs_diff(load[&2]) <= 1, "{load:?}");
}

#[test]
fn too_few_nodes_names_the_region_and_counts() {
    let c = candidates(&[(0, 0), (0, 1), (1, 0)]);
    let err = place_collection(&spec(&[(0, 1), (1, 1)], 2), &c).unwrap_err();
    assert_eq!(
        err,
        PlacementError::TooFewNodes {
            region: region(1),
            have: 1,
            need: 2
        }
    );
    assert!(err.to_string().contains("region us-east has 1 node(s)"), "{err}");
}

proptest! {
    #[test]
    fn placement_is_on_region_distinct_and_zone_spread(
        nodes in prop::collection::vec((0usize..3, 0usize..3), 0..14),
        shards in prop::collection::vec(1u32..6, 1..4),
        rf in 1u32..4,
    ) {
        let c = candidates(&nodes);
        let regions: Vec<(usize, u32)> = shards.iter().enumerate().map(|(r, &n)| (r, n)).collect();
        let s = spec(&regions, rf);
        match place_collection(&s, &c) {
            Err(PlacementError::TooFewNodes { region, have, need }) => {
                prop_assert_eq!(need, rf as usize);
                prop_assert_eq!(have, c.iter().filter(|n| n.region == region).count());
                prop_assert!(have < need);
            }
            Ok(p) => {
                prop_assert_eq!(p.len(), shards.iter().map(|&n| n as usize).sum::<usize>());
                for ((r, _), replicas) in &p {
                    let of = |id: &u64| &c[(*id - 1) as usize];
                    // R1: never off the shard's region.
                    prop_assert!(replicas.iter().all(|id| &of(id).region == r));
                    // Distinct nodes, exactly rf of them.
                    let distinct: BTreeSet<_> = replicas.iter().collect();
                    prop_assert_eq!(distinct.len(), rf as usize);
                    // As many zones as the region offers, up to rf.
                    let offered: BTreeSet<_> = c.iter().filter(|n| &n.region == r).map(|n| &n.zone).collect();
                    let used: BTreeSet<_> = replicas.iter().map(|id| &of(id).zone).collect();
                    prop_assert_eq!(used.len(), offered.len().min(rf as usize));
                }
            }
        }
    }
}
