//! Wire <-> domain conversions. Wire-to-domain conversions validate shape (ids,
//! enum values, oneofs) and name the field at fault; range checks that need the
//! collection live in `sovra_types::validate`.

use crate::v1;
use sovra_types as t;
use sovra_types::ApiError;

pub fn point_id_from(p: Option<&v1::PointId>, field: &str) -> Result<t::PointId, ApiError> {
    match p.and_then(|p| p.kind.as_ref()) {
        Some(v1::point_id::Kind::Num(n)) => Ok(t::PointId::Num(*n)),
        Some(v1::point_id::Kind::Uuid(s)) => uuid::Uuid::parse_str(s)
            .map(t::PointId::Uuid)
            .map_err(|e| ApiError::invalid(format!("{field}.uuid {} is not a UUID: {e}", t::quote(s)))),
        None => Err(ApiError::invalid(format!("{field} is missing: set num or uuid"))),
    }
}

pub fn point_id_to(id: &t::PointId) -> v1::PointId {
    v1::PointId {
        kind: Some(match id {
            t::PointId::Num(n) => v1::point_id::Kind::Num(*n),
            t::PointId::Uuid(u) => v1::point_id::Kind::Uuid(u.to_string()),
        }),
    }
}

pub fn value_from(v: &v1::Value, field: &str) -> Result<t::Value, ApiError> {
    use v1::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => Ok(t::Value::String(s.clone())),
        Some(Kind::IntegerValue(i)) => Ok(t::Value::Integer(*i)),
        Some(Kind::DoubleValue(d)) => Ok(t::Value::Double(*d)),
        Some(Kind::BoolValue(b)) => Ok(t::Value::Bool(*b)),
        None => Err(ApiError::invalid(format!(
            "{field} has no value: set one of string/integer/double/bool"
        ))),
    }
}

pub fn value_to(v: &t::Value) -> v1::Value {
    use v1::value::Kind;
    v1::Value {
        kind: Some(match v {
            t::Value::String(s) => Kind::StringValue(s.clone()),
            t::Value::Integer(i) => Kind::IntegerValue(*i),
            t::Value::Double(d) => Kind::DoubleValue(*d),
            t::Value::Bool(b) => Kind::BoolValue(*b),
        }),
    }
}

pub fn lawful_basis_from(raw: i32, field: &str) -> Result<t::LawfulBasis, ApiError> {
    use t::LawfulBasis as L;
    Ok(match v1::LawfulBasis::try_from(raw) {
        Ok(v1::LawfulBasis::Unspecified) => L::Unspecified,
        Ok(v1::LawfulBasis::Consent) => L::Consent,
        Ok(v1::LawfulBasis::Contract) => L::Contract,
        Ok(v1::LawfulBasis::LegalObligation) => L::LegalObligation,
        Ok(v1::LawfulBasis::VitalInterests) => L::VitalInterests,
        Ok(v1::LawfulBasis::PublicTask) => L::PublicTask,
        Ok(v1::LawfulBasis::LegitimateInterests) => L::LegitimateInterests,
        Err(_) => return Err(ApiError::invalid(format!("{field} is {raw}: not a known lawful basis"))),
    })
}

pub fn lawful_basis_to(b: t::LawfulBasis) -> v1::LawfulBasis {
    use t::LawfulBasis as L;
    match b {
        L::Unspecified => v1::LawfulBasis::Unspecified,
        L::Consent => v1::LawfulBasis::Consent,
        L::Contract => v1::LawfulBasis::Contract,
        L::LegalObligation => v1::LawfulBasis::LegalObligation,
        L::VitalInterests => v1::LawfulBasis::VitalInterests,
        L::PublicTask => v1::LawfulBasis::PublicTask,
        L::LegitimateInterests => v1::LawfulBasis::LegitimateInterests,
    }
}

/// A wire point as a record (unvalidated ranges: see `sovra_types::validate`).
pub fn point_from(p: v1::Point, i: usize) -> Result<t::PointRecord, ApiError> {
    let at = format!("points[{i}]");
    let id = point_id_from(p.id.as_ref(), &format!("{at}.id"))?;
    let region = t::RegionId::parse(&p.region).map_err(|e| e.at(&format!("{at}.region")))?;
    let mut payload = t::Payload::new();
    for (k, v) in &p.payload {
        payload.insert(k.clone(), value_from(v, &format!("{at}.payload[{}]", t::quote(k)))?);
    }
    Ok(t::PointRecord {
        id,
        region,
        vector: p.vector,
        subject: p.subject,
        payload,
        lawful_basis: lawful_basis_from(p.lawful_basis, &format!("{at}.lawful_basis"))?,
        source: p.source,
        expires_at_ms: p.expires_at_ms,
        consent_at_ms: p.consent_at_ms,
    })
}

