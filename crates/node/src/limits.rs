//! Load shedding on the public listener: a per-node budget of bytes in flight
//! and of requests in flight. A request that would go over either is answered
//! RESOURCE_EXHAUSTED at once, naming the limit, rather than queued: a flood
//! costs the node at most its budget, and callers learn to back off while the
//! node keeps serving what it took (and its health check, which is exempt).
//!
//! Every public call is unary, so a request's body is read whole here,
//! reserving its bytes as they arrive (times [`COPIES`], the copies a request
//! makes on its way to the handler: the body, tonic's decode buffer, the
//! decoded message), and the reservation is held until the response has been
//! sent. Bodies over the message size limit are passed on unread past it, for
//! tonic to refuse with its own status. tonic's per-connection concurrency and
//! stream limits sit below this (see `run.rs`).

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;

/// How many times its body's size a request is counted: the body as read,
/// tonic's decode buffer, and the decoded message.
pub const COPIES: usize = 3;

/// Calls never shed: a probe must see the node's health under load.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// The node's budget, shared by every connection of the public listener.
#[derive(Debug)]
pub struct Budget {
    max_bytes: usize,
    max_requests: usize,
    bytes: AtomicUsize,
    requests: AtomicUsize,
}

impl Budget {
    pub fn new(max_bytes: usize, max_requests: usize) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            max_requests,
            bytes: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved now (for metrics and tests).
    pub fn bytes_in_flight(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn try_add(counter: &AtomicUsize, n: usize, max: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_add(n).filter(|t| *t <= max))
            .is_ok()
    }
}

/// What one request holds; given back when dropped (response sent, client
/// gone, or the request refused).
struct Held {
    budget: Arc<Budget>,
    bytes: usize,
    request: bool,
}

impl Held {
    fn enter(budget: &Arc<Budget>) -> Option<Self> {
        Budget::try_add(&budget.requests, 1, budget.max_requests).then(|| Self {
            budget: budget.clone(),
            bytes: 0,
            request: true,
        })
    }

    fn grow(&mut self, n: usize) -> bool {
        let ok = Budget::try_add(&self.budget.bytes, n, self.budget.max_bytes);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.request {
            self.budget.requests.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn shed(what: &str) -> http::Response<Body> {
    metrics::counter!("sovra_requests_shed_total", "limit" => what.to_string()).increment(1);
    let msg = match what {
        "requests" => "the node is at its limit of requests in flight (max_inflight_requests): retry with backoff".to_string(),
        _ => "the node is at its budget of request bytes in flight (max_inflight_bytes): retry with backoff, or send smaller batches"
            .to_string(),
    };
    tonic::Status::resource_exhausted(msg).into_http()
}

#[derive(Clone)]
pub struct BudgetLayer {
    pub budget: Arc<Budget>,
    /// Past this many body bytes a request is passed on unread for tonic to
    /// refuse as too large.
    pub max_message: usize,
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BudgetService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BudgetService<S> {
    inner: S,
    layer: BudgetLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for BudgetService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            if exempt(req.uri().path()) {
                return inner.call(req).await;
            }
            let Some(mut held) = Held::enter(&layer.budget) else {
                return Ok(shed("requests"));
            };
            let (parts, mut body) = req.into_parts();
            let mut buf = BytesMut::new();
            let mut rest = None;
            loop {
                let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                let Some(frame) = frame else { break };
                let Ok(frame) = frame else {
                    // The client reset or the connection broke: nobody to answer.
                    return Ok(tonic::Status::cancelled("the request body was cut off").into_http());
                };
                let Ok(data) = frame.into_data() else { continue };
                if !held.grow(data.len() * COPIES) {
                    return Ok(shed("bytes"));
                }
                buf.extend_from_slice(&data);
                if buf.len() > layer.max_message + 5 {
                    // Too large to take: tonic reads on and answers OUT_OF_RANGE.
                    rest = Some(body);
                    break;
                }
            }
            let read = Body::new(http_body_util::Full::new(Bytes::from(buf)));
            let body = match rest {
                None => read,
                Some(rest) => Body::new(Chain { first: Some(read), rest }),
            };
            let resp = inner.call(http::Request::from_parts(parts, body)).await?;
            Ok(resp.map(|b| Body::new(Holding { inner: b, _held: held })))
        })
    }
}

/// A response body that keeps the request's reservation until it is done.
struct Holding {
    inner: Body,
    _held: Held,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = tonic::Status;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What was read, then the rest of the body.
struct Chain {
    first: Option<Body>,
    rest: Body,
}

impl http_body::Body for Chain {
    type Data = Bytes;
    type Error = tonic::Status;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.as_mut() {
            match Pin::new(first).poll_frame(cx) {
                Poll::Ready(None) => self.first = None,
                other => return other,
            }
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_past_its_limit_and_gets_back_what_is_dropped() {
        let b = Budget::new(100, 2);
        let mut one = Held::enter(&b).unwrap();
        assert!(one.grow(60));
        let mut two = Held::enter(&b).unwrap();
        assert!(Held::enter(&b).is_none(), "a third request past max_requests");
        assert!(!two.grow(41), "past max_bytes");
        assert!(two.grow(40));
        assert_eq!(b.bytes_in_flight(), 100);
        drop(one);
        assert_eq!(b.bytes_in_flight(), 40);
        assert!(Held::enter(&b).is_some());
        drop(two);
        assert_eq!(b.bytes_in_flight(), 0);
    }
}
