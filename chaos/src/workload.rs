//! The workload: concurrent clients doing upserts (each of a value no other
//! write uses, kept in the point's payload `v`, with the region's canary in
//! `c`), deletes, erasures and linearizable or `any` gets on a small key space
//! (so keys collide), searches with the admin key and with one scoped to the
//! client's region, writes of expiring points and of points within the
//! region's opt-out likeness, and attempts to write another region's points
//! through this region's nodes; each recorded in the history as invoked and
//! as it ended. Clients run inside a host's network
//! namespace: [`in_namespace`] moves one OS thread there (`setns` changes
//! only the calling thread), so the harness itself stays outside.

use crate::history::{Call, EXPIRING_KEYS, Hit, LIKENESS_KEYS, MOVABLE_KEYS, Op, Outcome, REGION_KEYS};
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

/// What every client of a run shares.
pub struct Workload {
    /// The collection of the register, expiring and likeness keys
    /// (replication factor 3) and the one of the movable keys (factor 2).
    pub collection: String,
    pub movable: String,
    /// The regions, in key order (region index = position).
    pub regions: Vec<String>,
    /// Keys per kind per region.
    pub keys: u64,
    pub seed: u64,
    /// The admin key (writes, reads, erasures) and, per region, a key that may
    /// read only that region.
    pub admin_key: String,
    pub scoped_keys: Vec<String>,
    /// The CA certificate the nodes' public ports are checked against.
    pub ca: std::path::PathBuf,
    /// Regions whose search results may go to a coordinator of region i
    /// (besides i itself), from the policies the run set.
    pub results_to: Vec<Vec<String>>,
    /// Each region's canary (in every point's payload `c`), for R2 at rest.
    pub canaries: Vec<String>,
    /// The run's logical clock and unique values.
    pub clock: AtomicU64,
    pub values: AtomicU64,
    pub stop: std::sync::atomic::AtomicBool,
    /// Each call's deadline: one that passes it is indeterminate.
    pub timeout: Duration,
}

/// The likeness region `r` opts out: far from every other point written.
pub fn likeness(r: u64) -> Vec<f32> {
    vec![50.0 + r as f32, 50.0, 50.0, 50.0]
}

/// How close a point must be to the likeness to be refused (L2, squared).
pub const LIKENESS_THRESHOLD: f32 = 1.0;

