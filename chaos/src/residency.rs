//! R2 at rest: no node's data directory holds a canary of another region.
//! The workload writes into each region points carrying that region's canary
//! (a byte string no other data has, in the payload); after the run every
//! node's whole directory (store, Raft log, snapshots, index files) is
//! scanned for the canaries of every other region.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file under `dir` (or `dir` itself, a file) whose bytes contain `needle`.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if dir.is_file() {
        if !needle.is_empty() && std::fs::read(dir).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            out.push(dir.to_path_buf());
        }
        return out;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_holding(&p, needle));
        } else if !needle.is_empty() && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            out.push(p);
        }
    }
    out
}

/// A file of a node of region `node_region` holding `canary_region`'s canary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    pub node_region: String,
    pub canary_region: String,
    pub file: PathBuf,
}

/// R2 at rest: `dirs` is each node's data directory with its region,
/// `canaries` each region's canary.
pub fn check(dirs: &[(String, PathBuf)], canaries: &BTreeMap<String, Vec<u8>>) -> Vec<Stray> {
    let mut out = Vec::new();
    for (region, dir) in dirs {
        for (other, canary) in canaries.iter().filter(|(r, _)| *r != region) {
            for file in files_holding(dir, canary) {
                out.push(Stray {
                    node_region: region.clone(),
                    canary_region: other.clone(),
                    file,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_of_another_region_anywhere_under_a_node_is_found_and_its_own_is_not_judged() {
        let tmp = tempfile::tempdir().unwrap();
        let (uk, us) = (tmp.path().join("uk1"), tmp.path().join("us1"));
        std::fs::create_dir_all(uk.join("replicas/people/uk/0")).unwrap();
        std::fs::create_dir_all(&us).unwrap();
        std::fs::write(uk.join("replicas/people/uk/0/db"), b"..canary-uk-1..").unwrap();
        std::fs::write(us.join("log"), b"..canary-us-2..").unwrap();
        let canaries = BTreeMap::from([
            ("uk".to_string(), b"canary-uk-1".to_vec()),
            ("us".to_string(), b"canary-us-2".to_vec()),
        ]);
        let dirs = vec![("uk".to_string(), uk.clone()), ("us".to_string(), us.clone())];
        assert!(check(&dirs, &canaries).is_empty(), "each holds only its own");
        // A uk point leaks into a us node's snapshot, deep in its directory.
        std::fs::create_dir_all(us.join("replicas/people/us/0/snapshots")).unwrap();
        std::fs::write(us.join("replicas/people/us/0/snapshots/current"), b"xxcanary-uk-1xx").unwrap();
        let found = check(&dirs, &canaries);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].node_region.as_str(), found[0].canary_region.as_str()), ("us", "uk"));
        assert!(found[0].file.ends_with("snapshots/current"));
    }
}
