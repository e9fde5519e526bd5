//! `sovra ctl` commands for operations jobs and API keys: drain, undrain,
//! rebalance (`--dry-run` prints the plan), jobs (list, watch with progress
//! bars, cancel) and keys (create, list, revoke). Each talks the admin API of
//! any node; the meta group records and drives the jobs, so a watch may stop
//! and start again anywhere.

use crate::ctl::{Conn, Format, Table};
use sovra_proto::v1;
use std::time::Duration;

fn status(call: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("{call}: {}", s.message())
}

/// What a job acts on, in a word or two.
fn target(j: &v1::OpJob) -> String {
    match j.kind.as_str() {
        "drain" => format!("node {}", j.node),
        "rebalance" => format!("region {}", j.region),
        "recover" => format!(
            "{}/{}/{} -> {} from node {}",
            j.collection,
            j.region,
            j.shard,
            j.new_shards.first().copied().unwrap_or(0),
            j.from
        ),
        "split" => match j.new_shards[..] {
            [a, b] => format!("{}/{}/{} -> {a}, {b}", j.collection, j.region, j.shard),
            _ => format!("{}/{}/{}", j.collection, j.region, j.shard),
        },
        _ => format!("{}/{}/{}", j.collection, j.region, j.shard),
    }
}

pub fn job_rows(jobs: Vec<v1::OpJob>) -> Table {
    let dash = |n: u64| (n != 0).then_some(n);
    Table {
        columns: vec!["job", "kind", "target", "from", "to", "state", "moves", "progress", "error"],
        rows: jobs
            .into_iter()
            .map(|j| {
                let is_move = j.kind == "move";
                vec![
                    j.job.clone().into(),
                    j.kind.clone().into(),
                    target(&j).into(),
                    (if is_move { dash(j.from) } else { None }).into(),
                    (if is_move { dash(j.to) } else { None }).into(),
                    j.state.clone().into(),
                    format!("{}/{}", j.moves_done, j.moves_total).into(),
                    j.progress.into(),
                    (!j.error.is_empty()).then_some(j.error).into(),
                ]
            })
            .collect(),
    }
}

fn plan_rows(plan: &[v1::PlannedMove]) -> Table {
    Table {
        columns: vec!["move", "shard", "from", "to"],
        rows: plan
            .iter()
            .enumerate()
            .map(|(i, m)| {
                vec![
                    i.into(),
                    format!("{}/{}/{}", m.collection, m.region, m.shard).into(),
                    m.from.into(),
                    m.to.into(),
                ]
            })
            .collect(),
    }
}

async fn list(admin: &mut v1::admin_client::AdminClient<crate::dev::Keyed>) -> anyhow::Result<Vec<v1::OpJob>> {
    Ok(admin
        .list_jobs(v1::ListJobsRequest {})
        .await
        .map_err(status("ListJobs"))?
        .into_inner()
        .jobs)
}

/// Follows `ids` (every running top-level job when empty) until each ends:
/// a progress bar per job on a terminal, a line per change otherwise. The
/// final rows; fails unless every job ended done.
pub async fn watch(c: &Conn, ids: Vec<String>) -> anyhow::Result<String> {
    let mut admin = c.admin().await?;
    let first = list(&mut admin).await?;
    let ids: Vec<String> = if ids.is_empty() {
        first
            .iter()
            .filter(|j| j.state == "running" && j.parent.is_empty())
            .map(|j| j.job.clone())
            .collect()
    } else {
        ids
    };
    if ids.is_empty() {
        return Ok("no job is running".into());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} {wide_msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let bars: Vec<indicatif::ProgressBar> = ids
        .iter()
        .map(|id| {
            let b = multi.add(indicatif::ProgressBar::new(1).with_style(style.clone()));
            b.set_prefix(id.clone());
            b
        })
        .collect();
    if !tty {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last: Vec<String> = vec![String::new(); ids.len()];
    let mut jobs = first;
    loop {
        let mut ended = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let j = jobs
                .iter()
                .find(|j| &j.job == id)
                .ok_or_else(|| anyhow::anyhow!("no job {id} is listed (the last 200 finished are kept)"))?;
            bars[i].set_length(u64::from(j.moves_total.max(1)));
            bars[i].set_position(u64::from(j.moves_done));
            let text = format!("{}: {}", j.state, j.progress);
            if text != last[i] {
                bars[i].set_message(text.clone());
                if !tty {
                    eprintln!("{id}: {text}");
                }
                last[i] = text;
            }
            if j.state != "running" {
                bars[i].finish();
            }
            ended.push(j.state != "running");
        }
        if ended.iter().all(|e| *e) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        jobs = list(&mut admin).await?;
    }
    let done: Vec<v1::OpJob> = ids.iter().filter_map(|id| jobs.iter().find(|j| &j.job == id).cloned()).collect();
    let bad: Vec<String> = done
        .iter()
        .filter(|j| j.state != "done")
        .map(|j| {
            format!(
                "job {} ended {}{}",
                j.job,
                j.state,
                if j.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", j.error)
                }
            )
        })
        .collect();
    let table = job_rows(done).render(c.format);
    anyhow::ensure!(bad.is_empty(), "{}\n{table}", bad.join("; "));
    Ok(table)
}

