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
    /// An erasure of the key's point (by id).
    Erase,
    /// A search through a coordinator with a key (API key) that may read
    /// `may_read` regions; the outcome lists what it returned.
    Search {
        may_read: Vec<String>,
    },
    /// An upsert of a point that expires at `expires_at_ms` (wall clock, Unix
    /// ms): its key never takes part in the linearizability check (expiry
    /// empties it with no operation of its own).
    UpsertExpiring {
        value: u64,
        expires_at_ms: u64,
    },
    /// An upsert of a point within the key's region's opt-out likeness (before
    /// the opt-out is registered it is taken; after, refused).
    UpsertLikeness {
        value: u64,
    },
    /// The registration of the region's opt-out likeness; `key` is the
    /// region's base key.
    OptOut,
    /// An attempt to write a point of region `region` through a node of
    /// another region: R2 says it is refused.
    ForeignUpsert {
        value: u64,
        region: String,
    },
}

/// Keys are `region index * REGION_KEYS + kind offset + i`: one number names
/// the region and what the key is for.
pub const REGION_KEYS: u64 = 1000;
/// Offsets of the key kinds within a region.
pub const EXPIRING_KEYS: u64 = 100;
pub const LIKENESS_KEYS: u64 = 200;
/// Keys of the second collection (replication factor 2, for moves).
pub const MOVABLE_KEYS: u64 = 300;

/// The region index a key belongs to.
pub fn region_of(key: u64) -> u64 {
    key / REGION_KEYS
}

/// One search hit as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    pub key: u64,
    pub value: u64,
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Acknowledged; a read's answer (`None`: absent).
    Ok { found: Option<u64> },
    /// A search's answer.
    Hits(Vec<Hit>),
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
    /// Wall clock at invocation (Unix ms), for T1 only: expiry is the one
    /// thing judged against the clock, which nodes and clients here share.
    #[serde(default)]
    pub invoked_ms: u64,
}

/// Each key's register history for the linearizability check: acknowledged
/// and indeterminate writes, and linearizable reads that answered.
pub fn registers(ops: &[Op]) -> BTreeMap<u64, Vec<KeyOp>> {
    // Keys whose register changes without an operation of its own (expiry,
    // an opt-out's erasure) are not registers.
    let unjudged: std::collections::BTreeSet<u64> = ops
        .iter()
        .filter(|o| {
            matches!(
                o.call,
                Call::UpsertExpiring { .. } | Call::UpsertLikeness { .. } | Call::OptOut | Call::ForeignUpsert { .. }
            )
        })
        .map(|o| o.key)
        .collect();
    let mut out: BTreeMap<u64, Vec<KeyOp>> = BTreeMap::new();
    for o in ops.iter().filter(|o| !unjudged.contains(&o.key)) {
        let write = match o.call {
            Call::Upsert { value } => Some(Some(value)),
            // An erasure empties the register like a delete.
            Call::Delete | Call::Erase => Some(None),
            _ => None,
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
        .filter_map(|(k, h)| {
            if h.len() > linearizable::MAX_OPS_PER_KEY {
                // Not judged is not passed: reported, so a run cannot hide a
                // key behind a long history (use more keys or a shorter run).
                return Some((
                    k,
                    Violation {
                        longest_prefix: Vec::new(),
                        value_there: None,
                        stuck_on: Vec::new(),
                        too_long: Some(h.len()),
                    },
                ));
            }
            linearizable::check(&h).err().map(|v| (k, v))
        })
        .collect()
}

/// E1 and R3 violations, each named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breach {
    /// A read or search invoked after an erasure of `key` was acknowledged
    /// returned `value`, written (and acknowledged) before the erasure was
    /// invoked.
    ErasedReturned {
        key: u64,
        value: u64,
        erased_at: u64,
        read_at: u64,
        /// Read after the final heal: E3 (back after faults).
        after_heal: bool,
    },
    /// A search returned a point of a region its key may not read.
    OutOfScope { key: u64, region: String, read_at: u64 },
    /// T1: a read invoked after the point's expiry returned it.
    ExpiredReturned {
        key: u64,
        value: u64,
        expires_at_ms: u64,
        read_at_ms: u64,
    },
    /// E3: a point within an opted-out likeness was written after the
    /// opt-out's acknowledgement (`read_at` 0), or returned by a read invoked
    /// after it.
    OptedOutLikeness { key: u64, value: u64, opted_out_at: u64, at: u64 },
    /// R2: a point of `region` written through a node of another region was
    /// acknowledged.
    ForeignAccepted { key: u64, region: String, at: u64 },
    /// D1: after the final heal, the key holds `found`, which no write that
    /// could have been the last one wrote: an acknowledged write was lost
    /// (or something never written appeared).
    Lost {
        key: u64,
        found: Option<u64>,
        could_be: Vec<Option<u64>>,
    },
}

impl Breach {
    /// The invariant it breaks.
    pub fn invariant(&self) -> &'static str {
        match self {
            Breach::ErasedReturned { after_heal: false, .. } => "E1",
            Breach::ErasedReturned { after_heal: true, .. } | Breach::OptedOutLikeness { .. } => "E3",
            Breach::OutOfScope { .. } => "R3",
            Breach::ExpiredReturned { .. } => "T1",
            Breach::ForeignAccepted { .. } => "R2",
            Breach::Lost { .. } => "D1",
        }
    }
}

