//! The `sovra` command line: `sovra node`, `sovra dev`, `sovra health`,
//! `sovra certs`, `sovra ctl`, `sovra bench ...`. The `sovra` executable is
//! this and nothing else; the test-only `sovra-format-next` is this with the
//! next data directory format (`src/bin/format_next.rs`).

use crate::{
    NodeConfig, bench, bench_cluster, bench_erasure, bench_move, bench_replicas, bench_replication, bench_search, bench_startup, dev,
};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sovra", version, about = "Sovra: a sharded vector-search cluster for data about people")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a config file (SOVRA_* environment variables override it).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a local node with sample data and example searches, until Ctrl-C.
    Dev(dev::DevArgs),
    /// Exit 0 if the node at --addr answers SERVING to a gRPC health check,
    /// else 1 (a container health check or an exec probe).
    Health(crate::health::HealthArgs),
    /// Makes a cluster CA and node certificates for TLS.
    Certs {
        #[command(subcommand)]
        what: crate::certs::CertsCommand,
    },
    /// Checks an erasure receipt: reads a GetErasureJob answer as JSON (as
    /// grpcurl prints it) from --file or stdin and verifies its signature.
    VerifyReceipt(crate::receipt::VerifyArgs),
    /// Prints the public key a node with this config signs receipts with
    /// (derived from its cluster secret).
    ReceiptKey {
        #[arg(long)]
        config: PathBuf,
        /// Print the audit checkpoint key instead (the same derivation under
        /// its own label).
        #[arg(long)]
        audit: bool,
    },
    /// LOSES WRITES. On a stopped node whose meta replica (--meta) or region
    /// audit log replica (--audit) survived the loss of a majority of its
    /// group for good: makes it the group's only voter; started again, it
    /// leads and the others are added back. See docs/lost-quorum.md.
    RecoverGroups {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        meta: bool,
        #[arg(long)]
        audit: bool,
        /// Only print how far each replica's log goes (to pick the survivor).
        #[arg(long)]
        dry_run: bool,
        /// Required: says you read the above.
        #[arg(long)]
        i_accept_lost_writes: bool,
    },
    /// Operator commands that need no running node.
    Ctl {
        #[command(subcommand)]
        what: crate::ctl::CtlCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The index peer for shared/bench/peers.py --sovra.
    Index(bench::IndexBenchArgs),
    /// Write throughput and ack latency: a 3-replica group beside a single engine.
    Replication(bench_replication::ReplicationBenchArgs),
    /// Client-observed search latency against a running node (`sovra dev`).
    Search(bench_search::SearchBenchArgs),
    /// What many replicas cost a node: threads, memory, files, start-up time.
    Replicas(bench_replicas::ReplicasBenchArgs),
    /// Search through a coordinator over 2 regions x 3 nodes beside one in-process engine.
    Cluster(bench_cluster::ClusterBenchArgs),
    /// A replica's start-up time: loading its saved index against rebuilding it.
    Startup(bench_startup::StartupBenchArgs),
    /// Erasure acknowledgement latency beside a one-point write, on 3 nodes of one region.
    Erasure(bench_erasure::ErasureBenchArgs),
    /// A replica move's time against an index rebuild, and search latency during it.
    Move(bench_move::MoveBenchArgs),
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// What `sovra` does with its command line.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr: stdout carries the bench protocol and the dev transcript.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Sovra's own crates at INFO, every dependency (openraft's chatter
        // included) at WARN; RUST_LOG overrides.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,sovra=info,sovra_node=info,sovra_raft=info,sovra_shard=info,sovra_meta=info,sovra_index=info".into()
            }),
        )
        .init();
    match cli.command {
        Command::Bench {
            what: BenchCommand::Index(args),
        } => bench::index(args),
        Command::Bench {
            what: BenchCommand::Replication(args),
        } => bench_replication::replication(args),
        Command::Bench {
            what: BenchCommand::Search(args),
        } => bench_search::search(args),
        Command::Bench {
            what: BenchCommand::Replicas(args),
        } => bench_replicas::replicas(args),
        Command::Bench {
            what: BenchCommand::Cluster(args),
        } => bench_cluster::cluster(args),
        Command::Bench {
            what: BenchCommand::Startup(args),
        } => bench_startup::startup(args),
        Command::Bench {
            what: BenchCommand::Erasure(args),
        } => bench_erasure::erasure(args),
        Command::Bench {
            what: BenchCommand::Move(args),
        } => bench_move::bench_move(args),
        Command::Node { config } => {
            let cfg = NodeConfig::load(&config, |k| std::env::var(k).ok()).with_context(|| format!("loading {}", config.display()))?;
            // The chaos harness's deliberate breaks: honoured by test builds
            // only; any other build refuses to start with one asked for.
            if let Ok(names) = std::env::var("SOVRA_CHAOS_BREAK") {
                let on = sovra_types::chaos::turn_on(&names).map_err(|e| anyhow::anyhow!("SOVRA_CHAOS_BREAK: {e}"))?;
                for s in on {
                    eprintln!("CHAOS SWITCH ON: {} (this node breaks an invariant on purpose)", s.name());
                }
            }
            runtime()?.block_on(crate::run(cfg, shutdown_signal(), |n| {
                // One parseable line so scripts and tests learn the bound ports.
                println!(
                    "sovra node listening grpc={} cluster={} metrics={}",
                    n.grpc_addr, n.cluster_addr, n.metrics_addr
                );
            }))
        }
        Command::Dev(args) => runtime()?.block_on(dev::dev(args, shutdown_signal())),
        Command::Health(args) => {
            // One thread: a probe runs often and should cost little.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match rt.block_on(crate::health::check(&args)) {
                Ok(()) => {
                    println!("SERVING");
                    Ok(())
                }
                Err(why) => {
                    eprintln!("{why}");
                    std::process::exit(1);
                }
            }
        }
        Command::RecoverGroups {
            config,
            meta,
            audit,
            dry_run,
            i_accept_lost_writes,
        } => {
            if !i_accept_lost_writes && !dry_run {
                eprintln!(
                    "WARNING: recover-groups makes this node's replica its group's only voter: whatever the lost \
                     voters committed beyond its log is LOST. Only for a group that lost a majority for good (see \
                     docs/lost-quorum.md). Pass --i-accept-lost-writes to go on."
                );
                std::process::exit(2);
            }
            let cfg = NodeConfig::load(&config, |k| std::env::var(k).ok()).with_context(|| format!("loading {}", config.display()))?;
            println!("{}", crate::recover::recover_groups(&cfg, meta, audit, dry_run)?);
            Ok(())
        }
        Command::VerifyReceipt(args) => crate::receipt::verify_command(args),
        Command::Certs { what } => {
            println!("{}", crate::certs::run(&what)?);
            Ok(())
        }
        Command::Ctl { what } => crate::ctl::run(what),
        Command::ReceiptKey { config, audit } => {
            let cfg = NodeConfig::load(&config, |k| std::env::var(k).ok()).with_context(|| format!("loading {}", config.display()))?;
            anyhow::ensure!(
                cfg.cluster_secret.is_some() || cfg.cluster_secret_file.is_some(),
                "{} sets no cluster secret: a node alone keeps a random receipt key in its data directory; read it from a GetErasureJob answer",
                config.display()
            );
            let secret = cfg.cluster_secret()?;
            let key = if audit {
                crate::receipt::ReceiptKey::derived(secret.expose(), crate::receipt::AUDIT_LABEL)
            } else {
                crate::receipt::ReceiptKey::from_secret(secret.expose())
            };
            println!("{}", key.public_hex());
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
