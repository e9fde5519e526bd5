//! `sovra ctl`: operator commands: checking an audit export offline, and
//! fetching one (with a signed checkpoint) from a node of its region.

use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// The audit log.
    Audit {
        #[command(subcommand)]
        what: AuditCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Checks an audit export (JSON lines) against a saved checkpoint and
    /// names the first bad record.
    Verify(AuditVerifyArgs),
    /// Saves a region's signed checkpoint, then its whole log as JSON lines,
    /// from a node of the region (data_protection scope).
    Export(AuditExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct AuditExportArgs {
    /// A node of the region (its public gRPC address, host:port).
    #[arg(long)]
    pub addr: String,
    /// An API key with the data_protection scope.
    #[arg(long, env = "SOVRA_KEY")]
    pub key: String,
    /// The region whose log to export (default: the node's).
    #[arg(long, default_value = "")]
    pub region: String,
    /// Where to write the lines.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the checkpoint (JSON); it covers the log as it was
    /// just before the export, so the export verifies against it.
    #[arg(long)]
    pub checkpoint: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct AuditVerifyArgs {
    /// The export: one JSON record per line.
    #[arg(long)]
    pub export: PathBuf,
    /// The checkpoint saved earlier (JSON: origin, size, root, signature).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The key the checkpoint was signed with (hex ed25519 public key).
    #[arg(long)]
    pub public_key: String,
}

pub fn run(cmd: CtlCommand) -> anyhow::Result<()> {
    match cmd {
        CtlCommand::Audit {
            what: AuditCommand::Verify(a),
        } => audit_verify(&a).map(|msg| println!("{msg}")),
        CtlCommand::Audit {
            what: AuditCommand::Export(a),
        } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(audit_export(&a)).map(|msg| println!("{msg}"))
        }
    }
}

/// Fetches a checkpoint, then every line from 0, and writes both.
pub async fn audit_export(a: &AuditExportArgs) -> anyhow::Result<String> {
    use sovra_proto::v1;
    let uri = if a.addr.contains("://") {
        a.addr.clone()
    } else {
        format!("http://{}", a.addr)
    };
    let ch = tonic::transport::Endpoint::from_shared(uri)?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", a.addr))?;
    let mut client = v1::audit_client::AuditClient::new(crate::dev::keyed(&ch, &a.key));
    let c = client
        .get_audit_checkpoint(v1::GetAuditCheckpointRequest { region: a.region.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("GetAuditCheckpoint: {}", s.message()))?
        .into_inner();
    let checkpoint = sovra_audit::Checkpoint {
        origin: c.origin.clone(),
        size: c.size,
        root: c.root.clone(),
        signature: c.signature.clone(),
    };
    let mut out = String::new();
    let (mut from, mut n) = (0u64, 0u64);
    loop {
        let page = client
            .export_audit(v1::ExportAuditRequest {
                region: a.region.clone(),
                from_seq: from,
                limit: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("ExportAudit from {from}: {}", s.message()))?
            .into_inner();
        for l in &page.lines {
            out.push_str(l);
            out.push('\n');
        }
        n += page.lines.len() as u64;
        from = page.next_seq;
        if !page.more {
            break;
        }
    }
    let write = |p: &PathBuf, body: &str| std::fs::write(p, body).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()));
    write(&a.checkpoint, &serde_json::to_string_pretty(&checkpoint)?)?;
    write(&a.out, &out)?;
    Ok(format!(
        "{n} records of {} written to {}; checkpoint (size {}, root {}) to {}; signed by public key {}",
        c.origin,
        a.out.display(),
        c.size,
        c.root,
        a.checkpoint.display(),
        c.public_key
    ))
}

/// What `sovra ctl audit verify` prints when the export checks out; an
/// error naming the first bad record otherwise.
pub fn audit_verify(a: &AuditVerifyArgs) -> anyhow::Result<String> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
    let export = read(&a.export)?;
    let checkpoint: sovra_audit::Checkpoint =
        serde_json::from_str(&read(&a.checkpoint)?).map_err(|e| anyhow::anyhow!("the checkpoint is not one: {e}"))?;
    let key: [u8; 32] = hex::decode(a.public_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("--public-key must be 32 bytes of hex"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|e| anyhow::anyhow!("--public-key is not an ed25519 key: {e}"))?;
    let lines = export.lines().filter(|l| !l.is_empty());
    let covered =
        sovra_audit::verify_export(lines, &checkpoint, &key).map_err(|bad| anyhow::anyhow!("the audit export does not verify: {bad}"))?;
    Ok(format!(
        "{covered} records of {} verified against its checkpoint (root {})",
        checkpoint.origin, checkpoint.root
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_verify_passes_an_intact_export_and_names_an_altered_record() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let mut log = sovra_audit::Log::default();
        let lines: Vec<String> = (0..5u64)
            .map(|i| {
                log.append(&sovra_audit::Record {
                    at_ms: i,
                    key_id: "k".into(),
                    call: "search".into(),
                    purpose: "p".into(),
                    collection: "people".into(),
                    regions: vec!["uk".into()],
                    shards: 1,
                    results: i,
                    query_sha256: None,
                    target: None,
                    status: "OK".into(),
                })
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (export, cp) = (dir.path().join("audit.jsonl"), dir.path().join("cp.json"));
        std::fs::write(&cp, serde_json::to_string(&log.checkpoint(&key, "sovra-audit/uk")).unwrap()).unwrap();
        let args = AuditVerifyArgs {
            export: export.clone(),
            checkpoint: cp,
            public_key: hex::encode(key.verifying_key().as_bytes()),
        };
        std::fs::write(&export, lines.join("\n") + "\n").unwrap();
        assert!(audit_verify(&args).unwrap().starts_with("5 records"));
        let altered = lines.join("\n").replace("\"results\":2", "\"results\":0");
        std::fs::write(&export, altered).unwrap();
        let e = audit_verify(&args).unwrap_err().to_string();
        assert!(e.contains("record 2 was altered"), "{e}");
    }
}