/// Every value a read or search returned, with its key and when it was invoked
/// (logical and wall clock).
fn reads(ops: &[Op]) -> Vec<(u64, u64, u64, u64)> {
    let mut out = Vec::new();
    for o in ops {
        match (&o.call, &o.outcome) {
            (Call::Get { .. }, Outcome::Ok { found: Some(v) }) => out.push((o.key, *v, o.invoked, o.invoked_ms)),
            (Call::Search { .. }, Outcome::Hits(hits)) => {
                out.extend(hits.iter().map(|h| (h.key, h.value, o.invoked, o.invoked_ms)));
            }
            _ => {}
        }
    }
    out
}

/// T1: no read invoked after a point's `expires_at_ms` returns it. Writes that
/// may have happened (acknowledged or indeterminate) count.
pub fn check_expiry(ops: &[Op]) -> Vec<Breach> {
    let expiring: BTreeMap<u64, u64> = ops
        .iter()
        .filter_map(|o| match (&o.call, &o.outcome) {
            (Call::UpsertExpiring { value, expires_at_ms }, Outcome::Ok { .. } | Outcome::Indeterminate(_)) => {
                Some((*value, *expires_at_ms))
            }
            _ => None,
        })
        .collect();
    reads(ops)
        .into_iter()
        .filter_map(|(key, value, _, at_ms)| {
            let &exp = expiring.get(&value)?;
            (at_ms > exp).then_some(Breach::ExpiredReturned {
                key,
                value,
                expires_at_ms: exp,
                read_at_ms: at_ms,
            })
        })
        .collect()
}

