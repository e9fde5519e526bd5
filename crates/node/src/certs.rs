//! `sovra certs`: a cluster CA, and node certificates it signs whose subject
//! alternative names carry the node's identity ([`sovra_raft::tls`]): its
//! id, its region, `cluster.sovra`, and the names clients dial (`localhost`
//! and 127.0.0.1 always, so a probe inside the node's container can check
//! it). `sovra dev` and the tests make a throwaway CA with the same code.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sovra_raft::tls::{CLUSTER_NAME, node_name, node_region_name};
use std::path::{Path, PathBuf};

/// A CA: its certificate and key, PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(..)")
    }
}

/// A node's certificate and key, PEM.
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(p: &mut CertificateParams, days: u32) {
    // A little backdated, so a peer whose clock is slightly behind takes it.
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

impl Ca {
    /// A new CA with a fresh P-256 key. `name` goes in its common name.
    pub fn generate(name: &str, days: u32) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sovra");
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, days);
        let cert = p.self_signed(&key).context("signing the CA certificate")?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA from its PEM files.
    pub fn read(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            cert_pem: std::fs::read_to_string(cert).with_context(|| format!("reading the CA certificate {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key).with_context(|| format!("reading the CA key {}", key.display()))?,
        })
    }

    /// A certificate for node `id` of `region`, for server and client use,
    /// also naming `hosts` (DNS names or IP addresses clients dial).
    pub fn node(&self, id: u64, region: &str, hosts: &[String], days: u32) -> anyhow::Result<NodeCert> {
        let ca_key = KeyPair::from_pem(&self.key_pem).context("the CA key is not a PEM private key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).context("the CA certificate cannot sign")?;
        let mut names = vec![
            node_name(id),
            node_region_name(id, region),
            CLUSTER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        for h in hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let mut p = CertificateParams::new(names).context("a host is neither a DNS name nor an IP address")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sovra");
        dn.push(DnType::CommonName, format!("node {id} ({region})"));
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, days);
        let key = KeyPair::generate().context("generating the node key")?;
        let cert = p.signed_by(&key, &issuer).context("signing the node certificate")?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `text` to `path`, refusing to replace a file (a CA or key
/// overwritten by mistake cannot be had back); `secret` files get mode 0600.
fn write_new(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The files of a node's certificate in `dir`.
pub fn node_files(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (dir.join(format!("node-{id}.pem")), dir.join(format!("node-{id}-key.pem")))
}

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Makes a cluster CA: DIR/ca.pem (give it to every node and client as
    /// tls_ca / --ca) and DIR/ca-key.pem (keep it off the nodes).
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "sovra cluster CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Makes node ID's certificate, signed by the CA in --ca-dir:
    /// OUT/node-ID.pem and OUT/node-ID-key.pem (tls_cert and tls_key).
    Node {
        /// The directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        region: String,
        /// A DNS name or IP address clients dial this node at (repeatable);
        /// localhost and 127.0.0.1 are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(cmd: &CertsCommand) -> anyhow::Result<String> {
    match cmd {
        CertsCommand::Ca { out, name, days } => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let ca = Ca::generate(name, *days)?;
            write_new(&out.join("ca.pem"), &ca.cert_pem, false)?;
            write_new(&out.join("ca-key.pem"), &ca.key_pem, true)?;
            Ok(format!("wrote {0}/ca.pem and {0}/ca-key.pem", out.display()))
        }
        CertsCommand::Node {
            ca_dir,
            id,
            region,
            hosts,
            out,
            days,
        } => {
            sovra_types::RegionId::parse(region).map_err(|e| anyhow::anyhow!("--region {region:?}: {e}"))?;
            let ca = Ca::read(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))?;
            let c = ca.node(*id, region, hosts, *days)?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let (cert, key) = node_files(out, *id);
            write_new(&cert, &c.cert_pem, false)?;
            write_new(&key, &c.key_pem, true)?;
            Ok(format!("wrote {} and {}", cert.display(), key.display()))
        }
    }
}

/// A throwaway CA in `dir` with certificates for `nodes` (id, region):
/// `sovra dev` and the tests. Returns the CA.
pub fn throwaway(dir: &Path, nodes: &[(u64, &str)]) -> anyhow::Result<Ca> {
    let nodes: Vec<(u64, &str, Vec<String>)> = nodes.iter().map(|(id, r)| (*id, *r, Vec::new())).collect();
    throwaway_with_hosts(dir, &nodes)
}

/// As [`throwaway`], each node's certificate also naming its hosts (the
/// addresses clients dial it by, as the chaos runs' namespaces).
pub fn throwaway_with_hosts(dir: &Path, nodes: &[(u64, &str, Vec<String>)]) -> anyhow::Result<Ca> {
    std::fs::create_dir_all(dir)?;
    let ca = Ca::generate("sovra throwaway CA", 30)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    for (id, region, hosts) in nodes {
        let c = ca.node(*id, region, hosts, 30)?;
        let (cert, key) = node_files(dir, *id);
        std::fs::write(cert, c.cert_pem)?;
        std::fs::write(key, c.key_pem)?;
    }
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_region_and_chains_to_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        throwaway(dir.path(), &[(7, "uk")]).unwrap();
        let (cert, key) = node_files(dir.path(), 7);
        let files = sovra_raft::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: dir.path().join("ca.pem"),
        };
        sovra_raft::tls::TlsState::load(files.clone(), 7, "uk").unwrap();
        // The same certificate as another node's, or another region's: refused at load.
        let e = sovra_raft::tls::TlsState::load(files.clone(), 8, "uk").unwrap_err().to_string();
        assert!(e.contains("not node 8's of region uk"), "{e}");
        let e = sovra_raft::tls::TlsState::load(files.clone(), 7, "us").unwrap_err().to_string();
        assert!(e.contains("node-7.us.sovra"), "{e}");
        // Another CA: refused.
        let other = tempfile::tempdir().unwrap();
        throwaway(other.path(), &[]).unwrap();
        let e = sovra_raft::tls::TlsState::load(
            sovra_raft::tls::TlsFiles {
                ca: other.path().join("ca.pem"),
                ..files.clone()
            },
            7,
            "uk",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not node 7's") && e.contains("checked as node-7.sovra"), "{e}");
        // A key that is not the certificate's: refused.
        let other_node = other.path().join("n");
        std::fs::create_dir_all(&other_node).unwrap();
        let ca = Ca::generate("x", 1).unwrap();
        let c = ca.node(7, "uk", &[], 1).unwrap();
        std::fs::write(other_node.join("key.pem"), c.key_pem).unwrap();
        let e = sovra_raft::tls::TlsState::load(
            sovra_raft::tls::TlsFiles {
                key: other_node.join("key.pem"),
                ..files
            },
            7,
            "uk",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls_key"), "{e}");
    }
}
