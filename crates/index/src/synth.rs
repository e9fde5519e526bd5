//! Seeded synthetic datasets, so recall tests need nothing beside the checkout.
//!
//! [`gaussian_mixture`] follows the recipe of `shared/bench/make_datasets.py`
//! (`gmm-128-l2`): clusters with lognormal(0, 1) weights, centres drawn from
//! N(0, I), a per-cluster spread of 0.7 x lognormal(0, 0.35), and per-axis
//! standard deviations decaying as i^-0.5 (normalised to mean variance 1), each
//! cluster randomly rotated. The anisotropy and low intrinsic dimension make it
//! behave like real embeddings rather than uniform noise. Queries are fresh
//! draws from the same mixture on their own random stream. Pure: no I/O.
//!
//! The numbers differ from the Python generator's (another RNG); the recipe
//! is the same, and the same seed always gives the same set.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generated dataset.
pub struct Dataset {
    pub base: Vec<Vec<f32>>,
    pub queries: Vec<Vec<f32>>,
}

/// The shape of a mixture.
#[derive(Debug, Clone, Copy)]
pub struct MixtureSpec {
    pub dim: usize,
    pub clusters: usize,
    pub base: usize,
    pub queries: usize,
    pub seed: u64,
}

impl MixtureSpec {
    /// The benchmark recipe's shape at the size of its small variant.
    pub fn gmm_128(seed: u64) -> Self {
        Self {
            dim: 128,
            clusters: 1000,
            base: 20_000,
            queries: 300,
            seed,
        }
    }
}

/// One standard normal draw (Box-Muller; the second value is dropped to keep
/// the stream simple).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A uniformly random rotation (rows orthonormal): Gram-Schmidt on a Gaussian
/// matrix, which is the QR with a positive-diagonal R the recipe uses.
fn rotation(rng: &mut StdRng, d: usize) -> Vec<f64> {
    let mut m: Vec<f64> = (0..d * d).map(|_| normal(rng)).collect();
    for i in 0..d {
        for j in 0..i {
            let dot: f64 = (0..d).map(|k| m[i * d + k] * m[j * d + k]).sum();
            for k in 0..d {
                m[i * d + k] -= dot * m[j * d + k];
            }
        }
        let norm = (0..d).map(|k| m[i * d + k] * m[i * d + k]).sum::<f64>().sqrt();
        for k in 0..d {
            m[i * d + k] /= norm;
        }
    }
    m
}

struct Cluster {
    center: Vec<f64>,
    spread: f64,
    rotation: Vec<f64>,
}

/// Generates `spec.base` base vectors and `spec.queries` queries.
pub fn gaussian_mixture(spec: MixtureSpec) -> Dataset {
    let d = spec.dim;
    let mut params = StdRng::seed_from_u64(spec.seed);
    let weights: Vec<f64> = (0..spec.clusters).map(|_| normal(&mut params).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    if let Some(last) = cdf.last_mut() {
        *last = 1.0;
    }
    let mut spectrum: Vec<f64> = (1..=d).map(|i| (i as f64).powf(-0.5)).collect();
    let scale = (d as f64 / spectrum.iter().map(|s| s * s).sum::<f64>()).sqrt();
    spectrum.iter_mut().for_each(|s| *s *= scale);
    let clusters: Vec<Cluster> = (0..spec.clusters)
        .map(|_| Cluster {
            center: (0..d).map(|_| normal(&mut params)).collect(),
            spread: 0.7 * (0.35 * normal(&mut params)).exp(),
            rotation: rotation(&mut params, d),
        })
        .collect();
    let sample = |rng: &mut StdRng, n: usize| -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let c = &clusters[cdf.partition_point(|&p| p < u).min(clusters.len() - 1)];
                let z: Vec<f64> = (0..d).map(|i| normal(rng) * spectrum[i]).collect();
                (0..d)
                    .map(|j| {
                        let rotated: f64 = (0..d).map(|i| z[i] * c.rotation[i * d + j]).sum();
                        (c.center[j] + c.spread * rotated) as f32
                    })
                    .collect()
            })
            .collect()
    };
    let mut query_rng = StdRng::seed_from_u64(spec.seed ^ 0x5175_6572_7973);
    let queries = sample(&mut query_rng, spec.queries);
    let mut base_rng = StdRng::seed_from_u64(spec.seed ^ 0x4261_7365);
    let base = sample(&mut base_rng, spec.base);
    Dataset { base, queries }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_are_orthonormal_and_sets_are_reproducible() {
        let mut rng = StdRng::seed_from_u64(1);
        let d = 16;
        let r = rotation(&mut rng, d);
        for i in 0..d {
            for j in 0..d {
                let dot: f64 = (0..d).map(|k| r[i * d + k] * r[j * d + k]).sum();
                assert!((dot - f64::from(u8::from(i == j))).abs() < 1e-9, "{i} {j} {dot}");
            }
        }
        let spec = MixtureSpec {
            dim: 8,
            clusters: 5,
            base: 50,
            queries: 5,
            seed: 3,
        };
        let (a, b) = (gaussian_mixture(spec), gaussian_mixture(spec));
        assert_eq!(a.base, b.base);
        assert_eq!(a.queries, b.queries);
        assert_eq!((a.base.len(), a.queries.len(), a.base[0].len()), (50, 5, 8));
        assert!(a.base.iter().flatten().all(|x| x.is_finite()));
    }
}
