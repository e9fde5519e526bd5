//! Per-key linearizability of a register: writes (an upsert of a unique
//! value, or a delete: the register empty) and linearizable reads, checked
//! by the Wing-Gong search with memoisation (as in Lowe's and Knossos's
//! checkers). A history is split by key first (a register per key is
//! independent, so P-compositionality makes each key's check small).
//!
//! An operation is invoked at one logical time and, if it completed, returned
//! at a later one. A write that timed out is **indeterminate**: it may have
//! taken effect at any point after its invocation, or never; it has no return
//! time and need not be linearized. A write that failed for sure is not given
//! to the checker; nor is a read that did not answer (it constrains nothing).

use std::collections::HashSet;

/// What one operation on a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOp {
    /// Set the register (`None`: a delete).
    Write(Option<u64>),
    /// A linearizable read that answered with this value (`None`: absent).
    Read(Option<u64>),
}

/// One operation of one key's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOp {
    pub op: RegOp,
    /// Logical time it was invoked.
    pub invoked: u64,
    /// Logical time it returned; `None`: indeterminate (writes only).
    pub returned: Option<u64>,
}

/// Why a key's history is not linearizable: the operations (indexes into
/// the history given) that could be ordered before the search got stuck,
/// and the register's value there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub longest_prefix: Vec<usize>,
    pub value_there: Option<u64>,
    /// The completed operations none of which could come next.
    pub stuck_on: Vec<usize>,
    /// Set instead when the key had more operations than the checker takes,
    /// or its search passed [`SEARCH_BUDGET`] (how many operations): not
    /// judged, so reported as undecided.
    pub too_long: Option<usize>,
}

/// At most this many operations per key (the search's state is a bit set).
pub const MAX_OPS_PER_KEY: usize = 512;

/// A set of operation indexes below [`MAX_OPS_PER_KEY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Bits([u64; MAX_OPS_PER_KEY / 64]);

impl Bits {
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn with(mut self, i: usize) -> Bits {
        self.0[i / 64] |= 1 << (i % 64);
        self
    }
    /// Whether every member of `other` is in `self`.
    fn covers(&self, other: &Bits) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & b == *b)
    }
}

/// Checks one key's history, starting from an empty register. `Ok(order)`
/// is one linearization (indexes into `ops`; indeterminate writes left out
/// are not in it).
pub fn check(ops: &[KeyOp]) -> Result<Vec<usize>, Violation> {
    // An indeterminate write whose value no read returned can be left out
    // exactly: with it or without it the same reads fit. Keeping them made
    // the search exponential in CI (a key with dozens of timed-out writes).
    let kept: Vec<usize> = (0..ops.len())
        .filter(|&i| match ops[i].op {
            RegOp::Write(Some(v)) if ops[i].returned.is_none() => ops.iter().any(|o| o.op == RegOp::Read(Some(v))),
            _ => true,
        })
        .collect();
    let sub: Vec<KeyOp> = kept.iter().map(|&i| ops[i]).collect();
    let back = |v: Vec<usize>| v.into_iter().map(|i| kept[i]).collect::<Vec<_>>();
    match check_all(&sub) {
        Ok(order) => Ok(back(order)),
        Err(v) => Err(Violation {
            longest_prefix: back(v.longest_prefix),
            stuck_on: back(v.stuck_on),
            ..v
        }),
    }
}

/// States the search may visit before it gives up undecided.
pub const SEARCH_BUDGET: usize = 2_000_000;

fn check_all(ops: &[KeyOp]) -> Result<Vec<usize>, Violation> {
    // Callers split longer histories (`history::check_linearizable` reports a
    // key it cannot check).
    assert!(ops.len() <= MAX_OPS_PER_KEY, "at most {MAX_OPS_PER_KEY} operations per key");
    for o in ops {
        if let Some(r) = o.returned {
            assert!(r >= o.invoked, "an operation returned before it was invoked");
        }
        assert!(
            o.returned.is_some() || matches!(o.op, RegOp::Write(_)),
            "only a write may be indeterminate"
        );
    }
    let complete = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.returned.is_some())
        .fold(Bits::default(), |m, (i, _)| m.with(i));
    let mut seen: HashSet<(Bits, Option<u64>)> = HashSet::new();
    let mut path = Vec::new();
    let mut best = Violation {
        longest_prefix: Vec::new(),
        value_there: None,
        stuck_on: Vec::new(),
        too_long: None,
    };
    if search(ops, complete, Bits::default(), None, &mut seen, &mut path, &mut best) {
        Ok(path)
    } else if seen.len() > SEARCH_BUDGET {
        Err(Violation {
            longest_prefix: Vec::new(),
            value_there: None,
            stuck_on: Vec::new(),
            too_long: Some(ops.len()),
        })
    } else {
        Err(best)
    }
}

