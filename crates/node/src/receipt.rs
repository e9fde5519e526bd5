//! Erasure receipts: a done job's [`Receipt`] as JSON (those exact bytes are
//! what is signed) with an ed25519 signature by the cluster's receipt key,
//! and their verification.
//!
//! The key is derived from the cluster secret (HMAC-SHA256 under a fixed
//! label), so every node of a cluster signs with the same key and gives the
//! same signature (ed25519 is deterministic), and an operator who holds the
//! secret can print the public key offline (`sovra receipt-key`). A node that
//! runs alone with no configured secret keeps a random seed in its own
//! database instead. Whoever holds the cluster secret can sign receipts:
//! it is the cluster's key, not a third party's.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use sovra_meta::erasure::Receipt;

const LABEL: &[u8] = b"sovra.erasure-receipt.key.v1";
/// The audit log's checkpoint key: derived alike, under its own label, so
/// the one cannot sign for the other.
pub const AUDIT_LABEL: &[u8] = b"sovra.audit-checkpoint.key.v1";

pub struct ReceiptKey(SigningKey);

/// A signed receipt as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub receipt_json: String,
    pub signature: String,
    pub public_key: String,
}

impl ReceiptKey {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self::derived(secret, LABEL)
    }

    /// The key derived from `secret` under `label` (HMAC-SHA256).
    pub fn derived(secret: &[u8], label: &[u8]) -> Self {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(label);
        Self::from_seed(mac.finalize().into_bytes().into())
    }

    pub fn signing(&self) -> &SigningKey {
        &self.0
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.0.verifying_key().as_bytes())
    }

    pub fn sign(&self, receipt: &Receipt) -> Signed {
        let receipt_json = serde_json::to_string(receipt).expect("a receipt serialises");
        let signature = hex::encode(self.0.sign(receipt_json.as_bytes()).to_bytes());
        Signed {
            receipt_json,
            signature,
            public_key: self.public_hex(),
        }
    }
}

