//! The matrix kernels: `out[rows, panels] = (Σ a·w) · a_scale · w_scale + bias`.
//!
//! Each kernel walks register tiles of a few rows × one to four 16-column panels; the packed
//! weight layout (see `QuantizedLinear::packed`) puts the 4 inner values × 16 columns a
//! `vpdpbusd` needs in one 64-byte vector, and one broadcast of 4 activation bytes feeds a
//! whole panel.

use std::ops::Range;

use crate::{GROUP, Isa, PANEL};

pub(crate) struct Job<'a> {
    /// Quantized activations, `a_stride` bytes per row (u8 + 128 for the VNNI kernels, i8
    /// bits otherwise; for the avx2 kernel the row's values, then their magnitudes, each
    /// `a_stride / 2` bytes).
    pub a: &'a [u8],
    pub a_stride: usize,
    pub a_scales: &'a [f32],
    /// Per row, the offset stored in its bytes (see `QuantizedRows::zeros`): read by the
    /// portable kernel and the avx2 zero-point tile; the VNNI kernels' rows are all offset
    /// by 128 and the avx2 symmetric tile's by 0, which they take as given.
    pub a_zeros: &'a [i32],
    /// Rows quantized with a zero point (unsigned 7-bit, no magnitudes).
    pub zero_point: bool,
    pub packed: &'a [i8],
    pub groups: usize,
    pub scales: &'a [f32],
    pub bias: &'a [f32],
    pub column_sums: &'a [i32],
    pub n_out: usize,
    /// `a_scales.len() × n_out` row-major.
    pub out: *mut f32,
    pub rows: Range<usize>,
    pub panels: Range<usize>,
}

impl Job<'_> {
    fn check(&self) {
        let panels = self.scales.len() / PANEL;
        assert!(self.rows.end <= self.a_scales.len() && self.panels.end <= panels);
        assert_eq!(self.a_zeros.len(), self.a_scales.len());
        assert!(self.a.len() >= self.a_scales.len() * self.a_stride);
        assert!(self.a_stride >= self.groups * GROUP);
        assert_eq!(self.packed.len(), panels * self.groups * PANEL * GROUP);
        assert!(self.bias.len() == panels * PANEL && self.column_sums.len() == panels * PANEL);
        assert!(self.n_out <= panels * PANEL && self.n_out > (panels.max(1) - 1) * PANEL);
    }
}

/// # Safety
/// `job.out` must point to `a_scales.len() × n_out` writable floats that no one else touches
/// in `job.rows` × the columns of `job.panels`; the CPU must support `isa`, and `job.a` must
/// be quantized for `isa`.
pub(crate) unsafe fn run(isa: Isa, job: &Job) {
    job.check();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked the CPU features of `isa`.
    unsafe {
        match isa {
            Isa::Avx512Vnni => return x86::avx512_vnni(job),
            Isa::AvxVnni => return x86::avx_vnni(job),
            Isa::Avx512VlVnni256 => return x86::avx512vl_vnni256(job),
            Isa::Avx2 => return x86::avx2(job),
            Isa::Portable => {}
        }
    }
    // SAFETY: as for this function.
    unsafe { portable(job) }
}

