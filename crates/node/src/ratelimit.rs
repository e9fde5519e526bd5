//! Per-key rates on the public API: a token bucket per API key on this node,
//! filled at the key's `per_second` up to its `burst` (from the key's record
//! in meta, [`sovra_meta::keys::KeyRate`]); each authenticated call takes one
//! token, and a call that finds none is RESOURCE_EXHAUSTED with the wait in a
//! `retry-after-ms` header. Per node, not cluster-wide: no coordination on
//! the request path, so a key spread over n coordinators gets up to n times
//! its rate (the README says so).

use parking_lot::Mutex;
use sovra_meta::keys::KeyRate;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    rate: KeyRate,
    tokens: f64,
    at: Instant,
}

/// Every rated key's bucket on this node.
#[derive(Debug, Default)]
pub struct KeyBuckets {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyBuckets {
    /// Takes a token from `key`'s bucket at `rate`, or says how long until
    /// one is there. A new bucket starts full; a changed rate keeps the
    /// tokens held, up to the new burst. `rated` (every key with a rate)
    /// prunes buckets of keys revoked or unrated since.
    pub fn take(&self, key: &str, rate: KeyRate, rated: &BTreeMap<String, KeyRate>, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock();
        if buckets.len() > rated.len() + 64 {
            buckets.retain(|k, _| rated.contains_key(k));
        }
        let b = buckets.entry(key.to_string()).or_insert_with(|| Bucket {
            rate,
            tokens: f64::from(rate.burst),
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now.max(b.at);
        b.rate = rate;
        b.tokens = (b.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst));
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - b.tokens) / f64::from(rate.per_second)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> KeyRate {
        KeyRate { per_second, burst }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = KeyBuckets::default();
        let r = rate(10, 3);
        let rated = BTreeMap::from([("k".to_string(), r)]);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take("k", r, &rated, t0).unwrap();
        }
        let wait = b.take("k", r, &rated, t0).unwrap_err();
        assert!((Duration::from_millis(99)..=Duration::from_millis(101)).contains(&wait), "{wait:?}");
        // 100 ms later one token has come back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        b.take("k", r, &rated, t1).unwrap();
        assert!(b.take("k", r, &rated, t1).is_err());
        // A long pause refills to the burst, never past it.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            b.take("k", r, &rated, t2).unwrap();
        }
        assert!(b.take("k", r, &rated, t2).is_err());
        // Another key has its own bucket.
        b.take("other", r, &rated, t2).unwrap();
    }

    #[test]
    fn a_lower_rate_applies_at_once_and_revoked_keys_are_pruned() {
        let b = KeyBuckets::default();
        let t0 = Instant::now();
        let high = rate(1000, 1000);
        let rated = BTreeMap::from([("k".to_string(), high)]);
        b.take("k", high, &rated, t0).unwrap();
        // The burst is now 1: at most one token is kept.
        let low = rate(1, 1);
        b.take("k", low, &rated, t0).unwrap();
        let wait = b.take("k", low, &rated, t0).unwrap_err();
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        for i in 0..100 {
            let _ = b.take(&format!("gone-{i}"), low, &rated, t0);
        }
        assert!(b.buckets.lock().len() <= rated.len() + 65);
        assert!(b.buckets.lock().contains_key("k"));
    }
}
