//! The chaos network: one Linux network namespace per host, each joined by a
//! veth pair to a bridge in a hub namespace of its own (nothing is added to
//! the machine's own namespace), addresses 10.77.<net>.<host>/24, and
//! partitions made with nftables rules inside the hosts' namespaces (`tc
//! netem` is not available on this kernel). Every command is `ip` or `nft`
//! from iproute2 and nftables; a [`Net`] deletes its namespaces when
//! dropped, so a failed run leaves nothing behind.

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("`{0}` could not be run: {1}")]
    Spawn(String, std::io::Error),
}

fn run(args: &[&str]) -> Result<Output, NetError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Spawn(cmd.clone(), e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Whether namespaces can be made here (root, iproute2): where they cannot,
/// a harness may fall back to loopback, saying so, except under CI.
pub fn available() -> Result<(), NetError> {
    let probe = format!("sovra-probe-{}", std::process::id());
    run(&["ip", "netns", "add", &probe])?;
    run(&["ip", "netns", "del", &probe])?;
    run(&["nft", "--version"])?;
    Ok(())
}

/// Deletes the namespaces of earlier runs (`<tag><n>-...`) whose harness
/// (a `sovra-chaos` process with pid ≡ n mod 100000) no longer runs: a run
/// killed by a signal cannot drop its [`Net`]. Returns how many it deleted.
pub fn clean_stale(tag: &str) -> usize {
    let live: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "sovra-chaos").then_some(pid % 100_000)
        })
        .collect();
    let Ok(out) = run(&["ip", "netns", "list"]) else { return 0 };
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(tag) else { continue };
        let Some((num, _)) = rest.split_once('-') else { continue };
        let Ok(num) = num.parse::<u32>() else { continue };
        if !live.contains(&num) && run(&["ip", "netns", "del", name]).is_ok() {
            n += 1;
        }
    }
    n
}

/// A set of hosts on one bridge.
pub struct Net {
    prefix: String,
    net: u8,
    hosts: Vec<String>,
    cut: BTreeSet<(usize, usize)>,
}

impl Net {
    /// Namespaces `<prefix>-hub` and `<prefix>-<i>` for each host `i` (from
    /// 1), at 10.77.`net`.`i`. `prefix` must be short (interface names are
    /// at most 15 bytes) and unique to the run.
    pub fn create(prefix: &str, net: u8, hosts: usize) -> Result<Net, NetError> {
        assert!(prefix.len() <= 8 && (1..=200).contains(&hosts));
        let mut n = Net {
            prefix: prefix.to_string(),
            net,
            hosts: Vec::new(),
            cut: BTreeSet::new(),
        };
        let hub = n.hub();
        run(&["ip", "netns", "add", &hub])?;
        n.hosts.push(hub.clone());
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let ns = n.ns(i);
            run(&["ip", "netns", "add", &ns])?;
            n.hosts.push(ns.clone());
            let (inside, outside) = (format!("{}h{i}", n.prefix), format!("{}b{i}", n.prefix));
            run(&["ip", "link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            run(&["ip", "link", "set", &inside, "netns", &ns])?;
            run(&["ip", "link", "set", &outside, "netns", &hub])?;
            run(&["ip", "-n", &hub, "link", "set", &outside, "master", "br0"])?;
            run(&["ip", "-n", &hub, "link", "set", &outside, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", n.addr(i)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            // One table per host for the nemesis's partitions.
            run(&["ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "chaos"])?;
            for hook in ["input", "output"] {
                let spec = format!("{{ type filter hook {hook} priority 0 ; policy accept ; }}");
                run(&["ip", "netns", "exec", &ns, "nft", "add", "chain", "inet", "chaos", hook, &spec])?;
            }
        }
        Ok(n)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{i}", self.net)
    }

    /// A command that runs `program` in host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), program]);
        c
    }

    /// Drops all traffic between hosts `a` and `b`, both ways (in both
    /// hosts' tables, so either side alone also cuts it).
    pub fn cut(&mut self, a: usize, b: usize) -> Result<(), NetError> {
        if a == b || !self.cut.insert((a.min(b), a.max(b))) {
            return Ok(());
        }
        for (me, other) in [(a, b), (b, a)] {
            let ns = self.ns(me);
            let peer = self.addr(other);
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "chaos", "input", "ip", "saddr", &peer, "drop",
            ])?;
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "chaos", "output", "ip", "daddr", &peer, "drop",
            ])?;
        }
        Ok(())
    }

