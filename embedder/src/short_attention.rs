//! Attention of one short sequence and head as one fused kernel: scores, softmax and the
//! weighted sum of values for each query row in registers and L1.
//!
//! Why: short texts (queries, titles, tickets: 10–30 tokens) are most of what an embedder
//! serves. At those lengths a (sequence, head) block is a few thousand multiply-adds, and
//! doing it as two `gemm` calls around a softmax pass over memory cost several times that in
//! dispatch, packing and passes (about 5% of a pass over short texts, against under 1% of
//! its FLOPs). Longer sequences keep `gemm`, which blocks them better.
//!
//! The kernel is AVX2 + FMA (every x86-64 CPU this project targets, AVX-512 ones included),
//! picked at run time; elsewhere [`available`] is false and the caller keeps `gemm`.

/// Longest sequence the fused kernel takes. Past it `gemm`, which blocks its products for
/// the caches, wins: on a 2-core EPYC (one pass of ~256 tokens), per 1,000 tokens, fused
/// against `gemm`, 0.34 vs 0.54 ms at 8 tokens, 0.48 vs 0.73 at 21, 0.56 vs 0.65 at 32,
/// 0.76 vs 0.79 at 48, 1.11 vs 0.98 at 64.
pub const MAX_LEN: usize = 48;

