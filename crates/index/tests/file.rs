//! The index file: a saved graph loads into the same answers, dead slots are
//! saved without their vectors, and a damaged or foreign file is refused.

use rand::{Rng, SeedableRng, rngs::StdRng};
use sovra_index::file::{IndexFileError, load};
use sovra_index::{GraphConfig, SovraIndex, Space, VectorIndex};

fn random(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect()
}

const CFG: GraphConfig = GraphConfig {
    m: 8,
    ef_construction: 64,
    seed: 3,
};

fn built(n: usize) -> (SovraIndex, Vec<Vec<f32>>) {
    let data = random(n, 16, 1);
    let g = SovraIndex::new(16, Space::L2, &CFG, None);
    g.add_batch(&data.iter().map(Vec::as_slice).collect::<Vec<_>>());
    (g, data)
}

#[test]
fn a_saved_index_loads_into_the_same_answers_and_keeps_growing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.bin");
    let (g, _) = built(3000);
    g.save(&path, b"meta here", &|_| true).unwrap();
    let (h, meta) = load(&path, 16, Space::L2, &CFG, None).unwrap();
    assert_eq!(meta, b"meta here");
    assert_eq!(h.len(), 3000);
    assert_eq!(h.layer_stats(), g.layer_stats());
    for q in random(30, 16, 2) {
        assert_eq!(h.search(&q, 10, 64, None), g.search(&q, 10, 64, None));
    }
    // The loaded graph takes inserts like a built one.
    let more = random(500, 16, 9);
    assert_eq!(h.add_batch(&more.iter().map(Vec::as_slice).collect::<Vec<_>>()), 3000..3500);
    assert_eq!(h.search(&more[7], 1, 64, None)[0].slot, 3007);
    assert!(!dir.path().join("index.tmp").exists(), "the temporary file is renamed, not left");
}

#[test]
fn dead_slots_are_saved_without_their_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.bin");
    let (g, data) = built(400);
    g.save(&path, b"", &|s| s % 2 == 0).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let needle: Vec<u8> = data[1].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
        "a dead slot's vector is on disk"
    );
    let needle: Vec<u8> = data[2].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
        "a live slot's vector is missing"
    );
    let (h, _) = load(&path, 16, Space::L2, &CFG, None).unwrap();
    assert_eq!(h.vectors().get(1).unwrap(), vec![0.0; 16]);
}

#[test]
fn damaged_truncated_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.bin");
    let (g, _) = built(1000);
    g.save(&path, b"m", &|_| true).unwrap();
    let good = std::fs::read(&path).unwrap();

    // Every single flipped byte is caught (a sample of positions across the file).
    for at in (0..good.len()).step_by(good.len() / 97) {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let err = load(&path, 16, Space::L2, &CFG, None)
            .err()
            .unwrap_or_else(|| panic!("flip at {at} loaded"));
        assert!(
            matches!(err, IndexFileError::Corrupt(_) | IndexFileError::Mismatch(_)),
            "flip at {at}: {err}"
        );
    }
    for cut in [0, 7, 30, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(
            matches!(load(&path, 16, Space::L2, &CFG, None), Err(IndexFileError::Corrupt(_))),
            "cut at {cut}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    assert!(matches!(load(&path, 16, Space::L2, &CFG, None), Err(IndexFileError::Corrupt(_))));

    std::fs::write(&path, &good).unwrap();
    assert!(load(&path, 16, Space::L2, &CFG, None).is_ok());
    for (d, space, m) in [(17, Space::L2, 8), (16, Space::OneMinusDot, 8), (16, Space::L2, 12)] {
        let cfg = GraphConfig { m, ..CFG };
        let err = load(&path, d, space, &cfg, None).err().expect("a foreign file loaded");
        assert!(matches!(err, IndexFileError::Mismatch(_)), "{err}");
    }
}

/// The seed `fuzz/run` gives the `index_file` target (`fuzz/seeds/index_file/`):
/// a real file, so libFuzzer starts past the magic and version checks. It
/// must load with the target's parameters (8-d, one-minus-dot, as the
/// magic's odd first byte picks there). After a format change,
/// `SOVRA_WRITE_FUZZ_SEEDS=1 cargo test -p sovra-index --test file fuzz_seed`
/// writes it again.
#[test]
fn the_fuzz_seed_is_an_index_file_this_build_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/index_file/small.idx");
    let cfg = GraphConfig {
        m: 8,
        ef_construction: 32,
        seed: 7,
    };
    if std::env::var_os("SOVRA_WRITE_FUZZ_SEEDS").is_some() {
        let g = SovraIndex::new(8, Space::OneMinusDot, &cfg, None);
        let data: Vec<Vec<f32>> = random(24, 8, 5)
            .into_iter()
            .map(|v| {
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect();
        g.add_batch(&data.iter().map(Vec::as_slice).collect::<Vec<_>>());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // One dead slot, saved without its vector: that path too.
        g.save(&path, b"seed", &|slot| slot != 3).unwrap();
    }
    let (index, meta) = load(&path, 8, Space::OneMinusDot, &cfg, None).unwrap_or_else(|e| {
        panic!(
            "{} does not load ({e}); write it again with SOVRA_WRITE_FUZZ_SEEDS=1",
            path.display()
        )
    });
    assert_eq!(meta, b"seed");
    assert!((23..=24).contains(&index.len()), "{}", index.len());
}
