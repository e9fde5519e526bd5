//! Sovra's HNSW engine against the exact oracle, under concurrent inserts, and
//! in its structure. Recall on the benchmark-shaped sets (and against hnsw_rs)
//! is tested through the shard engine in the shard crate.

use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_index::{ExactIndex, GraphConfig, SovraIndex, Space, VectorIndex};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn random(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect()
}

fn normalised(mut v: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    for x in &mut v {
        let n = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        x.iter_mut().for_each(|a| *a /= n);
    }
    v
}

fn cfg(m: usize) -> GraphConfig {
    GraphConfig {
        m,
        ef_construction: 100,
        seed: 7,
    }
}

fn pool() -> Arc<rayon::ThreadPool> {
    Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap())
}

fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// With ef at least the number of points the search is exhaustive over the
/// connected graph: it must give exactly the oracle's answer, in both spaces.
#[test]
fn equals_the_exact_oracle_on_small_sets_at_high_ef() {
    for (space, data) in [
        (Space::L2, random(600, 12, 1)),
        (Space::OneMinusDot, normalised(random(600, 12, 2))),
    ] {
        let g = SovraIndex::new(12, space, &cfg(8), Some(pool()));
        let exact = ExactIndex::new(12, space);
        assert_eq!(g.add_batch(&refs(&data)), 0..600);
        exact.add_batch(&refs(&data));
        for q in random(40, 12, 3) {
            let want = exact.search(&q, 10, 0, None);
            let got = g.search(&q, 10, 600, None);
            assert_eq!(got, want, "{space:?}");
        }
    }
}

#[test]
fn refused_slots_are_walked_through_but_never_returned() {
    let data = random(3000, 16, 4);
    let g = SovraIndex::new(16, Space::L2, &cfg(16), Some(pool()));
    let exact = ExactIndex::new(16, Space::L2);
    g.add_batch(&refs(&data));
    exact.add_batch(&refs(&data));
    let even = |s: usize| s.is_multiple_of(2);
    let (mut hit, mut total) = (0, 0);
    for q in random(50, 16, 5) {
        let want: Vec<usize> = exact.search(&q, 10, 0, Some(&even)).iter().map(|n| n.slot).collect();
        let got = g.search(&q, 10, 128, Some(&even));
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|n| even(n.slot)), "a refused slot came back");
        assert!(got.windows(2).all(|w| w[0].distance <= w[1].distance), "closest first");
        hit += got.iter().filter(|n| want.contains(&n.slot)).count();
        total += want.len();
    }
    let recall = hit as f64 / total as f64;
    assert!(recall >= 0.97, "filtered recall {recall}");
    // Nothing accepted: nothing returned, and the search ends.
    assert!(g.search(&data[0], 10, 64, Some(&|_| false)).is_empty());
}

#[test]
fn searches_while_inserting_see_only_stored_slots_with_their_own_vectors() {
    let d = 24;
    let data = Arc::new(random(6000, d, 6));
    let g = Arc::new(SovraIndex::new(d, Space::L2, &cfg(12), Some(pool())));
    g.add_batch(&refs(&data[..200]));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (g, done, data) = (g.clone(), done.clone(), data.clone());
            std::thread::spawn(move || {
                let queries = random(50, d, 100 + r);
                let mut searches = 0usize;
                while !done.load(Ordering::Acquire) || searches < 50 {
                    let q = &queries[searches % queries.len()];
                    let hits = g.search(q, 10, 48, Some(&|s| s % 3 != 0));
                    let stored = g.len();
                    assert!(!hits.is_empty());
                    for h in &hits {
                        assert!(h.slot < stored, "slot {} beyond the {stored} stored", h.slot);
                        assert!(h.slot % 3 != 0, "refused slot {} returned", h.slot);
                        // The distance is to the vector stored in that slot.
                        let want: f32 = q.iter().zip(&data[h.slot]).map(|(a, b)| (a - b) * (a - b)).sum();
                        assert!((h.distance - want).abs() <= 1e-3 * want.max(1.0), "slot {}", h.slot);
                    }
                    searches += 1;
                }
                searches
            })
        })
        .collect();
    // Batches both above and below the parallel-insert threshold.
    let mut at = 200;
    for size in [10, 500, 1, 63, 64, 1000, 7, 2000].into_iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        assert_eq!(g.add_batch(&refs(&data[at..end])), at..end);
        at = end;
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().expect("a reader panicked") >= 50);
    }
    // Everything inserted is findable: each point is its own nearest neighbour.
    let missed = (0..data.len())
        .step_by(37)
        .filter(|&s| g.search(&data[s], 1, 64, None).first().map(|n| n.slot) != Some(s))
        .count();
    assert!(missed <= 2, "{missed} points not found as their own nearest");
}