/// Depth-first: extends the linearization `path` (the set `done`, register
/// `value`) by every operation that may come next.
fn search(
    ops: &[KeyOp],
    complete: Bits,
    done: Bits,
    value: Option<u64>,
    seen: &mut HashSet<(Bits, Option<u64>)>,
    path: &mut Vec<usize>,
    best: &mut Violation,
) -> bool {
    if done.covers(&complete) {
        return true;
    }
    if seen.len() > SEARCH_BUDGET || !seen.insert((done, value)) {
        return false;
    }
    // An operation may come next only if no operation still to place
    // returned before it was invoked (real-time order).
    let first_return = (0..ops.len())
        .filter(|&i| !done.has(i))
        .filter_map(|i| ops[i].returned)
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..ops.len() {
        if done.has(i) || ops[i].invoked > first_return {
            continue;
        }
        let next = match ops[i].op {
            RegOp::Write(v) => v,
            RegOp::Read(v) if v == value => value,
            RegOp::Read(_) => continue,
        };
        path.push(i);
        if search(ops, complete, done.with(i), next, seen, path, best) {
            return true;
        }
        path.pop();
    }
    if path.len() >= best.longest_prefix.len() {
        *best = Violation {
            too_long: None,
            longest_prefix: path.clone(),
            value_there: value,
            stuck_on: (0..ops.len())
                .filter(|&i| !done.has(i) && ops[i].returned.is_some() && ops[i].invoked <= first_return)
                .collect(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(v: Option<u64>, invoked: u64, returned: Option<u64>) -> KeyOp {
        KeyOp {
            op: RegOp::Write(v),
            invoked,
            returned,
        }
    }
    fn r(v: Option<u64>, invoked: u64, returned: u64) -> KeyOp {
        KeyOp {
            op: RegOp::Read(v),
            invoked,
            returned: Some(returned),
        }
    }

    #[test]
    fn sequential_reads_see_the_last_write() {
        let h = [w(Some(1), 0, Some(1)), r(Some(1), 2, 3), w(None, 4, Some(5)), r(None, 6, 7)];
        assert_eq!(check(&h).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let h = [w(Some(1), 0, Some(1)), w(Some(2), 2, Some(3)), r(Some(1), 4, 5)];
        let v = check(&h).unwrap_err();
        assert_eq!(v.stuck_on, vec![2]);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught() {
        assert!(check(&[w(Some(1), 0, Some(1)), r(Some(9), 2, 3)]).is_err());
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        // Acknowledged, then read back absent with nothing in between.
        assert!(check(&[w(Some(1), 0, Some(1)), r(None, 2, 3)]).is_err());
    }

    #[test]
    fn concurrent_operations_may_go_either_way() {
        // A read overlapping a write may see the old or the new value.
        assert!(check(&[w(Some(1), 0, Some(10)), r(None, 1, 2)]).is_ok());
        assert!(check(&[w(Some(1), 0, Some(10)), r(Some(1), 1, 2)]).is_ok());
        // But two reads in sequence inside the write may not go back.
        assert!(check(&[w(Some(1), 0, Some(10)), r(Some(1), 1, 2), r(None, 3, 4)]).is_err());
    }

    #[test]
    fn an_indeterminate_write_may_take_effect_late_or_never() {
        // Timed out; seen much later: it took effect.
        assert!(check(&[w(Some(1), 0, None), r(None, 5, 6), r(Some(1), 7, 8)]).is_ok());
        // Never seen: it did not.
        assert!(check(&[w(Some(1), 0, None), r(None, 5, 6)]).is_ok());
        // But not before it was invoked.
        assert!(check(&[r(Some(1), 0, 1), w(Some(1), 2, None)]).is_err());
        // And once overwritten by a later acknowledged write, it may still
        // land after that write (it was in flight): seen again is fine...
        assert!(check(&[w(Some(1), 0, None), w(Some(2), 1, Some(2)), r(Some(1), 3, 4)]).is_ok());
        // ...but not once both were read in an order that rules it out.
        assert!(check(&[w(Some(1), 0, None), r(Some(1), 1, 2), w(Some(2), 3, Some(4)), r(Some(1), 5, 6)]).is_err());
    }

    proptest! {
        /// A history made from a real linearizable execution, each operation
        /// taking effect at its own point inside an interval that may overlap
        /// others', some writes timing out (taking effect or not), is
        /// judged linearizable.
        #[test]
        fn overlapping_linearizable_histories_pass(ops in proptest::collection::vec((0u8..3, 0u64..6, 0u64..6, 0u8..4), 1..30)) {
            let mut h = Vec::new();
            let mut value = None;
            let mut next_value = 1;
            for (i, (kind, before, after, timeout)) in ops.into_iter().enumerate() {
                // Effect points 10 apart; intervals reach up to 5 either side.
                let at = 10 + 10 * i as u64;
                let (invoked, returned) = (at - before, at + after);
                let op = match kind {
                    0 => RegOp::Write(Some({ next_value += 1; next_value })),
                    1 => RegOp::Write(None),
                    _ => RegOp::Read(value),
                };
                let timed_out = timeout == 0 && matches!(op, RegOp::Write(_));
                // A timed-out write takes effect (or not: timeout 0 and an odd value).
                let applies = !(timed_out && next_value % 2 == 1);
                if let RegOp::Write(v) = op && applies {
                    value = v;
                }
                h.push(KeyOp { op, invoked, returned: if timed_out { None } else { Some(returned) } });
            }
            prop_assert!(check(&h).is_ok(), "{h:?}");
        }

        /// A history made by running the register sequentially, with each
        /// operation given random slack that keeps the order, is
        /// linearizable; changing one read to a value never written makes
        /// it not.
        #[test]
        fn generated_histories_are_judged_right(ops in proptest::collection::vec((0u8..3, 0u64..4), 1..40)) {
            let mut h = Vec::new();
            let mut value = None;
            let mut t = 0;
            let mut next_value = 1;
            for (kind, slack) in ops {
                let op = match kind {
                    0 => { value = Some(next_value); next_value += 1; RegOp::Write(value) }
                    1 => { value = None; RegOp::Write(None) }
                    _ => RegOp::Read(value),
                };
                h.push(KeyOp { op, invoked: t, returned: Some(t + slack) });
                t += slack + 1;
            }
            prop_assert!(check(&h).is_ok());
            if let Some(i) = h.iter().position(|o| matches!(o.op, RegOp::Read(_))) {
                h[i].op = RegOp::Read(Some(1_000_000));
                prop_assert!(check(&h).is_err());
            }
        }
    }

    #[test]
    fn histories_longer_than_a_u128_are_checked_up_to_the_limit() {
        // 400 operations: a write and a read of each value in turn, every
        // write overlapping the read before it.
        let mut ops = Vec::new();
        for v in 0..200u64 {
            ops.push(w(Some(v), 4 * v, Some(4 * v + 2)));
            ops.push(r(Some(v), 4 * v + 3, 4 * v + 4));
        }
        assert!(ops.len() > 128 && ops.len() <= MAX_OPS_PER_KEY);
        assert!(check(&ops).is_ok());
        // The last read sees a value overwritten long before: caught.
        let n = ops.len();
        ops[n - 1] = r(Some(3), 4 * 199 + 3, 4 * 199 + 4);
        let v = check(&ops).unwrap_err();
        assert_eq!(v.stuck_on, vec![n - 1]);
    }

    #[test]
    fn many_unobserved_timed_out_writes_are_left_out_and_an_observed_one_kept() {
        // 200 writes that timed out, none of whose values any read saw,
        // around acknowledged writes and reads: decided at once.
        let mut ops = Vec::new();
        for v in 0..200u64 {
            ops.push(w(Some(1000 + v), v, None));
        }
        ops.push(w(Some(1), 10, Some(11)));
        ops.push(r(Some(1), 12, 13));
        // A timed-out write a read did see is kept, and explains that read.
        ops.push(w(Some(2), 14, None));
        ops.push(r(Some(2), 20, 21));
        let order = check(&ops).unwrap();
        assert!(order.contains(&202), "{order:?}");
        // A read of a value no write wrote still fails.
        ops.push(r(Some(3), 30, 31));
        assert!(check(&ops).is_err());
    }
}