/// A small seeded generator (PCG-style LCG), so one seed decides every choice.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.draw();
        r
    }
    pub fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let x = self.0;
        (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 32
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.draw() % n.max(1)
    }
    pub fn unit(&mut self) -> f32 {
        (self.draw() % 10_000) as f32 / 10_000.0
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a failed call ended: for sure (refused before it could take effect)
/// or maybe (no answer: it may have).
pub fn outcome_of(s: &tonic::Status) -> Outcome {
    use tonic::Code::*;
    match s.code() {
        InvalidArgument | FailedPrecondition | NotFound | PermissionDenied | Unauthenticated | AlreadyExists => {
            Outcome::Failed(format!("{:?}: {}", s.code(), s.message()))
        }
        _ => Outcome::Indeterminate(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn pid(key: u64) -> Option<v1::PointId> {
    Some(v1::PointId {
        kind: Some(v1::point_id::Kind::Num(key)),
    })
}

fn int(v: &v1::Point, field: &str) -> Option<u64> {
    match v.payload.get(field).and_then(|v| v.kind.clone()) {
        Some(v1::value::Kind::IntegerValue(x)) => Some(x as u64),
        _ => None,
    }
}

fn num_id(p: &v1::Point) -> u64 {
    match p.id.as_ref().and_then(|i| i.kind.clone()) {
        Some(v1::point_id::Kind::Num(n)) => n,
        _ => u64::MAX,
    }
}

/// A point of region `r` (index) with `value`, carrying the region's canary.
pub fn point(w: &Workload, r: usize, key: u64, value: u64, vector: Vec<f32>, expires_at_ms: u64) -> v1::Point {
    v1::Point {
        id: pid(key),
        vector,
        subject: format!("s{key}"),
        region: w.regions[r].clone(),
        lawful_basis: v1::LawfulBasis::Consent as i32,
        expires_at_ms,
        payload: [
            (
                "v".to_string(),
                v1::Value {
                    kind: Some(v1::value::Kind::IntegerValue(value as i64)),
                },
            ),
            (
                "c".to_string(),
                v1::Value {
                    kind: Some(v1::value::Kind::StringValue(w.canaries[r].clone())),
                },
            ),
        ]
        .into(),
        ..Default::default()
    }
}

/// The API clients of one node.
#[derive(Clone)]
pub struct Clients {
    pub points: v1::points_client::PointsClient<Keyed>,
    pub search: v1::search_client::SearchClient<Keyed>,
    pub scoped: v1::search_client::SearchClient<Keyed>,
    pub erasure: v1::erasure_client::ErasureClient<Keyed>,
    pub admin: v1::admin_client::AdminClient<Keyed>,
    pub collections: v1::collections_client::CollectionsClient<Keyed>,
}

type Keyed = sovra_node::dev::Keyed;

impl Clients {
    /// Lazily connected: a node that is down fails each call, not this.
    pub fn new(addr: std::net::SocketAddr, ca: &std::path::Path, admin_key: &str, scoped_key: &str) -> Clients {
        let ch = sovra_node::client::endpoint(&addr.to_string(), Some(ca))
            .expect("an address and a readable CA")
            .connect_timeout(Duration::from_secs(2))
            // Every call ends: a node that never answers one (seen in the
            // soak while meta was stuck) must not hang the harness.
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        let k = |key: &str| sovra_node::dev::keyed(&ch, key);
        Clients {
            points: v1::points_client::PointsClient::new(k(admin_key)),
            search: v1::search_client::SearchClient::new(k(admin_key)),
            scoped: v1::search_client::SearchClient::new(k(scoped_key)),
            erasure: v1::erasure_client::ErasureClient::new(k(admin_key)),
            admin: v1::admin_client::AdminClient::new(k(admin_key)),
            collections: v1::collections_client::CollectionsClient::new(k(admin_key)),
        }
    }
}

fn timed<T>(t: Duration, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(t);
    r
}

/// Erases `key`'s point (by id) through `c`; the outcome for the history.
pub async fn erase(w: &Workload, c: &mut Clients, r: usize, key: u64) -> Outcome {
    let req = v1::EraseRequest {
        collection: w.collection.clone(),
        region: w.regions[r].clone(),
        target: Some(v1::erase_request::Target::Ids(v1::EraseIds {
            ids: vec![pid(key).expect("set")],
        })),
    };
    match c.erasure.erase(timed(w.timeout * 2, req)).await {
        Ok(_) => Outcome::Ok { found: None },
        Err(s) => outcome_of(&s),
    }
}

/// Registers region `r`'s opt-out likeness through `c`.
pub async fn opt_out(w: &Workload, c: &mut Clients, r: usize) -> Outcome {
    let req = v1::RegisterOptOutRequest {
        collection: w.collection.clone(),
        region: w.regions[r].clone(),
        vector: likeness(r as u64),
        threshold: LIKENESS_THRESHOLD,
        subject: String::new(),
    };
    match c.erasure.register_opt_out(timed(w.timeout * 2, req)).await {
        Ok(_) => Outcome::Ok { found: None },
        Err(s) => outcome_of(&s),
    }
}

/// A linearizable (or `any`) get of `key` in `collection`.
pub async fn get(w: &Workload, c: &mut Clients, collection: &str, r: usize, key: u64, linearizable: bool) -> Outcome {
    let req = v1::GetPointsRequest {
        collection: collection.to_string(),
        region: w.regions[r].clone(),
        ids: vec![pid(key).expect("set")],
        consistency: if linearizable {
            v1::Consistency::Linearizable as i32
        } else {
            v1::Consistency::Any as i32
        },
        with_payload: true,
        ..Default::default()
    };
    match c.points.get(timed(w.timeout, req)).await {
        Ok(a) => Outcome::Ok {
            found: a.into_inner().points.first().and_then(|p| int(p, "v")),
        },
        Err(s) => outcome_of(&s),
    }
}

/// A search through `c`: with the admin key, or (`scoped`) the key that may
/// read only `c`'s region; `exact` lists everything (k large). Its call for
/// the history is [`search_call`].
pub async fn search(w: &Workload, c: &mut Clients, scoped: bool, vector: Vec<f32>, k: u32, exact: bool) -> Outcome {
    let req = v1::SearchRequest {
        collection: w.collection.clone(),
        vector,
        k,
        with_payload: true,
        allow_partial: !exact,
        exact,
        ..Default::default()
    };
    let client = if scoped { &mut c.scoped } else { &mut c.search };
    match client.search(timed(w.timeout, req)).await {
        Ok(a) => Outcome::Hits(
            a.into_inner()
                .hits
                .into_iter()
                .filter_map(|h| h.point)
                .map(|p| Hit {
                    key: num_id(&p),
                    value: int(&p, "v").unwrap_or(u64::MAX),
                    region: p.region.clone(),
                })
                .collect(),
        ),
        Err(s) => outcome_of(&s),
    }
}

/// The search call [`search`] makes through a node of region `r`, with the
/// regions its key and the policies let it read.
pub fn search_call(w: &Workload, r: usize, scoped: bool) -> Call {
    let mut may_read = vec![w.regions[r].clone()];
    if !scoped {
        may_read.extend(w.results_to[r].iter().cloned());
    }
    Call::Search { may_read }
}

/// Records one operation: invoked now, ended when `f` answers.
pub async fn record<F: std::future::Future<Output = Outcome>>(w: &Workload, process: u32, key: u64, call: Call, f: F) -> Op {
    let invoked_ms = now_ms();
    let invoked = w.clock.fetch_add(1, Ordering::SeqCst);
    let outcome = f.await;
    let returned = w.clock.fetch_add(1, Ordering::SeqCst);
    Op {
        process,
        key,
        call,
        invoked,
        returned: Some(returned),
        outcome,
        invoked_ms,
    }
}

/// One client, through the nodes `addrs` of region `r` (the first, then the
/// next after a call that found it unreachable), until the run stops.
pub async fn client(process: u32, r: usize, addrs: Vec<std::net::SocketAddr>, w: std::sync::Arc<Workload>) -> Vec<Op> {
    let mut rng = Rng::new(w.seed, process as u64 + 1);
    let nodes: Vec<Clients> = addrs
        .iter()
        .map(|a| Clients::new(*a, &w.ca, &w.admin_key, &w.scoped_keys[r]))
        .collect();
    let mut at = (process as usize) % nodes.len();
    let base = r as u64 * REGION_KEYS;
    let mut out = Vec::new();
    while !w.stop.load(Ordering::Relaxed) {
        let mut c = nodes[at].clone();
        let i = rng.below(w.keys);
        let dice = rng.below(100);
        let value = w.values.fetch_add(1, Ordering::Relaxed);
        let near = vec![rng.unit() * 10.0, rng.unit() * 10.0, rng.unit() * 10.0, rng.unit() * 10.0];
        let op = match dice {
            0..=27 => {
                let key = base + i;
                let p = point(&w, r, key, value, near, 0);
                record(&w, process, key, Call::Upsert { value }, upsert(&w, &mut c, &w.collection, p)).await
            }
            28..=33 => {
                let key = base + i;
                record(&w, process, key, Call::Delete, delete(&w, &mut c, r, key)).await
            }
            34..=58 => {
                // Linearizable up to 51, `any` above.
                let (key, linearizable) = (base + i, dice <= 51);
                let read = get(&w, &mut c, &w.collection, r, key, linearizable);
                record(&w, process, key, Call::Get { linearizable }, read).await
            }
            59..=68 => {
                let scoped = rng.below(3) == 0;
                let call = search_call(&w, r, scoped);
                record(&w, process, base, call, search(&w, &mut c, scoped, near, 10, false)).await
            }
            69..=71 => {
                let key = base + i;
                record(&w, process, key, Call::Erase, erase(&w, &mut c, r, key)).await
            }
            72..=79 => {
                let key = base + EXPIRING_KEYS + i;
                let expires_at_ms = now_ms() + 500 + rng.below(2500);
                let p = point(&w, r, key, value, near, expires_at_ms);
                record(
                    &w,
                    process,
                    key,
                    Call::UpsertExpiring { value, expires_at_ms },
                    upsert(&w, &mut c, &w.collection, p),
                )
                .await
            }
            80..=84 => {
                let key = base + EXPIRING_KEYS + i;
                record(
                    &w,
                    process,
                    key,
                    Call::Get { linearizable: false },
                    get(&w, &mut c, &w.collection, r, key, false),
                )
                .await
            }
            85..=87 => {
                let key = base + LIKENESS_KEYS + i;
                let mut v = likeness(r as u64);
                v[1] += rng.unit() * 0.3;
                let p = point(&w, r, key, value, v, 0);
                record(
                    &w,
                    process,
                    key,
                    Call::UpsertLikeness { value },
                    upsert(&w, &mut c, &w.collection, p),
                )
                .await
            }
            88..=89 => {
                // A point of another region through this node: R2 refuses it.
                let other = (r + 1) % w.regions.len();
                let key = other as u64 * REGION_KEYS + LIKENESS_KEYS + 50 + i;
                let p = point(&w, other, key, value, near, 0);
                let call = Call::ForeignUpsert {
                    value,
                    region: w.regions[other].clone(),
                };
                record(&w, process, key, call, upsert(&w, &mut c, &w.collection, p)).await
            }
            90..=95 => {
                let key = base + MOVABLE_KEYS + i;
                let p = point(&w, r, key, value, near, 0);
                record(&w, process, key, Call::Upsert { value }, upsert(&w, &mut c, &w.movable, p)).await
            }
            _ => {
                let key = base + MOVABLE_KEYS + i;
                record(
                    &w,
                    process,
                    key,
                    Call::Get { linearizable: true },
                    get(&w, &mut c, &w.movable, r, key, true),
                )
                .await
            }
        };
        // A node that did not answer: the next call goes to another.
        if let Outcome::Indeterminate(why) = &op.outcome
            && (why.starts_with("Unavailable") || why.starts_with("Unknown") || why.starts_with("Cancelled") || why.contains("transport"))
        {
            at = (at + 1) % nodes.len();
        }
        out.push(op);
    }
    out
}

async fn upsert(w: &Workload, c: &mut Clients, collection: &str, p: v1::Point) -> Outcome {
    let req = v1::UpsertRequest {
        collection: collection.to_string(),
        points: vec![p],
    };
    match c.points.upsert(timed(w.timeout, req)).await {
        Ok(_) => Outcome::Ok { found: None },
        Err(s) => outcome_of(&s),
    }
}

async fn delete(w: &Workload, c: &mut Clients, r: usize, key: u64) -> Outcome {
    let req = v1::DeletePointsRequest {
        collection: w.collection.clone(),
        region: w.regions[r].clone(),
        ids: vec![pid(key).expect("set")],
    };
    match c.points.delete(timed(w.timeout, req)).await {
        Ok(_) => Outcome::Ok { found: None },
        Err(s) => outcome_of(&s),
    }
}