/// Whether this CPU has the kernel for heads of width `d` (32: MiniLM; 64: BERT-base).
pub fn available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (d == 32 || d == 64) && x86::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// `out` (`len` rows of the head's width `d`) = `softmax(q·kᵀ·scale)·v`, where row `i` of
/// q, k and v is `d` floats at `qkv[i·stride]`, `qkv[h + i·stride]`, `qkv[2h + i·stride]`.
///
/// # Panics
/// Unless [`available`]`(d)`, or if a row would fall outside `qkv`.
pub fn attend(
    qkv: &[f32],
    stride: usize,
    h: usize,
    len: usize,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    if len == 0 {
        return;
    }
    let d = out.len() / len;
    assert_eq!(out.len(), len * d, "output size");
    // Checked: a wrapped sum would pass the bound and let the kernel read anywhere.
    let needed = (len - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(h.checked_mul(2)?.checked_add(d)?));
    assert!(needed.is_some_and(|n| n <= qkv.len()), "rows outside qkv");
    assert!(available(d), "no fused attention kernel for heads of {d}");
    let padded = len.div_ceil(8) * 8;
    scratch.resize(d * padded + 2 * padded, 0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` found AVX2 and FMA; the asserts above bound every row read, the
    // scratch holds kᵀ (d × padded) and one score row (padded), and out is len × d.
    unsafe {
        let (qkv, kt, out) = (qkv.as_ptr(), scratch.as_mut_ptr(), out.as_mut_ptr());
        match d {
            // Two rows at a time keep 8 value chains in flight; BERT-base's 8 vectors a row
            // already do, and two of its rows would not fit the 16 registers.
            32 => x86::attend::<4, 2>(qkv, stride, h, len, scale, kt, out),
            _ => x86::attend::<8, 1>(qkv, stride, h, len, scale, kt, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = scale;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn supported() -> bool {
        static SUPPORTED: OnceLock<bool> = OnceLock::new();
        *SUPPORTED
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// `DB` vectors of 8 per head row (d = 8·DB), `R` query rows at a time. `scratch` has
    /// room for kᵀ (d × padded) followed by R score rows (padded), padded = len rounded up
    /// to 8.
    // The register tiles are indexed by row, partial sum and vector, which the index loops
    // name more plainly than nested iterators would.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend<const DB: usize, const R: usize>(
        qkv: *const f32,
        stride: usize,
        h: usize,
        len: usize,
        scale: f32,
        scratch: *mut f32,
        out: *mut f32,
    ) {
        let d = 8 * DB;
        let padded = len.div_ceil(8) * 8;
        let blocks = padded / 8;
        let (kt, p) = (scratch, unsafe { scratch.add(d * padded) });
        unsafe {
            // kᵀ, scaled, so that a query row's scores against 8 keys are one vector per
            // element of the row; padding keys score 0 here and are masked below.
            for j in 0..len {
                let k = qkv.add(h + j * stride);
                for c in 0..d {
                    *kt.add(c * padded + j) = *k.add(c) * scale;
                }
            }
            for c in 0..d {
                for j in len..padded {
                    *kt.add(c * padded + j) = 0.0;
                }
            }
            let last = blocks - 1;
            // Lanes of the last block that hold real keys.
            let real = _mm256_cmpgt_epi32(
                _mm256_set1_epi32((len - 8 * last) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let real = _mm256_castsi256_ps(real);
            let minus_inf = _mm256_set1_ps(f32::NEG_INFINITY);
            // R query rows at a time: their chains interleave, and they share each load
            // of kᵀ and v. An odd last row is computed twice and written once.
            for first in (0..len).step_by(R) {
                let rows: [usize; R] = std::array::from_fn(|r| (first + r).min(len - 1));
                let q: [*const f32; R] = rows.map(|i| qkv.add(i * stride));
                let p: [*mut f32; R] = std::array::from_fn(|r| p.add(r * padded));
                let mut high = [minus_inf; R];
                for b in 0..blocks {
                    let k = kt.add(8 * b);
                    let mut acc = [[_mm256_setzero_ps(); 2]; R];
                    for c in (0..d).step_by(2) {
                        for u in 0..2 {
                            let k = _mm256_loadu_ps(k.add((c + u) * padded));
                            for r in 0..R {
                                let q = _mm256_broadcast_ss(&*q[r].add(c + u));
                                acc[r][u] = _mm256_fmadd_ps(q, k, acc[r][u]);
                            }
                        }
                    }
                    for r in 0..R {
                        let mut s = _mm256_add_ps(acc[r][0], acc[r][1]);
                        if b == last {
                            s = _mm256_blendv_ps(minus_inf, s, real);
                        }
                        high[r] = _mm256_max_ps(high[r], s);
                        _mm256_storeu_ps(p[r].add(8 * b), s);
                    }
                }
                let mut inv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let high = _mm256_set1_ps(horizontal_max(high[r]));
                    let mut total = _mm256_setzero_ps();
                    for b in 0..blocks {
                        let mut e = exp(_mm256_sub_ps(_mm256_loadu_ps(p[r].add(8 * b)), high));
                        if b == last {
                            e = _mm256_and_ps(e, real);
                        }
                        total = _mm256_add_ps(total, e);
                        _mm256_storeu_ps(p[r].add(8 * b), e);
                    }
                    inv[r] = _mm256_set1_ps(1.0 / horizontal_sum(total));
                }
                // The weighted sums of value rows: R × DB independent chains.
                let mut acc = [[_mm256_setzero_ps(); DB]; R];
                for j in 0..len {
                    let v = qkv.add(2 * h + j * stride);
                    let v: [__m256; DB] = std::array::from_fn(|x| _mm256_loadu_ps(v.add(8 * x)));
                    for r in 0..R {
                        let w = _mm256_broadcast_ss(&*p[r].add(j));
                        for x in 0..DB {
                            acc[r][x] = _mm256_fmadd_ps(w, v[x], acc[r][x]);
                        }
                    }
                }
                for r in 0..R {
                    let o = out.add(rows[r] * d);
                    for x in 0..DB {
                        _mm256_storeu_ps(o.add(8 * x), _mm256_mul_ps(acc[r][x], inv[r]));
                    }
                }
            }
        }
    }

    /// The largest of the 8 lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn horizontal_max(v: __m256) -> f32 {
        let v = _mm256_max_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = _mm256_max_ps(v, _mm256_permute_ps::<0b01_00_11_10>(v));
        let v = _mm256_max_ps(v, _mm256_permute_ps::<0b10_11_00_01>(v));
        _mm256_cvtss_f32(v)
    }

    /// The sum of the 8 lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn horizontal_sum(v: __m256) -> f32 {
        let v = _mm256_add_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = _mm256_add_ps(v, _mm256_permute_ps::<0b01_00_11_10>(v));
        let v = _mm256_add_ps(v, _mm256_permute_ps::<0b10_11_00_01>(v));
        _mm256_cvtss_f32(v)
    }

    /// e^x lane by lane: the Cephes polynomial of `bert`'s scalar `exp`, with the same
    /// constants, so both agree to an ulp.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row offset that wraps around `usize` must not pass the bound.
    #[test]
    #[should_panic(expected = "rows outside qkv")]
    fn a_stride_that_wraps_is_refused() {
        let (qkv, mut out) = (vec![0f32; 64], vec![0f32; 64]);
        attend(&qkv, usize::MAX - 15, 0, 2, 1.0, &mut Vec::new(), &mut out);
    }
}
