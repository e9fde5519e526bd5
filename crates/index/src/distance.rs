//! Distance kernels. hnsw_rs asserts that distances are >= 0 and never NaN; the
//! spaces here guarantee that for every vector `sovra-types` validation accepts.
//! AVX-512 and AVX2+FMA kernels are chosen at run time, with a portable fallback
//! the compiler can vectorise; tests hold every kernel the CPU has to the others.

/// The distance the index computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Squared Euclidean distance.
    L2,
    /// `max(0, 1 - dot)`: cosine on normalised vectors, or inner product on vectors
    /// of norm <= 1 (the clamp only absorbs rounding there).
    OneMinusDot,
}

type Kernel = fn(&[f32], &[f32]) -> f32;

/// A space with its kernel resolved once, so the hot loop makes no feature checks.
#[derive(Clone, Copy)]
pub struct SpaceDistance {
    space: Space,
    l2: Kernel,
    dot: Kernel,
}

/// A set of kernels for one instruction set.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub name: &'static str,
    pub l2: Kernel,
    pub dot: Kernel,
}

const PORTABLE: Kernels = Kernels {
    name: "portable",
    l2: l2_portable,
    dot: dot_portable,
};

/// Every kernel set this CPU can run, best first; the portable one is always last.
pub(crate) fn available_kernels() -> Vec<Kernels> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            out.push(Kernels {
                name: "avx512",
                l2: x86::l2_avx512,
                dot: x86::dot_avx512,
            });
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            out.push(Kernels {
                name: "avx2",
                l2: x86::l2_avx2,
                dot: x86::dot_avx2,
            });
        }
    }
    out.push(PORTABLE);
    out
}

/// The kernels every index uses: the best the CPU has, or the one named by
/// `SOVRA_SIMD` (`avx512`, `avx2`, `portable`) if the CPU has it, for measuring.
fn chosen() -> Kernels {
    static CHOSEN: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let all = available_kernels();
        let wanted = std::env::var("SOVRA_SIMD").ok();
        wanted.and_then(|w| all.iter().find(|k| k.name == w).copied()).unwrap_or(all[0])
    })
}

/// The name of the kernel set in use, for reports.
pub fn simd_kernels() -> &'static str {
    chosen().name
}

impl SpaceDistance {
    pub fn new(space: Space) -> Self {
        let k = chosen();
        Self {
            space,
            l2: k.l2,
            dot: k.dot,
        }
    }

    pub fn space(&self) -> Space {
        self.space
    }

    #[inline]
    pub fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.space {
            Space::L2 => (self.l2)(a, b),
            Space::OneMinusDot => (1.0 - (self.dot)(a, b)).max(0.0),
        }
    }
}

impl anndists::dist::Distance<f32> for SpaceDistance {
    #[inline]
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        SpaceDistance::eval(self, va, vb)
    }
}

fn l2_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only selected after `is_x86_feature_detected!` found avx2 and fma.
        unsafe { l2(a, b) }
    }

    pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { dot(a, b) }
    }

    pub fn l2_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only selected after `is_x86_feature_detected!` found avx512f.
        unsafe { l2_512(a, b) }
    }

    pub fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { dot_512(a, b) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn l2_512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: full loads read 16 floats at i <= n - 16; the masked tail load
        // touches only the `n - i` lanes inside both slices.
        unsafe {
            while i + 32 <= n {
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                let d1 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)));
                acc0 = _mm512_fmadd_ps(d0, d0, acc0);
                acc1 = _mm512_fmadd_ps(d1, d1, acc1);
                i += 32;
            }
            while i + 16 <= n {
                let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                acc0 = _mm512_fmadd_ps(d, d, acc0);
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
                let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i)));
                acc1 = _mm512_fmadd_ps(d, d, acc1);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot_512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: as in `l2_512`.
        unsafe {
            while i + 32 <= n {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), acc1);
                i += 32;
            }
            while i + 16 <= n {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
                acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i)), acc1);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn l2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every load reads 8 floats at i < n - 15 (or n - 7), inside both slices.
        unsafe {
            while i + 16 <= n {
                let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                let d1 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)));
                acc0 = _mm256_fmadd_ps(d0, d0, acc0);
                acc1 = _mm256_fmadd_ps(d1, d1, acc1);
                i += 16;
            }
            while i + 8 <= n {
                let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                acc0 = _mm256_fmadd_ps(d, d, acc0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                let d = *pa.add(i) - *pb.add(i);
                s += d * d;
                i += 1;
            }
            s
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: as in `l2`.
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
                i += 16;
            }
            while i + 8 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                s += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l2_ref(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
    }
    fn dot_ref(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum()
    }

    proptest! {
        #[test]
        fn kernels_agree_with_f64_reference(
            (a, b) in (1usize..70).prop_flat_map(|n| (
                proptest::collection::vec(-10f32..10., n),
                proptest::collection::vec(-10f32..10., n),
            ))
        ) {
            let (l2_want, dot_want) = (l2_ref(&a, &b), dot_ref(&a, &b));
            for k in available_kernels() {
                prop_assert!(((k.l2)(&a, &b) as f64 - l2_want).abs() <= 1e-3 * l2_want.max(1.0), "{} l2", k.name);
                prop_assert!(((k.dot)(&a, &b) as f64 - dot_want).abs() <= 1e-3 * dot_want.abs().max(1.0), "{} dot", k.name);
                // The SIMD kernels agree with the portable one within float tolerance.
                prop_assert!(((k.l2)(&a, &b) - l2_portable(&a, &b)).abs() <= 1e-4 * (l2_want as f32).max(1.0), "{} vs portable", k.name);
            }
        }
    }

    #[test]
    fn one_minus_dot_is_never_negative() {
        let d = SpaceDistance::new(Space::OneMinusDot);
        let v = [0.6f32, 0.8, 0.0];
        assert!(d.eval(&v, &v) >= 0.0);
        assert_eq!(d.eval(&[1.0, 0.0], &[1.0000001, 0.0]), 0.0);
    }
}
