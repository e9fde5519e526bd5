//! `sovra ctl`: operator commands. `status`, `collections` and `shards` print
//! `_cat`-style aligned tables (or JSON for scripts) from any node's public
//! API with an admin key; `audit` fetches a region's log with a signed
//! checkpoint and checks an export offline; jobs and keys are in
//! [`crate::ctl_ops`]. Exit codes: 0 done, 1 failed, 2 bad usage.

use std::path::PathBuf;

/// One shard: `--collection C --region R --shard N`.
#[derive(clap::Args, Debug)]
pub struct ShardArg {
    #[arg(long)]
    pub collection: String,
    #[arg(long)]
    pub region: String,
    #[arg(long)]
    pub shard: u32,
}

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// The audit log.
    Audit {
        #[command(subcommand)]
        what: AuditCommand,
    },
    /// Nodes per region and zone: state, roles, replicas, heartbeat age, and
    /// which node leads the meta group.
    Status(Conn),
    /// Every collection: regions, shards, replication factor, points.
    Collections(Conn),
    /// Every shard (of one collection, or all): replicas, leader, term, points.
    Shards {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        collection: Option<String>,
    },
    /// Moves a shard's replica from one node to another of its region, as a
    /// job; with --wait, follows it until it ends (exit 1 unless done).
    Move {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        shard: ShardArg,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Operations jobs, newest first; --cancel JOB ends a running one (a
    /// drain's or rebalance's running moves with it); --watch follows the
    /// running ones (or each --job) with progress bars until they end (exit 1
    /// unless all ended done).
    Jobs {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, conflicts_with = "watch")]
        cancel: Option<String>,
        #[arg(long)]
        watch: bool,
        #[arg(long, requires = "watch")]
        job: Vec<String>,
    },
    /// Moves every replica off a node to other nodes of its region, then
    /// marks it drained (no new replicas); refused, naming the shard, if
    /// some replica would have nowhere to go.
    Drain {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        node: u64,
        /// Moves at once (default 2, at most 16).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        concurrency: u32,
        #[arg(long)]
        wait: bool,
    },
    /// A drained node takes replicas again.
    Undrain {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        node: u64,
    },
    /// Evens out a region's replicas per node to within one of the mean;
    /// --dry-run prints the plan and moves nothing.
    Rebalance {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        region: String,
        #[arg(long)]
        dry_run: bool,
        /// Moves at once (default 2, at most 16).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        concurrency: u32,
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
    },
    /// Splits a shard: its hash range halved between two new shards on the
    /// same nodes, routing switched once they hold everything; its writers
    /// wait a moment, none is lost. --wait follows it until it ends.
    Split {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        shard: ShardArg,
        #[arg(long)]
        wait: bool,
    },
    /// LOSES WRITES. Rebuilds a shard whose group lost a majority of its
    /// replicas for good from the replica on --survivor (the one that applied
    /// the most: `sovra ctl shards` on each node shows `applied`): a new shard
    /// on the survivor and other up nodes of the region replaces it. Writes
    /// the lost replicas acknowledged after the survivor's last entry are
    /// gone. See the lost-quorum runbook in the README.
    Recover {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        shard: ShardArg,
        #[arg(long)]
        survivor: u64,
        /// Go on even if an erasure committed after the survivor's last entry
        /// (its points come back: run it again at once).
        #[arg(long)]
        accept_lost_erasures: bool,
        /// Required: says you read the above.
        #[arg(long)]
        i_accept_lost_writes: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Backs up every shard of a collection's region into an empty directory:
    /// a snapshot file per shard (points, suppression list, tombstones,
    /// opt-out registry, each at one log position, digest-checked) and
    /// manifest.json. The files hold the region's personal data: keep them in
    /// the region.
    Backup {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        collection: String,
        #[arg(long)]
        region: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Restores a backup into a cluster where the collection does not exist
    /// (or its shards in the region are empty). With --ledger (a later
    /// backup of the same region), points erased, suppressed or opted out
    /// since the backup are left out and the later lists adopted.
    Restore {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// API keys: create, list, revoke.
    Keys {
        #[command(subcommand)]
        what: crate::ctl_ops::KeysCommand,
    },
}

/// How `sovra ctl` reaches a node: a flag, else the environment, else a
/// config file (`--config`, `SOVRA_CTL_CONFIG`, or `~/.config/sovra/ctl.toml`
/// when it exists) with `addr` and `key`.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// A node's public gRPC address (host:port; default 127.0.0.1:7300).
    #[arg(long, env = "SOVRA_ADDR")]
    pub addr: Option<String>,
    /// An API key (the admin scope for most commands).
    #[arg(long, env = "SOVRA_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// The cluster CA certificate (PEM): connect over TLS trusting it.
    /// Without it the connection is plaintext (a node with `tls = false`).
    #[arg(long, env = "SOVRA_CA")]
    pub ca: Option<PathBuf>,
    /// A TOML file with `addr = "host:port"`, `key = "sovra_..."` and
    /// optionally `ca = "/path/ca.pem"`.
    #[arg(long, env = "SOVRA_CTL_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CtlFile {
    addr: Option<String>,
    key: Option<String>,
    ca: Option<PathBuf>,
}

/// `sovra ctl` was given too little to act on: exit code 2, like clap's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

impl Conn {
    pub fn to(addr: impl Into<String>, key: impl Into<String>, format: Format) -> Self {
        Self {
            addr: Some(addr.into()),
            key: Some(key.into()),
            ca: None,
            config: None,
            format,
        }
    }

    /// The address, key and CA, from flags, environment or the config file.
    pub fn resolve(&self) -> anyhow::Result<(String, String, Option<PathBuf>)> {
        let default = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/sovra/ctl.toml"));
        let path = self.config.clone().or(default.filter(|p| p.exists()));
        let file = match &path {
            Some(p) if self.addr.is_none() || self.key.is_none() || self.ca.is_none() => {
                let text = std::fs::read_to_string(p).map_err(|e| Usage(format!("reading {}: {e}", p.display())))?;
                toml::from_str::<CtlFile>(&text).map_err(|e| Usage(format!("{}: {e}", p.display())))?
            }
            _ => CtlFile::default(),
        };
        let addr = self.addr.clone().or(file.addr).unwrap_or_else(|| "127.0.0.1:7300".into());
        let key =
            self.key.clone().or(file.key).ok_or_else(|| {
                Usage("no API key: pass --key, set SOVRA_KEY, or put key = \"sovra_...\" in a config file (--config)".into())
            })?;
        Ok((addr, key, self.ca.clone().or(file.ca)))
    }

    pub async fn keyed(&self) -> anyhow::Result<crate::dev::Keyed> {
        let (addr, key, ca) = self.resolve()?;
        let ch = crate::client::connect(&addr, ca.as_deref(), std::time::Duration::from_secs(10)).await?;
        Ok(crate::dev::keyed(&ch, &key))
    }

    /// `Admin/ClusterStatus` through this connection.
    pub async fn cluster_status(&self) -> anyhow::Result<sovra_proto::v1::ClusterStatusResponse> {
        Ok(self
            .admin()
            .await?
            .cluster_status(sovra_proto::v1::ClusterStatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("ClusterStatus: {}", s.message()))?
            .into_inner())
    }

    pub async fn admin(&self) -> anyhow::Result<sovra_proto::v1::admin_client::AdminClient<crate::dev::Keyed>> {
        Ok(sovra_proto::v1::admin_client::AdminClient::new(self.keyed().await?))
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Rows of named cells, printed as an aligned table or JSON objects.
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

impl Table {
    pub fn render(&self, f: Format) -> String {
        if f == Format::Json {
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = self
                .rows
                .iter()
                .map(|r| self.columns.iter().map(|c| c.to_string()).zip(r.iter().cloned()).collect())
                .collect();
            return serde_json::to_string_pretty(&rows).expect("JSON values serialise");
        }
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        let cells: Vec<Vec<String>> = self.rows.iter().map(|r| r.iter().map(text).collect()).collect();
        let width = |i: usize| cells.iter().map(|r| r[i].len()).chain([self.columns[i].len()]).max().unwrap_or(0);
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let line = |r: Vec<String>| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join(" ")
                .trim_end()
                .to_string()
        };
        let mut out = vec![line(self.columns.iter().map(|c| c.to_string()).collect())];
        out.extend(cells.into_iter().map(line));
        out.join("\n")
    }
}

/// `sovra ctl status`.
pub async fn status(c: &Conn) -> anyhow::Result<String> {
    let r = c.cluster_status().await?;
    let mut nodes = r.nodes;
    nodes.sort_by(|a, b| (&a.region, &a.zone, a.id).cmp(&(&b.region, &b.zone, b.id)));
    let rows = nodes
        .into_iter()
        .map(|n| {
            vec![
                n.id.into(),
                n.region.into(),
                n.zone.into(),
                n.state.into(),
                n.roles.join(",").into(),
                n.replicas.into(),
                (if n.audit_replica { "yes" } else { "no" }).into(),
                (n.id == r.meta_leader).then_some("leader").into(),
                n.heartbeat_age_ms.into(),
                n.public_addr.into(),
            ]
        })
        .collect();
    let t = Table {
        columns: vec![
            "node", "region", "zone", "state", "roles", "replicas", "audit", "meta", "hb_ms", "public",
        ],
        rows,
    };
    let table = t.render(c.format);
    Ok(if c.format == Format::Table {
        format!("{table}\nmeta level {}, shard map version {}", r.meta_level, r.map_version)
    } else {
        table
    })
}

/// `sovra ctl collections` and `sovra ctl shards`.
pub async fn collections(c: &Conn, shards: bool, only: Option<&str>) -> anyhow::Result<String> {
    use sovra_proto::v1;
    let mut client = v1::collections_client::CollectionsClient::new(c.keyed().await?);
    let list = client
        .list_collections(v1::ListCollectionsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ListCollections: {}", s.message()))?
        .into_inner();
    let mut rows = Vec::new();
    for info in list.collections {
        let Some(spec) = info.spec.clone() else { continue };
        if only.is_some_and(|o| o != spec.name) {
            continue;
        }
        // The answer of a node that holds replicas has their counts; ask
        // for the collection itself for the freshest shard view.
        let info = client
            .get_collection(v1::GetCollectionRequest {
                name: spec.name.clone(),
                with_digest: false,
            })
            .await
            .map_err(|s| anyhow::anyhow!("GetCollection {}: {}", spec.name, s.message()))?
            .into_inner();
        if shards {
            for s in info.shards {
                rows.push(vec![
                    spec.name.clone().into(),
                    s.region.into(),
                    s.number.into(),
                    s.replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(",").into(),
                    (s.leader != 0).then_some(s.leader).into(),
                    s.term.into(),
                    if s.held { s.live_points.into() } else { serde_json::Value::Null },
                    if s.held { s.tombstones.into() } else { serde_json::Value::Null },
                    if s.held { s.applied_index.into() } else { serde_json::Value::Null },
                ]);
            }
        } else {
            let regions: Vec<String> = spec.regions.iter().map(|r| format!("{}:{}", r.region, r.shard_count)).collect();
            let held: u64 = info.shards.iter().filter(|s| s.held).map(|s| s.live_points).sum();
            rows.push(vec![
                spec.name.clone().into(),
                spec.dimension.into(),
                format!("{:?}", v1::Metric::try_from(spec.metric).unwrap_or_default())
                    .to_lowercase()
                    .into(),
                regions.join(",").into(),
                spec.replication_factor.max(1).into(),
                info.shards.len().into(),
                held.into(),
            ]);
        }
    }
    let columns = if shards {
        vec![
            "collection",
            "region",
            "shard",
            "replicas",
            "leader",
            "term",
            "live",
            "tombstones",
            "applied",
        ]
    } else {
        vec!["collection", "dim", "metric", "regions", "rf", "shards", "live_here"]
    };
    Ok(Table { columns, rows }.render(c.format))
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Checks an audit export (JSON lines) against a saved checkpoint and
    /// names the first bad record.
    Verify(AuditVerifyArgs),
    /// Saves a region's signed checkpoint, then its whole log as JSON lines,
    /// from a node of the region (data_protection scope).
    Export(AuditExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct AuditExportArgs {
    /// A node of the region (its public gRPC address, host:port).
    #[arg(long)]
    pub addr: String,
    /// An API key with the data_protection scope.
    #[arg(long, env = "SOVRA_KEY")]
    pub key: String,
    /// The cluster CA certificate (PEM), for a node serving TLS.
    #[arg(long, env = "SOVRA_CA")]
    pub ca: Option<PathBuf>,
    /// The region whose log to export (default: the node's).
    #[arg(long, default_value = "")]
    pub region: String,
    /// Where to write the lines.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the checkpoint (JSON); it covers the log as it was
    /// just before the export, so the export verifies against it.
    #[arg(long)]
    pub checkpoint: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct AuditVerifyArgs {
    /// The export: one JSON record per line.
    #[arg(long)]
    pub export: PathBuf,
    /// The checkpoint saved earlier (JSON: origin, size, root, signature).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The key the checkpoint was signed with (hex ed25519 public key).
    #[arg(long)]
    pub public_key: String,
}

pub fn run(cmd: CtlCommand) -> anyhow::Result<()> {
    match cmd {
        CtlCommand::Audit {
            what: AuditCommand::Verify(a),
        } => audit_verify(&a).map(|msg| println!("{msg}")),
        CtlCommand::Audit {
            what: AuditCommand::Export(a),
        } => block_on(audit_export(&a)),
        CtlCommand::Status(c) => block_on(status(&c)),
        CtlCommand::Collections(c) => block_on(collections(&c, false, None)),
        CtlCommand::Shards { conn, collection } => block_on(collections(&conn, true, collection.as_deref())),
        CtlCommand::Move {
            conn,
            shard: ShardArg { collection, region, shard },
            from,
            to,
            wait,
        } => block_on(crate::ctl_ops::move_replica(
            &conn,
            sovra_proto::v1::MoveReplicaRequest {
                collection,
                region,
                shard,
                from,
                to,
            },
            wait,
        )),
        CtlCommand::Jobs { conn, cancel, watch, job } => block_on(crate::ctl_ops::jobs(&conn, cancel.as_deref(), watch.then_some(job))),
        CtlCommand::Drain {
            conn,
            node,
            concurrency,
            wait,
        } => block_on(crate::ctl_ops::drain(&conn, node, concurrency, wait)),
        CtlCommand::Undrain { conn, node } => block_on(crate::ctl_ops::undrain(&conn, node)),
        CtlCommand::Rebalance {
            conn,
            region,
            dry_run,
            concurrency,
            wait,
        } => block_on(crate::ctl_ops::rebalance(&conn, &region, concurrency, dry_run, wait)),
        CtlCommand::Split {
            conn,
            shard: ShardArg { collection, region, shard },
            wait,
        } => block_on(crate::ctl_ops::split(
            &conn,
            sovra_proto::v1::SplitShardRequest { collection, region, shard },
            wait,
        )),
        CtlCommand::Recover {
            conn,
            shard: ShardArg { collection, region, shard },
            survivor,
            accept_lost_erasures,
            i_accept_lost_writes,
            wait,
        } => block_on(crate::ctl_ops::recover(
            &conn,
            sovra_proto::v1::RecoverShardRequest {
                collection,
                region,
                shard,
                survivor,
                accept_lost_erasures,
            },
            i_accept_lost_writes,
            wait,
        )),
        CtlCommand::Backup {
            conn,
            collection,
            region,
            out,
        } => block_on(crate::backup::backup(&conn, &collection, &region, &out)),
        CtlCommand::Restore { conn, dir, ledger } => block_on(crate::backup::restore(&conn, &dir, ledger.as_deref())),
        CtlCommand::Keys { what } => block_on(crate::ctl_ops::keys(what)),
    }
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<String>>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match rt.block_on(f) {
        Ok(msg) => {
            println!("{msg}");
            Ok(())
        }
        // Too little to act on is bad usage, like clap's errors: exit 2.
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
        Err(e) => Err(e),
    }
}

/// Fetches a checkpoint, then every line from 0, and writes both.
pub async fn audit_export(a: &AuditExportArgs) -> anyhow::Result<String> {
    use sovra_proto::v1;
    let ch = crate::client::connect(&a.addr, a.ca.as_deref(), std::time::Duration::from_secs(10)).await?;
    let mut client = v1::audit_client::AuditClient::new(crate::dev::keyed(&ch, &a.key));
    let c = client
        .get_audit_checkpoint(v1::GetAuditCheckpointRequest { region: a.region.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("GetAuditCheckpoint: {}", s.message()))?
        .into_inner();
    let checkpoint = sovra_audit::Checkpoint {
        origin: c.origin.clone(),
        size: c.size,
        root: c.root.clone(),
        signature: c.signature.clone(),
    };
    let mut out = String::new();
    let (mut from, mut n) = (0u64, 0u64);
    loop {
        let page = client
            .export_audit(v1::ExportAuditRequest {
                region: a.region.clone(),
                from_seq: from,
                limit: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("ExportAudit from {from}: {}", s.message()))?
            .into_inner();
        for l in &page.lines {
            out.push_str(l);
            out.push('\n');
        }
        n += page.lines.len() as u64;
        from = page.next_seq;
        if !page.more {
            break;
        }
    }
    let write = |p: &PathBuf, body: &str| std::fs::write(p, body).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()));
    write(&a.checkpoint, &serde_json::to_string_pretty(&checkpoint)?)?;
    write(&a.out, &out)?;
    Ok(format!(
        "{n} records of {} written to {}; checkpoint (size {}, root {}) to {}; signed by public key {}",
        c.origin,
        a.out.display(),
        c.size,
        c.root,
        a.checkpoint.display(),
        c.public_key
    ))
}

/// What `sovra ctl audit verify` prints when the export checks out; an
/// error naming the first bad record otherwise.
pub fn audit_verify(a: &AuditVerifyArgs) -> anyhow::Result<String> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
    let export = read(&a.export)?;
    let checkpoint: sovra_audit::Checkpoint =
        serde_json::from_str(&read(&a.checkpoint)?).map_err(|e| anyhow::anyhow!("the checkpoint is not one: {e}"))?;
    let key: [u8; 32] = hex::decode(a.public_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("--public-key must be 32 bytes of hex"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|e| anyhow::anyhow!("--public-key is not an ed25519 key: {e}"))?;
    let lines = export.lines().filter(|l| !l.is_empty());
    let covered =
        sovra_audit::verify_export(lines, &checkpoint, &key).map_err(|bad| anyhow::anyhow!("the audit export does not verify: {bad}"))?;
    Ok(format!(
        "{covered} records of {} verified against its checkpoint (root {})",
        checkpoint.origin, checkpoint.root
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_verify_passes_an_intact_export_and_names_an_altered_record() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let mut log = sovra_audit::Log::default();
        let lines: Vec<String> = (0..5u64)
            .map(|i| {
                log.append(&sovra_audit::Record {
                    at_ms: i,
                    key_id: "k".into(),
                    call: "search".into(),
                    purpose: "p".into(),
                    collection: "people".into(),
                    regions: vec!["uk".into()],
                    shards: 1,
                    results: i,
                    query_sha256: None,
                    target: None,
                    status: "OK".into(),
                })
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (export, cp) = (dir.path().join("audit.jsonl"), dir.path().join("cp.json"));
        std::fs::write(&cp, serde_json::to_string(&log.checkpoint(&key, "sovra-audit/uk")).unwrap()).unwrap();
        let args = AuditVerifyArgs {
            export: export.clone(),
            checkpoint: cp,
            public_key: hex::encode(key.verifying_key().as_bytes()),
        };
        std::fs::write(&export, lines.join("\n") + "\n").unwrap();
        assert!(audit_verify(&args).unwrap().starts_with("5 records"));
        let altered = lines.join("\n").replace("\"results\":2", "\"results\":0");
        std::fs::write(&export, altered).unwrap();
        let e = audit_verify(&args).unwrap_err().to_string();
        assert!(e.contains("record 2 was altered"), "{e}");
    }
}
