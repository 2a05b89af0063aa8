//! Attention of one short sequence and head as one fused kernel: scores, softmax and the
//! weighted sum of values for each query row in registers and L1.
//!
//! Why: short texts (queries, titles, tickets: 10–30 tokens) are most of what an embedder
//! serves. At those lengths a (sequence, head) block is a few thousand multiply-adds, and
//! doing it as two `gemm` calls around a softmax pass over memory cost several times that in
//! dispatch, packing and passes (about 5% of a pass over short texts, against under 1% of
//! its FLOPs). Sequences past [`MAX_LEN`] keep `gemm`, which blocks them better.
//!
//! How: kᵀ is formed once per block, scaled, in 8 × 8 register transposes. Then, two query
//! rows at a time, their scores against up to five blocks of 8 keys at once (ten
//! independent FMA chains; one block at a time left the chains waiting on each other), the
//! softmax, and the weighted sum of value rows.
//!
//! The kernel is AVX2 + FMA (every x86-64 CPU this project targets, AVX-512 ones included),
//! picked at run time; elsewhere [`available`] is false and the caller keeps `gemm`.

/// Longest sequence the fused kernel takes. Past it `gemm`, which blocks its products for
/// the caches, wins or ties: on a 2-core EPYC (one pass of ~256 tokens, both threads), per
/// 1,000 tokens, fused against `gemm`, 0.44 vs 0.74 ms at 21 tokens, 0.48 vs 0.70 at 32, 0.82
/// vs 0.98 at 64, 1.16 vs 1.19 at 80, 1.38 vs 1.34 at 96, 1.64 vs 1.49 at 112
/// (`benches/attention.rs`).
pub const MAX_LEN: usize = 80;