pub fn point_to(r: &t::PointRecord, with_vector: bool, with_payload: bool) -> v1::Point {
    v1::Point {
        id: Some(point_id_to(&r.id)),
        vector: if with_vector { r.vector.clone() } else { Vec::new() },
        subject: r.subject.clone(),
        region: r.region.to_string(),
        payload: if with_payload {
            r.payload.iter().map(|(k, v)| (k.clone(), value_to(v))).collect()
        } else {
            Default::default()
        },
        lawful_basis: lawful_basis_to(r.lawful_basis) as i32,
        source: r.source.clone(),
        expires_at_ms: r.expires_at_ms,
        consent_at_ms: r.consent_at_ms,
    }
}

pub fn metric_from(raw: i32) -> Result<t::Metric, ApiError> {
    match v1::Metric::try_from(raw) {
        Ok(v1::Metric::Cosine) => Ok(t::Metric::Cosine),
        Ok(v1::Metric::Dot) => Ok(t::Metric::Dot),
        Ok(v1::Metric::L2) => Ok(t::Metric::L2),
        _ => Err(ApiError::invalid(
            "collection.metric is unset or unknown: choose METRIC_COSINE, METRIC_DOT or METRIC_L2",
        )),
    }
}

pub fn metric_to(m: t::Metric) -> v1::Metric {
    match m {
        t::Metric::Cosine => v1::Metric::Cosine,
        t::Metric::Dot => v1::Metric::Dot,
        t::Metric::L2 => v1::Metric::L2,
    }
}

fn or_default(v: u32, d: u32) -> u32 {
    if v == 0 { d } else { v }
}

/// A wire spec with defaults filled in and every range checked.
pub fn spec_from(s: v1::CollectionSpec) -> Result<t::CollectionSpec, ApiError> {
    let name = t::CollectionName::parse(&s.name).map_err(|e| e.at("collection.name"))?;
    let d = t::HnswParams::default();
    let h = s.hnsw.unwrap_or_default();
    let mut regions = Vec::with_capacity(s.regions.len());
    for (i, r) in s.regions.iter().enumerate() {
        regions.push(t::RegionShards {
            region: t::RegionId::parse(&r.region).map_err(|e| e.at(&format!("collection.regions[{i}].region")))?,
            shard_count: or_default(r.shard_count, 1),
            split_map: None,
        });
    }
    let spec = t::CollectionSpec {
        name,
        dimension: s.dimension,
        metric: metric_from(s.metric)?,
        hnsw: t::HnswParams {
            m: or_default(h.m, d.m),
            ef_construction: or_default(h.ef_construction, d.ef_construction),
            ef_search: or_default(h.ef_search, d.ef_search),
        },
        regions,
        replication_factor: or_default(s.replication_factor, 1),
        default_retention_seconds: s.default_retention_seconds,
        require_lawful_basis: s.require_lawful_basis,
        require_purpose: s.require_purpose,
    };
    spec.validate()?;
    Ok(spec)
}

pub fn spec_to(s: &t::CollectionSpec) -> v1::CollectionSpec {
    v1::CollectionSpec {
        name: s.name.to_string(),
        dimension: s.dimension,
        metric: metric_to(s.metric) as i32,
        hnsw: Some(v1::HnswParams {
            m: s.hnsw.m,
            ef_construction: s.hnsw.ef_construction,
            ef_search: s.hnsw.ef_search,
        }),
        regions: s
            .regions
            .iter()
            .map(|r| v1::RegionShards {
                region: r.region.to_string(),
                shard_count: r.shard_count,
            })
            .collect(),
        replication_factor: s.replication_factor,
        default_retention_seconds: s.default_retention_seconds,
        require_lawful_basis: s.require_lawful_basis,
        require_purpose: s.require_purpose,
    }
}

pub fn filter_from(f: &v1::Filter, path: &str) -> Result<t::Filter, ApiError> {
    use v1::filter::Kind;
    match &f.kind {
        Some(Kind::Condition(c)) => {
            let cond = match &c.test {
                Some(v1::condition::Test::Match(v)) => t::Condition::Match {
                    key: c.key.clone(),
                    value: value_from(v, &format!("{path}.match"))?,
                },
                Some(v1::condition::Test::Range(r)) => t::Condition::Range {
                    key: c.key.clone(),
                    range: t::Range {
                        gt: r.gt,
                        gte: r.gte,
                        lt: r.lt,
                        lte: r.lte,
                    },
                },
                None => return Err(ApiError::invalid(format!("{path}.condition has no test: set match or range"))),
            };
            Ok(t::Filter::Condition(cond))
        }
        Some(Kind::And(l)) => Ok(t::Filter::And(list(&l.filters, &format!("{path}.and"))?)),
        Some(Kind::Or(l)) => Ok(t::Filter::Or(list(&l.filters, &format!("{path}.or"))?)),
        Some(Kind::Not(inner)) => Ok(t::Filter::Not(Box::new(filter_from(inner, &format!("{path}.not"))?))),
        None => Err(ApiError::invalid(format!("{path} is empty: set condition, and, or, or not"))),
    }
}

fn list(fs: &[v1::Filter], path: &str) -> Result<Vec<t::Filter>, ApiError> {
    fs.iter()
        .enumerate()
        .map(|(i, f)| filter_from(f, &format!("{path}[{i}]")))
        .collect()
}