/// `sovra ctl jobs [--cancel JOB | --watch [--job JOB]...]`.
pub async fn jobs(c: &Conn, cancel: Option<&str>, watch_ids: Option<Vec<String>>) -> anyhow::Result<String> {
    let mut admin = c.admin().await?;
    if let Some(job) = cancel {
        let j = admin
            .cancel_job(v1::CancelJobRequest { job: job.into() })
            .await
            .map_err(status("CancelJob"))?
            .into_inner();
        return Ok(job_rows(vec![j]).render(c.format));
    }
    if let Some(ids) = watch_ids {
        return watch(c, ids).await;
    }
    Ok(job_rows(list(&mut admin).await?).render(c.format))
}

/// A job just started: with `wait`, followed until it ends; else its row.
async fn follow(c: &Conn, job: v1::OpJob, wait: bool) -> anyhow::Result<String> {
    if wait {
        return watch(c, vec![job.job]).await;
    }
    Ok(job_rows(vec![job]).render(c.format))
}

/// `sovra ctl move`: starts the job; with `wait`, follows it until it ends.
pub async fn move_replica(c: &Conn, req: v1::MoveReplicaRequest, wait: bool) -> anyhow::Result<String> {
    let job = c
        .admin()
        .await?
        .move_replica(req)
        .await
        .map_err(status("MoveReplica"))?
        .into_inner();
    follow(c, job, wait).await
}

/// `sovra ctl split`: starts the job; with `wait`, follows it until it ends.
pub async fn split(c: &Conn, req: v1::SplitShardRequest, wait: bool) -> anyhow::Result<String> {
    let job = c.admin().await?.split_shard(req).await.map_err(status("SplitShard"))?.into_inner();
    follow(c, job, wait).await
}

/// `sovra ctl recover`: refused (bad usage) without `--i-accept-lost-writes`;
/// starts the job; with `wait`, follows it until it ends.
pub async fn recover(c: &Conn, req: v1::RecoverShardRequest, accepted: bool, wait: bool) -> anyhow::Result<String> {
    if !accepted {
        return Err(anyhow::Error::new(crate::ctl::Usage(format!(
            "WARNING: rebuilding shard {}/{}/{} from node {} LOSES every write the lost replicas acknowledged after              the survivor's last log entry. Only for a group that lost a majority of its replicas for good.              Pass --i-accept-lost-writes to go on.",
            req.collection, req.region, req.shard, req.survivor
        ))));
    }
    eprintln!(
        "WARNING: rebuilding shard {}/{}/{} from node {}: writes acknowledged after its last log entry are lost",
        req.collection, req.region, req.shard, req.survivor
    );
    let job = c
        .admin()
        .await?
        .recover_shard(req)
        .await
        .map_err(status("RecoverShard"))?
        .into_inner();
    follow(c, job, wait).await
}

