//! Faults injected into node-to-node calls, switchable at run time, in the
//! spirit of tikv's `transport_simulate.rs`: drop (always or with a seeded
//! probability), delay, partition between two sets of nodes, isolate a node.
//!
//! The rules sit in a tower layer on every outgoing channel, so everything a
//! node sends to a peer (Raft traffic, forwarded writes, read-index requests)
//! obeys them. A dropped call fails as UNAVAILABLE, as a dead link would.

use crate::types::NodeId;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::http;

#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Calls from `from` to `to` (`None` = any node) are dropped with probability `p`.
    Drop { from: Option<NodeId>, to: Option<NodeId>, p: f64 },
    /// Calls from `from` to `to` wait `by` before they are sent.
    Delay {
        from: Option<NodeId>,
        to: Option<NodeId>,
        by: Duration,
    },
    /// No call crosses between the two sides, in either direction.
    Partition(BTreeSet<NodeId>, BTreeSet<NodeId>),
    /// The node can neither send to nor receive from any other node.
    Isolate(NodeId),
}

fn hits(rule: Option<NodeId>, n: NodeId) -> bool {
    rule.is_none_or(|r| r == n)
}

struct State {
    rules: Vec<Rule>,
    rng: StdRng,
}

/// Shared by every node of a test cluster; cheap to clone.
#[derive(Clone)]
pub struct Faults(Arc<Mutex<State>>);

impl Default for Faults {
    fn default() -> Self {
        Self::seeded(0)
    }
}

/// What to do with one call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Verdict {
    pub drop: bool,
    pub delay: Duration,
}

impl Faults {
    /// Random drops draw from this seed, so a failing run can be replayed.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(State {
            rules: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
        })))
    }

    pub fn add(&self, rule: Rule) {
        self.0.lock().rules.push(rule);
    }

    pub fn partition(&self, a: impl IntoIterator<Item = NodeId>, b: impl IntoIterator<Item = NodeId>) {
        self.add(Rule::Partition(a.into_iter().collect(), b.into_iter().collect()));
    }

    pub fn isolate(&self, n: NodeId) {
        self.add(Rule::Isolate(n));
    }

    /// Removes every rule.
    pub fn heal(&self) {
        self.0.lock().rules.clear();
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.0.lock().rules.clone()
    }

    pub fn verdict(&self, from: NodeId, to: NodeId) -> Verdict {
        let mut s = self.0.lock();
        let mut v = Verdict::default();
        let State { rules, rng } = &mut *s;
        for r in rules.iter() {
            match r {
                Rule::Drop { from: f, to: t, p } if hits(*f, from) && hits(*t, to) => {
                    v.drop |= *p >= 1.0 || rng.random::<f64>() < *p;
                }
                Rule::Delay { from: f, to: t, by } if hits(*f, from) && hits(*t, to) => v.delay += *by,
                Rule::Partition(a, b) => {
                    v.drop |= (a.contains(&from) && b.contains(&to)) || (b.contains(&from) && a.contains(&to));
                }
                Rule::Isolate(n) if *n == from || *n == to => v.drop = true,
                _ => {}
            }
        }
        v
    }
}

/// Tower layer applying [`Faults`] to calls from `from` to `to`.
#[derive(Clone)]
pub struct FaultLayer {
    pub faults: Faults,
    pub from: NodeId,
    pub to: NodeId,
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = FaultService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FaultService<S> {
    inner: S,
    layer: FaultLayer,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, R> tower::Service<http::Request<B>> for FaultService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let v = self.layer.faults.verdict(self.layer.from, self.layer.to);
        // The clone that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (from, to) = (self.layer.from, self.layer.to);
        Box::pin(async move {
            if !v.delay.is_zero() {
                tokio::time::sleep(v.delay).await;
            }
            if v.drop {
                return Err(Box::new(tonic::Status::unavailable(format!("fault injected: link {from} -> {to} is down"))) as BoxError);
            }
            inner.call(req).await.map_err(Into::into)
        })
    }
}