/// Checks `signature` (hex) over the exact bytes of `receipt_json` under
/// `public_key` (hex), and that the bytes are a receipt of a format this
/// build reads. Returns the receipt, or what is wrong.
pub fn verify(receipt_json: &str, signature: &str, public_key: &str) -> Result<Receipt, String> {
    let key: [u8; 32] = hex::decode(public_key.trim())
        .map_err(|e| format!("the public key is not hex: {e}"))?
        .try_into()
        .map_err(|_| "the public key is not 32 bytes".to_string())?;
    let key = VerifyingKey::from_bytes(&key).map_err(|e| format!("the public key is not an ed25519 key: {e}"))?;
    let sig: [u8; 64] = hex::decode(signature.trim())
        .map_err(|e| format!("the signature is not hex: {e}"))?
        .try_into()
        .map_err(|_| "the signature is not 64 bytes".to_string())?;
    key.verify(receipt_json.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| "the signature does not match the receipt under this key: it was altered, or signed by another key".to_string())?;
    let receipt: Receipt = serde_json::from_str(receipt_json).map_err(|e| format!("the signed bytes are not a receipt: {e}"))?;
    if receipt.format != sovra_meta::erasure::RECEIPT_FORMAT {
        return Err(format!(
            "receipt format {} is not {}, the one this build reads",
            receipt.format,
            sovra_meta::erasure::RECEIPT_FORMAT
        ));
    }
    Ok(receipt)
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The GetErasureJob answer as JSON (grpcurl's output); stdin if unset.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// The cluster's receipt key (hex; `sovra receipt-key --config ...`, or
    /// what `sovra dev` prints). Unset: the key in the answer itself, which
    /// shows the receipt is intact but not whose it is.
    #[arg(long)]
    pub public_key: Option<String>,
}

/// `sovra verify-receipt`: prints what the receipt says once it verifies;
/// an error (and a non-zero exit) says why it does not.
pub fn verify_command(args: VerifyArgs) -> anyhow::Result<()> {
    let text = match &args.file {
        Some(p) => std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?,
        None => std::io::read_to_string(std::io::stdin())?,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("the answer is not JSON: {e}"))?;
    // grpcurl prints proto3 JSON (lowerCamelCase); accept the proto names too.
    let field = |camel: &str, snake: &str| v.get(camel).or_else(|| v.get(snake)).and_then(|x| x.as_str()).map(str::to_string);
    let state = field("state", "state").unwrap_or_default();
    let json = field("receiptJson", "receipt_json").ok_or_else(|| {
        anyhow::anyhow!("the answer holds no receipt (job state {state:?}): a receipt comes once every replica has purged")
    })?;
    let signature = field("signature", "signature").ok_or_else(|| anyhow::anyhow!("the answer holds no signature"))?;
    let embedded = field("publicKey", "public_key");
    let key = match (&args.public_key, &embedded) {
        (Some(k), _) => k.clone(),
        (None, Some(k)) => {
            eprintln!("note: checked against the key in the answer; pass --public-key to check it is your cluster's");
            k.clone()
        }
        (None, None) => anyhow::bail!("no public key: pass --public-key"),
    };
    let r = verify(&json, &signature, &key).map_err(|e| anyhow::anyhow!("the receipt does not verify: {e}"))?;
    println!("receipt verified under key {key}");
    println!(
        "job {} ({} erasure) of collection {} in region {}: {} points erased",
        r.job, r.kind, r.collection, r.region, r.erased
    );
    println!(
        "requested {} ms, acknowledged {} ms, purged everywhere {} ms (Unix ms)",
        r.requested_at_ms, r.acknowledged_at_ms, r.done_at_ms
    );
    for s in &r.shards {
        println!("shard {}: erase at log index {}, {} points", s.shard, s.log_index, s.erased);
        for x in &s.replicas {
            println!(
                "  node {}: {}{}",
                x.node,
                x.outcome,
                x.purged_through.map(|t| format!(" through log index {t}")).unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sovra_meta::erasure::{ReceiptReplica, ReceiptShard};

    fn receipt() -> Receipt {
        Receipt {
            format: sovra_meta::erasure::RECEIPT_FORMAT.into(),
            job: "erase-1".into(),
            kind: "subject".into(),
            collection: "faces".into(),
            region: "eu".into(),
            requested_at_ms: 1,
            acknowledged_at_ms: 2,
            done_at_ms: 3,
            erased: 4,
            shards: vec![ReceiptShard {
                shard: 0,
                log_index: 9,
                erased: 4,
                replicas: vec![ReceiptReplica {
                    node: 1,
                    outcome: "purged".into(),
                    purged_through: Some(9),
                    removed: Some(4),
                    at_ms: Some(3),
                }],
            }],
        }
    }

    #[test]
    fn a_receipt_verifies_under_its_clusters_key_only_and_not_once_altered() {
        let a = ReceiptKey::from_secret(b"cluster-a-secret-0123456789abcdef");
        let again = ReceiptKey::from_secret(b"cluster-a-secret-0123456789abcdef");
        let b = ReceiptKey::from_secret(b"cluster-b-secret-0123456789abcdef");
        let s = a.sign(&receipt());
        assert_eq!(s, again.sign(&receipt()), "every node of a cluster signs alike");
        assert_eq!(verify(&s.receipt_json, &s.signature, &s.public_key).unwrap(), receipt());
        let wrong_key = verify(&s.receipt_json, &s.signature, &b.public_hex()).unwrap_err();
        assert!(wrong_key.contains("does not match"), "{wrong_key}");
        let altered = s.receipt_json.replace("\"erased\":4", "\"erased\":5");
        assert_ne!(altered, s.receipt_json);
        assert!(verify(&altered, &s.signature, &s.public_key).is_err());
        assert!(verify(&s.receipt_json, "zz", &s.public_key).unwrap_err().contains("not hex"));
    }

    #[test]
    fn verify_receipt_reads_grpcurls_answer_and_fails_on_a_changed_byte_or_another_key() {
        let k = ReceiptKey::from_secret(b"cluster-a-secret-0123456789abcdef");
        let s = k.sign(&receipt());
        let answer = |json: &str| {
            serde_json::json!({"job": "erase-1", "state": "done", "receiptJson": json, "signature": s.signature, "publicKey": s.public_key})
                .to_string()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.json");
        let run = |text: String, key: Option<String>| {
            std::fs::write(&file, text).unwrap();
            verify_command(VerifyArgs {
                file: Some(file.clone()),
                public_key: key,
            })
        };
        run(answer(&s.receipt_json), Some(k.public_hex())).unwrap();
        run(answer(&s.receipt_json), None).unwrap();
        let other = ReceiptKey::from_secret(b"cluster-b-secret-0123456789abcdef").public_hex();
        let e = run(answer(&s.receipt_json), Some(other)).unwrap_err().to_string();
        assert!(e.contains("does not verify"), "{e}");
        let e = run(answer(&s.receipt_json.replace("faces", "facez")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
        let pending = serde_json::json!({"job": "erase-1", "state": "acknowledged"}).to_string();
        let e = run(pending, None).unwrap_err().to_string();
        assert!(e.contains("no receipt") && e.contains("acknowledged"), "{e}");
    }
}
