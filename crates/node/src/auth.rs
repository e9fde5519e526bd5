//! API keys on the public API (R3's "who"): every sovra.v1 call carries
//! `authorization: Bearer sovra_<id>_<secret>`; the node knows the key by its
//! id and the SHA-256 of its secret in its metadata view, and the call by the
//! key's scopes. Fail closed: a node that has not confirmed its view with a
//! quorum of the meta group within `key_lease_ms` refuses every key, so a
//! revocation holds on every coordinator within the lease, also on one cut
//! off from meta. `auth = false` takes every call as an all-scopes caller.

use crate::metrics as m;
use crate::state::NodeState;
use sovra_meta::keys::{Scopes, parse_key};
use sovra_types::{ApiError, CollectionName, RegionId};
use std::sync::Arc;

/// Who is calling and what it may do.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's id (`None` with `auth = false`).
    pub key: Option<String>,
    pub scopes: Scopes,
    node: u64,
}

fn denied(node: u64, reason: &'static str, e: ApiError) -> ApiError {
    metrics::counter!(m::AUTH_DENIED, "node" => node.to_string(), "reason" => reason).increment(1);
    e
}

impl Caller {
    fn name(&self) -> String {
        self.key.as_deref().map_or("this caller".into(), |k| format!("API key {k}"))
    }

    pub fn require_collection(&self, c: &CollectionName) -> Result<(), ApiError> {
        if self.scopes.may_use(c) {
            return Ok(());
        }
        Err(denied(
            self.node,
            "collection",
            ApiError::denied(format!(
                "{} may not use collection {c}; use a key whose scopes name it",
                self.name()
            )),
        ))
    }

    pub fn require_read(&self, r: &RegionId) -> Result<(), ApiError> {
        if self.scopes.read.contains(r) {
            return Ok(());
        }
        Err(denied(
            self.node,
            "read_region",
            ApiError::denied(format!(
                "{} may not read region {r}; use a key whose read regions include it",
                self.name()
            )),
        ))
    }

    pub fn require_write(&self, r: &RegionId) -> Result<(), ApiError> {
        if self.scopes.write.contains(r) {
            return Ok(());
        }
        Err(denied(
            self.node,
            "write_region",
            ApiError::denied(format!(
                "{} may not write region {r}; use a key whose write regions include it; nothing was written",
                self.name()
            )),
        ))
    }

    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.scopes.admin {
            return Ok(());
        }
        Err(denied(
            self.node,
            "admin",
            ApiError::denied(format!("{what} needs the admin scope, which {} does not have", self.name())),
        ))
    }

    pub fn require_data_protection(&self, what: &str) -> Result<(), ApiError> {
        if self.scopes.data_protection {
            return Ok(());
        }
        Err(denied(
            self.node,
            "data_protection",
            ApiError::denied(format!(
                "{what} needs the data_protection scope, which {} does not have",
                self.name()
            )),
        ))
    }

    /// Counts a denial the root or the region plan made (R3).
    pub fn count_denial(&self, e: ApiError) -> ApiError {
        if e.code == sovra_types::ErrorCode::PermissionDenied {
            return denied(self.node, "read_region", e);
        }
        e
    }
}

const HEADER: &str = "authorization";

impl NodeState {
    /// Takes a token of key `id`'s rate on this node, if it has one; else
    /// RESOURCE_EXHAUSTED with the wait ([`crate::ratelimit`]).
    fn within_rate(&self, id: &str) -> Result<(), ApiError> {
        let view = self.view();
        let rated = &view.state.ext.key_rates;
        let Some(rate) = rated.get(id) else { return Ok(()) };
        let Err(wait) = self.key_buckets.take(id, *rate, rated, std::time::Instant::now()) else {
            return Ok(());
        };
        let node = self.config.node_id;
        metrics::counter!(m::KEY_RATE_LIMITED, "node" => node.to_string(), "key" => id.to_string()).increment(1);
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        Err(ApiError::new(
            sovra_types::ErrorCode::ResourceExhausted,
            format!(
                "API key {id} is over its rate on node {node} ({} calls a second, bursts of {}); retry in {ms} ms (header {}), or ask an admin for a higher rate (Admin.SetKeyRate)",
                rate.per_second,
                rate.burst,
                sovra_proto::RETRY_AFTER_HEADER
            ),
        )
        .retry_after(ms))
    }

    /// The caller of a public request, or UNAUTHENTICATED / UNAVAILABLE (the
    /// key lease lapsed) saying what to do.
    pub async fn authenticate(self: &Arc<Self>, md: &tonic::metadata::MetadataMap) -> Result<Caller, ApiError> {
        let node = self.config.node_id;
        if !self.config.auth {
            return Ok(Caller {
                key: None,
                scopes: Scopes::all(),
                node,
            });
        }
        let unauth = |why: String| denied(node, "unauthenticated", ApiError::unauthenticated(why));
        let Some(v) = md.get(HEADER) else {
            return Err(unauth(format!(
                "this call needs an API key: send metadata `{HEADER}: Bearer sovra_<id>_<secret>` (the bootstrap node printed the first admin key; Admin.CreateKey makes more)"
            )));
        };
        let text = v.to_str().unwrap_or("");
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| unauth(format!("{HEADER} must be `Bearer sovra_<id>_<secret>`")))?;
        let (id, secret) =
            parse_key(token).ok_or_else(|| unauth("the API key is malformed: it has the form sovra_<id>_<secret>".into()))?;
        if !self.lease_held() && !self.confirm_meta().await {
            return Err(denied(
                node,
                "lease",
                ApiError::unavailable(format!(
                    "node {node} has not confirmed its API keys with the cluster metadata within its key lease ({} ms), so it refuses every key until it can; send the call to another node",
                    self.config.key_lease_ms
                )),
            ));
        }
        let mut rec = self.view().state.api_keys.get(id).cloned();
        if rec.is_none() && self.may_refresh_for_unknown_key() {
            // A key made a moment ago through another node.
            self.refresh_view().await;
            rec = self.view().state.api_keys.get(id).cloned();
        }
        match rec {
            Some(r) if r.matches(secret) => {
                self.within_rate(&r.id)?;
                Ok(Caller {
                    key: Some(r.id),
                    scopes: r.scopes,
                    node,
                })
            }
            _ => Err(unauth(format!(
                "API key {} is not valid: unknown, revoked, or a wrong secret",
                sovra_types::quote(id)
            ))),
        }
    }
}
