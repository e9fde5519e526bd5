//! Small, data-free checks of the index contract; the recall figures on the
//! benchmark datasets live in the shard crate's tests, through the engine.

use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_index::{ExactIndex, HnswConfig, HnswIndex, Space, VectorIndex};
use std::sync::Arc;

fn random(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect()
}

#[test]
fn hnsw_finds_what_exact_finds_and_respects_the_filter() {
    let data = random(3000, 16, 1);
    let refs: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap());
    let cfg = HnswConfig {
        m: 16,
        ef_construction: 100,
        expected_points: 3000,
    };
    let hnsw = HnswIndex::new(16, Space::L2, &cfg, Some(pool));
    let exact = ExactIndex::new(16, Space::L2);
    assert_eq!(hnsw.add_batch(&refs), 0..3000);
    assert_eq!(exact.add_batch(&refs), 0..3000);

    let queries = random(50, 16, 2);
    let (mut hit, mut total) = (0, 0);
    let even = |s: usize| s.is_multiple_of(2);
    for q in &queries {
        let want: Vec<usize> = exact.search(q, 10, 0, Some(&even)).iter().map(|n| n.slot).collect();
        let got: Vec<usize> = hnsw.search(q, 10, 128, Some(&even)).iter().map(|n| n.slot).collect();
        assert!(want.iter().all(|s| s % 2 == 0));
        hit += got.iter().filter(|s| want.contains(s)).count();
        total += want.len();
    }
    let recall = hit as f64 / total as f64;
    assert!(recall >= 0.95, "filtered recall {recall}");
}

#[test]
fn exact_search_is_sorted_and_bounded_by_k() {
    let idx = ExactIndex::new(2, Space::OneMinusDot);
    let v: Vec<Vec<f32>> = (0..10).map(|i| vec![(i as f32 / 10.0).cos(), (i as f32 / 10.0).sin()]).collect();
    idx.add_batch(&v.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let hits = idx.search(&[1.0, 0.0], 3, 0, None);
    assert_eq!(hits.iter().map(|h| h.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
    assert!(idx.search(&[1.0, 0.0], 0, 0, None).is_empty());
    assert!(idx.search(&[1.0, 0.0], 3, 0, Some(&|_| false)).is_empty());
}
