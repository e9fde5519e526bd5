//! The `sovra` node: typed config, node state (collections and their shard
//! replicas, each a Raft group of sovra-raft), the public gRPC services, metrics, and the wiring that starts and
//! stops it (`run(config, shutdown)`), plus `sovra dev` and `sovra bench`.
//!
//! Everything below this crate is pure or storage; this crate is where the
//! runtime, the network and the clock come in.

pub mod audit;
pub mod auth;
pub mod backup;
pub mod bench;
pub mod bench_cluster;
pub mod bench_erasure;
pub mod bench_move;
pub mod bench_replicas;
pub mod bench_replication;
pub mod bench_search;
pub mod bench_startup;
pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod ctl_ops;
pub mod dev;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod ratelimit;
pub mod receipt;
pub mod recover;
pub mod run;
mod service;
pub mod split;
pub mod state;

pub use config::NodeConfig;
pub use run::{RunningNode, run, start};
