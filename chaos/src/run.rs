//! One chaos run, decided by its seed: a 2-region cluster of real `sovra
//! node` processes (uk on hosts 1-4, us on hosts 5-7, each in its own network
//! namespace; the fourth uk node gives moves and drains of 3-replica shards
//! somewhere to go), clients in an eighth namespace working through nodes of
//! both regions, the nemesis injecting faults for the load period, then a
//! final heal, final reads, and every checker. The run's directory keeps
//! the history (`history.jsonl`), the summary and every node's log.

use crate::cluster::{Cluster, METRICS_PORT};
use crate::history::{self, Breach, Call, LIKENESS_KEYS, MOVABLE_KEYS, Op, Outcome, REGION_KEYS};
use crate::net::Net;
use crate::workload::{self, Clients, Rng, Workload};
use serde::Serialize;
use sovra_proto::v1;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const REGIONS: [&str; 2] = ["uk", "us"];
/// The node hosts' regions (host i+1 at position i); the client host is next.
pub const HOSTS: [&str; 7] = ["uk", "uk", "uk", "uk", "us", "us", "us"];
const CLIENT_HOST: usize = 8;
const COLLECTION: &str = "chaos";
const MOVABLE: &str = "movable";
/// The logical process numbers of what is not a client.
const NEMESIS_PROCESS: u32 = 1000;
const FINAL_PROCESS: u32 = 2000;

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Seconds of load (the nemesis acts during them).
    pub load_secs: u64,
    /// A chaos switch the nodes run with (test builds only).
    pub switch: Option<String>,
    /// Inject faults (a breaking run may go without).
    pub faults: bool,
    pub clients_per_region: usize,
    /// Keys per kind per region.
    pub keys: u64,
    /// Where the run's files go.
    pub dir: PathBuf,
    /// Namespace prefix and the net's third octet (unique per concurrent run).
    pub prefix: String,
    pub net: u8,
}