/// E3 for opt-outs: once a region's opt-out is acknowledged, no point within
/// its likeness is written there again, and no read invoked after it returns
/// one.
pub fn check_optouts(ops: &[Op]) -> Vec<Breach> {
    // region -> earliest acknowledgement of its opt-out.
    let mut opted: BTreeMap<u64, u64> = BTreeMap::new();
    for o in ops {
        if let (Call::OptOut, Outcome::Ok { .. }, Some(r)) = (&o.call, &o.outcome, o.returned) {
            let e = opted.entry(region_of(o.key)).or_insert(r);
            *e = (*e).min(r);
        }
    }
    let likeness: BTreeMap<u64, u64> = ops
        .iter()
        .filter_map(|o| match o.call {
            Call::UpsertLikeness { value } => Some((value, o.key)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for o in ops {
        if let (Call::UpsertLikeness { value }, Outcome::Ok { .. }) = (&o.call, &o.outcome)
            && let Some(&at) = opted.get(&region_of(o.key))
            && o.invoked > at
        {
            out.push(Breach::OptedOutLikeness {
                key: o.key,
                value: *value,
                opted_out_at: at,
                at: o.invoked,
            });
        }
    }
    for (key, value, at, _) in reads(ops) {
        if let Some(&k) = likeness.get(&value)
            && let Some(&when) = opted.get(&region_of(k))
            && at > when
        {
            out.push(Breach::OptedOutLikeness {
                key,
                value,
                opted_out_at: when,
                at,
            });
        }
    }
    out
}

/// R2 at the edge: a point of one region written through a node of another
/// is refused, never acknowledged.
pub fn check_foreign(ops: &[Op]) -> Vec<Breach> {
    ops.iter()
        .filter_map(|o| match (&o.call, &o.outcome) {
            (Call::ForeignUpsert { region, .. }, Outcome::Ok { .. }) => Some(Breach::ForeignAccepted {
                key: o.key,
                region: region.clone(),
                at: o.invoked,
            }),
            _ => None,
        })
        .collect()
}

/// D1, no acknowledged write lost: `finals` holds each register key's value
/// read (linearizably) after the final heal. It must be what one of the
/// writes that could have been last wrote: a write (acknowledged, or
/// indeterminate: it may land late) not followed for sure by another
/// acknowledged write of the key. A key never written reads absent.
pub fn check_final(ops: &[Op], finals: &BTreeMap<u64, Option<u64>>) -> Vec<Breach> {
    let regs = registers(ops);
    let mut out = Vec::new();
    for (key, found) in finals {
        let writes: Vec<&KeyOp> = regs
            .get(key)
            .into_iter()
            .flatten()
            .filter(|k| matches!(k.op, RegOp::Write(_)))
            .collect();
        let superseded = |w: &KeyOp| {
            w.returned
                .is_some_and(|r| writes.iter().any(|w2| w2.returned.is_some() && w2.invoked > r))
        };
        let mut could_be: Vec<Option<u64>> = writes
            .iter()
            .filter(|w| !superseded(w))
            .map(|w| match w.op {
                RegOp::Write(v) => v,
                RegOp::Read(_) => unreachable!("writes only"),
            })
            .collect();
        // With no acknowledged write, none may have happened: still empty.
        // (The soak's seed 1006 had a key whose two writes both timed out,
        // and this checker called its empty final read a loss.)
        if !writes.iter().any(|w| w.returned.is_some()) {
            could_be.push(None);
        }
        if !could_be.contains(found) {
            out.push(Breach::Lost {
                key: *key,
                found: *found,
                could_be,
            });
        }
    }
    out
}

/// E1: no erased point is returned after the erasure's acknowledgement; E3:
/// none is back after the final heal (`heal_at`, in logical time). A value
/// whose write overlapped the erasure may go either way and is not judged;
/// one written after it is new data.
pub fn check_erasures(ops: &[Op], heal_at: Option<u64>) -> Vec<Breach> {
    // key -> (erasure invoked, acknowledged), acknowledged erasures only.
    let mut erasures: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    // value -> when its write was acknowledged.
    let mut written: BTreeMap<u64, u64> = BTreeMap::new();
    for o in ops {
        match (&o.call, &o.outcome, o.returned) {
            (Call::Erase, Outcome::Ok { .. }, Some(r)) => erasures.entry(o.key).or_default().push((o.invoked, r)),
            (Call::Upsert { value }, Outcome::Ok { .. }, Some(r)) => {
                written.insert(*value, r);
            }
            _ => {}
        }
    }
    // A read after the final heal that returns an erased point is E3
    // (resurrected), before it E1.
    let resurrected = |read_at: u64| heal_at.is_some_and(|h| read_at > h);
    let mut out = Vec::new();
    let mut judge = |key: u64, value: u64, read_at: u64| {
        let Some(w) = written.get(&value) else { return };
        for &(e_inv, e_ret) in erasures.get(&key).into_iter().flatten() {
            if *w < e_inv && e_ret < read_at {
                out.push(Breach::ErasedReturned {
                    key,
                    value,
                    erased_at: e_ret,
                    read_at,
                    after_heal: resurrected(read_at),
                });
            }
        }
    };
    for (key, value, read_at, _) in reads(ops) {
        judge(key, value, read_at);
    }
    out
}

/// R3: no search returns a point of a region its key may not read.
pub fn check_scope(ops: &[Op]) -> Vec<Breach> {
    let mut out = Vec::new();
    for o in ops {
        if let (Call::Search { may_read }, Outcome::Hits(hits)) = (&o.call, &o.outcome) {
            for h in hits.iter().filter(|h| !may_read.contains(&h.region)) {
                out.push(Breach::OutOfScope {
                    key: h.key,
                    region: h.region.clone(),
                    read_at: o.invoked,
                });
            }
        }
    }
    out
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
            invoked_ms: invoked,
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

    fn hits(hs: &[(u64, u64, &str)]) -> Outcome {
        Outcome::Hits(
            hs.iter()
                .map(|&(key, value, region)| Hit {
                    key,
                    value,
                    region: region.into(),
                })
                .collect(),
        )
    }

    #[test]
    fn e1_an_erased_point_returned_after_the_acknowledgement_is_caught_and_one_written_after_is_not() {
        let search = || Call::Search {
            may_read: vec!["uk".into()],
        };
        let mut ops = vec![
            op(1, Call::Upsert { value: 10 }, 0, 1, Outcome::Ok { found: None }),
            op(1, Call::Erase, 2, 3, Outcome::Ok { found: None }),
            // Concurrent with the erasure: either way.
            op(1, Call::Get { linearizable: false }, 2, 4, Outcome::Ok { found: Some(10) }),
            // Written again after the erasure: new data.
            op(1, Call::Upsert { value: 11 }, 5, 6, Outcome::Ok { found: None }),
            op(0, search(), 7, 8, hits(&[(1, 11, "uk")])),
        ];
        assert!(check_erasures(&ops, None).is_empty());
        assert!(check_linearizable(&ops).is_empty());
        ops.push(op(0, search(), 9, 10, hits(&[(1, 10, "uk")])));
        ops.push(op(1, Call::Get { linearizable: false }, 9, 10, Outcome::Ok { found: Some(10) }));
        let b = check_erasures(&ops, None);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(
            b[0],
            Breach::ErasedReturned {
                key: 1,
                value: 10,
                erased_at: 3,
                read_at: 9,
                after_heal: false
            }
        );
    }

    #[test]
    fn r3_a_hit_of_a_region_the_key_may_not_read_is_caught() {
        let ops = vec![
            op(
                0,
                Call::Search {
                    may_read: vec!["uk".into()],
                },
                0,
                1,
                hits(&[(1, 10, "uk"), (2, 20, "us")]),
            ),
            op(
                0,
                Call::Search {
                    may_read: vec!["uk".into(), "us".into()],
                },
                2,
                3,
                hits(&[(2, 20, "us")]),
            ),
        ];
        assert_eq!(
            check_scope(&ops),
            vec![Breach::OutOfScope {
                key: 2,
                region: "us".into(),
                read_at: 0
            }]
        );
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

    #[test]
    fn t1_a_point_read_after_its_expiry_is_caught_and_one_read_before_is_not() {
        let mut ops = vec![
            op(
                101,
                Call::UpsertExpiring {
                    value: 7,
                    expires_at_ms: 50,
                },
                0,
                1,
                Outcome::Ok { found: None },
            ),
            // Invoked at wall time 40 (op's invoked_ms = invoked): before expiry.
            op(101, Call::Get { linearizable: false }, 40, 41, Outcome::Ok { found: Some(7) }),
        ];
        assert!(check_expiry(&ops).is_empty());
        ops.push(op(
            0,
            Call::Search {
                may_read: vec!["uk".into()],
            },
            60,
            61,
            hits(&[(101, 7, "uk")]),
        ));
        let b = check_expiry(&ops);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].invariant(), "T1");
        // Expiring keys are not registers (expiry empties them unseen).
        assert!(registers(&ops).is_empty());
    }

    #[test]
    fn e3_a_likeness_written_or_returned_after_the_opt_out_is_caught_in_its_region_only() {
        let uk_like = LIKENESS_KEYS + 1;
        let us_like = REGION_KEYS + LIKENESS_KEYS + 1;
        let mut ops = vec![
            op(uk_like, Call::UpsertLikeness { value: 5 }, 0, 1, Outcome::Ok { found: None }),
            op(LIKENESS_KEYS, Call::OptOut, 2, 3, Outcome::Ok { found: None }),
            // Refused after the opt-out: right.
            op(
                uk_like,
                Call::UpsertLikeness { value: 6 },
                4,
                5,
                Outcome::Failed("opted out".into()),
            ),
            // Another region's likeness is not covered by uk's opt-out.
            op(us_like, Call::UpsertLikeness { value: 8 }, 4, 5, Outcome::Ok { found: None }),
            op(us_like, Call::Get { linearizable: false }, 6, 7, Outcome::Ok { found: Some(8) }),
            // Concurrent with the opt-out: either way.
            op(uk_like, Call::Get { linearizable: false }, 2, 4, Outcome::Ok { found: Some(5) }),
        ];
        assert!(check_optouts(&ops).is_empty(), "{:?}", check_optouts(&ops));
        ops.push(op(uk_like, Call::UpsertLikeness { value: 9 }, 8, 9, Outcome::Ok { found: None }));
        ops.push(op(
            uk_like,
            Call::Get { linearizable: false },
            10,
            11,
            Outcome::Ok { found: Some(5) },
        ));
        let b = check_optouts(&ops);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(b.iter().all(|b| b.invariant() == "E3"));
    }

    #[test]
    fn r2_a_foreign_write_acknowledged_is_caught_and_a_refused_one_is_not() {
        let call = || Call::ForeignUpsert {
            value: 3,
            region: "us".into(),
        };
        let mut ops = vec![op(REGION_KEYS + 250, call(), 0, 1, Outcome::Failed("R2".into()))];
        assert!(check_foreign(&ops).is_empty());
        ops.push(op(REGION_KEYS + 250, call(), 2, 3, Outcome::Ok { found: None }));
        assert_eq!(check_foreign(&ops)[0].invariant(), "R2");
    }

    #[test]
    fn d1_a_final_value_must_be_one_a_last_write_could_have_left() {
        let ops = vec![
            op(1, Call::Upsert { value: 10 }, 0, 1, Outcome::Ok { found: None }),
            op(1, Call::Upsert { value: 11 }, 2, 3, Outcome::Ok { found: None }),
            // Indeterminate: may land, even late.
            op(1, Call::Upsert { value: 12 }, 4, 5, Outcome::Indeterminate("timeout".into())),
            // Failed for sure: never the final value.
            op(1, Call::Upsert { value: 13 }, 6, 7, Outcome::Failed("refused".into())),
            op(2, Call::Upsert { value: 20 }, 0, 1, Outcome::Ok { found: None }),
            op(2, Call::Erase, 2, 3, Outcome::Ok { found: None }),
            // Key 4: its only writes timed out, so either or none happened.
            op(4, Call::Upsert { value: 40 }, 0, 1, Outcome::Indeterminate("timeout".into())),
            op(4, Call::Upsert { value: 41 }, 2, 3, Outcome::Indeterminate("timeout".into())),
        ];
        let finals = |a: Option<u64>, b: Option<u64>, c: Option<u64>| BTreeMap::from([(1, a), (2, b), (3, c), (4, None)]);
        assert!(check_final(&ops, &finals(Some(11), None, None)).is_empty());
        assert!(check_final(&ops, &finals(Some(12), None, None)).is_empty());
        for key4 in [None, Some(40), Some(41)] {
            let mut f = finals(Some(11), None, None);
            f.insert(4, key4);
            assert!(check_final(&ops, &f).is_empty(), "{key4:?}");
        }
        // 10 was overwritten for sure; 13 never happened; 20 was erased; key 3
        // was never written.
        for bad in [
            finals(Some(10), None, None),
            finals(Some(13), None, None),
            finals(Some(11), Some(20), None),
            finals(Some(11), None, Some(1)),
        ] {
            let b = check_final(&ops, &bad);
            assert_eq!(b.len(), 1, "{bad:?}: {b:?}");
            assert_eq!(b[0].invariant(), "D1");
        }
    }
}
