//! Real `sovra node` processes, each in its host's network namespace
//! ([`crate::net`]): configs written per node (public API on
//! `10.77.<net>.<host>:7300`, cluster API on `:7400`), started with the
//! bootstrap node first and the others joining through it, and the
//! nemesis's process faults: SIGKILL and restart on the same data, SIGSTOP
//! and SIGCONT. Every node's output goes to a log file in the run's
//! directory, kept when a run fails. Every port but metrics is TLS, as in
//! production: a throwaway CA per run signs each node's certificate (its
//! identity, region and namespace address), and the harness's clients trust
//! it ([`Cluster::ca`]).

use crate::net::Net;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const GRPC_PORT: u16 = 7300;
pub const CLUSTER_PORT: u16 = 7400;
pub const METRICS_PORT: u16 = 7500;

/// The `sovra` binary: `SOVRA_BIN`, else the workspace's debug build.
pub fn sovra_bin() -> PathBuf {
    std::env::var_os("SOVRA_BIN").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug/sovra")
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from("target/debug/sovra"))
    })
}

pub struct Node {
    pub host: usize,
    pub region: String,
    /// Extra environment (the chaos switches of a breaking run).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

pub struct Cluster {
    pub net: Net,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// The first admin key, printed by the bootstrap node.
    pub admin_key: String,
    bin: PathBuf,
}

impl Cluster {
    /// Starts one node per entry of `regions` (host i+1 in `net`), node 1
    /// bootstrapping; returns once the bootstrap node printed the first
    /// admin key and every node its listening line.
    pub fn start(net: Net, dir: &Path, regions: &[&str]) -> anyhow::Result<Cluster> {
        Cluster::start_with(net, dir, regions, |_| Vec::new())
    }

    /// As [`Cluster::start`], with `env(host)` added to each node's environment.
    pub fn start_with(net: Net, dir: &Path, regions: &[&str], env: impl Fn(usize) -> Vec<(String, String)>) -> anyhow::Result<Cluster> {
        let mut c = Cluster {
            net,
            dir: dir.to_path_buf(),
            nodes: Vec::new(),
            admin_key: String::new(),
            bin: sovra_bin(),
        };
        anyhow::ensure!(
            c.bin.exists(),
            "no sovra binary at {} (build it, or set SOVRA_BIN)",
            c.bin.display()
        );
        let certs: Vec<(u64, &str, Vec<String>)> = (1..=regions.len())
            .map(|h| (h as u64, regions[h - 1], vec![c.net.addr(h)]))
            .collect();
        sovra_node::certs::throwaway_with_hosts(&c.tls_dir(), &certs)?;
        for (i, region) in regions.iter().enumerate() {
            c.nodes.push(Node {
                host: i + 1,
                region: region.to_string(),
                env: env(i + 1),
                child: None,
                starts: 0,
            });
            let key = c.spawn(i + 1)?;
            if let Some(k) = key {
                c.admin_key = k;
            }
        }
        anyhow::ensure!(!c.admin_key.is_empty(), "the bootstrap node printed no admin key");
        Ok(c)
    }

