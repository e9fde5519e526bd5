//! The audit log's tamper evidence, pure: an RFC 6962 (RFC 9162 §2.1) Merkle
//! tree over records' exact bytes, grown one record at a time from a compact
//! range of perfect-subtree hashes; checkpoints (tree size and root) signed
//! with ed25519; and the check of an export against a saved checkpoint.
//!
//! Each record carries its sequence number and the tree's root *before* it
//! (`prev_root`), so a verifier that recomputes the root record by record
//! names the first record that was edited (the root after it no longer matches
//! what the next record, or the checkpoint, says), removed or reordered (its
//! sequence number is not the next one), and sees a truncation (fewer records
//! than the checkpoint's size). Whoever rewrites every record after an edit
//! (their `prev_root`s too) is still caught by the checkpoint, which then
//! names the last record covered. Records never hold a vector or a subject id in
//! the clear: the caller hashes what identifies a person before it gets here.
//!
//! Knows nothing of Raft, the network or the clock; depends on `sha2`,
//! `serde` and `ed25519-dalek` only.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// RFC 6962's hash of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// RFC 6962 leaf hash: SHA-256(0x00 || bytes).
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(bytes);
    h.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// RFC 6962's Merkle tree hash of `leaves` (leaf hashes), by its recursive
/// definition: the reference the incremental tree is checked against.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            // The largest power of two below n.
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// A Merkle tree grown by appending, holding only the roots of its perfect
/// subtrees (at most one per bit of the size): O(log n) memory and work per
/// record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    size: u64,
    /// Perfect-subtree roots, largest (leftmost) first.
    peaks: Vec<Hash>,
}

impl Tree {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        // Merge equal-sized subtrees: one merge per trailing one bit of size.
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.peaks.pop().expect("a peak per one bit");
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.peaks.push(h);
        self.size += 1;
    }

    /// The root: the peaks folded right to left.
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        let Some(last) = it.next() else { return empty_root() };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

/// A signed statement of the log's size and root. The signed bytes are
/// `origin`, the size and the root in hex, one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Which log (e.g. `sovra-audit/uk`).
    pub origin: String,
    pub size: u64,
    /// Hex.
    pub root: String,
    /// ed25519, hex.
    pub signature: String,
}

fn checkpoint_body(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", hex::encode(root))
}

impl Checkpoint {
    pub fn sign(key: &SigningKey, origin: &str, tree: &Tree) -> Checkpoint {
        let root = tree.root();
        let sig = key.sign(checkpoint_body(origin, tree.size(), &root).as_bytes());
        Checkpoint {
            origin: origin.to_string(),
            size: tree.size(),
            root: hex::encode(root),
            signature: hex::encode(sig.to_bytes()),
        }
    }

    /// The root, once the signature verifies under `key`.
    pub fn verified_root(&self, key: &VerifyingKey) -> Result<Hash, String> {
        let root: Hash = hex::decode(&self.root)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("the checkpoint's root is not 32 bytes of hex")?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("the checkpoint's signature is not 64 bytes of hex")?;
        key.verify(
            checkpoint_body(&self.origin, self.size, &root).as_bytes(),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| "the checkpoint's signature does not verify under this key".to_string())?;
        Ok(root)
    }
}

/// What every exported record carries for the check, beside its own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chained {
    /// 0-based position in the log.
    pub seq: u64,
    /// Hex root of the tree of every record before this one.
    pub prev_root: String,
}

/// Why an export does not match its checkpoint, naming the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("the checkpoint does not verify: {0}")]
    Checkpoint(String),
    #[error("line {line}: not a record ({why})")]
    Unreadable { line: usize, why: String },
    #[error("line {line}: record {found} where record {expected} belongs (one was removed, reordered or inserted)")]
    Sequence { line: usize, expected: u64, found: u64 },
    #[error("record {seq} was altered (the log after it does not match what follows)")]
    Altered { seq: u64 },
    #[error("the export stops after {have} records; the checkpoint covers {want} (truncated)")]
    Truncated { have: u64, want: u64 },
}

