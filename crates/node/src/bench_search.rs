//! `sovra bench search`: search latency as a client sees it, against a running
//! node (by default the one `sovra dev` starts), beside the latency of a
//! Health/Check on the same channel in the same run. The check does no work on
//! the node, so the difference is what searching adds; a transport delay (such
//! as Nagle's algorithm meeting a delayed ACK) shows in both.

use rand::{Rng, SeedableRng};
use sovra_proto::v1;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct SearchBenchArgs {
    /// Public gRPC address of the node.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub addr: SocketAddr,
    #[arg(long, default_value = crate::dev::DEV_COLLECTION)]
    pub collection: String,
    /// Searches (and as many health checks), one at a time.
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// An API key that may read the collection (`sovra dev` prints them).
    #[arg(long, env = "SOVRA_KEY", default_value = "")]
    pub key: String,
}

fn quantiles(lat: &mut [Duration]) -> (f64, f64, f64) {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    (q(0.5), q(0.9), q(0.99))
}

pub fn search(args: SearchBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.queries > 0, "--queries must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let ch = crate::dev::wait_serving(args.addr, Duration::from_secs(30)).await?;
        let info = v1::collections_client::CollectionsClient::new(crate::dev::keyed(&ch, &args.key))
            .get_collection(v1::GetCollectionRequest {
                name: args.collection.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let spec = info.spec.unwrap_or_default();
        let points: u64 = info.shards.iter().map(|s| s.live_points).sum();
        let dim = spec.dimension as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let mut search = v1::search_client::SearchClient::new(crate::dev::keyed(&ch, &args.key));
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let (mut s_lat, mut h_lat) = (Vec::with_capacity(args.queries), Vec::with_capacity(args.queries));
        // Interleaved, so both see the same machine load.
        for _ in 0..args.queries {
            let vector: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let t = Instant::now();
            search
                .search(v1::SearchRequest {
                    collection: args.collection.clone(),
                    vector,
                    k: args.k,
                    ..Default::default()
                })
                .await?;
            s_lat.push(t.elapsed());
            let t = Instant::now();
            health.check(tonic_health::pb::HealthCheckRequest::default()).await?;
            h_lat.push(t.elapsed());
        }
        let (s50, s90, s99) = quantiles(&mut s_lat);
        let (h50, h90, h99) = quantiles(&mut h_lat);
        println!(
            "collection {} ({points} points, {dim}-d), {} searches k={} at {}",
            args.collection, args.queries, args.k, args.addr
        );
        println!("search        p50 {s50:.2} ms  p90 {s90:.2} ms  p99 {s99:.2} ms");
        println!("health check  p50 {h50:.2} ms  p90 {h90:.2} ms  p99 {h99:.2} ms");
        println!("search p50 / health p50 = {:.1}x", s50 / h50.max(1e-6));
        Ok(())
    })
}
