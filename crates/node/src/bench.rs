//! `sovra bench index`: the child side of `shared/bench/peers.py --sovra`.
//!
//! Builds a shard's searchable view ([`LiveIndex`], the same code the engine
//! searches through: tombstone, expiry and filter checks, re-check of every hit,
//! exact fallbacks) from `.fvecs` files, then answers the harness's JSON requests
//! on stdin/stdout. Only JSON lines go to stdout.

use anyhow::{Context, bail};
use serde_json::{Value as Json, json};
use sovra_index::fvecs::read_fvecs;
use sovra_index::{GraphConfig, HnswConfig, HnswIndex, IndexOptions, VectorIndex};
use sovra_shard::engine::space_of;
use sovra_shard::live::LiveIndex;
use sovra_types::validate::prepare_vector;
use sovra_types::*;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct IndexBenchArgs {
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub queries: PathBuf,
    /// `l2` or `ip` (inner product on normalised vectors).
    #[arg(long)]
    pub metric: String,
    #[arg(long, default_value_t = 16)]
    pub m: u32,
    #[arg(long, default_value_t = 200)]
    pub ef_construction: u32,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// `sovra` (Sovra's engine), `hnsw_rs`, or `frozen-hnsw_rs`: hnsw_rs builds
    /// the graph, which is then copied into Sovra's layout and searched by
    /// Sovra's search (to tell the graph's quality from the search's speed).
    #[arg(long, default_value = "sovra")]
    pub engine: String,
}