/// Checks export `lines` (each a JSON record with [`Chained`]'s fields; its
/// exact bytes are its leaf) against `checkpoint` under `key`. Records past
/// the checkpoint are checked for order and chaining but not covered by it.
/// Returns how many records the checkpoint covers.
pub fn verify_export<'a>(lines: impl IntoIterator<Item = &'a str>, checkpoint: &Checkpoint, key: &VerifyingKey) -> Result<u64, Bad> {
    let want_root = checkpoint.verified_root(key).map_err(Bad::Checkpoint)?;
    let mut tree = Tree::default();
    let mut at_checkpoint = (checkpoint.size == 0).then(empty_root);
    for (i, line) in lines.into_iter().enumerate() {
        let c: Chained = serde_json::from_str(line).map_err(|e| Bad::Unreadable {
            line: i + 1,
            why: e.to_string(),
        })?;
        if c.seq != tree.size() {
            return Err(Bad::Sequence {
                line: i + 1,
                expected: tree.size(),
                found: c.seq,
            });
        }
        if c.prev_root != hex::encode(tree.root()) {
            // The tree so far is not what this record saw: the record before
            // it was altered (the first record has an empty tree before it,
            // which cannot differ, so seq >= 1 here).
            return Err(Bad::Altered { seq: c.seq - 1 });
        }
        tree.push(leaf_hash(line.as_bytes()));
        if tree.size() == checkpoint.size {
            at_checkpoint = Some(tree.root());
        }
    }
    match at_checkpoint {
        None => Err(Bad::Truncated {
            have: tree.size(),
            want: checkpoint.size,
        }),
        // The last covered record has no successor to vouch for it in the
        // export: the checkpoint does.
        Some(root) if root != want_root => Err(Bad::Altered {
            seq: checkpoint.size.saturating_sub(1),
        }),
        Some(_) => Ok(checkpoint.size),
    }
}

/// One audited call. Holds no vector and no subject id: a query vector is
/// kept as its SHA-256 ([`vector_sha256`]), a probe likeness likewise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The node's clock, Unix ms.
    pub at_ms: u64,
    /// The API key's id (never its secret).
    pub key_id: String,
    /// The call: `search`, `upsert`, `erase`, `opt_out`, `subject_access`, ...
    pub call: String,
    /// The caller's `x-purpose`.
    pub purpose: String,
    pub collection: String,
    /// Regions the call read or wrote.
    pub regions: Vec<String>,
    /// Shards it touched.
    pub shards: u32,
    /// Points returned, written or erased.
    pub results: u64,
    /// Hex SHA-256 of the query vector, when there was one.
    pub query_sha256: Option<String>,
    /// What the call acted on, when that is no personal data: a key id, an
    /// erasure job id, an opt-out template id, a region.
    pub target: Option<String>,
    /// How it ended: a gRPC code name (`OK`, `PERMISSION_DENIED`, ...).
    pub status: String,
}

/// A record as the log holds and exports it: its position, the root before
/// it, and its fields, as one JSON line (whose exact bytes are its leaf).
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev_root: String,
    #[serde(flatten)]
    record: &'a Record,
}

/// Hex SHA-256 of a vector's components as little-endian `f32`s.
pub fn vector_sha256(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// The writing side of one region's log: appends records as chained lines.
#[derive(Debug, Clone, Default)]
pub struct Log {
    tree: Tree,
}

impl Log {
    /// A log that already holds `tree`'s records (from its saved state).
    pub fn resume(tree: Tree) -> Self {
        Self { tree }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Appends `r`; returns its line, the bytes to store and export as is.
    pub fn append(&mut self, r: &Record) -> String {
        let line = serde_json::to_string(&Line {
            seq: self.tree.size(),
            prev_root: hex::encode(self.tree.root()),
            record: r,
        })
        .expect("a record serialises");
        self.tree.push(leaf_hash(line.as_bytes()));
        line
    }

    pub fn checkpoint(&self, key: &SigningKey, origin: &str) -> Checkpoint {
        Checkpoint::sign(key, origin, &self.tree)
    }
}

#[cfg(test)]
mod tests;
