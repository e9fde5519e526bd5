//! The one set of rules for what may enter a shard's log: turning a client's
//! points into records fit to log ([`prepare_batch`]), and checking a command
//! against the shard it is proposed to ([`check_command`]). The same checks run
//! at the edge of the log and again on apply, so an entry that slipped past the
//! edge (an older build, a bug) is recorded as a rejection, never applied.

use crate::collection::{CollectionSpec, Metric};
use crate::command::ShardCommand;
use crate::error::{ApiError, quote};
use crate::ids::{PointId, RegionId, ShardId};
use crate::limits::*;
use crate::point::{LawfulBasis, PointRecord};

/// How far from 1 the norm of a stored cosine vector may be (f32 rounding of a
/// normalisation done in f64).
const STORED_NORM_SLACK: f64 = 1e-3;

/// Validates a vector for the collection and returns it as the index will hold it
/// (normalised under cosine). `what` names the field in errors, e.g. `points[3].vector`.
pub fn prepare_vector(spec: &CollectionSpec, mut v: Vec<f32>, what: &str) -> Result<Vec<f32>, ApiError> {
    check_dimension(spec, &v, what)?;
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
    if p.consent_at_ms != 0 {
        if p.lawful_basis != LawfulBasis::Consent {
            return Err(ApiError::invalid(format!(
                "{at}.consent_at_ms is set but lawful_basis is not CONSENT: the consent time belongs to a consent basis"
            )));
        }
        if p.consent_at_ms > now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
            return Err(ApiError::invalid(format!(
                "{at}.consent_at_ms is {} ms ahead of this node's clock: consent cannot be given in the future",
                p.consent_at_ms - now_ms
            )));
        }
    }
    if p.expires_at_ms == 0 && spec.default_retention_seconds > 0 {
        p.expires_at_ms = now_ms.saturating_add(spec.default_retention_seconds.saturating_mul(1000));
    }
    check_record(spec, &p, &at)?;
    Ok(p)
}

/// The rules a record must meet to be logged, stored or indexed, checked as the
/// record will be held (vector already normalised under cosine). The client
/// path ([`prepare_point`]) ends with it; [`check_command`] runs it at the edge
/// of the log and again on apply; loading a store and installing a snapshot run
/// it on every record, so nothing that fails it ever reaches the index.
pub fn check_record(spec: &CollectionSpec, p: &PointRecord, at: &str) -> Result<(), ApiError> {
    if spec.region(&p.region).is_none() {
        return Err(spec.region_not_spanned(&p.region).at(at));
    }
    check_stored_vector(spec, &p.vector, &format!("{at}.vector"))?;
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
    let payload_bytes = payload_size(p);
    if payload_bytes > MAX_PAYLOAD_BYTES {
        return Err(ApiError::invalid(format!(
            "{at}.payload is {payload_bytes} bytes: at most {MAX_PAYLOAD_BYTES}"
        )));
    }
    for (k, v) in &p.payload {
        if k.is_empty() || k.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(format!(
                "{at}.payload key {} is {} bytes: keys must be 1 to {MAX_KEY_BYTES} bytes",
                quote(k),
                k.len()
            )));
        }
        if let crate::point::Value::Double(d) = v
            && !d.is_finite()
        {
            return Err(ApiError::invalid(format!(
                "{at}.payload[{}] is {d}: numbers must be finite",
                quote(k)
            )));
        }
    }
    Ok(())
}

fn check_dimension(spec: &CollectionSpec, v: &[f32], what: &str) -> Result<(), ApiError> {
    if v.len() == spec.dimension as usize {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "{what} has dimension {}: collection {} expects {}",
        v.len(),
        spec.name,
        spec.dimension
    )))
}