/// Resident memory of this process, after handing freed heap back to the
/// system: the index's memory is the difference across its build, measured, not
/// estimated. (Resident, not allocated: chunks are allocated zeroed ahead of use
/// and pages never touched cost nothing.)
fn resident_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn cpu_seconds() -> f64 {
    // utime + stime from /proc/self/stat, in clock ticks (100 per second on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

pub fn index(args: IndexBenchArgs) -> anyhow::Result<()> {
    let metric = match args.metric.as_str() {
        "l2" => Metric::L2,
        "ip" => Metric::Dot,
        other => bail!("--metric {other:?}: use l2 or ip"),
    };
    let base = read_fvecs(&args.base).with_context(|| format!("reading {}", args.base.display()))?;
    let queries = read_fvecs(&args.queries).with_context(|| format!("reading {}", args.queries.display()))?;
    let dim = base.first().context("base is empty")?.len();
    let spec = CollectionSpec {
        hnsw: HnswParams {
            m: args.m,
            ef_construction: args.ef_construction,
            ef_search: 64,
        },
        ..CollectionSpec::single_region(CollectionName::parse("bench")?, dim as u32, metric, RegionId::parse("bench")?)
    };
    spec.validate()?;
    let queries: Vec<Vec<f32>> = queries
        .into_iter()
        .map(|q| prepare_vector(&spec, q, "query"))
        .collect::<Result<_, _>>()?;

    let region = RegionId::parse("bench")?;
    let record = |row: usize, v: &Vec<f32>| -> Result<PointRecord, ApiError> {
        Ok(PointRecord {
            id: PointId::Num(row as u64),
            region: region.clone(),
            vector: prepare_vector(&spec, v.clone(), "base")?,
            subject: String::new(),
            payload: Payload::new(),
            lawful_basis: LawfulBasis::Unspecified,
            source: String::new(),
            expires_at_ms: 0,
            consent_at_ms: 0,
        })
    };
    let heap_before = resident_bytes();
    let started = Instant::now();
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(args.threads).build()?);
    let (m, efc) = (args.m as usize, args.ef_construction as usize);
    let space = space_of(metric);
    let live = match args.engine.as_str() {
        "frozen-hnsw_rs" => {
            let cfg = HnswConfig {
                m,
                ef_construction: efc,
                expected_points: base.len(),
            };
            let hnsw = HnswIndex::new(dim, space, &cfg, Some(pool));
            let recs = base.iter().enumerate().map(|(i, v)| record(i, v)).collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&[f32]> = recs.iter().map(|r| r.vector.as_slice()).collect();
            hnsw.add_batch(&refs);
            let frozen = hnsw.freeze(&GraphConfig {
                m,
                ef_construction: efc,
                seed: 0,
            });
            drop(hnsw);
            LiveIndex::adopt(Box::new(frozen), &recs)
        }
        name => {
            let options = IndexOptions {
                engine: name.parse().map_err(anyhow::Error::msg)?,
                pool: Some(pool),
            };
            let live = LiveIndex::new(options.build(dim, space, m, efc, base.len()));
            for (c, chunk) in base.chunks(10_000).enumerate() {
                let recs = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| record(c * 10_000 + i, v))
                    .collect::<Result<Vec<_>, _>>()?;
                live.upsert(&recs);
            }
            // The build is done when the graph holds every point.
            live.link_pending();
            live
        }
    };
    let build_seconds = started.elapsed().as_secs_f64();
    let index_bytes = resident_bytes().saturating_sub(heap_before);
    eprintln!(
        "sovra bench index: engine {}, kernels {}, built {} points in {build_seconds:.1} s, resident {:.1} MiB measured ({:.1} MiB reported by the index)",
        args.engine,
        sovra_index::simd_kernels(),
        base.len(),
        index_bytes as f64 / 1048576.0,
        live.memory_bytes() as f64 / 1048576.0
    );
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        json!({"ready": true, "build_seconds": build_seconds, "index_bytes": index_bytes})
    )?;
    out.flush()?;

    let k = args.k;
    let search = |q: &[f32], ef: usize| -> Vec<u64> {
        let (hits, _) = live.search(q, k, ef, None, 0);
        hits.iter()
            .map(|h| match h.id {
                PointId::Num(n) => n,
                PointId::Uuid(_) => u64::MAX,
            })
            .collect()
    };
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let req: Json = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                writeln!(out, "{}", json!({"error": format!("bad request: {e}")}))?;
                out.flush()?;
                continue;
            }
        };
        let reply = match req["op"].as_str() {
            Some("quit") => {
                writeln!(out, "{}", json!({"bye": true}))?;
                out.flush()?;
                return Ok(());
            }
            Some("search") => {
                let ef = req["ef"].as_u64().unwrap_or(64) as usize;
                let mode = req["mode"].as_str().unwrap_or("q1").to_string();
                let min_seconds = req["min_seconds"].as_f64().unwrap_or(0.0);
                if !["q1", "b1", "b2"].contains(&mode.as_str()) {
                    json!({"error": format!("mode {mode:?}: use q1, b1 or b2")})
                } else {
                    let cpu0 = cpu_seconds();
                    let t0 = Instant::now();
                    let mut first: Option<Vec<Vec<u64>>> = None;
                    let mut done = 0usize;
                    loop {
                        // q1 and b1 are the same here: there is no batch call, so the
                        // whole set is one query per call on one thread.
                        let ids: Vec<Vec<u64>> = if mode == "b2" {
                            let half = queries.len().div_ceil(2);
                            std::thread::scope(|s| {
                                let parts: Vec<_> = queries
                                    .chunks(half)
                                    .map(|part| s.spawn(move || part.iter().map(|q| search(q, ef)).collect::<Vec<_>>()))
                                    .collect();
                                parts.into_iter().flat_map(|h| h.join().expect("search thread")).collect()
                            })
                        } else {
                            queries.iter().map(|q| search(q, ef)).collect()
                        };
                        done += queries.len();
                        first.get_or_insert(ids);
                        if t0.elapsed().as_secs_f64() >= min_seconds {
                            break;
                        }
                    }
                    json!({"queries_done": done, "seconds": t0.elapsed().as_secs_f64(), "cpu_seconds": cpu_seconds() - cpu0, "ids": first})
                }
            }
            _ => json!({"error": format!("unknown op in {line}")}),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}
