//! The index file reader a replica runs at start on the graph it saved:
//! whatever the bytes (a torn or corrupted file), it loads an index or
//! names the fault, never panics, never allocates past what the file holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sovra_index::{GraphConfig, Space};
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("sovra-fuzz-index-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).expect("temp file");
    let (space, dim) = match data.first().map(|b| b % 2) {
        Some(0) => (Space::L2, 4),
        _ => (Space::OneMinusDot, 8),
    };
    let cfg = GraphConfig {
        m: 8,
        ef_construction: 32,
        seed: 7,
    };
    if let Ok((index, _meta)) = sovra_index::file::load(&path, dim, space, &cfg, None) {
        // A file that loads is searched: its links must point inside it.
        use sovra_index::VectorIndex;
        let _ = index.search(&vec![0.5; dim], 3, 16, None);
    }
    let _ = std::fs::remove_file(&path);
});