/// `sovra ctl drain`.
pub async fn drain(c: &Conn, node: u64, concurrency: u32, wait: bool) -> anyhow::Result<String> {
    let job = c
        .admin()
        .await?
        .drain_node(v1::DrainNodeRequest { node, concurrency })
        .await
        .map_err(status("DrainNode"))?
        .into_inner();
    follow(c, job, wait).await
}

/// `sovra ctl undrain`.
pub async fn undrain(c: &Conn, node: u64) -> anyhow::Result<String> {
    c.admin()
        .await?
        .undrain_node(v1::UndrainNodeRequest { node })
        .await
        .map_err(status("UndrainNode"))?;
    Ok(format!("node {node} takes replicas again (sovra ctl rebalance moves some to it)"))
}

/// `sovra ctl rebalance [--dry-run]`: the plan and every node's replicas
/// before and after it; without a dry run, the job (followed with `wait`).
pub async fn rebalance(c: &Conn, region: &str, concurrency: u32, dry_run: bool, wait: bool) -> anyhow::Result<String> {
    let r = c
        .admin()
        .await?
        .rebalance(v1::RebalanceRequest {
            region: region.into(),
            concurrency,
            dry_run,
        })
        .await
        .map_err(status("Rebalance"))?
        .into_inner();
    if c.format == Format::Json {
        let plan: Vec<serde_json::Value> = r
            .plan
            .iter()
            .map(|m| serde_json::json!({"collection": m.collection, "region": m.region, "shard": m.shard, "from": m.from, "to": m.to}))
            .collect();
        let loads: Vec<serde_json::Value> = r
            .loads
            .iter()
            .map(|l| serde_json::json!({"node": l.node, "zone": l.zone, "before": l.before, "after": l.after}))
            .collect();
        let job = r.job.as_ref().map(|j| j.job.clone());
        if wait && let Some(j) = &job {
            watch(c, vec![j.clone()]).await?;
        }
        return Ok(serde_json::to_string_pretty(
            &serde_json::json!({"plan": plan, "loads": loads, "job": job}),
        )?);
    }
    let loads = Table {
        columns: vec!["node", "zone", "replicas", "after"],
        rows: r
            .loads
            .iter()
            .map(|l| vec![l.node.into(), l.zone.clone().into(), l.before.into(), l.after.into()])
            .collect(),
    };
    let mut out = vec![
        format!("region {region}: {} moves", r.plan.len()),
        plan_rows(&r.plan).render(Format::Table),
        String::new(),
        loads.render(Format::Table),
    ];
    match r.job {
        None => out.push("(dry run: nothing was moved)".into()),
        Some(j) if wait => {
            println!("{}", out.join("\n"));
            return watch(c, vec![j.job]).await;
        }
        Some(j) => out.push(format!("\njob {} started; follow it with sovra ctl jobs --watch", j.job)),
    }
    Ok(out.join("\n"))
}

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Makes a key; its secret is printed this once.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Lowercase letters, digits and '-', starting with a letter.
        #[arg(long)]
        id: String,
        /// Regions it may read, comma-separated ("*" = all).
        #[arg(long, value_delimiter = ',')]
        read_regions: Vec<String>,
        /// Regions it may write, comma-separated ("*" = all).
        #[arg(long, value_delimiter = ',')]
        write_regions: Vec<String>,
        /// Collections it may use, comma-separated (none = all).
        #[arg(long, value_delimiter = ',')]
        collections: Vec<String>,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        data_protection: bool,
        #[command(flatten)]
        rate: RateArgs,
    },
    /// Every key's id, scopes, rate and creation time (never a secret).
    List(Conn),
    /// Sets a key's rate (`--per-second`, `--burst`), or clears it
    /// (`--unlimited`). Every node applies it within about a second.
    Rate {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        id: String,
        #[command(flatten)]
        rate: RateArgs,
        /// No rate: only the nodes' budgets limit the key.
        #[arg(long, conflicts_with_all = ["per_second", "burst"])]
        unlimited: bool,
    },
    /// Every node refuses the key within its key lease.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        id: String,
    },
}

/// A key's rate on the command line.
#[derive(Debug, clap::Args)]
pub struct RateArgs {
    /// Calls a second the key may make on each node (a token bucket).
    #[arg(long)]
    per_second: Option<u32>,
    /// Calls it may make at once after a pause (default: --per-second).
    #[arg(long, requires = "per_second")]
    burst: Option<u32>,
}

