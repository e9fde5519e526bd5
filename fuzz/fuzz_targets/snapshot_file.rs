//! The snapshot file reader a replica runs on a file another node streamed to
//! it: whatever the bytes, it ends in records or a named error, never a
//! panic or an allocation the file's length does not justify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    // The reader opens a path, as the installer does: one file per process.
    let path = std::env::temp_dir().join(format!("sovra-fuzz-snapshot-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).expect("temp file");
    // Record by record, as install reads it, to the end or the first error.
    if let Ok(reader) = sovra_raft::snapshot::Reader::open(&path) {
        for r in reader {
            if r.is_err() {
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
