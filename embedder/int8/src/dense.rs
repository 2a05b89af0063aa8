//! f32 linear layers with weights packed once at load for the kernel, bias fused.
//!
//! `gemm` repacks the weight matrix on every call, which for the few-hundred-token passes
//! of an embedding server costs more than the product at batch 1; packing at load saves
//! that pass (forward bench: batch 1 +40%, batch 32 +5%). Kernels: AVX-512 (6 rows × 64
//! columns), AVX2+FMA (6 × 16), portable; picked at run time.

use crate::{OutPtr, PANEL, for_each_tile};

pub struct PackedLinear {
    /// `[panel][k][16 columns]`.
    packed: Vec<f32>,
    /// Padded to whole panels with zeros.
    bias: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

impl PackedLinear {
    /// `weight` is `(n_out, n_in)` row-major (the checkpoint's layout).
    pub fn new(weight: &[f32], bias: &[f32], n_out: usize, n_in: usize) -> Self {
        assert_eq!(weight.len(), n_out * n_in, "weight size");
        assert_eq!(bias.len(), n_out, "bias size");
        let panels = n_out.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * n_in * PANEL];
        for n in 0..n_out {
            let (panel, column) = (n / PANEL, n % PANEL);
            for k in 0..n_in {
                packed[(panel * n_in + k) * PANEL + column] = weight[n * n_in + k];
            }
        }
        let mut padded = vec![0f32; panels * PANEL];
        padded[..n_out].copy_from_slice(bias);
        Self {
            packed,
            bias: padded,
            n_in,
            n_out,
        }
    }

    pub fn bytes(&self) -> usize {
        4 * (self.packed.len() + self.bias.len())
    }

    /// `out = x · Wᵀ + b` for `rows` rows of `x`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        self.forward_with(Level::detect(), x, rows, out);
    }

    /// [`forward`](Self::forward) into a slice of exactly `rows × n_out` floats (rows of a
    /// larger matrix).
    pub fn forward_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.forward_into_with(Level::detect(), x, rows, out);
    }

    /// [`forward`](Self::forward) with a given kernel (tests).
    pub fn forward_with(&self, level: Level, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        // Every output is written, so stale values need no zeroing.
        out.resize(rows * self.n_out, 0.0);
        self.forward_into_with(level, x, rows, out);
    }

    fn forward_into_with(&self, level: Level, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(level.supported(), "{level:?} is not supported here");
        assert_eq!(x.len(), rows * self.n_in, "activation size");
        assert_eq!(out.len(), rows * self.n_out, "output size");
        let panels = self.n_out.div_ceil(PANEL);
        let ptr = OutPtr(out.as_mut_ptr());
        for_each_tile(
            rows,
            panels,
            rows * self.n_out * self.n_in,
            |rows, panels| {
                let job = Job {
                    x,
                    n_in: self.n_in,
                    packed: &self.packed,
                    bias: &self.bias,
                    n_out: self.n_out,
                    out: ptr.get(),
                    rows,
                    panels,
                };
                // SAFETY: out is rows × n_out; each task writes only its own tile; the level's
                // features were checked above.
                unsafe { run(level, &job) }
            },
        );
    }
}

struct Job<'a> {
    x: &'a [f32],
    n_in: usize,
    packed: &'a [f32],
    bias: &'a [f32],
    n_out: usize,
    out: *mut f32,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
}

/// The f32 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Portable,
}

impl Level {
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Level::Avx512 => cfg!(feature = "avx512") && has!("avx512f") && has!("fma"),
                Level::Avx2 => has!("avx2") && has!("fma"),
                Level::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Portable
        }
    }

    /// The widest this CPU runs (AVX-512 only with the `avx512` feature).
    pub fn detect() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            [Level::Avx512, Level::Avx2]
                .into_iter()
                .find(|l| l.supported())
                .unwrap_or(Level::Portable)
        })
    }
}

unsafe fn run(level: Level, job: &Job) {
    assert!(job.rows.end * job.n_in <= job.x.len());
    assert!(job.panels.end * PANEL <= job.bias.len());
    assert_eq!(job.packed.len(), job.bias.len() * job.n_in);
    // SAFETY: the caller checked the level's features.
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => x86::avx512(job),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => x86::avx2(job),
            _ => portable(job),
        }
    }
}

