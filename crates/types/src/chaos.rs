//! Test-only fault switches for the chaos harness's "checkers that can fail"
//! runs: each breaks one invariant on purpose (acknowledge a write that was
//! never committed, skip an erasure, store another region's point, ...), so a
//! run with it on must end with that invariant's checker reporting a
//! violation. The switches exist only with the `chaos-switches` feature,
//! which only the test build turns on (the `sovra-chaos` crate's
//! dev-dependencies): a release build cannot be told to break anything, and
//! `broken` is a constant `false` there. The set of switches on is process
//! wide, set once at start by the node binary (from `SOVRA_CHAOS_BREAK`);
//! this crate reads no environment itself.

/// One deliberate break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Switch {
    /// Every third single-point upsert is acknowledged without being proposed (D1).
    AckWithoutCommit = 1,
    /// An erasure by ids removes nothing but is acknowledged (E1).
    SkipErasure = 2,
    /// A point within an opted-out likeness is written (E3: re-ingest).
    SkipOptOutCheck = 4,
    /// A point of another region written through this node is stored in this
    /// node's region (R2).
    StoreForeignRegion = 8,
    /// A search asks every region, whatever the key and policies allow (R3).
    IgnoreScope = 16,
    /// Expired points are served (and never swept) (T1).
    ServeExpired = 32,
    /// This replica drops every fifth point it applies (D1: digests).
    Diverge = 64,
}

impl Switch {
    pub const ALL: [Switch; 7] = [
        Switch::AckWithoutCommit,
        Switch::SkipErasure,
        Switch::SkipOptOutCheck,
        Switch::StoreForeignRegion,
        Switch::IgnoreScope,
        Switch::ServeExpired,
        Switch::Diverge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Switch::AckWithoutCommit => "ack-without-commit",
            Switch::SkipErasure => "skip-erasure",
            Switch::SkipOptOutCheck => "skip-optout-check",
            Switch::StoreForeignRegion => "store-foreign-region",
            Switch::IgnoreScope => "ignore-scope",
            Switch::ServeExpired => "serve-expired",
            Switch::Diverge => "diverge",
        }
    }

    pub fn parse(name: &str) -> Option<Switch> {
        Switch::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[cfg(feature = "chaos-switches")]
static ON: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether `s` is on (always `false` without the `chaos-switches` feature).
#[inline]
pub fn broken(s: Switch) -> bool {
    #[cfg(feature = "chaos-switches")]
    {
        ON.load(std::sync::atomic::Ordering::Relaxed) & s as u32 != 0
    }
    #[cfg(not(feature = "chaos-switches"))]
    {
        let _ = s;
        false
    }
}

/// Turns on the switches named in `names` (comma-separated). A build
/// without the feature refuses any name, so a harness asking for a break
/// from a release binary fails loudly instead of running unbroken.
pub fn turn_on(names: &str) -> Result<Vec<Switch>, String> {
    let mut on = Vec::new();
    for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let s = Switch::parse(n).ok_or_else(|| {
            let known: Vec<_> = Switch::ALL.iter().map(|s| s.name()).collect();
            format!("unknown chaos switch {n:?}; known: {}", known.join(", "))
        })?;
        on.push(s);
    }
    if on.is_empty() {
        return Ok(on);
    }
    #[cfg(feature = "chaos-switches")]
    {
        for s in &on {
            ON.fetch_or(*s as u32, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(on)
    }
    #[cfg(not(feature = "chaos-switches"))]
    Err("this build has no chaos switches (only a test build, with the sovra-types feature chaos-switches, has them)".into())
}