#[test]
fn one_thread_builds_the_same_graph_every_time() {
    let data = random(1500, 8, 8);
    let build = || {
        let g = SovraIndex::new(8, Space::L2, &cfg(6), None);
        for chunk in data.chunks(100) {
            g.add_batch(&refs(chunk));
        }
        g
    };
    let (a, b) = (build(), build());
    assert_eq!(a.layer_stats(), b.layer_stats());
    for q in random(20, 8, 9) {
        assert_eq!(a.search(&q, 10, 32, None), b.search(&q, 10, 32, None));
    }
}

#[test]
fn layers_have_the_paper_shape() {
    let m = 8;
    let data = random(8000, 8, 10);
    let g = SovraIndex::new(8, Space::L2, &cfg(m), Some(pool()));
    g.add_batch(&refs(&data));
    let stats = g.layer_stats();
    assert_eq!(stats[0].0, 8000);
    // Layer 0 holds at most 2m links per node and, with the heuristic, well over
    // m on average on random data; upper layers at most m.
    let avg0 = stats[0].1 as f64 / stats[0].0 as f64;
    assert!(avg0 <= 2.0 * m as f64 && avg0 >= 0.75 * m as f64, "layer 0 average {avg0}");
    // About one node in m reaches layer 1.
    let ratio = stats[1].0 as f64 / 8000.0;
    assert!((0.5 / m as f64..2.0 / m as f64).contains(&ratio), "layer 1 share {ratio}");
    for (l, &(nodes, links)) in stats.iter().enumerate().skip(1) {
        assert!(links <= nodes * m, "layer {l}: {links} links on {nodes} nodes");
    }
}

#[test]
fn empty_and_tiny_indexes() {
    let g = SovraIndex::new(3, Space::L2, &cfg(4), None);
    assert!(g.search(&[0.0, 0.0, 0.0], 5, 10, None).is_empty());
    g.add_batch(&[&[1.0, 0.0, 0.0]]);
    let hits = g.search(&[0.0, 0.0, 0.0], 5, 10, None);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].slot, 0);
    assert!(g.search(&[0.0, 0.0, 0.0], 0, 10, None).is_empty());
    g.add_batch(&[&[2.0, 0.0, 0.0], &[3.0, 0.0, 0.0]]);
    let slots: Vec<usize> = g.search(&[2.9, 0.0, 0.0], 5, 10, None).iter().map(|n| n.slot).collect();
    assert_eq!(slots, vec![2, 1, 0]);
}

/// Appended points are found from the moment `append` returns (the unlinked
/// tail is scanned exactly), while a background linker brings them into the
/// graph; once it is done nothing is pending and the graph alone finds them.
#[test]
fn appended_points_are_found_at_once_and_linked_behind() {
    let d = 16;
    let data = random(4000, d, 11);
    let g = Arc::new(SovraIndex::new(d, Space::L2, &cfg(12), Some(pool())));
    g.add_batch(&refs(&data[..1000]));
    for chunk in data[1000..].chunks(250) {
        let slots = g.append(&refs(chunk));
        // Every point of the batch is its own nearest neighbour right away.
        for s in slots.clone().step_by(25) {
            assert_eq!(g.search(&data[s], 1, 32, None)[0].slot, s, "appended slot {s} not found");
        }
        g.clone().schedule_linking();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while g.pending() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} points still unlinked after 60 s",
            g.pending()
        );
        std::thread::yield_now();
    }
    assert_eq!(g.link_pending(), 0);
    let missed = (0..4000)
        .step_by(13)
        .filter(|&s| g.search(&data[s], 1, 64, None)[0].slot != s)
        .count();
    assert!(missed <= 2, "{missed} linked points not found as their own nearest");
}

#[test]
fn without_a_pool_linking_happens_at_once() {
    let data = random(300, 8, 12);
    let g = Arc::new(SovraIndex::new(8, Space::L2, &cfg(6), None));
    g.append(&refs(&data));
    assert_eq!(g.pending(), 300);
    g.clone().schedule_linking();
    assert_eq!(g.pending(), 0);
}
