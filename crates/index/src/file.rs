//! The index file: Sovra's graph saved whole, so that a replica starts by
//! reading it instead of rebuilding the graph point by point.
//!
//! Layout (little-endian): magic, format version, dimension, space, m, slot
//! count, entry point, the caller's opaque metadata (length-prefixed), every
//! slot's vector, every slot's layer-0 row, the upper blocks of the slots that
//! have them, then a CRC-32 of everything before it. Loading checks every field
//! and every link against the graph's own invariants, so a file that is corrupt,
//! truncated, or made for another collection is refused, never trusted.
//! Slots the caller marks dead are written with zero vectors: a deleted point's
//! vector is not copied to disk.

use crate::graph::SovraIndex;
use crate::{GraphConfig, SlotFilter, Space};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"SOVRAIDX";
pub const INDEX_FILE_VERSION: u32 = 1;
/// Caller metadata larger than this is refused on load (a corrupt length).
const MAX_META: u64 = 1 << 34;

#[derive(Debug, thiserror::Error)]
pub enum IndexFileError {
    #[error("index file: {0}")]
    Io(#[from] io::Error),
    #[error("index file is corrupt: {0}")]
    Corrupt(String),
    #[error("index file was made for another index: {0}")]
    Mismatch(String),
    #[error("index file: the {0} engine does not save its graph")]
    Unsupported(&'static str),
}

fn corrupt(why: impl Into<String>) -> IndexFileError {
    IndexFileError::Corrupt(why.into())
}

fn space_code(space: Space) -> u8 {
    match space {
        Space::L2 => 1,
        Space::OneMinusDot => 2,
    }
}

/// Writes through and keeps a CRC of what passed.
pub(crate) struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<W> {
    pub fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }
    pub fn u32(&mut self, v: u32) -> io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> io::Result<()> {
        self.put(&v.to_le_bytes())
    }
}

pub(crate) struct CrcReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> CrcReader<R> {
    pub fn take(&mut self, buf: &mut [u8]) -> Result<(), IndexFileError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => corrupt("it ends early (truncated)"),
            _ => IndexFileError::Io(e),
        })?;
        self.crc.update(buf);
        Ok(())
    }
    pub fn u32(&mut self) -> Result<u32, IndexFileError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn u64(&mut self) -> Result<u64, IndexFileError> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn u32s(&mut self, out: &mut [u32]) -> Result<(), IndexFileError> {
        let mut b = vec![0u8; out.len() * 4];
        self.take(&mut b)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
        Ok(())
    }
}

/// Saves `index` with the caller's `meta` to `path`, atomically: written to a
/// temporary file beside it, synced, then renamed over it.
pub fn save(index: &SovraIndex, path: &Path, meta: &[u8], keep: SlotFilter<'_>) -> io::Result<()> {
    // The file holds the graph whole: link what is still pending first.
    crate::VectorIndex::link_pending(index);
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.put(MAGIC)?;
        w.u32(INDEX_FILE_VERSION)?;
        w.u64(meta.len() as u64)?;
        w.put(meta)?;
        index.write_body(&mut w, keep)?;
        let crc = w.crc.clone().finalize();
        w.inner.write_all(&crc.to_le_bytes())?;
        let file = w.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Loads a file [`save`] wrote, for an index of this shape; returns the index
/// and the caller's metadata.
pub fn load(
    path: &Path,
    dimension: usize,
    space: Space,
    cfg: &GraphConfig,
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
) -> Result<(SovraIndex, Vec<u8>), IndexFileError> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
    };
    let mut magic = [0u8; 8];
    r.take(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt("it does not start with the index file's magic"));
    }
    let version = r.u32()?;
    if version != INDEX_FILE_VERSION {
        return Err(IndexFileError::Mismatch(format!(
            "format version {version}, this build reads {INDEX_FILE_VERSION}"
        )));
    }
    let meta_len = r.u64()?;
    if meta_len > MAX_META.min(len) {
        return Err(corrupt(format!("metadata length {meta_len} is larger than the file")));
    }
    let mut meta = vec![0u8; meta_len as usize];
    r.take(&mut meta)?;
    let index = SovraIndex::read_body(&mut r, dimension, space, cfg, pool, len)?;
    let want = r.crc.clone().finalize();
    let mut b = [0u8; 4];
    r.inner.read_exact(&mut b).map_err(|_| corrupt("it ends before its checksum"))?;
    if u32::from_le_bytes(b) != want {
        return Err(corrupt("checksum mismatch"));
    }
    if r.inner.read(&mut b)? != 0 {
        return Err(corrupt("bytes after the checksum"));
    }
    Ok((index, meta))
}

pub(crate) fn header_fields(dimension: usize, space: Space, m: usize) -> [u32; 3] {
    [dimension as u32, space_code(space) as u32, m as u32]
}