impl RateArgs {
    fn to_pb(&self) -> Option<v1::KeyRate> {
        self.per_second.map(|per_second| v1::KeyRate {
            per_second,
            burst: self.burst.unwrap_or(0),
        })
    }
}

fn rate_cell(r: Option<v1::KeyRate>) -> serde_json::Value {
    r.map_or_else(|| "-".into(), |r| format!("{}/s burst {}", r.per_second, r.burst).into())
}

fn scope_cells(s: Option<v1::KeyScopes>) -> Vec<serde_json::Value> {
    let s = s.unwrap_or_default();
    let list = |v: Vec<String>| if v.is_empty() { "-".to_string() } else { v.join(",") };
    vec![
        list(s.read_regions).into(),
        list(s.write_regions).into(),
        (if s.collections.is_empty() {
            "*".to_string()
        } else {
            s.collections.join(",")
        })
        .into(),
        s.admin.into(),
        s.data_protection.into(),
    ]
}

const SCOPE_COLUMNS: [&str; 5] = ["read", "write", "collections", "admin", "data_protection"];

/// Keys as `keys list` shows them: id, scopes, rate, creation time.
fn keys_table(keys: Vec<v1::ApiKey>) -> Table {
    let rows = keys
        .into_iter()
        .map(|k| {
            let mut row = vec![k.id.into()];
            row.extend(scope_cells(k.scopes));
            row.push(rate_cell(k.rate));
            row.push(k.created_ms.into());
            row
        })
        .collect();
    let mut columns = vec!["id"];
    columns.extend(SCOPE_COLUMNS);
    columns.push("rate");
    columns.push("created_ms");
    Table { columns, rows }
}

/// `sovra ctl keys ...`.
pub async fn keys(cmd: KeysCommand) -> anyhow::Result<String> {
    match cmd {
        KeysCommand::Create {
            conn,
            id,
            read_regions,
            write_regions,
            collections,
            admin,
            data_protection,
            rate,
        } => {
            let r = conn
                .admin()
                .await?
                .create_key(v1::CreateKeyRequest {
                    id,
                    scopes: Some(v1::KeyScopes {
                        read_regions,
                        write_regions,
                        collections,
                        admin,
                        data_protection,
                    }),
                    rate: rate.to_pb(),
                })
                .await
                .map_err(status("CreateKey"))?
                .into_inner();
            let mut row = vec![r.id.into(), r.key.into()];
            row.extend(scope_cells(r.scopes));
            row.push(rate_cell(r.rate));
            let mut columns = vec!["id", "key"];
            columns.extend(SCOPE_COLUMNS);
            columns.push("rate");
            let table = Table { columns, rows: vec![row] }.render(conn.format);
            Ok(if conn.format == Format::Table {
                format!("{table}\n(the key is shown this once; the cluster keeps only its hash)")
            } else {
                table
            })
        }
        KeysCommand::List(conn) => {
            let r = conn
                .admin()
                .await?
                .list_keys(v1::ListKeysRequest {})
                .await
                .map_err(status("ListKeys"))?
                .into_inner();
            Ok(keys_table(r.keys).render(conn.format))
        }
        KeysCommand::Revoke { conn, id } => {
            conn.admin()
                .await?
                .revoke_key(v1::RevokeKeyRequest { id: id.clone() })
                .await
                .map_err(status("RevokeKey"))?;
            Ok(format!("key {id} revoked: every node refuses it within its key lease"))
        }
        KeysCommand::Rate { conn, id, rate, unlimited } => {
            let rate = match (rate.to_pb(), unlimited) {
                (Some(r), false) => Some(r),
                (None, true) => None,
                _ => anyhow::bail!("say the rate: --per-second N [--burst M], or --unlimited"),
            };
            let k = conn
                .admin()
                .await?
                .set_key_rate(v1::SetKeyRateRequest { id, rate })
                .await
                .map_err(status("SetKeyRate"))?
                .into_inner();
            Ok(keys_table(vec![k]).render(conn.format))
        }
    }
}
