use thiserror::Error;

/// Failures of the storage layer. Any of these means this replica can no longer be
/// trusted to have written what it was told: the node stops rather than carry on.
#[derive(Debug, Error)]
pub enum ShardError {
    #[error("storage I/O failed")]
    Storage(#[from] sled::Error),
    #[error("stored record at {what} cannot be decoded")]
    Corrupt {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("data directory I/O failed")]
    Io(#[from] std::io::Error),
    #[error("encoding a record failed")]
    Encode(#[source] postcard::Error),
    /// A stored or received record this collection cannot hold (written by an
    /// older build, or corrupted): it never reaches the index.
    #[error("record {what} is invalid for its collection: {reason}")]
    Invalid { what: String, reason: String },
    #[error(
        "this node already holds {open} of {shares} replicas its page-cache budget is shared among; raise max_replicas (and cache_capacity_mb with it) or place fewer replicas here"
    )]
    Budget { open: usize, shares: usize },
    #[error("data directory has format version {found}, this build reads {expected}")]
    FormatVersion { found: u32, expected: u32 },
}
