//! `sovra bench startup`: how long a shard replica takes to open with its saved
//! index (load, then checked against the store) against rebuilding the graph
//! from the store, in the same run on the same data.

use anyhow::Context;
use sovra_index::fvecs::read_fvecs;
use sovra_shard::engine::INDEX_FILE;
use sovra_shard::{CacheBudget, ReplicaStore, ShardEngine};
use sovra_types::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct StartupBenchArgs {
    /// Base vectors (`.fvecs`), e.g. the 200k set `make_datasets.py --only gmm` makes.
    #[arg(long)]
    pub base: PathBuf,
    /// `l2` or `ip`.
    #[arg(long, default_value = "l2")]
    pub metric: String,
    /// Use at most this many points (0: all).
    #[arg(long, default_value_t = 0)]
    pub points: usize,
}

pub fn startup(args: StartupBenchArgs) -> anyhow::Result<()> {
    let metric = match args.metric.as_str() {
        "l2" => Metric::L2,
        "ip" => Metric::Cosine,
        other => anyhow::bail!("--metric {other:?}: use l2 or ip"),
    };
    let mut base = read_fvecs(&args.base).with_context(|| format!("reading {}", args.base.display()))?;
    if args.points > 0 {
        base.truncate(args.points);
    }
    let dim = base.first().context("base is empty")?.len();
    let region = RegionId::parse("eu-west")?;
    let spec = Arc::new(CollectionSpec::single_region(
        CollectionName::parse("bench")?,
        dim as u32,
        metric,
        region.clone(),
    ));
    spec.validate()?;
    let id = ShardId {
        collection: spec.name.clone(),
        region: region.clone(),
        number: 0,
    };
    let dir = tempfile::tempdir()?;
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build()?);
    let open = || -> anyhow::Result<(ShardEngine, f64)> {
        let replica = ReplicaStore::open(&dir.path().join("replica"), &CacheBudget::new(256 << 20, 1))?;
        let t = Instant::now();
        let e = ShardEngine::open(
            id.clone(),
            spec.clone(),
            &replica,
            sovra_index::IndexOptions::with_pool(pool.clone()),
        )?;
        // Timed until the graph holds every point (a rebuilt engine serves before,
        // searching the unlinked rest exactly).
        e.link_pending();
        Ok((e, t.elapsed().as_secs_f64()))
    };
    let t = Instant::now();
    {
        let (engine, _) = open()?;
        for (c, chunk) in base.chunks(1000).enumerate() {
            let recs = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    Ok(PointRecord {
                        id: PointId::Num((c * 1000 + i) as u64),
                        region: region.clone(),
                        vector: sovra_types::validate::prepare_vector(&spec, v.clone(), "base")?,
                        subject: String::new(),
                        payload: Payload::new(),
                        lawful_basis: LawfulBasis::Unspecified,
                        source: String::new(),
                        expires_at_ms: 0,
                        consent_at_ms: 0,
                    })
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            engine.apply_next(&ShardCommand::Upsert(recs))?;
        }
    }
    eprintln!("ingested {} points in {:.1} s", base.len(), t.elapsed().as_secs_f64());
    // Rebuild: no saved index.
    let (engine, rebuild) = open()?;
    anyhow::ensure!(!engine.loaded_saved_index());
    let t = Instant::now();
    engine.save_index()?;
    let save = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(dir.path().join("replica").join(INDEX_FILE))?.len();
    drop(engine);
    let (engine, load) = open()?;
    anyhow::ensure!(engine.loaded_saved_index(), "the saved index was not loaded");
    println!(
        "startup of one replica, {} points of {dim} dimensions: rebuild {rebuild:.2} s, load {load:.2} s ({:.1}x faster); save took {save:.2} s, file {:.1} MiB",
        base.len(),
        rebuild / load,
        bytes as f64 / 1048576.0
    );
    Ok(())
}