/// Plain loops: the reference every SIMD kernel is tested against.
unsafe fn portable(job: &Job) {
    for r in job.rows.clone() {
        let a = &job.a[r * job.a_stride..][..job.groups * GROUP];
        for p in job.panels.clone() {
            let mut sums = [0i32; PANEL];
            let panel = &job.packed[p * job.groups * PANEL * GROUP..][..job.groups * PANEL * GROUP];
            for (g, block) in panel.chunks_exact(PANEL * GROUP).enumerate() {
                let a = &a[g * GROUP..][..GROUP];
                for (sum, w) in sums.iter_mut().zip(block.chunks_exact(GROUP)) {
                    *sum += a
                        .iter()
                        .zip(w)
                        .map(|(&a, &w)| a as i8 as i32 * w as i32)
                        .sum::<i32>();
                }
            }
            let n0 = p * PANEL;
            for (c, &sum) in sums.iter().enumerate().take(job.n_out.saturating_sub(n0)) {
                let sum = sum - job.a_zeros[r] * job.column_sums[n0 + c];
                // Fused, like the SIMD kernels, so every kernel gives the same floats.
                let scale = job.scales[n0 + c] * job.a_scales[r];
                let y = (sum as f32).mul_add(scale, job.bias[n0 + c]);
                // SAFETY: (r, n0 + c) is inside the output, in this job's tile.
                unsafe { *job.out.add(r * job.n_out + n0 + c) = y };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{quantize_avx2, quantize_zero_point_avx2};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Job;
    use crate::{CacheLevel, GROUP, PANEL, PREFETCH_EVERY, Prefetch};

    /// The weights' bytes per panel, for [`Prefetch`].
    fn panel_bytes(job: &Job) -> usize {
        job.groups * PANEL * GROUP
    }

    /// Reads the 4 activation bytes of group `g` of row `r` as one i32, for a broadcast.
    #[inline(always)]
    unsafe fn group_of(job: &Job, r: usize, g: usize) -> i32 {
        // SAFETY: r < rows and g < groups, both checked against `a` in Job::check; for the
        // avx2 tile's magnitudes g < groups + a_stride / 2 / GROUP, checked in `avx2`.
        unsafe {
            job.a
                .as_ptr()
                .add(r * job.a_stride + g * GROUP)
                .cast::<i32>()
                .read_unaligned()
        }
    }

    // ---------------------------------------------------------------- quantizing rows

    /// `quantize_symmetric` with AVX2: `vcvtps2dq` rounds half to even like the portable
    /// path, and the packs saturate, so both give the same bytes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_avx2(x: &[f32], q: &mut [i8]) -> f32 {
        // SAFETY: this function's features.
        let amax = crate::abs_max(unsafe { min_max(x) });
        let Some(inv) = crate::inverse_scale(amax) else {
            q.fill(0);
            return crate::scale_for(amax);
        };
        let mut chunks = x.chunks_exact(32);
        let mut out = q.chunks_exact_mut(32);
        // SAFETY: each chunk is 32 floats read and 32 bytes written.
        unsafe {
            let scale = _mm256_set1_ps(inv);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (x, q) in (&mut chunks).zip(&mut out) {
                let p = x.as_ptr();
                macro_rules! v {
                    ($i:expr) => {
                        _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(8 * $i)), scale))
                    };
                }
                let words = _mm256_packs_epi32(v!(0), v!(1));
                let bytes = _mm256_packs_epi16(words, _mm256_packs_epi32(v!(2), v!(3)));
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
            }
        }
        for (q, v) in out.into_remainder().iter_mut().zip(chunks.remainder()) {
            *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        crate::scale_for(amax)
    }

    /// The row's minimum and maximum with zero (exact in any order, so the portable path's
    /// too); both NaN if any value is. Written out because the compiler's vectorisation of
    /// the portable scans shuffled and blended bytes: quantizing one lane's 331 × 1536
    /// feed-forward activations took 204 µs symmetric and 290 µs with a zero point, against
    /// 64–72 µs with this, the product itself ~1 ms on AVX-512 VNNI.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn min_max(x: &[f32]) -> (f32, f32) {
        let mut chunks = x.chunks_exact(16);
        // SAFETY: each chunk is 16 floats.
        let (lo, hi, nan) = unsafe {
            let zero = _mm256_setzero_ps();
            let (mut lo, mut hi, mut nan) = ([zero; 2], [zero; 2], [zero; 2]);
            for chunk in &mut chunks {
                for i in 0..2 {
                    let v = _mm256_loadu_ps(chunk.as_ptr().add(8 * i));
                    lo[i] = _mm256_min_ps(lo[i], v);
                    hi[i] = _mm256_max_ps(hi[i], v);
                    nan[i] = _mm256_or_ps(nan[i], _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                }
            }
            let mut lanes = [[0f32; 8]; 2];
            _mm256_storeu_ps(lanes[0].as_mut_ptr(), _mm256_min_ps(lo[0], lo[1]));
            _mm256_storeu_ps(lanes[1].as_mut_ptr(), _mm256_max_ps(hi[0], hi[1]));
            let nan = _mm256_movemask_ps(_mm256_or_ps(nan[0], nan[1])) != 0;
            (
                lanes[0].iter().fold(0f32, |a, &b| a.min(b)),
                lanes[1].iter().fold(0f32, |a, &b| a.max(b)),
                nan,
            )
        };
        let rest = chunks.remainder();
        if nan || rest.iter().any(|v| v.is_nan()) {
            return (f32::NAN, f32::NAN);
        }
        (
            rest.iter().fold(lo, |a, &b| a.min(b)),
            rest.iter().fold(hi, |a, &b| a.max(b)),
        )
    }

    /// `quantize_zero_point` compiled for AVX2, to the portable path's bytes: `vcvtps2dq`
    /// rounds half to even, the packs saturate and the last step caps at 127.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_zero_point_avx2(x: &[f32], q: &mut [u8]) -> (f32, i32) {
        // SAFETY: this function's features.
        let range = unsafe { min_max(x) };
        crate::quantize_zero_point_with(x, q, range, |x, q, inv, zero| {
            // SAFETY: the closure runs inside this function, with its features.
            unsafe { fill_zero_point(x, q, inv, zero) }
        })
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_zero_point(x: &[f32], q: &mut [u8], inv: f32, zero: i32) {
        let mut chunks = x.chunks_exact(32);
        let mut out = q.chunks_exact_mut(32);
        // SAFETY: each chunk is 32 floats read and 32 bytes written.
        unsafe {
            let scale = _mm256_set1_ps(inv);
            let z = _mm256_set1_epi32(zero);
            let cap = _mm256_set1_epi8(127);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (x, q) in (&mut chunks).zip(&mut out) {
                let p = x.as_ptr();
                macro_rules! v {
                    ($i:expr) => {
                        _mm256_add_epi32(
                            _mm256_cvtps_epi32(_mm256_mul_ps(
                                _mm256_loadu_ps(p.add(8 * $i)),
                                scale,
                            )),
                            z,
                        )
                    };
                }
                let words = _mm256_packs_epi32(v!(0), v!(1));
                let bytes = _mm256_packus_epi16(words, _mm256_packs_epi32(v!(2), v!(3)));
                let bytes = _mm256_min_epu8(_mm256_permutevar8x32_epi32(bytes, order), cap);
                _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
            }
        }
        crate::zero_point_portable(chunks.remainder(), out.into_remainder(), inv, zero);
    }

    // ---------------------------------------------------------------- AVX-512 VNNI

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn avx512_vnni(job: &Job) {
        // SAFETY: this function's features are the tile's.
        unsafe {
            let packed = job.packed.as_ptr().cast::<u8>();
            walk_tiles!(
                job,
                6,
                4,
                tile512,
                packed,
                panel_bytes(job),
                job.groups,
                CacheLevel::L2
            )
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn tile512<const MR: usize, const NP: usize>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        let panel_bytes = panel_bytes(job);
        // SAFETY: every pointer below stays inside the slices Job::check sized; the output
        // tile belongs to this job.
        unsafe {
            let b = job.packed.as_ptr().add(p0 * panel_bytes);
            let mut acc = [[_mm512_setzero_si512(); NP]; MR];
            for g in 0..job.groups {
                if g % PREFETCH_EVERY == 0 {
                    prefetch.step();
                }
                let mut w = [_mm512_setzero_si512(); NP];
                for (p, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(b.add(p * panel_bytes + g * 64).cast());
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(group_of(job, r0 + r, g));
                    for (acc, &w) in acc.iter_mut().zip(&w) {
                        *acc = _mm512_dpbusd_epi32(*acc, a, w);
                    }
                }
            }
            for p in 0..NP {
                let n0 = (p0 + p) * PANEL;
                let offset = _mm512_slli_epi32::<7>(_mm512_loadu_si512(
                    job.column_sums.as_ptr().add(n0).cast(),
                ));
                let scales = _mm512_loadu_ps(job.scales.as_ptr().add(n0));
                let bias = _mm512_loadu_ps(job.bias.as_ptr().add(n0));
                let valid = (job.n_out - n0).min(PANEL);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                for (r, acc) in acc.iter().enumerate() {
                    let row = r0 + r;
                    let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p], offset));
                    let scale = _mm512_mul_ps(scales, _mm512_set1_ps(job.a_scales[row]));
                    let y = _mm512_fmadd_ps(sums, scale, bias);
                    _mm512_mask_storeu_ps(job.out.add(row * job.n_out + n0), mask, y);
                }
            }
        }
    }

    // ---------------------------------------------------------------- 256-bit kernels

    /// Stores one row's 16 columns (two vectors), fewer at the matrix's last panel.
    #[inline(always)]
    unsafe fn store16(out: *mut f32, lo: __m256, hi: __m256, valid: usize) {
        // SAFETY: `out` has `valid` writable floats (the caller's tile).
        unsafe {
            if valid == PANEL {
                _mm256_storeu_ps(out, lo);
                _mm256_storeu_ps(out.add(8), hi);
            } else {
                let mut tmp = [0f32; PANEL];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, valid);
            }
        }
    }

    /// The 256-bit VNNI kernel, once per encoding of `vpdpbusd`: `$dpbusd` and the target
    /// features are all that differ.
    macro_rules! vnni256 {
        ($walk:ident, $tile:ident, $features:literal, $dpbusd:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $walk(job: &Job) {
                // SAFETY: this function's features are the tile's.
                unsafe {
                    let packed = job.packed.as_ptr().cast::<u8>();
                    walk_tiles!(
                        job,
                        4,
                        1,
                        $tile,
                        packed,
                        panel_bytes(job),
                        job.groups,
                        CacheLevel::L1
                    )
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn $tile<const MR: usize, const NP: usize>(
                job: &Job,
                r0: usize,
                p0: usize,
                prefetch: &mut Prefetch,
            ) {
                let panel_bytes = panel_bytes(job);
                // SAFETY: as in tile512.
                unsafe {
                    let b = job.packed.as_ptr().add(p0 * panel_bytes);
                    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
                    for g in 0..job.groups {
                        if g % PREFETCH_EVERY == 0 {
                            prefetch.step();
                        }
                        let lo = _mm256_loadu_si256(b.add(g * 64).cast());
                        let hi = _mm256_loadu_si256(b.add(g * 64 + 32).cast());
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let a = _mm256_set1_epi32(group_of(job, r0 + r, g));
                            acc[0] = $dpbusd(acc[0], a, lo);
                            acc[1] = $dpbusd(acc[1], a, hi);
                        }
                    }
                    let n0 = p0 * PANEL;
                    let valid = (job.n_out - n0).min(PANEL);
                    let sums = job.column_sums.as_ptr().add(n0);
                    let offset = [
                        _mm256_slli_epi32::<7>(_mm256_loadu_si256(sums.cast())),
                        _mm256_slli_epi32::<7>(_mm256_loadu_si256(sums.add(8).cast())),
                    ];
                    for (r, acc) in acc.iter().enumerate() {
                        let row = r0 + r;
                        let y = epilogue256(
                            job,
                            row,
                            n0,
                            [
                                _mm256_sub_epi32(acc[0], offset[0]),
                                _mm256_sub_epi32(acc[1], offset[1]),
                            ],
                        );
                        store16(job.out.add(row * job.n_out + n0), y[0], y[1], valid);
                    }
                }
            }
        };
    }

    /// One row's 16 sums less the row's offset times the columns' weight sums.
    #[inline(always)]
    unsafe fn less_offset(job: &Job, row: usize, n0: usize, acc: [__m256i; 2]) -> [__m256i; 2] {
        // SAFETY: n0 + 16 is within the padded column sums.
        unsafe {
            let sums = job.column_sums.as_ptr().add(n0);
            let zero = _mm256_set1_epi32(job.a_zeros[row]);
            [
                _mm256_sub_epi32(
                    acc[0],
                    _mm256_mullo_epi32(_mm256_loadu_si256(sums.cast()), zero),
                ),
                _mm256_sub_epi32(
                    acc[1],
                    _mm256_mullo_epi32(_mm256_loadu_si256(sums.add(8).cast()), zero),
                ),
            ]
        }
    }

    /// `sums · a_scale · w_scale + bias` for one row's 16 columns.
    #[inline(always)]
    unsafe fn epilogue256(job: &Job, row: usize, n0: usize, sums: [__m256i; 2]) -> [__m256; 2] {
        // SAFETY: n0 + 16 is within the padded scales and bias.
        unsafe {
            let a_scale = _mm256_set1_ps(job.a_scales[row]);
            let (scales, bias) = (job.scales.as_ptr().add(n0), job.bias.as_ptr().add(n0));
            [
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums[0]),
                    _mm256_mul_ps(_mm256_loadu_ps(scales), a_scale),
                    _mm256_loadu_ps(bias),
                ),
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums[1]),
                    _mm256_mul_ps(_mm256_loadu_ps(scales.add(8)), a_scale),
                    _mm256_loadu_ps(bias.add(8)),
                ),
            ]
        }
    }

    vnni256!(
        avx_vnni,
        tile_avx_vnni,
        "avx2,fma,avxvnni",
        _mm256_dpbusd_avx_epi32
    );
    vnni256!(
        avx512vl_vnni256,
        tile_avx512vl_vnni256,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32
    );

    // ---------------------------------------------------------------- AVX2

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(job: &Job) {
        if job.zero_point {
            // SAFETY: this function's features are the tile's.
            unsafe {
                let packed = job.packed.as_ptr().cast::<u8>();
                return walk_tiles!(
                    job,
                    4,
                    1,
                    tile_avx2_unsigned,
                    packed,
                    panel_bytes(job),
                    job.groups,
                    CacheLevel::L1
                );
            }
        }
        // The tile reads each group's magnitudes half a row after its values.
        assert!(
            job.a_stride / 2 >= job.groups * GROUP,
            "activations for the avx2 kernel carry their magnitudes"
        );
        // SAFETY: this function's features are the tile's.
        unsafe {
            let packed = job.packed.as_ptr().cast::<u8>();
            walk_tiles!(
                job,
                4,
                1,
                tile_avx2,
                packed,
                panel_bytes(job),
                job.groups,
                CacheLevel::L1
            )
        }
    }

    /// `a · w` as `|a| · (w with a's sign)`: with both in [-127, 127] the pairwise i16 sums
    /// of `vpmaddubsw` (at most 2 · 127 · 127) cannot saturate, so the result is exact. The
    /// magnitudes `|a|` come with the activations, half a row after their values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const MR: usize, const NP: usize>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        // SAFETY: as in tile_avx2_of; this function has its features.
        unsafe { tile_avx2_of::<MR, NP, false>(job, r0, p0, prefetch) }
    }

    /// The avx2 tile for [`Activations::ZeroPoint`](crate::Activations::ZeroPoint) rows:
    /// unsigned 7-bit activations times signed weights, pairwise i16 sums of at most
    /// 2 · 127 · 127, so `vpmaddubsw` cannot saturate and no sign step is needed; each sum
    /// then loses its row's zero point times the column's weight sum.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2_unsigned<const MR: usize, const NP: usize>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        // SAFETY: as in tile_avx2_of; this function has its features.
        unsafe { tile_avx2_of::<MR, NP, true>(job, r0, p0, prefetch) }
    }

    /// The two avx2 tiles, inlined into each (`UNSIGNED` is decided at compile time).
    #[inline(always)]
    unsafe fn tile_avx2_of<const MR: usize, const NP: usize, const UNSIGNED: bool>(
        job: &Job,
        r0: usize,
        p0: usize,
        prefetch: &mut Prefetch,
    ) {
        let panel_bytes = panel_bytes(job);
        // SAFETY: as in tile512.
        unsafe {
            let b = job.packed.as_ptr().add(p0 * panel_bytes);
            let ones = _mm256_set1_epi16(1);
            let half = job.a_stride / 2;
            let mut acc = [[_mm256_setzero_si256(); 2]; MR];
            for g in 0..job.groups {
                if g % PREFETCH_EVERY == 0 {
                    prefetch.step();
                }
                let lo = _mm256_loadu_si256(b.add(g * 64).cast());
                let hi = _mm256_loadu_si256(b.add(g * 64 + 32).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_set1_epi32(group_of(job, r0 + r, g));
                    let (lo, hi) = if UNSIGNED {
                        (_mm256_maddubs_epi16(a, lo), _mm256_maddubs_epi16(a, hi))
                    } else {
                        let magnitude = _mm256_set1_epi32(group_of(job, r0 + r, g + half / GROUP));
                        (
                            _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(lo, a)),
                            _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(hi, a)),
                        )
                    };
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(lo, ones));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(hi, ones));
                }
            }
            let n0 = p0 * PANEL;
            let valid = (job.n_out - n0).min(PANEL);
            for (r, acc) in acc.iter().enumerate() {
                let row = r0 + r;
                let sums = if UNSIGNED {
                    less_offset(job, row, n0, *acc)
                } else {
                    *acc
                };
                let y = epilogue256(job, row, n0, sums);
                store16(job.out.add(row * job.n_out + n0), y[0], y[1], valid);
            }
        }
    }
}
