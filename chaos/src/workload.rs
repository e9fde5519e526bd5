//! The workload: concurrent clients doing upserts (each of a value no other
//! write uses, kept in the point's payload `v`), deletes and linearizable or
//! `any` gets on a small key space (so keys collide), each recorded in the
//! history as invoked and as it ended. Clients run inside a host's network
//! namespace: [`in_namespace`] moves one OS thread there (`setns` changes
//! only the calling thread), so the harness itself stays outside.

use crate::history::{Call, Op, Outcome};
use sovra_proto::v1;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Runs `f` on a new thread whose network namespace is `ns`.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns on this thread with a namespace file it holds open.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        anyhow::ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

pub struct Workload {
    pub collection: String,
    pub region: String,
    pub keys: u64,
    pub ops: usize,
    pub seed: u64,
}

/// How a failed call ended: for sure (refused before it could take effect)
/// or maybe (no answer: it may have).
fn outcome_of(s: &tonic::Status) -> Outcome {
    use tonic::Code::*;
    match s.code() {
        InvalidArgument | FailedPrecondition | NotFound | PermissionDenied | Unauthenticated | AlreadyExists => {
            Outcome::Failed(s.message().to_string())
        }
        _ => Outcome::Indeterminate(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// One client's operations through the node at `addr`; `clock` is the run's
/// logical clock, `values` hands out unique values.
pub async fn client(
    process: u32,
    addr: std::net::SocketAddr,
    key: &str,
    w: &Workload,
    clock: &AtomicU64,
    values: &AtomicU64,
) -> anyhow::Result<Vec<Op>> {
    let ch = sovra_node::dev::wait_serving(addr, Duration::from_secs(30)).await?;
    let mut points = v1::points_client::PointsClient::new(sovra_node::dev::keyed(&ch, key));
    let mut rng = w.seed.wrapping_mul(6364136223846793005).wrapping_add(process as u64 + 1);
    let mut next = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rng >> 33
    };
    let mut out = Vec::with_capacity(w.ops);
    for _ in 0..w.ops {
        let k = next() % w.keys;
        let id = Some(v1::PointId {
            kind: Some(v1::point_id::Kind::Num(k)),
        });
        let call = match next() % 10 {
            0..=3 => Call::Upsert {
                value: values.fetch_add(1, Ordering::Relaxed),
            },
            4 => Call::Delete,
            5..=7 => Call::Get { linearizable: true },
            _ => Call::Get { linearizable: false },
        };
        let invoked = clock.fetch_add(1, Ordering::SeqCst);
        let result = match &call {
            Call::Upsert { value } => {
                let p = v1::Point {
                    id: id.clone(),
                    vector: vec![(k % 7) as f32, (*value % 11) as f32, 1.0, 0.5],
                    subject: format!("s{k}"),
                    region: w.region.clone(),
                    lawful_basis: v1::LawfulBasis::Consent as i32,
                    payload: [(
                        "v".to_string(),
                        v1::Value {
                            kind: Some(v1::value::Kind::IntegerValue(*value as i64)),
                        },
                    )]
                    .into(),
                    ..Default::default()
                };
                let req = v1::UpsertRequest {
                    collection: w.collection.clone(),
                    points: vec![p],
                };
                points.upsert(req).await.map(|_| None)
            }
            Call::Delete => {
                let req = v1::DeletePointsRequest {
                    collection: w.collection.clone(),
                    region: w.region.clone(),
                    ids: vec![id.clone().expect("set")],
                };
                points.delete(req).await.map(|_| None)
            }
            Call::Get { linearizable } => {
                let req = v1::GetPointsRequest {
                    collection: w.collection.clone(),
                    region: w.region.clone(),
                    ids: vec![id.clone().expect("set")],
                    consistency: if *linearizable {
                        v1::Consistency::Linearizable as i32
                    } else {
                        v1::Consistency::Any as i32
                    },
                    with_payload: true,
                    ..Default::default()
                };
                points.get(req).await.map(|r| {
                    r.into_inner()
                        .points
                        .first()
                        .and_then(|p| match p.payload.get("v").and_then(|v| v.kind.clone()) {
                            Some(v1::value::Kind::IntegerValue(v)) => Some(v as u64),
                            _ => None,
                        })
                })
            }
            Call::Erase | Call::Search { .. } => unreachable!("not in this workload"),
        };
        let returned = clock.fetch_add(1, Ordering::SeqCst);
        let outcome = match result {
            Ok(found) => Outcome::Ok { found },
            Err(s) => outcome_of(&s),
        };
        out.push(Op {
            process,
            key: k,
            call,
            invoked,
            returned: Some(returned),
            outcome,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use std::sync::Arc;

    /// The first chaos run, with no faults yet: three nodes in their own
    /// namespaces, two clients in a fourth one through different nodes, 150
    /// operations each on 4 keys; the history is linearizable per key.
    #[test]
    fn a_fault_free_run_through_two_coordinators_is_linearizable() {
        let Some(net) = crate::net::test_net("sw", 9, 4) else { return };
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::start(net, dir.path(), &["uk", "uk", "uk"]).unwrap();
        c.ctl(4, 1, &["status"]).unwrap();
        let ns = c.net.ns(4);
        let key = c.admin_key.clone();
        let addrs: Vec<std::net::SocketAddr> = (1..=3).map(|h| c.grpc(h).parse().unwrap()).collect();
        let run = in_namespace(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let ch = sovra_node::dev::wait_serving(addrs[0], Duration::from_secs(30)).await?;
                let mut cols = v1::collections_client::CollectionsClient::new(sovra_node::dev::keyed(&ch, &key));
                let spec = sovra_node::dev::spanning_spec("chaos", 4, v1::Metric::L2, &["uk"], 2, 3);
                cols.create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
                    .await?;
                let w = Arc::new(Workload {
                    collection: "chaos".into(),
                    region: "uk".into(),
                    keys: 4,
                    ops: 150,
                    seed: 7,
                });
                let (clock, values) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(1)));
                let mut tasks = Vec::new();
                for p in 0..2u32 {
                    let (w, clock, values, key) = (w.clone(), clock.clone(), values.clone(), key.clone());
                    let addr = addrs[p as usize + 1];
                    tasks.push(tokio::spawn(async move { client(p, addr, &key, &w, &clock, &values).await }));
                }
                let mut ops = Vec::new();
                for t in tasks {
                    ops.extend(t.await??);
                }
                Ok(ops)
            })
        });
        let ops = run.join().unwrap().unwrap();
        assert_eq!(ops.len(), 300);
        let ok = ops.iter().filter(|o| matches!(o.outcome, Outcome::Ok { .. })).count();
        assert!(ok > 250, "only {ok} of 300 operations succeeded without faults: {:?}", &ops[..5]);
        let bad = crate::history::check_linearizable(&ops);
        assert!(bad.is_empty(), "not linearizable: {bad:?}");
    }
}