    /// Splits the hosts into `side` and the rest.
    pub fn partition(&mut self, side: &BTreeSet<usize>) -> Result<(), NetError> {
        let n = self.hosts.len() - 1;
        for a in side {
            for b in (1..=n).filter(|b| !side.contains(b)) {
                self.cut(*a, b)?;
            }
        }
        Ok(())
    }

    /// The pairs cut now.
    pub fn cuts(&self) -> &BTreeSet<(usize, usize)> {
        &self.cut
    }

    /// Removes every partition rule.
    pub fn heal(&mut self) -> Result<(), NetError> {
        for i in 1..self.hosts.len() {
            let ns = self.ns(i);
            for hook in ["input", "output"] {
                run(&["ip", "netns", "exec", &ns, "nft", "flush", "chain", "inet", "chaos", hook])?;
            }
        }
        self.cut.clear();
        Ok(())
    }
}

/// For tests: a net of `hosts` hosts, or `None` (said loudly) where
/// namespaces cannot be made; under `CI=true` their absence fails the test.
#[cfg(test)]
pub(crate) fn test_net(tag: &str, net: u8, hosts: usize) -> Option<Net> {
    if let Err(e) = available() {
        assert!(std::env::var("CI").is_err(), "network namespaces are required under CI: {e}");
        eprintln!("SKIPPED LOUDLY: network namespaces are not available here ({e})");
        return None;
    }
    let prefix = format!("{tag}{}", std::process::id() % 100_000);
    Some(Net::create(&prefix, net, hosts).expect("the chaos network"))
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and the veth peers).
        for ns in self.hosts.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether host `from` can open a TCP connection to `to`'s port within
    /// a second (a Python one-liner run in `from`'s namespace).
    fn reaches(net: &Net, from: usize, to: usize, port: u16) -> bool {
        let code = format!(
            "import socket,sys\ns=socket.socket()\ns.settimeout(1)\ntry:\n s.connect(('{}',{port}))\nexcept Exception:\n sys.exit(1)",
            net.addr(to)
        );
        net.command(from, "python3")
            .args(["-c", &code])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Hosts reach one another over the bridge; a cut stops exactly that
    /// pair, a partition every pair across it, and a heal restores all.
    /// Needs root: where namespaces cannot be made it says so, and under
    /// `CI=true` that is a failure.
    #[test]
    fn hosts_reach_one_another_until_cut_and_again_after_a_heal() {
        let Some(mut net) = test_net("sc", 7, 3) else { return };
        // A listener on every host (bounded: each exits after 20 s).
        let port = 7711;
        let mut servers = Vec::new();
        for i in 1..=3 {
            let code = format!(
                "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port}))\ns.listen(16)\ns.settimeout(20)\nt=time.time()\nwhile time.time()-t<20:\n try:\n  c,_=s.accept(); c.close()\n except Exception:\n  break"
            );
            servers.push(net.command(i, "python3").args(["-c", &code]).spawn().unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reaches(&net, 1, 2, port) {
            assert!(Instant::now() < deadline, "host 1 never reached host 2");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(reaches(&net, 2, 3, port) && reaches(&net, 3, 1, port));
        net.cut(1, 2).unwrap();
        assert!(!reaches(&net, 1, 2, port) && !reaches(&net, 2, 1, port), "the cut pair still talks");
        assert!(reaches(&net, 1, 3, port) && reaches(&net, 2, 3, port), "a cut spilled over");
        net.heal().unwrap();
        assert!(reaches(&net, 1, 2, port));
        net.partition(&BTreeSet::from([3])).unwrap();
        assert_eq!(net.cuts().len(), 2);
        assert!(!reaches(&net, 3, 1, port) && !reaches(&net, 2, 3, port) && reaches(&net, 1, 2, port));
        for mut s in servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let names: Vec<String> = (1..=3).map(|i| net.ns(i)).collect();
        drop(net);
        let left = String::from_utf8(run(&["ip", "netns", "list"]).unwrap().stdout).unwrap();
        assert!(names.iter().all(|n| !left.contains(n.as_str())), "namespaces left behind: {left}");
    }
}
