//! Chaos testing of a Sovra cluster, the way Jepsen tests databases: a run's
//! history of client operations (`history`) and the checkers that judge it.
//! This first part holds the per-key linearizability checker
//! (`linearizable`: a memoised Wing-Gong search that treats timed-out
//! writes as may-or-may-not); the harness that starts nodes in their own
//! network namespaces, the workload, the nemesis and the residency, erasure
//! and retention checkers come next (issue 14).

pub mod history;
pub mod linearizable;
