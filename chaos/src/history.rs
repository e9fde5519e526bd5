//! A chaos run's history: every client operation as invoked and as it ended
//! (ok, failed for sure, or indeterminate: a timeout may or may not have
//! taken effect), one JSON object per line, in logical time (a counter every
//! client shares, so no clock is compared).

use crate::linearizable::{self, KeyOp, RegOp, Violation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// An upsert of the key with a value no other write uses.
    Upsert {
        value: u64,
    },
    Delete,
    /// A read of the key; `linearizable`: at that consistency (else `any`).
    Get {
        linearizable: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Acknowledged; a read's answer (`None`: absent).
    Ok { found: Option<u64> },
    /// Refused or failed before it could take effect.
    Failed(String),
    /// Ended without an answer (a timeout, a dropped connection).
    Indeterminate(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub process: u32,
    pub key: u64,
    pub call: Call,
    pub invoked: u64,
    /// When it ended; `None` if it never did (the run stopped first).
    pub returned: Option<u64>,
    pub outcome: Outcome,
}

/// Each key's register history for the linearizability check: acknowledged
/// and indeterminate writes, and linearizable reads that answered.
pub fn registers(ops: &[Op]) -> BTreeMap<u64, Vec<KeyOp>> {
    let mut out: BTreeMap<u64, Vec<KeyOp>> = BTreeMap::new();
    for o in ops {
        let write = match o.call {
            Call::Upsert { value } => Some(Some(value)),
            Call::Delete => Some(None),
            Call::Get { .. } => None,
        };
        let k = match (&o.call, &o.outcome, write) {
            (_, Outcome::Failed(_), _) => continue,
            (_, Outcome::Ok { .. }, Some(v)) => KeyOp {
                op: RegOp::Write(v),
                invoked: o.invoked,
                returned: o.returned,
            },
            (_, Outcome::Indeterminate(_), Some(v)) => KeyOp {
                op: RegOp::Write(v),
                invoked: o.invoked,
                returned: None,
            },
            (Call::Get { linearizable: true }, Outcome::Ok { found }, None) => KeyOp {
                op: RegOp::Read(*found),
                invoked: o.invoked,
                returned: o.returned,
            },
            _ => continue,
        };
        out.entry(o.key).or_default().push(k);
    }
    out
}

/// The keys whose history is not linearizable, with why.
pub fn check_linearizable(ops: &[Op]) -> Vec<(u64, Violation)> {
    registers(ops)
        .into_iter()
        .filter_map(|(k, h)| linearizable::check(&h).err().map(|v| (k, v)))
        .collect()
}

/// Reads a history written one JSON object per line.
pub fn parse(text: &str) -> Result<Vec<Op>, serde_json::Error> {
    text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: u64, call: Call, invoked: u64, returned: u64, outcome: Outcome) -> Op {
        Op {
            process: 0,
            key,
            call,
            invoked,
            returned: Some(returned),
            outcome,
        }
    }

    #[test]
    fn keys_are_checked_apart_and_failed_or_any_operations_constrain_nothing() {
        let ops = vec![
            op(1, Call::Upsert { value: 10 }, 0, 1, Outcome::Ok { found: None }),
            op(2, Call::Upsert { value: 20 }, 0, 1, Outcome::Ok { found: None }),
            // Failed for sure: never took effect.
            op(1, Call::Upsert { value: 11 }, 2, 3, Outcome::Failed("refused".into())),
            // An `any` read may be stale.
            op(1, Call::Get { linearizable: false }, 4, 5, Outcome::Ok { found: None }),
            op(1, Call::Get { linearizable: true }, 6, 7, Outcome::Ok { found: Some(10) }),
            op(2, Call::Get { linearizable: true }, 6, 7, Outcome::Ok { found: Some(20) }),
        ];
        assert!(check_linearizable(&ops).is_empty());
        let text: String = ops.iter().map(|o| serde_json::to_string(o).unwrap() + "\n").collect();
        assert_eq!(parse(&text).unwrap(), ops);
    }

    #[test]
    fn a_lost_acknowledged_write_of_one_key_is_reported_for_that_key() {
        let ops = vec![
            op(1, Call::Upsert { value: 10 }, 0, 1, Outcome::Ok { found: None }),
            op(2, Call::Upsert { value: 20 }, 0, 1, Outcome::Ok { found: None }),
            op(2, Call::Get { linearizable: true }, 2, 3, Outcome::Ok { found: None }),
        ];
        let bad = check_linearizable(&ops);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 2);
    }
}