/// A vector as the index will hold it: the right dimension, finite components
/// within range, normalised under cosine, of norm <= 1 under dot. hnsw_rs
/// asserts on anything else, so this stands between any record and the index.
fn check_stored_vector(spec: &CollectionSpec, v: &[f32], what: &str) -> Result<(), ApiError> {
    check_dimension(spec, v, what)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite() || x.abs() > MAX_COMPONENT_ABS) {
        return Err(ApiError::invalid(format!(
            "{what}[{i}] is {}: components must be finite and within +/-{MAX_COMPONENT_ABS:e}",
            v[i]
        )));
    }
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    match spec.metric {
        Metric::Cosine if (norm - 1.0).abs() > STORED_NORM_SLACK => Err(ApiError::invalid(format!(
            "{what} has norm {norm:.4}: under cosine a logged vector is normalised (norm 1)"
        ))),
        Metric::Dot if norm > DOT_MAX_NORM as f64 => Err(ApiError::invalid(format!(
            "{what} has norm {norm:.4}: the dot metric needs norm <= 1 (normalise it, or use the cosine metric)"
        ))),
        _ => Ok(()),
    }
}

/// Checks a command against the shard it is proposed to (or applied in): the
/// collection, batch limits, every point of the shard's region (R2) and owned
/// by this shard under the documented routing, every record by
/// [`check_record`]. Called on every path that proposes (local, forwarded,
/// region-node writes) and again when an entry is applied, where a failure
/// becomes a recorded rejection instead of a change.
pub fn check_command(spec: &CollectionSpec, shard: &ShardId, cmd: &ShardCommand) -> Result<(), ApiError> {
    if spec.name != shard.collection {
        return Err(ApiError::precondition(format!(
            "command for collection {} sent to shard {shard}",
            spec.name
        )));
    }
    let map = spec.shard_map(&shard.region).map_err(|e| e.at(&format!("shard {shard}")))?;
    let owned = |id: &PointId, at: &str| -> Result<(), ApiError> {
        let owner = map.shard_for(id);
        if owner == shard.number {
            Ok(())
        } else {
            Err(ApiError::precondition(format!(
                "{at}: point {id} belongs to shard {owner} of region {}, not to shard {shard}",
                shard.region
            )))
        }
    };
    let points_ok = |points: &[crate::point::PointRecord]| -> Result<(), ApiError> {
        check_batch_size(points)?;
        for (i, p) in points.iter().enumerate() {
            let at = format!("points[{i}]");
            if p.region != shard.region && !crate::chaos::broken(crate::chaos::Switch::StoreForeignRegion) {
                return Err(ApiError::precondition(format!(
                    "{at}: a point of region {} may not be stored in shard {shard} (R2)",
                    p.region
                )));
            }
            owned(&p.id, &at)?;
            check_record(spec, p, &at)?;
        }
        Ok(())
    };
    let ids_ok = |ids: &[PointId]| -> Result<(), ApiError> {
        if ids.len() > MAX_IDS_PER_REQUEST {
            return Err(ApiError::invalid(format!(
                "delete names {} ids: at most {MAX_IDS_PER_REQUEST}",
                ids.len()
            )));
        }
        for (i, id) in ids.iter().enumerate() {
            owned(id, &format!("ids[{i}]"))?;
        }
        Ok(())
    };
    match cmd {
        ShardCommand::Upsert(points) => points_ok(points)?,
        ShardCommand::Delete(ids) => ids_ok(ids)?,
        ShardCommand::Erase(e) => check_erase(spec, e, owned)?,
        ShardCommand::RemoveOptOut { template } => check_template_id(template)?,
        ShardCommand::Freeze { job } | ShardCommand::Unfreeze { job } | ShardCommand::Retire { job } => check_job_id(job)?,
        ShardCommand::Copy(c) => {
            check_job_id(&c.job)?;
            points_ok(&c.points)?;
            ids_ok(&c.delete)?;
            if c.suppressed.len() > MAX_IDS_PER_REQUEST
                || c.tombstones.len() > MAX_IDS_PER_REQUEST
                || c.opt_outs.len() + c.remove_opt_outs.len() > MAX_IDS_PER_REQUEST
            {
                return Err(ApiError::invalid(format!(
                    "a split copy carries at most {MAX_IDS_PER_REQUEST} suppression entries and {MAX_IDS_PER_REQUEST} opt-out changes"
                )));
            }
            for (t, o) in &c.opt_outs {
                check_template_id(t)?;
                if o.vector.len() != spec.dimension as usize || o.vector.iter().any(|x| !x.is_finite()) {
                    return Err(ApiError::invalid(format!(
                        "opt-out template {t} of a split copy is not a finite vector of dimension {}",
                        spec.dimension
                    )));
                }
            }
            for t in &c.remove_opt_outs {
                check_template_id(t)?;
            }
        }
    }
    Ok(())
}

