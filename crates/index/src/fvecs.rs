//! Readers for the TexMex `.fvecs` / `.ivecs` files in `shared/bench/data`: per
//! row a little-endian i32 dimension, then that many f32 (or i32) values.

use std::io;
use std::path::Path;

pub fn read_fvecs(path: &Path) -> io::Result<Vec<Vec<f32>>> {
    read_rows(path, f32::from_le_bytes)
}

pub fn read_ivecs(path: &Path) -> io::Result<Vec<Vec<i32>>> {
    read_rows(path, i32::from_le_bytes)
}

fn read_rows<T>(path: &Path, conv: fn([u8; 4]) -> T) -> io::Result<Vec<Vec<T>>> {
    let bytes = std::fs::read(path)?;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()));
    let mut rows = Vec::new();
    let mut at = 0;
    let word = |at: usize| -> [u8; 4] { bytes[at..at + 4].try_into().expect("4 bytes") };
    while at < bytes.len() {
        if at + 4 > bytes.len() {
            return Err(bad("truncated row header"));
        }
        let d = i32::from_le_bytes(word(at));
        if d <= 0 {
            return Err(bad("non-positive dimension"));
        }
        let d = d as usize;
        at += 4;
        if at + 4 * d > bytes.len() {
            return Err(bad("truncated row"));
        }
        rows.push((0..d).map(|i| conv(word(at + 4 * i))).collect());
        at += 4 * d;
    }
    Ok(rows)
}
