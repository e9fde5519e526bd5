//! Chaos testing of a Sovra cluster, the way Jepsen tests databases: a run's
//! history of client operations (`history`) and the checkers that judge it:
//! per-key linearizability (`linearizable`: a memoised Wing-Gong search that
//! treats timed-out writes as may-or-may-not), E1 (no erased point returned
//! after the erasure's acknowledgement), R3 (no search hit from a region
//! its key may not read) and R2 at rest (`residency`: no node's data
//! directory holds another region's canary); and the network the harness runs nodes in (`net`:
//! a namespace per host on a bridge, partitions by nftables) with real
//! `sovra node` processes in it and their process faults (`cluster`:
//! SIGKILL and restart, SIGSTOP and SIGCONT), and the workload's clients
//! (`workload`: run from a host's namespace). The harness's seeded run loop,
//! the nemesis, and the E3, T1 and convergence
//! checkers come next (issue 14).

pub mod cluster;
pub mod history;
pub mod linearizable;
pub mod net;
pub mod residency;
pub mod run;
pub mod workload;