fn check_job_id(job: &str) -> Result<(), ApiError> {
    if job.is_empty() || job.len() > MAX_JOB_ID_BYTES {
        return Err(ApiError::invalid(format!("job id is {} bytes: 1..={MAX_JOB_ID_BYTES}", job.len())));
    }
    Ok(())
}

/// Bounds an erasure command (its ids must be the shard's own, like a delete's).
fn check_erase(
    spec: &CollectionSpec,
    e: &crate::command::Erase,
    owned: impl Fn(&PointId, &str) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    use crate::command::EraseTarget;
    if e.job.is_empty() || e.job.len() > MAX_JOB_ID_BYTES {
        return Err(ApiError::invalid(format!(
            "erase job id is {} bytes: 1..={MAX_JOB_ID_BYTES}",
            e.job.len()
        )));
    }
    match &e.target {
        EraseTarget::Ids(ids) | EraseTarget::Expired { ids, .. } => {
            if ids.is_empty() || ids.len() > MAX_IDS_PER_REQUEST {
                return Err(ApiError::invalid(format!(
                    "erase names {} ids: 1..={MAX_IDS_PER_REQUEST} per request",
                    ids.len()
                )));
            }
            for (i, id) in ids.iter().enumerate() {
                owned(id, &format!("ids[{i}]"))?;
            }
        }
        EraseTarget::Subject(s) => check_subject(s, "subject")?,
        EraseTarget::Filter(f) => f.validate()?,
        EraseTarget::All => {}
        EraseTarget::Likeness {
            template,
            vector,
            threshold,
            subject,
        } => {
            check_template_id(template)?;
            check_likeness(spec, vector, *threshold, "vector")?;
            if let Some(s) = subject {
                check_subject(s, "subject")?;
            }
        }
    }
    Ok(())
}

/// An opt-out template id as Sovra makes them: `optout-` and 32 hex digits.
pub fn check_template_id(t: &str) -> Result<(), ApiError> {
    let ok = t
        .strip_prefix("optout-")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "template {} is not an opt-out template id (RegisterOptOut returned one: optout- and 32 hex digits)",
            quote(t)
        )))
    }
}

/// A likeness (an opt-out template or a probe) and its threshold: the
/// collection's dimension, finite components, a finite threshold >= 0.
pub fn check_likeness(spec: &CollectionSpec, vector: &[f32], threshold: f32, at: &str) -> Result<(), ApiError> {
    if vector.len() != spec.dimension as usize {
        return Err(ApiError::invalid(format!(
            "{at} has {} components: collection {} has dimension {}",
            vector.len(),
            spec.name,
            spec.dimension
        )));
    }
    if vector.iter().any(|x| !x.is_finite()) {
        return Err(ApiError::invalid(format!("{at} has a component that is not a finite number")));
    }
    if !threshold.is_finite() || threshold < 0.0 {
        return Err(ApiError::invalid(format!(
            "threshold is {threshold}: give a finite distance >= 0 in the collection's metric (as search reports distances)"
        )));
    }
    Ok(())
}

/// A subject named by an erasure or a lookup: present, and as bounded as a
/// stored one.
pub fn check_subject(subject: &str, at: &str) -> Result<(), ApiError> {
    if subject.is_empty() {
        return Err(ApiError::invalid(format!("{at} is empty: name the subject")));
    }
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(ApiError::invalid(format!(
            "{at} is {} bytes: at most {MAX_SUBJECT_BYTES}",
            subject.len()
        )));
    }
    Ok(())
}

fn check_batch_size(points: &[PointRecord]) -> Result<(), ApiError> {
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
    Ok(())
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
    check_batch_size(&points)?;
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