    /// The run's throwaway CA and node certificates.
    fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The CA certificate the run's clients trust.
    pub fn ca(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    /// Node `host`'s public address.
    pub fn grpc(&self, host: usize) -> String {
        format!("{}:{GRPC_PORT}", self.net.addr(host))
    }

    fn config(&self, host: usize) -> anyhow::Result<PathBuf> {
        let n = &self.nodes[host - 1];
        let addr = self.net.addr(host);
        let (cert, key) = sovra_node::certs::node_files(&self.tls_dir(), host as u64);
        let mut text = format!(
            "node_id = {host}\nregion = \"{}\"\nzone = \"{}-z{host}\"\ndata_dir = \"{}\"\n\
             grpc_listen = \"{addr}:{GRPC_PORT}\"\ncluster_listen = \"{addr}:{CLUSTER_PORT}\"\n\
             metrics_listen = \"{addr}:{METRICS_PORT}\"\ncluster_secret = \"chaos-cluster-secret-0123456789\"\n\
             heartbeat_ms = 200\ndown_after_ms = 5000\n\
             tls = true\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
            n.region,
            n.region,
            self.data_dir(host).display(),
            cert.display(),
            key.display(),
            self.ca().display(),
        );
        if host == 1 {
            text.push_str("bootstrap = true\n");
        } else {
            text.push_str(&format!("join = [\"{}:{CLUSTER_PORT}\"]\n", self.net.addr(1)));
        }
        let path = self.dir.join(format!("node{host}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts node `host` (again: on its data); waits for its listening
    /// line; returns the admin key if it printed one.
    fn spawn(&mut self, host: usize) -> anyhow::Result<Option<String>> {
        // The bootstrap node's first start prints its key after it listens.
        let wants_key = host == 1 && !self.data_dir(1).exists();
        let cfg = self.config(host)?;
        let log = self.log_file(host);
        let mut child = self
            .net
            .command(host, self.bin.to_str().unwrap())
            .args(["node", "--config", cfg.to_str().unwrap()])
            .envs(self.nodes[host - 1].env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout so the node never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.nodes[host - 1].child = Some(child);
        self.nodes[host - 1].starts += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut key, mut listening) = (None, false);
        loop {
            if listening && (key.is_some() || !wants_key) {
                return Ok(key);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "node {host} printed no listening line in 60 s (log: {})",
                log.display()
            );
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("first admin key") => key = line.split_whitespace().last().map(str::to_string),
                Ok(line) if line.starts_with("sovra node listening") => listening = true,
                Ok(_) => {}
                Err(_) => anyhow::bail!("node {host} ended or printed no listening line (log: {})", log.display()),
            }
        }
    }

    fn signal(&self, host: usize, sig: i32) -> anyhow::Result<()> {
        let child = self.nodes[host - 1]
            .child
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("node {host} is not running"))?;
        let out = std::process::Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()?;
        anyhow::ensure!(out.success(), "kill -{sig} node {host} failed");
        Ok(())
    }

    /// Whether node `host` runs (started and not killed).
    pub fn running(&self, host: usize) -> bool {
        self.nodes[host - 1].child.is_some()
    }

    /// Node `host`'s data directory and log file.
    pub fn data_dir(&self, host: usize) -> PathBuf {
        self.dir.join(format!("data{host}"))
    }

    pub fn log_file(&self, host: usize) -> PathBuf {
        self.dir.join(format!("node{host}.log"))
    }

    /// SIGKILL: the node stops at once, mid-write if it was writing.
    pub fn kill(&mut self, host: usize) -> anyhow::Result<()> {
        self.signal(host, 9)?;
        if let Some(mut c) = self.nodes[host - 1].child.take() {
            c.wait()?;
        }
        Ok(())
    }

    /// Starts a killed node again on its data.
    pub fn restart(&mut self, host: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[host - 1].child.is_none(), "node {host} is running");
        self.spawn(host)?;
        Ok(())
    }

    /// SIGSTOP (a paused process: its peers see it silent, its sockets open).
    pub fn pause(&self, host: usize) -> anyhow::Result<()> {
        self.signal(host, 19)
    }

    /// SIGCONT.
    pub fn resume(&self, host: usize) -> anyhow::Result<()> {
        self.signal(host, 18)
    }

    /// `sovra ctl ARGS` run in host `from`'s namespace against node `to`,
    /// with the admin key; its standard output.
    pub fn ctl(&self, from: usize, to: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .net
            .command(from, self.bin.to_str().unwrap())
            .arg("ctl")
            .args(args)
            .args(["--addr", &self.grpc(to), "--key", &self.admin_key])
            .arg("--ca")
            .arg(self.ca())
            .env("RUST_BACKTRACE", "0")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "sovra ctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // A paused node is resumed first so it can die.
                let _ = std::process::Command::new("kill").args(["-18", &c.id().to_string()]).status();
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three `sovra node` processes, each in its own namespace, form a
    /// cluster over the bridge; a node killed with SIGKILL comes back on its
    /// data and is up again; a paused one is seen down, then up once resumed.
    #[test]
    fn nodes_in_their_own_namespaces_form_a_cluster_and_survive_kill_and_pause() {
        let Some(net) = crate::net::test_net("sk", 8, 3) else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster::start(net, dir.path(), &["uk", "uk", "uk"]).unwrap();
        let up = |c: &Cluster, want: usize| -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = c.ctl(1, 1, &["status", "--format", "json"]).unwrap_or_default();
                let n = s.matches("\"up\"").count();
                if n == want {
                    return Ok(());
                }
                anyhow::ensure!(Instant::now() < deadline, "{n} nodes up, not {want}: {s}");
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        up(&c, 3).unwrap();
        c.kill(3).unwrap();
        c.restart(3).unwrap();
        up(&c, 3).unwrap();
        c.pause(2).unwrap();
        up(&c, 2).unwrap();
        c.resume(2).unwrap();
        up(&c, 3).unwrap();
    }
}