impl Options {
    /// The command that runs this schedule again.
    pub fn reproduce(&self) -> String {
        let mut c = format!(
            "target/debug/sovra-chaos run --seed {} --secs {} --clients {} --keys {}",
            self.seed, self.load_secs, self.clients_per_region, self.keys
        );
        if let Some(s) = &self.switch {
            c.push_str(&format!(" --switch {s}"));
        }
        if !self.faults {
            c.push_str(" --no-faults");
        }
        c
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub switch: Option<String>,
    pub ops: usize,
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Faults actually injected, by kind.
    pub faults: BTreeMap<String, u32>,
    /// Faults the nemesis tried that the cluster refused (with why).
    pub refused: Vec<String>,
    /// Each violation: invariant, then what happened.
    pub violations: Vec<(String, String)>,
    /// What the final phase could not confirm in time (a node not back up, a
    /// job not ended): reported, and a failure of the run.
    pub stuck: Vec<String>,
    /// Writes of another region's points attempted through a node, and how
    /// many the nodes' refusal counters show.
    pub foreign_attempts: usize,
    pub residency_refusals_counted: u64,
    pub seconds: f64,
    pub dir: PathBuf,
    /// The nemesis's actions, in order.
    pub timeline: Vec<String>,
    /// Keys whose linearizability the checker could not decide within its
    /// budget: a failure of a strict run, a warning in CI.
    pub undecided: Vec<String>,
}

impl Summary {
    pub fn broken(&self) -> BTreeSet<String> {
        self.violations.iter().map(|(i, _)| i.clone()).collect()
    }
}

/// Runs one schedule. Errors are the harness's own failures (the cluster
/// would not start); violations are in the summary.
pub fn run(o: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    std::fs::create_dir_all(&o.dir)?;
    let net = Net::create(&o.prefix, o.net, CLIENT_HOST)?;
    let client_ns = net.ns(CLIENT_HOST);
    let switch = o.switch.clone();
    let env = move |host: usize| -> Vec<(String, String)> {
        match switch.as_deref() {
            // One replica diverges; the others stay right.
            Some("diverge") if host != 2 => Vec::new(),
            Some(s) => vec![("SOVRA_CHAOS_BREAK".into(), s.into())],
            None => Vec::new(),
        }
    };
    let cluster = Cluster::start_with(net, &o.dir, &HOSTS, env)?;
    let cluster = Arc::new(Mutex::new(cluster));
    let (c2, o2) = (cluster.clone(), o.clone());
    let out = workload::in_namespace(&client_ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(drive(c2, o2))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the run's thread panicked"))?;
    let (mut summary, ops) = out?;
    // R2 at rest, after everything (outside the namespaces: files only).
    let c = cluster.lock().expect("not poisoned");
    let canaries: BTreeMap<String, Vec<u8>> = REGIONS
        .iter()
        .enumerate()
        .map(|(i, r)| (r.to_string(), canary(o.seed, i).into_bytes()))
        .collect();
    let mut places = Vec::new();
    for h in 1..=HOSTS.len() {
        places.push((HOSTS[h - 1].to_string(), c.data_dir(h)));
        places.push((HOSTS[h - 1].to_string(), c.log_file(h)));
    }
    for s in crate::residency::check(&places, &canaries) {
        summary.violations.push((
            "R2".into(),
            format!(
                "a node of {} holds region {}'s canary in {}",
                s.node_region,
                s.canary_region,
                s.file.display()
            ),
        ));
    }
    drop(c);
    summary.seconds = started.elapsed().as_secs_f64();
    summary.dir = o.dir.clone();
    let history: String = ops
        .iter()
        .map(|op| serde_json::to_string(op).expect("serialisable") + "\n")
        .collect();
    std::fs::write(o.dir.join("history.jsonl"), history)?;
    std::fs::write(o.dir.join("nemesis.log"), summary.timeline.join("\n") + "\n")?;
    std::fs::write(o.dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// Region `r`'s canary in run `seed`: in every point's payload, and nowhere
/// else.
pub fn canary(seed: u64, r: usize) -> String {
    format!("canary-{}-{seed:x}-Zq7", REGIONS[r])
}

fn addr(c: &Cluster, host: usize) -> SocketAddr {
    c.grpc(host).parse().expect("an address")
}

fn region_hosts(r: usize) -> Vec<usize> {
    (1..=HOSTS.len()).filter(|h| HOSTS[h - 1] == REGIONS[r]).collect()
}

/// Retries `f` until it succeeds or `limit` passes.
async fn until<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(20), f())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("an attempt took over 20 s")));
        match attempt {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() >= deadline => anyhow::bail!("{what} not within {limit:?}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn drive(cluster: Arc<Mutex<Cluster>>, o: Options) -> anyhow::Result<(Summary, Vec<Op>)> {
    let (addrs, admin_key, ca): (Vec<SocketAddr>, String, PathBuf) = {
        let c = cluster.lock().expect("not poisoned");
        ((1..=HOSTS.len()).map(|h| addr(&c, h)).collect(), c.admin_key.clone(), c.ca())
    };
    let mut summary = Summary {
        seed: o.seed,
        switch: o.switch.clone(),
        ..Default::default()
    };
    let w = setup(&addrs, &ca, &admin_key, &o).await?;
    let w = Arc::new(w);
    let mut clients = Vec::new();
    for (r, _) in REGIONS.iter().enumerate() {
        let hosts: Vec<SocketAddr> = region_hosts(r).into_iter().map(|h| addrs[h - 1]).collect();
        for i in 0..o.clients_per_region {
            let p = (r * o.clients_per_region + i) as u32;
            clients.push(tokio::spawn(workload::client(p, r, hosts.clone(), w.clone())));
        }
    }
    let nemesis = Nemesis {
        cluster: cluster.clone(),
        w: w.clone(),
        rng: Rng::new(o.seed, 0xBAD),
        addrs: addrs.clone(),
        killed: BTreeSet::new(),
        paused: BTreeSet::new(),
        faults: BTreeMap::new(),
        refused: Vec::new(),
        ops: Vec::new(),
        splits: 0,
        opted: BTreeSet::new(),
        t0: Instant::now(),
        timeline: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(o.load_secs);
    let mut nemesis = nemesis.run(deadline, o.faults).await;
    w.stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for c in clients {
        ops.extend(c.await?);
    }
    // The final heal: every fault undone.
    nemesis.heal_all().await;
    summary.faults = nemesis.faults.clone();
    summary.timeline = std::mem::take(&mut nemesis.timeline);
    summary.refused = nemesis.refused.clone();
    ops.append(&mut nemesis.ops);
    let heal_at = w.clock.fetch_add(1, Ordering::SeqCst);
    let mut stuck = Vec::new();
    if let Err(e) = all_up(&addrs, &ca, &admin_key).await {
        stuck.push(format!("{e:#}"));
    }
    if let Err(e) = jobs_end(&w, &addrs).await {
        stuck.push(format!("{e:#}"));
    }
    // Final reads: every register key, linearizably; then everything each
    // region's coordinator may list.
    let mut finals = BTreeMap::new();
    // One bound for all final reads (a stuck cluster must not cost a minute
    // per key); past it each key still gets one try.
    let reads_until = Instant::now() + Duration::from_secs(90);
    for (r, _) in REGIONS.iter().enumerate() {
        let hosts = region_hosts(r);
        for kind in [0, MOVABLE_KEYS] {
            for i in 0..o.keys {
                let key = r as u64 * REGION_KEYS + kind + i;
                let collection = if kind == MOVABLE_KEYS { &w.movable } else { &w.collection };
                match final_read(&w, &addrs, &hosts, collection, r, key, reads_until).await {
                    Some(op) => {
                        if let Outcome::Ok { found } = op.outcome {
                            finals.insert(key, found);
                        }
                        ops.push(op);
                    }
                    None => stuck.push(format!("key {key} ({collection}) could not be read after the final heal")),
                }
            }
        }
        for (j, h) in hosts.iter().enumerate() {
            let mut c = Clients::new(addrs[h - 1], &w.ca, &w.admin_key, &w.scoped_keys[r]);
            let scoped = j % 2 == 1;
            let listed = workload::search(&w, &mut c, scoped, vec![5.0; 4], 1000, true);
            let call = workload::search_call(&w, r, scoped);
            ops.push(workload::record(&w, FINAL_PROCESS, r as u64 * REGION_KEYS, call, listed).await);
        }
    }
    if let Err(e) = converged(&w, &addrs).await {
        summary.violations.push(("D1".into(), format!("replicas did not converge: {e:#}")));
    }
    summary.residency_refusals_counted = refusals_counted(&addrs).await;
    summary.foreign_attempts = ops.iter().filter(|o| matches!(o.call, Call::ForeignUpsert { .. })).count();
    summary.stuck = stuck;
    judge(&mut summary, &ops, &finals, heal_at);
    ops.sort_by_key(|o| o.invoked);
    Ok((summary, ops))
}

/// Judges a kept history again (`history.jsonl` of a run's directory) with
/// the history checkers; what needed the live cluster (digests, files at
/// rest, counters) is not judged again.
pub fn rejudge(ops: &[Op]) -> Summary {
    let finals: BTreeMap<u64, Option<u64>> = ops
        .iter()
        .filter(|o| o.process == FINAL_PROCESS)
        .filter_map(|o| match (&o.call, &o.outcome) {
            (Call::Get { .. }, Outcome::Ok { found }) => Some((o.key, *found)),
            _ => None,
        })
        .collect();
    let heal_at = ops
        .iter()
        .filter(|o| o.process == FINAL_PROCESS)
        .map(|o| o.invoked)
        .min()
        .unwrap_or(u64::MAX)
        .saturating_sub(1);
    let mut s = Summary::default();
    judge(&mut s, ops, &finals, heal_at);
    s
}

/// Every checker over the history.
pub fn judge(summary: &mut Summary, ops: &[Op], finals: &BTreeMap<u64, Option<u64>>, heal_at: u64) {
    summary.ops = ops.len();
    for op in ops {
        match op.outcome {
            Outcome::Ok { .. } | Outcome::Hits(_) => summary.ok += 1,
            Outcome::Failed(_) => summary.failed += 1,
            Outcome::Indeterminate(_) => summary.indeterminate += 1,
        }
    }
    for (key, v) in history::check_linearizable(ops) {
        match v.too_long {
            Some(n) => summary.undecided.push(format!(
                "key {key}: linearizability undecided ({n} operations, past the search budget)"
            )),
            None => summary
                .violations
                .push(("D1".into(), format!("key {key} is not linearizable: {v:?}"))),
        }
    }
    let mut breaches: Vec<Breach> = Vec::new();
    breaches.extend(history::check_final(ops, finals));
    breaches.extend(history::check_erasures(ops, Some(heal_at)));
    breaches.extend(history::check_scope(ops));
    breaches.extend(history::check_expiry(ops));
    breaches.extend(history::check_optouts(ops));
    breaches.extend(history::check_foreign(ops));
    for b in breaches {
        summary.violations.push((b.invariant().into(), format!("{b:?}")));
    }
}

/// Collections, policies and keys; returns once every shard has a leader.
async fn setup(addrs: &[SocketAddr], ca: &Path, admin_key: &str, o: &Options) -> anyhow::Result<Workload> {
    let ch = sovra_node::dev::wait_serving_with(addrs[0], Some(ca), Duration::from_secs(60)).await?;
    let mut cols = v1::collections_client::CollectionsClient::new(sovra_node::dev::keyed(&ch, admin_key));
    let mut admin = v1::admin_client::AdminClient::new(sovra_node::dev::keyed(&ch, admin_key));
    all_up(addrs, ca, admin_key).await?;
    let spec = sovra_node::dev::spanning_spec(COLLECTION, 4, v1::Metric::L2, &REGIONS, 2, 3);
    cols.create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await?;
    let spec = sovra_node::dev::spanning_spec(MOVABLE, 4, v1::Metric::L2, &REGIONS, 1, 2);
    cols.create_collection(v1::CreateCollectionRequest { collection: Some(spec) })
        .await?;
    // us results may go to uk coordinators; uk's stay in uk.
    admin
        .set_region_policy(v1::SetRegionPolicyRequest {
            policy: Some(v1::RegionPolicy {
                region: "us".into(),
                results_may_go_to: vec!["uk".into()],
            }),
        })
        .await?;
    let mut scoped_keys = Vec::new();
    for r in REGIONS {
        let k = admin
            .create_key(v1::CreateKeyRequest {
                rate: None,
                id: format!("{r}-reader"),
                scopes: Some(v1::KeyScopes {
                    read_regions: vec![r.into()],
                    ..Default::default()
                }),
            })
            .await?;
        scoped_keys.push(k.into_inner().key);
    }
    // Every node serves, knows the collections, and every shard has a leader.
    for a in addrs {
        sovra_node::dev::wait_serving_with(*a, Some(ca), Duration::from_secs(60)).await?;
    }
    until(Duration::from_secs(90), "a leader for every shard", || async {
        let mut led = BTreeSet::new();
        let mut all = BTreeSet::new();
        for (_, name, s) in shard_views(addrs, ca, admin_key, false).await? {
            all.insert((name, s.region.clone(), s.number));
            if s.held && s.leader != 0 {
                led.insert((name, s.region.clone(), s.number));
            }
        }
        anyhow::ensure!(led == all, "{} of {} shards have a leader", led.len(), all.len());
        Ok(())
    })
    .await?;
    Ok(Workload {
        collection: COLLECTION.into(),
        movable: MOVABLE.into(),
        regions: REGIONS.iter().map(|r| r.to_string()).collect(),
        keys: o.keys,
        seed: o.seed,
        admin_key: admin_key.into(),
        scoped_keys,
        ca: ca.to_path_buf(),
        results_to: vec![vec!["us".into()], vec![]],
        canaries: (0..REGIONS.len()).map(|r| canary(o.seed, r)).collect(),
        clock: AtomicU64::new(0),
        values: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        timeout: Duration::from_secs(6),
    })
}

/// A linearizable read of `key` through any node of its region, retried
/// until `deadline` (tried once, if that has passed); recorded.
#[allow(clippy::too_many_arguments)]
async fn final_read(
    w: &Workload,
    addrs: &[SocketAddr],
    hosts: &[usize],
    collection: &str,
    r: usize,
    key: u64,
    deadline: Instant,
) -> Option<Op> {
    let mut i = 0;
    while i == 0 || Instant::now() < deadline {
        let mut c = Clients::new(addrs[hosts[i % hosts.len()] - 1], &w.ca, &w.admin_key, &w.scoped_keys[r]);
        i += 1;
        let op = workload::record(
            w,
            FINAL_PROCESS,
            key,
            Call::Get { linearizable: true },
            workload::get(w, &mut c, collection, r, key, true),
        )
        .await;
        if let Outcome::Ok { .. } = op.outcome {
            return Some(op);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn all_up(addrs: &[SocketAddr], ca: &Path, admin_key: &str) -> anyhow::Result<()> {
    until(Duration::from_secs(90), "every node up after the heal", || async {
        let mut c = Clients::new(addrs[0], ca, admin_key, "");
        let s = c.admin.cluster_status(v1::ClusterStatusRequest {}).await?.into_inner();
        let down: Vec<String> = s
            .nodes
            .iter()
            .filter(|n| n.state != "up")
            .map(|n| format!("node {} {}", n.id, n.state))
            .collect();
        anyhow::ensure!(down.is_empty() && s.nodes.len() == addrs.len(), "{down:?}");
        Ok(())
    })
    .await
}

async fn jobs_end(w: &Workload, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    until(Duration::from_secs(120), "every operations job ended", || async {
        let mut c = Clients::new(addrs[0], &w.ca, &w.admin_key, "");
        let jobs = c.admin.list_jobs(v1::ListJobsRequest {}).await?.into_inner().jobs;
        let running: Vec<String> = jobs
            .iter()
            .filter(|j| j.state == "running")
            .map(|j| format!("{} {} ({})", j.kind, j.job, j.progress))
            .collect();
        anyhow::ensure!(running.is_empty(), "still running: {running:?}");
        Ok(())
    })
    .await
}

/// Every shard of both collections as each node (numbered from 1) sees it.
async fn shard_views(
    addrs: &[SocketAddr],
    ca: &Path,
    key: &str,
    with_digest: bool,
) -> anyhow::Result<Vec<(u64, &'static str, v1::ShardInfo)>> {
    let mut out = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut c = Clients::new(*a, ca, key, "");
        for name in [COLLECTION, MOVABLE] {
            let info = c
                .collections
                .get_collection(v1::GetCollectionRequest {
                    name: name.into(),
                    with_digest,
                })
                .await?
                .into_inner();
            out.extend(info.shards.into_iter().map(|s| (i as u64 + 1, name, s)));
        }
    }
    Ok(out)
}

/// D1: every shard's replicas reach equal digests within a bound (after
/// the heal, with no writes).
async fn converged(w: &Workload, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    until(Duration::from_secs(30), "replica digests equal", || async {
        // (collection, region, shard) -> (its replicas, digest per node that answered).
        type Digests = (BTreeSet<u64>, BTreeMap<u64, u64>);
        let mut by_shard: BTreeMap<(&str, String, u32), Digests> = BTreeMap::new();
        for (node, name, s) in shard_views(addrs, &w.ca, &w.admin_key, true).await? {
            let e = by_shard.entry((name, s.region.clone(), s.number)).or_default();
            e.0.extend(s.replicas.iter().copied());
            if s.held
                && let Some(d) = s.digest
            {
                e.1.insert(node, d);
            }
        }
        let mut bad = Vec::new();
        for ((name, region, n), (replicas, digests)) in &by_shard {
            let missing: Vec<_> = replicas.iter().filter(|r| !digests.contains_key(r)).collect();
            let distinct: BTreeSet<_> = digests.values().collect();
            if !missing.is_empty() || distinct.len() > 1 {
                bad.push(format!("{name}/{region}/{n}: digests {digests:?}, no digest from {missing:?}"));
            }
        }
        anyhow::ensure!(bad.is_empty(), "{}", bad.join("; "));
        Ok(())
    })
    .await
}

/// The nodes' R2 refusal counters (`sovra_residency_refused_total`), summed;
/// a node restarted since counts from zero.
async fn refusals_counted(addrs: &[SocketAddr]) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = 0;
    for a in addrs {
        let m = SocketAddr::new(a.ip(), METRICS_PORT);
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(m)).await else {
            continue;
        };
        let _ = s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {m}\r\n\r\n").as_bytes()).await;
        let mut body = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await;
        total += body
            .lines()
            .filter(|l| l.starts_with("sovra_residency_refused_total"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// The faults the nemesis draws from.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    KillTwo,
    KillMetaLeader,
    PauseLeader,
    Halves,
    IsolateLeader,
    RegionCut,
    Move,
    Drain,
    Split,
}

const FAULTS: [Fault; 10] = [
    Fault::Kill,
    Fault::KillTwo,
    Fault::KillMetaLeader,
    Fault::PauseLeader,
    Fault::Halves,
    Fault::IsolateLeader,
    Fault::RegionCut,
    Fault::Move,
    Fault::Drain,
    Fault::Split,
];

struct Nemesis {
    cluster: Arc<Mutex<Cluster>>,
    w: Arc<Workload>,
    rng: Rng,
    addrs: Vec<SocketAddr>,
    killed: BTreeSet<usize>,
    paused: BTreeSet<usize>,
    faults: BTreeMap<String, u32>,
    refused: Vec<String>,
    ops: Vec<Op>,
    splits: u32,
    /// Regions whose opt-out was attempted.
    opted: BTreeSet<usize>,
    t0: Instant,
    /// What the nemesis did, when (seconds into the load).
    timeline: Vec<String>,
}

impl Nemesis {
    fn count(&mut self, kind: &str) {
        *self.faults.entry(kind.into()).or_default() += 1;
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>7.2}s {what}", self.t0.elapsed().as_secs_f64());
        self.timeline.push(line);
    }

    /// Blocking work on the cluster (signals, restarts, nftables) off the
    /// async workers.
    async fn on_cluster<T: Send + 'static>(&self, f: impl FnOnce(&mut Cluster) -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
        let c = self.cluster.clone();
        tokio::task::spawn_blocking(move || f(&mut c.lock().expect("not poisoned"))).await?
    }

    async fn sleep_ms(&mut self, lo: u64, hi: u64) {
        let ms = lo + self.rng.below(hi - lo + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn clients(&self, host: usize, r: usize) -> Clients {
        Clients::new(self.addrs[host - 1], &self.w.ca, &self.w.admin_key, &self.w.scoped_keys[r])
    }

    fn up_host(&mut self, r: usize) -> usize {
        let hosts: Vec<usize> = region_hosts(r)
            .into_iter()
            .filter(|h| !self.killed.contains(h) && !self.paused.contains(h))
            .collect();
        hosts[self.rng.below(hosts.len() as u64) as usize]
    }

    async fn run(mut self, until: Instant, faults: bool) -> Nemesis {
        if !faults {
            // A breaking run without faults still registers each region's
            // opt-out a third of the way in, and erases.
            let third = (until - Instant::now()) / 3;
            tokio::time::sleep(third).await;
            for r in 0..REGIONS.len() {
                self.opt_out(r).await;
            }
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            return self;
        }
        self.sleep_ms(1000, 2000).await;
        while Instant::now() + Duration::from_secs(3) < until {
            let f = FAULTS[self.rng.below(FAULTS.len() as u64) as usize];
            if let Err(e) = self.inject(f).await {
                self.note(format!("{f:?} not injected: {e:#}"));
                self.refused.push(format!("{f:?}: {e:#}"));
            }
            self.heal_all().await;
            self.sleep_ms(1000, 2500).await;
        }
        for r in 0..REGIONS.len() {
            if !self.opted.contains(&r) {
                self.opt_out(r).await;
            }
        }
        self
    }

    /// An erasure and (half the time) an opt-out, recorded, through a node
    /// of a random region, while a partition stands.
    async fn during_partition(&mut self) {
        let r = self.rng.below(REGIONS.len() as u64) as usize;
        let key = r as u64 * REGION_KEYS + self.rng.below(self.w.keys);
        let host = self.up_host(r);
        let mut c = self.clients(host, r);
        let w = self.w.clone();
        let op = workload::record(&w, NEMESIS_PROCESS, key, Call::Erase, workload::erase(&w, &mut c, r, key)).await;
        self.note(format!("erase key {key} through node {host}: {:?}", op.outcome));
        self.count("erasure during a partition");
        self.ops.push(op);
        if self.rng.below(2) == 0 {
            self.opt_out(r).await;
            self.count("opt-out during a partition");
        }
    }

    async fn opt_out(&mut self, r: usize) {
        let host = self.up_host(r);
        let mut c = self.clients(host, r);
        let w = self.w.clone();
        let key = r as u64 * REGION_KEYS + LIKENESS_KEYS;
        let op = workload::record(&w, NEMESIS_PROCESS, key, Call::OptOut, workload::opt_out(&w, &mut c, r)).await;
        self.note(format!(
            "opt-out of {}'s likeness through node {host}: {:?}",
            REGIONS[r], op.outcome
        ));
        self.opted.insert(r);
        self.ops.push(op);
    }

    async fn hold(&mut self) {
        self.sleep_ms(2000, 5000).await;
    }

    async fn inject(&mut self, f: Fault) -> anyhow::Result<()> {
        match f {
            Fault::Kill => {
                let h = 1 + self.rng.below(HOSTS.len() as u64) as usize;
                self.kill(h).await?;
                self.count("kill");
                self.hold().await;
            }
            Fault::KillTwo => {
                let (a, b) = (self.up_host(0), self.up_host(1));
                self.kill(a).await?;
                self.kill(b).await?;
                self.count("kill two (one per region)");
                self.hold().await;
            }
            Fault::KillMetaLeader => {
                let l = self.meta_leader().await?;
                self.kill(l).await?;
                self.count("kill the meta leader");
                self.hold().await;
            }
            Fault::PauseLeader => {
                let l = self.shard_leader().await?;
                self.note(format!("SIGSTOP node {l} (a shard leader)"));
                self.on_cluster(move |c| c.pause(l)).await?;
                self.paused.insert(l);
                self.count("pause a shard leader");
                self.hold().await;
            }
            Fault::Halves => {
                let mut hosts: Vec<usize> = (1..=HOSTS.len()).collect();
                for i in (1..hosts.len()).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    hosts.swap(i, j);
                }
                let side: BTreeSet<usize> = hosts[..1 + self.rng.below(3) as usize].iter().copied().collect();
                self.cut_off(side).await?;
                self.count("partition into halves");
                self.during_partition().await;
                self.hold().await;
            }
            Fault::IsolateLeader => {
                let l = if self.rng.below(2) == 0 {
                    self.meta_leader().await?
                } else {
                    self.shard_leader().await?
                };
                self.cut_off(BTreeSet::from([l])).await?;
                self.count("isolate a leader");
                self.during_partition().await;
                self.hold().await;
            }
            Fault::RegionCut => {
                self.cut_off(region_hosts(0).into_iter().collect()).await?;
                self.count("cut a region off");
                self.during_partition().await;
                self.hold().await;
            }
            Fault::Move => {
                let name = if self.rng.below(2) == 0 { MOVABLE } else { COLLECTION };
                let info = self.shard_of(name, 0).await?;
                let replicas: Vec<u64> = info.replicas.clone();
                let from = *replicas
                    .iter()
                    .filter(|r| **r != info.leader)
                    .nth(self.rng.below(replicas.len().max(2) as u64 - 1) as usize)
                    .ok_or_else(|| anyhow::anyhow!("no follower to move"))?;
                let to = region_hosts(0)
                    .into_iter()
                    .map(|h| h as u64)
                    .find(|h| !replicas.contains(h) && !self.killed.contains(&(*h as usize)))
                    .ok_or_else(|| anyhow::anyhow!("no node to move to"))?;
                let host = self.up_host(0);
                let mut c = self.clients(host, 0);
                c.admin
                    .move_replica(v1::MoveReplicaRequest {
                        collection: name.into(),
                        region: "uk".into(),
                        shard: info.number,
                        from,
                        to,
                    })
                    .await?;
                self.note(format!("move {name}/uk/{} from node {from} to node {to}", info.number));
                self.count("move a replica");
                self.hold().await;
            }
            Fault::Drain => {
                let h = self.up_host(0);
                let mut c = self.clients(h, 0);
                let job = c
                    .admin
                    .drain_node(v1::DrainNodeRequest {
                        node: h as u64,
                        concurrency: 0,
                    })
                    .await?
                    .into_inner();
                self.note(format!("drain node {h} ({})", job.job));
                self.count("drain a node");
                // Until the drain ends (bounded), then the node takes replicas again.
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    let jobs = c.admin.list_jobs(v1::ListJobsRequest {}).await.map(|j| j.into_inner().jobs);
                    if jobs.is_ok_and(|js| js.iter().any(|j| j.job == job.job && j.state != "running")) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let _ = c.admin.cancel_job(v1::CancelJobRequest { job: job.job.clone() }).await;
                until(Duration::from_secs(20), "undrain", || {
                    let mut c = c.clone();
                    async move {
                        c.admin.undrain_node(v1::UndrainNodeRequest { node: h as u64 }).await?;
                        Ok(())
                    }
                })
                .await?;
            }
            Fault::Split => {
                anyhow::ensure!(self.splits < 2, "two splits a run at most");
                let r = self.rng.below(REGIONS.len() as u64) as usize;
                let info = self.shard_of(COLLECTION, r).await?;
                let host = self.up_host(r);
                let mut c = self.clients(host, r);
                c.admin
                    .split_shard(v1::SplitShardRequest {
                        collection: COLLECTION.into(),
                        region: REGIONS[r].into(),
                        shard: info.number,
                    })
                    .await?;
                self.note(format!("split {COLLECTION}/{}/{}", REGIONS[r], info.number));
                self.splits += 1;
                self.count("split a shard");
                self.hold().await;
            }
        }
        Ok(())
    }

    async fn kill(&mut self, h: usize) -> anyhow::Result<()> {
        if self.killed.contains(&h) {
            return Ok(());
        }
        self.note(format!("kill -9 node {h}"));
        self.on_cluster(move |c| c.kill(h)).await?;
        self.killed.insert(h);
        Ok(())
    }

    /// Cuts every node of `side` off from every node not in it (the
    /// clients' host still reaches all).
    async fn cut_off(&mut self, side: BTreeSet<usize>) -> anyhow::Result<()> {
        self.note(format!("cut nodes {side:?} off from the other nodes"));
        self.on_cluster(move |c| {
            for a in &side {
                for b in (1..=HOSTS.len()).filter(|b| !side.contains(b)) {
                    c.net.cut(*a, b)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn meta_leader(&mut self) -> anyhow::Result<usize> {
        // Just after a fault the group may be electing: asked a few times.
        for _ in 0..5 {
            let r = self.rng.below(2) as usize;
            let h = self.up_host(r);
            let mut c = self.clients(h, 0);
            if let Ok(s) = c.admin.cluster_status(v1::ClusterStatusRequest {}).await
                && s.get_ref().meta_leader != 0
            {
                return Ok(s.into_inner().meta_leader as usize);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::bail!("no meta leader known")
    }

    /// A random shard of `collection` in region `r`, as a node holding it sees it.
    async fn shard_of(&mut self, collection: &str, r: usize) -> anyhow::Result<v1::ShardInfo> {
        for _ in 0..4 {
            let h = self.up_host(r);
            let mut c = self.clients(h, r);
            let info = c
                .collections
                .get_collection(v1::GetCollectionRequest {
                    name: collection.into(),
                    with_digest: false,
                })
                .await?
                .into_inner();
            let held: Vec<v1::ShardInfo> = info
                .shards
                .into_iter()
                .filter(|s| s.region == REGIONS[r] && s.held && s.leader != 0)
                .collect();
            if !held.is_empty() {
                let i = self.rng.below(held.len() as u64) as usize;
                return Ok(held[i].clone());
            }
        }
        anyhow::bail!("no node of {} holds a led shard of {collection}", REGIONS[r])
    }

    async fn shard_leader(&mut self) -> anyhow::Result<usize> {
        let r = self.rng.below(REGIONS.len() as u64) as usize;
        Ok(self.shard_of(COLLECTION, r).await?.leader as usize)
    }

    /// Undoes every fault: heals the net, resumes paused nodes, restarts
    /// killed ones.
    async fn heal_all(&mut self) {
        let (paused, killed): (Vec<usize>, Vec<usize>) = (
            std::mem::take(&mut self.paused).into_iter().collect(),
            std::mem::take(&mut self.killed).into_iter().collect(),
        );
        self.note(format!("heal: net healed, resume {paused:?}, restart {killed:?}"));
        let r = self
            .on_cluster(move |c| {
                c.net.heal()?;
                for h in paused {
                    c.resume(h)?;
                }
                for h in killed {
                    c.restart(h)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            self.refused.push(format!("heal: {e:#}"));
        }
    }
}