/// The Cephes `expf` polynomial's coefficients, highest degree first. `bert`'s scalar `exp`
/// and this kernel's vector one share them, so the two agree to an ulp.
pub(crate) const EXP_COEFFICIENTS: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

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
    // Scores are computed against up to 5 blocks of 8 keys at once, one register each (6
    // spill); the blocks are shared out evenly over the fewest such groups, and kᵀ and the
    // score rows padded to whole groups.
    let blocks = len.div_ceil(8);
    let group = blocks.div_ceil(blocks.div_ceil(5));
    let width = blocks.div_ceil(group) * group * 8;
    scratch.resize(d * width + 2 * width, 0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` found AVX2 and FMA; the asserts above bound every row read, the
    // scratch holds kᵀ (d × width) and two score rows (width), out is len × d, and width
    // is a whole number of groups of `group` blocks.
    unsafe {
        let (qkv, kt, out) = (qkv.as_ptr(), scratch.as_mut_ptr(), out.as_mut_ptr());
        // Two rows at a time keep 8 value chains in flight; BERT-base's 8 vectors a row
        // already do, and two of its rows would not fit the 16 registers.
        macro_rules! by_group {
            ($db:literal, $r:literal) => {
                match group {
                    1 => x86::attend::<$db, $r, 1>(qkv, stride, h, len, width, scale, kt, out),
                    2 => x86::attend::<$db, $r, 2>(qkv, stride, h, len, width, scale, kt, out),
                    3 => x86::attend::<$db, $r, 3>(qkv, stride, h, len, width, scale, kt, out),
                    4 => x86::attend::<$db, $r, 4>(qkv, stride, h, len, width, scale, kt, out),
                    _ => x86::attend::<$db, $r, 5>(qkv, stride, h, len, width, scale, kt, out),
                }
            };
        }
        match d {
            32 => by_group!(4, 2),
            _ => by_group!(8, 1),
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

    /// `DB` vectors of 8 per head row (d = 8·DB), `R` query rows at a time, scores against
    /// `G` blocks of 8 keys at once. `scratch` has room for kᵀ (d × width) followed by R
    /// score rows (width), width being whole groups of G blocks that cover `len` keys.
    // The register tiles are indexed by row, block and vector, which the index loops name
    // more plainly than nested iterators would.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend<const DB: usize, const R: usize, const G: usize>(
        qkv: *const f32,
        stride: usize,
        h: usize,
        len: usize,
        width: usize,
        scale: f32,
        scratch: *mut f32,
        out: *mut f32,
    ) {
        let d = 8 * DB;
        let blocks = len.div_ceil(8);
        debug_assert!(width.is_multiple_of(8 * G) && width >= 8 * blocks);
        let (kt, p) = (scratch, unsafe { scratch.add(d * width) });
        unsafe {
            transpose_keys::<DB>(qkv.add(h), stride, len, width, scale, kt);
            let last = blocks - 1;
            // Lanes of the last block that hold real keys.
            let real = _mm256_cmpgt_epi32(
                _mm256_set1_epi32((len - 8 * last) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let real = _mm256_castsi256_ps(real);
            let minus_inf = _mm256_set1_ps(f32::NEG_INFINITY);
            // R query rows at a time: their chains interleave, and they share each load
            // of v. An odd last row is computed twice and written once.
            for first in (0..len).step_by(R) {
                let rows: [usize; R] = std::array::from_fn(|r| (first + r).min(len - 1));
                let q: [*const f32; R] = rows.map(|i| qkv.add(i * stride));
                let p: [*mut f32; R] = std::array::from_fn(|r| p.add(r * width));
                // The rows' scores against G blocks of keys at once: R × G independent
                // chains, each element of q broadcast once for all G blocks.
                for group in (0..width).step_by(8 * G) {
                    let mut scores = [[_mm256_setzero_ps(); G]; R];
                    for c in 0..d {
                        let k = kt.add(c * width + group);
                        for r in 0..R {
                            let q = _mm256_broadcast_ss(&*q[r].add(c));
                            for b in 0..G {
                                let k = _mm256_loadu_ps(k.add(8 * b));
                                scores[r][b] = _mm256_fmadd_ps(q, k, scores[r][b]);
                            }
                        }
                    }
                    for r in 0..R {
                        for b in 0..G {
                            _mm256_storeu_ps(p[r].add(group + 8 * b), scores[r][b]);
                        }
                    }
                }
                let mut inv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let score = |b: usize| {
                        let s = _mm256_loadu_ps(p[r].add(8 * b));
                        if b == last {
                            _mm256_blendv_ps(minus_inf, s, real)
                        } else {
                            s
                        }
                    };
                    let high = (1..blocks).fold(score(0), |m, b| _mm256_max_ps(m, score(b)));
                    let high = _mm256_set1_ps(horizontal_max(high));
                    let mut total = _mm256_setzero_ps();
                    for b in 0..blocks {
                        let mut e = exp(_mm256_sub_ps(score(b), high));
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

    /// kᵀ, scaled, `d` rows of `width` (padding keys 0), from the `len` key rows of `d`
    /// floats at `k + j·stride`: so that a query row's scores against 8 keys are one vector
    /// per element of the row. Padding keys score 0 here and are masked by the caller.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transpose_keys<const DB: usize>(
        k: *const f32,
        stride: usize,
        len: usize,
        width: usize,
        scale: f32,
        kt: *mut f32,
    ) {
        let scale = _mm256_set1_ps(scale);
        unsafe {
            // 8 keys × 8 elements at a time, transposed in registers.
            for jb in 0..width / 8 {
                for cb in 0..DB {
                    let row = |i: usize| {
                        let j = 8 * jb + i;
                        if j < len {
                            _mm256_loadu_ps(k.add(j * stride + 8 * cb))
                        } else {
                            _mm256_setzero_ps()
                        }
                    };
                    let columns = transpose8([
                        row(0),
                        row(1),
                        row(2),
                        row(3),
                        row(4),
                        row(5),
                        row(6),
                        row(7),
                    ]);
                    for (i, column) in columns.into_iter().enumerate() {
                        let at = kt.add((8 * cb + i) * width + 8 * jb);
                        _mm256_storeu_ps(at, _mm256_mul_ps(column, scale));
                    }
                }
            }
        }
    }

    /// The 8 × 8 transpose: lane `i` of the `j`th vector out is lane `j` of the `i`th in.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
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
        let [first, rest @ ..] = super::EXP_COEFFICIENTS;
        let mut p = _mm256_set1_ps(first);
        for c in rest {
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
