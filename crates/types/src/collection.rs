//! A collection's specification and the rules it must satisfy.

use crate::error::ApiError;
use crate::ids::{CollectionName, RegionId};
use crate::limits::*;
use crate::routing::RegionShardMap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// `1 - cos`; vectors are normalised on write, so the index computes `1 - dot`.
    Cosine,
    /// `1 - dot`; vectors must have norm <= 1 so the distance is never negative.
    Dot,
    /// Squared Euclidean distance.
    L2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    pub m: u32,
    pub ef_construction: u32,
    pub ef_search: u32,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            ef_search: 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionShards {
    pub region: RegionId,
    /// How many shards the region has (after splits too).
    pub shard_count: u32,
    /// After the region's first shard split, its shards by hash range; `None`
    /// means `shard_count` shards splitting the hash space evenly.
    #[serde(default)]
    pub split_map: Option<RegionShardMap>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionSpec {
    pub name: CollectionName,
    pub dimension: u32,
    pub metric: Metric,
    pub hnsw: HnswParams,
    pub regions: Vec<RegionShards>,
    pub replication_factor: u32,
    pub default_retention_seconds: u64,
    pub require_lawful_basis: bool,
    /// Every call on the collection must say why (request metadata
    /// `x-purpose`; INVALID_ARGUMENT without it): the purpose goes into the
    /// call's audit record.
    #[serde(default)]
    pub require_purpose: bool,
}

impl CollectionSpec {
    /// One shard in `region`, one replica, default HNSW parameters, no
    /// retention and no requirements: what benches, seeds and tests start
    /// from (set the fields that differ afterwards).
    pub fn single_region(name: CollectionName, dimension: u32, metric: Metric, region: RegionId) -> Self {
        Self {
            name,
            dimension,
            metric,
            hnsw: HnswParams::default(),
            regions: vec![RegionShards {
                region,
                shard_count: 1,
                split_map: None,
            }],
            replication_factor: 1,
            default_retention_seconds: 0,
            require_lawful_basis: false,
            require_purpose: false,
        }
    }

    /// Checks every field against the documented ranges. Defaults (zeros) must
    /// already have been filled in by whoever built the spec.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.dimension == 0 || self.dimension > MAX_DIMENSION {
            return Err(ApiError::invalid(format!(
                "collection.dimension is {}: it must be between 1 and {MAX_DIMENSION}",
                self.dimension
            )));
        }
        let h = &self.hnsw;
        if !(MIN_M..=MAX_M).contains(&h.m) {
            return Err(ApiError::invalid(format!(
                "collection.hnsw.m is {}: it must be between {MIN_M} and {MAX_M}",
                h.m
            )));
        }
        if !(MIN_EF_CONSTRUCTION..=MAX_EF_CONSTRUCTION).contains(&h.ef_construction) || h.ef_construction < h.m {
            return Err(ApiError::invalid(format!(
                "collection.hnsw.ef_construction is {}: it must be between {MIN_EF_CONSTRUCTION} and {MAX_EF_CONSTRUCTION} and at least m ({})",
                h.ef_construction, h.m
            )));
        }
        if h.ef_search == 0 || h.ef_search > MAX_EF_SEARCH {
            return Err(ApiError::invalid(format!(
                "collection.hnsw.ef_search is {}: it must be between 1 and {MAX_EF_SEARCH}",
                h.ef_search
            )));
        }
        if self.regions.is_empty() {
            return Err(ApiError::invalid("collection.regions is empty: name at least one region"));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(ApiError::invalid(format!(
                "collection.regions has {} entries: at most {MAX_REGIONS}",
                self.regions.len()
            )));
        }
        for (i, r) in self.regions.iter().enumerate() {
            if r.shard_count == 0 || r.shard_count > MAX_SHARDS_PER_REGION {
                return Err(ApiError::invalid(format!(
                    "collection.regions[{i}].shard_count is {}: it must be between 1 and {MAX_SHARDS_PER_REGION}",
                    r.shard_count
                )));
            }
            if let Some(m) = &r.split_map
                && m.len() != r.shard_count as usize
            {
                return Err(ApiError::invalid(format!(
                    "collection.regions[{i}]: its shard map has {} shards, not shard_count {}",
                    m.len(),
                    r.shard_count
                )));
            }
            if self.regions[..i].iter().any(|o| o.region == r.region) {
                return Err(ApiError::invalid(format!(
                    "collection.regions[{i}]: region {} is listed twice",
                    r.region
                )));
            }
        }
        if self.replication_factor == 0 || self.replication_factor > MAX_REPLICATION_FACTOR {
            return Err(ApiError::invalid(format!(
                "collection.replication_factor is {}: it must be between 1 and {MAX_REPLICATION_FACTOR}",
                self.replication_factor
            )));
        }
        Ok(())
    }

    pub fn region(&self, region: &RegionId) -> Option<&RegionShards> {
        self.regions.iter().find(|r| &r.region == region)
    }

    /// The shard map of one region, or INVALID_ARGUMENT naming the regions it spans.
    pub fn shard_map(&self, region: &RegionId) -> Result<RegionShardMap, ApiError> {
        match self.region(region) {
            Some(r) => Ok(r.split_map.clone().unwrap_or_else(|| RegionShardMap::even(r.shard_count))),
            None => Err(self.region_not_spanned(region)),
        }
    }

    /// INVALID_ARGUMENT for a region outside the collection, naming the ones it spans.
    pub fn region_not_spanned(&self, region: &RegionId) -> ApiError {
        ApiError::invalid(format!(
            "region {region} is not spanned by collection {}; it spans: {}",
            self.name,
            self.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> CollectionSpec {
        CollectionSpec {
            name: CollectionName::parse("c").unwrap(),
            dimension: 4,
            metric: Metric::L2,
            hnsw: HnswParams::default(),
            regions: vec![RegionShards {
                region: RegionId::parse("eu").unwrap(),
                shard_count: 2,
                split_map: None,
            }],
            replication_factor: 1,
            default_retention_seconds: 0,
            require_lawful_basis: false,
            require_purpose: false,
        }
    }

    #[test]
    fn ranges_are_enforced_with_field_names() {
        assert!(spec().validate().is_ok());
        type Mutation = fn(&mut CollectionSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (|s| s.dimension = 0, "collection.dimension"),
            (|s| s.dimension = MAX_DIMENSION + 1, "collection.dimension"),
            (|s| s.hnsw.m = 300, "collection.hnsw.m"),
            (|s| s.hnsw.m = 129, "collection.hnsw.m"),
            (|s| s.hnsw.ef_construction = 8, "collection.hnsw.ef_construction"),
            (|s| s.hnsw.ef_search = 0, "collection.hnsw.ef_search"),
            (|s| s.regions.clear(), "collection.regions"),
            (|s| s.regions[0].shard_count = 0, "collection.regions[0].shard_count"),
            (|s| s.replication_factor = 8, "collection.replication_factor"),
            (|s| s.regions.push(s.regions[0].clone()), "listed twice"),
        ];
        for (mutate, needle) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err();
            assert!(err.message.contains(needle), "{} lacks {needle}", err.message);
        }
    }
}