unsafe fn portable(job: &Job) {
    for r in job.rows.clone() {
        let x = &job.x[r * job.n_in..][..job.n_in];
        for p in job.panels.clone() {
            let mut acc: [f32; PANEL] = job.bias[p * PANEL..][..PANEL].try_into().unwrap();
            let panel = &job.packed[p * job.n_in * PANEL..][..job.n_in * PANEL];
            for (w, &a) in panel.chunks_exact(PANEL).zip(x) {
                for (acc, &w) in acc.iter_mut().zip(w) {
                    // Not `mul_add`: without FMA in the target (an x86 CPU before AVX2 is
                    // the one that lands here) it is a libm call per product (kernels
                    // bench: 0.6 against 34.5 GFLOP/s).
                    *acc += a * w;
                }
            }
            let n0 = p * PANEL;
            for (c, &y) in acc.iter().enumerate().take(job.n_out - n0) {
                // SAFETY: inside the output, in this job's tile.
                unsafe { *job.out.add(r * job.n_out + n0 + c) = y };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Job;
    use crate::{CacheLevel, PANEL, PREFETCH_EVERY, Prefetch};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512(job: &Job) {
        let packed = job.packed.as_ptr().cast::<u8>();
        let panel_bytes = job.n_in * PANEL * 4;
        // SAFETY: this function's features are the tile's.
        unsafe {
            walk_tiles!(
                job,
                6,
                4,
                tile512,
                packed,
                panel_bytes,
                job.n_in,
                CacheLevel::L2
            )
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile512<const MR: usize, const NP: usize>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        let k = job.n_in;
        // SAFETY: all reads are inside x, packed and bias (checked in run); the tile is ours.
        unsafe {
            let b = job.packed.as_ptr().add(p0 * k * PANEL);
            let x = job.x.as_ptr().add(r0 * k);
            let mut acc = [[_mm512_setzero_ps(); NP]; MR];
            for acc in acc.iter_mut() {
                for (p, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(job.bias.as_ptr().add((p0 + p) * PANEL));
                }
            }
            let mut kk = 0;
            while kk < k {
                let end = (kk + PREFETCH_EVERY).min(k);
                prefetch.step();
                for kk in kk..end {
                    let mut w = [_mm512_setzero_ps(); NP];
                    for (p, w) in w.iter_mut().enumerate() {
                        *w = _mm512_loadu_ps(b.add((p * k + kk) * PANEL));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_ps(*x.add(r * k + kk));
                        for (acc, &w) in acc.iter_mut().zip(&w) {
                            *acc = _mm512_fmadd_ps(a, w, *acc);
                        }
                    }
                }
                kk = end;
            }
            for p in 0..NP {
                let n0 = (p0 + p) * PANEL;
                let valid = (job.n_out - n0).min(PANEL);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(job.out.add((r0 + r) * job.n_out + n0), mask, acc[p]);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(job: &Job) {
        let packed = job.packed.as_ptr().cast::<u8>();
        let panel_bytes = job.n_in * PANEL * 4;
        // SAFETY: this function's features are the tile's.
        unsafe {
            walk_tiles!(
                job,
                6,
                1,
                tile_avx2,
                packed,
                panel_bytes,
                job.n_in,
                CacheLevel::L1
            )
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const MR: usize, const NP: usize>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        let k = job.n_in;
        // SAFETY: as in tile512.
        unsafe {
            let b = job.packed.as_ptr().add(p0 * k * PANEL);
            let x = job.x.as_ptr().add(r0 * k);
            let bias = job.bias.as_ptr().add(p0 * PANEL);
            let mut acc = [[_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))]; MR];
            let mut kk = 0;
            while kk < k {
                let end = (kk + PREFETCH_EVERY).min(k);
                prefetch.step();
                for kk in kk..end {
                    let lo = _mm256_loadu_ps(b.add(kk * PANEL));
                    let hi = _mm256_loadu_ps(b.add(kk * PANEL + 8));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm256_set1_ps(*x.add(r * k + kk));
                        acc[0] = _mm256_fmadd_ps(a, lo, acc[0]);
                        acc[1] = _mm256_fmadd_ps(a, hi, acc[1]);
                    }
                }
                kk = end;
            }
            let n0 = p0 * PANEL;
            let valid = (job.n_out - n0).min(PANEL);
            for (r, acc) in acc.iter().enumerate() {
                let out = job.out.add((r0 + r) * job.n_out + n0);
                if valid == PANEL {
                    _mm256_storeu_ps(out, acc[0]);
                    _mm256_storeu_ps(out.add(8), acc[1]);
                } else {
                    let mut tmp = [0f32; PANEL];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, valid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Every kernel this machine runs matches an f64 product, over shapes with partial
    /// panels, partial row tiles and the parallel split.
    #[test]
    fn every_kernel_here_matches_f64() {
        let mut rng = StdRng::seed_from_u64(5);
        let levels: Vec<Level> = [Level::Avx512, Level::Avx2, Level::Portable]
            .into_iter()
            .filter(|l| l.supported())
            .collect();
        eprintln!("f32 kernels on this machine: {levels:?}");
        for &(rows, n_in, n_out) in &[
            (1, 1, 1),
            (1, 384, 384),
            (7, 33, 17),
            (13, 64, 1152),
            (200, 384, 1536),
            (65, 1536, 384),
        ] {
            let x: Vec<f32> = (0..rows * n_in)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let w: Vec<f32> = (0..n_out * n_in)
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            let b: Vec<f32> = (0..n_out).map(|_| rng.random_range(-1.0..1.0)).collect();
            let layer = PackedLinear::new(&w, &b, n_out, n_in);
            for &level in &levels {
                // Stale values in a reused buffer: every output must be written.
                let mut out = vec![f32::NAN; rows * n_out];
                layer.forward_with(level, &x, rows, &mut out);
                for r in 0..rows {
                    for n in 0..n_out {
                        let exact: f64 = (0..n_in)
                            .map(|k| f64::from(x[r * n_in + k]) * f64::from(w[n * n_in + k]))
                            .sum::<f64>()
                            + f64::from(b[n]);
                        let got = f64::from(out[r * n_out + n]);
                        assert!(
                            (got - exact).abs()
                                <= 1e-5 * (1.0 + exact.abs()) * (n_in as f64).sqrt(),
                            "{level:?} {rows}x{n_in}x{n_out} at ({r}, {n}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
