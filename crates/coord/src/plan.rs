//! Which regions a read asks (R3): those the caller's key may read and whose
//! policy lets their results go to the coordinator's region. The others are
//! never contacted; a search names them as excluded, with why. A pure
//! function, so the rule is tested apart from the network.

use sovra_meta::keys::Regions;
use sovra_meta::state::RegionPolicy;
use sovra_types::{ApiError, RegionId};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    pub region: RegionId,
    pub reason: String,
    /// Excluded because of the key (else because of the region's policy).
    pub by_key: bool,
}

/// Whether `region`'s results may go to a coordinator in `coordinator`: its
/// own region always; another only if the region's policy names it.
pub fn results_may_go(policies: &BTreeMap<RegionId, RegionPolicy>, region: &RegionId, coordinator: &RegionId) -> bool {
    region == coordinator || policies.get(region).is_some_and(|p| p.results_may_go_to.contains(coordinator))
}

fn key_reason(region: &RegionId) -> String {
    format!("the API key may not read region {region}")
}

fn policy_reason(region: &RegionId, coordinator: &RegionId) -> String {
    format!("region {region}'s policy keeps its search results in {region} (this coordinator is in {coordinator}); ask a node of {region}")
}

/// The regions to ask, and those left out with why. `requested` empty means
/// every region of the collection (`spanned`), and leaving some out is
/// reported; a region named explicitly that may not be read is an error
/// (PERMISSION_DENIED for the key, FAILED_PRECONDITION for the policy). When
/// no region is left, the error names every reason.
pub fn regions_to_ask(
    spanned: &[RegionId],
    requested: &[RegionId],
    readable: &Regions,
    policies: &BTreeMap<RegionId, RegionPolicy>,
    coordinator: &RegionId,
) -> Result<(Vec<RegionId>, Vec<Excluded>), ApiError> {
    let explicit = !requested.is_empty();
    let candidates = if explicit { requested } else { spanned };
    let mut ask = Vec::new();
    let mut excluded = Vec::new();
    for r in candidates {
        if sovra_types::chaos::broken(sovra_types::chaos::Switch::IgnoreScope) {
            ask.push(r.clone());
        } else if !readable.contains(r) {
            if explicit {
                return Err(ApiError::denied(format!(
                    "{}: remove it from regions, or use a key that may",
                    key_reason(r)
                )));
            }
            excluded.push(Excluded {
                region: r.clone(),
                reason: key_reason(r),
                by_key: true,
            });
        } else if !results_may_go(policies, r, coordinator) {
            if explicit {
                return Err(ApiError::precondition(policy_reason(r, coordinator)));
            }
            excluded.push(Excluded {
                region: r.clone(),
                reason: policy_reason(r, coordinator),
                by_key: false,
            });
        } else {
            ask.push(r.clone());
        }
    }
    if ask.is_empty() {
        let why: Vec<String> = excluded.iter().map(|e| e.reason.clone()).collect();
        let msg = format!("no region of the collection may be searched: {}", why.join("; "));
        return Err(if excluded.iter().any(|e| e.by_key) {
            ApiError::denied(msg)
        } else {
            ApiError::precondition(msg)
        });
    }
    Ok((ask, excluded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sovra_types::ErrorCode;

    fn r(s: &str) -> RegionId {
        RegionId::parse(s).unwrap()
    }

    #[test]
    fn a_key_and_a_policy_each_exclude_and_say_why() {
        let spanned = [r("uk"), r("us")];
        let none = BTreeMap::new();
        let uk_only = Regions::Only([r("uk")].into());
        // A uk-only key on a uk coordinator: us left out for the key.
        let (ask, ex) = regions_to_ask(&spanned, &[], &uk_only, &none, &r("uk")).unwrap();
        assert_eq!(ask, vec![r("uk")]);
        assert_eq!(ex.len(), 1);
        assert!(ex[0].by_key && ex[0].reason.contains("may not read region us"));
        // Every-region key on a us coordinator without policies: uk's results stay in uk.
        let (ask, ex) = regions_to_ask(&spanned, &[], &Regions::All, &none, &r("us")).unwrap();
        assert_eq!(ask, vec![r("us")]);
        assert!(!ex[0].by_key && ex[0].reason.contains("policy keeps its search results in uk"));
        // With uk's policy letting results go to us, both are asked.
        let open: BTreeMap<_, _> = [(
            r("uk"),
            RegionPolicy {
                results_may_go_to: [r("us")].into(),
            },
        )]
        .into();
        let (ask, ex) = regions_to_ask(&spanned, &[], &Regions::All, &open, &r("us")).unwrap();
        assert_eq!(ask, spanned.to_vec());
        assert!(ex.is_empty());
        // Named explicitly: an error, not an exclusion.
        let e = regions_to_ask(&spanned, &[r("us")], &uk_only, &none, &r("uk")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let e = regions_to_ask(&spanned, &[r("uk")], &Regions::All, &none, &r("us")).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        // Nothing left: an error naming every reason.
        let us_only = Regions::Only([r("us")].into());
        let e = regions_to_ask(&spanned, &[], &us_only, &none, &r("uk")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(e.message.contains("uk") && e.message.contains("us"), "{}", e.message);
    }

    proptest! {
        /// Whatever the key, policies and coordinator: every region asked is
        /// readable by the key and lets results go to the coordinator; every
        /// region of the collection is either asked or excluded, never both.
        #[test]
        fn only_readable_and_permitted_regions_are_asked(
            readable in proptest::collection::btree_set(0u8..4, 0..4),
            allow in proptest::collection::btree_set((0u8..4, 0u8..4), 0..8),
            coord in 0u8..4,
            all in any::<bool>(),
        ) {
            let name = |i: u8| r(&format!("r{i}"));
            let spanned: Vec<RegionId> = (0..4).map(name).collect();
            let readable = if all { Regions::All } else { Regions::Only(readable.into_iter().map(name).collect()) };
            let mut policies: BTreeMap<RegionId, RegionPolicy> = BTreeMap::new();
            for (from, to) in allow {
                policies.entry(name(from)).or_default().results_may_go_to.insert(name(to));
            }
            let coordinator = name(coord);
            match regions_to_ask(&spanned, &[], &readable, &policies, &coordinator) {
                Ok((ask, ex)) => {
                    for a in &ask {
                        prop_assert!(readable.contains(a));
                        prop_assert!(results_may_go(&policies, a, &coordinator));
                        prop_assert!(!ex.iter().any(|e| &e.region == a));
                    }
                    prop_assert_eq!(ask.len() + ex.len(), spanned.len());
                }
                Err(_) => {
                    prop_assert!(!spanned.iter().any(|s| readable.contains(s) && results_may_go(&policies, s, &coordinator)));
                }
            }
        }
    }
}
