//! Turning a client's points into records fit to log: every check that could
//! refuse a point happens here, before any command exists, so a batch with one bad
//! point writes none and `apply` never has to reject anything.

use crate::collection::{CollectionSpec, Metric};
use crate::error::ApiError;
use crate::ids::RegionId;
use crate::limits::*;
use crate::point::{LawfulBasis, PointRecord};

/// Validates a vector for the collection and returns it as the index will hold it
/// (normalised under cosine). `what` names the field in errors, e.g. `points[3].vector`.
pub fn prepare_vector(spec: &CollectionSpec, mut v: Vec<f32>, what: &str) -> Result<Vec<f32>, ApiError> {
    if v.len() != spec.dimension as usize {
        return Err(ApiError::invalid(format!(
            "{what} has dimension {}: collection {} expects {}",
            v.len(),
            spec.name,
            spec.dimension
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(ApiError::invalid(format!(
            "{what}[{i}] is {}: components must be finite numbers",
            v[i]
        )));
    }
    if let Some(i) = v.iter().position(|x| x.abs() > MAX_COMPONENT_ABS) {
        return Err(ApiError::invalid(format!(
            "{what}[{i}] is {}: components must be within +/-{MAX_COMPONENT_ABS:e}",
            v[i]
        )));
    }
    // f64 so that large components cannot overflow the sum.
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    match spec.metric {
        Metric::Cosine => {
            if norm == 0.0 || !norm.is_normal() {
                return Err(ApiError::invalid(format!(
                    "{what} is a zero vector: cosine similarity is undefined for it; send a non-zero vector"
                )));
            }
            v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
        }
        Metric::Dot => {
            if norm > DOT_MAX_NORM as f64 {
                return Err(ApiError::invalid(format!(
                    "{what} has norm {norm:.4}: the dot metric needs norm <= 1 (normalise it, or use the cosine metric)"
                )));
            }
        }
        Metric::L2 => {}
    }
    Ok(v)
}

/// Checks one point against the collection and fills in what the log must carry
/// (normalised vector, resolved expiry). `now_ms` is the coordinator's clock, read
/// once before logging so that replay is deterministic.
pub fn prepare_point(spec: &CollectionSpec, mut p: PointRecord, i: usize, now_ms: u64) -> Result<PointRecord, ApiError> {
    let at = format!("points[{i}]");
    if spec.region(&p.region).is_none() {
        return Err(spec.region_not_spanned(&p.region).at(&at));
    }
    p.vector = prepare_vector(spec, std::mem::take(&mut p.vector), &format!("{at}.vector"))?;
    if spec.require_lawful_basis && p.lawful_basis == LawfulBasis::Unspecified {
        return Err(ApiError::precondition(format!(
            "{at}: collection {} requires a lawful basis on every point; set lawful_basis",
            spec.name
        )));
    }
    if p.subject.len() > MAX_SUBJECT_BYTES {
        return Err(ApiError::invalid(format!(
            "{at}.subject is {} bytes: at most {MAX_SUBJECT_BYTES}",
            p.subject.len()
        )));
    }
    if p.source.len() > MAX_SOURCE_BYTES {
        return Err(ApiError::invalid(format!(
            "{at}.source is {} bytes: at most {MAX_SOURCE_BYTES}",
            p.source.len()
        )));
    }
    if p.payload.len() > MAX_PAYLOAD_FIELDS {
        return Err(ApiError::invalid(format!(
            "{at}.payload has {} fields: at most {MAX_PAYLOAD_FIELDS}",
            p.payload.len()
        )));
    }
    let payload_bytes = payload_size(&p);
    if payload_bytes > MAX_PAYLOAD_BYTES {
        return Err(ApiError::invalid(format!(
            "{at}.payload is {payload_bytes} bytes: at most {MAX_PAYLOAD_BYTES}"
        )));
    }
    for (k, v) in &p.payload {
        if k.is_empty() || k.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(format!(
                "{at}.payload key {k:?} must be 1 to {MAX_KEY_BYTES} bytes"
            )));
        }
        if let crate::point::Value::Double(d) = v
            && !d.is_finite()
        {
            return Err(ApiError::invalid(format!("{at}.payload.{k} is {d}: numbers must be finite")));
        }
    }
    if p.expires_at_ms == 0 && spec.default_retention_seconds > 0 {
        p.expires_at_ms = now_ms.saturating_add(spec.default_retention_seconds.saturating_mul(1000));
    }
    Ok(p)
}

/// Approximate encoded size of a payload: keys plus values.
fn payload_size(p: &PointRecord) -> usize {
    p.payload
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    crate::point::Value::String(s) => s.len(),
                    _ => 8,
                }
        })
        .sum()
}

/// Validates a whole batch: size limits first, then each point. Returns the
/// prepared records, or the first error naming its `points[i]`.
pub fn prepare_batch(spec: &CollectionSpec, points: Vec<PointRecord>, now_ms: u64) -> Result<Vec<PointRecord>, ApiError> {
    if points.is_empty() {
        return Err(ApiError::invalid("points is empty: send at least one point"));
    }
    if points.len() > MAX_BATCH_POINTS {
        return Err(ApiError::invalid(format!(
            "batch has {} points: at most {MAX_BATCH_POINTS} per request; split it",
            points.len()
        )));
    }
    let bytes: usize = points.iter().map(|p| p.vector.len() * 4 + payload_size(p)).sum();
    if bytes > MAX_BATCH_BYTES {
        return Err(ApiError::invalid(format!(
            "batch carries {bytes} bytes of vectors and payloads: at most {MAX_BATCH_BYTES}; split it"
        )));
    }
    points
        .into_iter()
        .enumerate()
        .map(|(i, p)| prepare_point(spec, p, i, now_ms))
        .collect()
}

/// Checks that a region named by a get or delete is spanned by the collection.
pub fn check_region(spec: &CollectionSpec, region: &str) -> Result<RegionId, ApiError> {
    let region = RegionId::parse(region)?;
    match spec.region(&region) {
        Some(_) => Ok(region),
        None => Err(spec.region_not_spanned(&region)),
    }
}

#[cfg(test)]
mod tests;
