//! INT8 linear layers for CPU inference.
//!
//! Weights are quantized once, per output channel (symmetric, `[-127, 127]`); activations are
//! quantized per row at run time (symmetric, `[-127, 127]`); products accumulate exactly in
//! i32 and are scaled back to f32 with the bias added in the same pass. The matrix kernel is
//! picked at run time from what the CPU has ([`Isa`]): AVX-512 VNNI (`vpdpbusd` on 512-bit
//! registers), AVX-VNNI (the same instruction on 256-bit registers), AVX2
//! (`vpmaddubsw`/`vpmaddwd`) or portable Rust. Every path computes the same integer sums, so
//! they agree up to the rounding of the f32 epilogue.
//!
//! Why a kernel of our own: the dot-product instructions need both operands as bytes in a
//! layout made for them, and neither `gemm` nor candle multiplies int8 matrices on CPU.

/// Calls `$tile::<MR, NP>` with the tile's size as constants, so its accumulators are
/// arrays the compiler keeps in registers.
macro_rules! sized_tile {
    ($tile:ident, $mr:expr, $np:expr, $($arg:expr),*) => {
        match ($mr, $np) {
            (1, 1) => $tile::<1, 1>($($arg),*),
            (2, 1) => $tile::<2, 1>($($arg),*),
            (3, 1) => $tile::<3, 1>($($arg),*),
            (4, 1) => $tile::<4, 1>($($arg),*),
            (5, 1) => $tile::<5, 1>($($arg),*),
            (6, 1) => $tile::<6, 1>($($arg),*),
            (1, 2) => $tile::<1, 2>($($arg),*),
            (2, 2) => $tile::<2, 2>($($arg),*),
            (3, 2) => $tile::<3, 2>($($arg),*),
            (4, 2) => $tile::<4, 2>($($arg),*),
            (5, 2) => $tile::<5, 2>($($arg),*),
            (6, 2) => $tile::<6, 2>($($arg),*),
            (1, 3) => $tile::<1, 3>($($arg),*),
            (2, 3) => $tile::<2, 3>($($arg),*),
            (3, 3) => $tile::<3, 3>($($arg),*),
            (4, 3) => $tile::<4, 3>($($arg),*),
            (5, 3) => $tile::<5, 3>($($arg),*),
            (6, 3) => $tile::<6, 3>($($arg),*),
            (1, _) => $tile::<1, 4>($($arg),*),
            (2, _) => $tile::<2, 4>($($arg),*),
            (3, _) => $tile::<3, 4>($($arg),*),
            (4, _) => $tile::<4, 4>($($arg),*),
            (5, _) => $tile::<5, 4>($($arg),*),
            _ => $tile::<6, 4>($($arg),*),
        }
    };
}

/// Walks a job in tiles of up to `MR` rows × `NP` panels, panel group by panel group. Each
/// tile gets the [`Prefetch`] of the group after its own (`$inner` steps per tile, panels of
/// `$panel_bytes` from `$packed`), so those weights arrive while this group's row tiles run.
macro_rules! walk_tiles {
    ($job:expr, $mr:expr, $np:expr, $tile:ident, $packed:expr, $panel_bytes:expr, $inner:expr, $level:expr) => {{
        let job = $job;
        let steps = job.rows.len().div_ceil($mr) * ($inner).div_ceil(crate::PREFETCH_EVERY);
        let mut p = job.panels.start;
        while p < job.panels.end {
            let np = (job.panels.end - p).min($np);
            let next = (p + np)..(p + np + $np).min(job.panels.end);
            let mut prefetch = crate::Prefetch::new($packed, $panel_bytes, next, steps, $level);
            let mut r = job.rows.start;
            while r < job.rows.end {
                let mr = (job.rows.end - r).min($mr);
                sized_tile!($tile, mr, np, job, r, p, &mut prefetch);
                r += mr;
            }
            p += np;
        }
    }};
}

pub mod dense;
mod kernels;

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Columns per packed panel: one 512-bit register of i32 sums, two 256-bit ones.
const PANEL: usize = 16;
/// Inner-dimension values per packed group: one `vpdpbusd` lane sums four products.
const GROUP: usize = 4;
/// Work below this many multiply-adds runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;
/// Inner-dimension steps of a tile between two calls of [`Prefetch::step`].
#[cfg(target_arch = "x86_64")]
const PREFETCH_EVERY: usize = 16;

/// Which cache a [`Prefetch`] fills.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum CacheLevel {
    /// L1: the next single panel, beside the current one (256-bit tiles).
    L1,
    /// L2: the next four panels, which do not fit L1 beside the current four (AVX-512 tiles).
    L2,
}

/// The next panel group's weights, prefetched a few 64-byte lines per [`PREFETCH_EVERY`]
/// inner steps while the current group's row tiles run. A model's weights outgrow L2, so each
/// group comes from L3 or memory. The hardware prefetcher, seeing one new line per few dozen
/// multiply-adds on a group's first row tile, falls behind there, and that tile then waits on
/// every line.
///
/// One thread over a 6-layer encoder's distinct weights, GFLOP/s:
/// - AMD EPYC, f32 AVX2: 98-99 → 109-111 at 120 rows, 66 → 85-91 at 20 rows (weights in
///   cache: ~110 and ~99).
/// - Intel Xeon (Sapphire Rapids), f32 AVX-512 at 128 rows: 78.8-124.4 without it (a noisy
///   VM), 126.9-136.8 with it; about 125 with the weights in cache.
#[cfg(target_arch = "x86_64")]
struct Prefetch {
    from: *const u8,
    line: usize,
    lines: usize,
    per_step: usize,
    level: CacheLevel,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    /// For `next` panels of `panel_bytes` each from `packed`, spread over `steps` calls.
    fn new(
        packed: *const u8,
        panel_bytes: usize,
        next: std::ops::Range<usize>,
        steps: usize,
        level: CacheLevel,
    ) -> Self {
        let lines = next.len() * panel_bytes / 64;
        Self {
            // Never read when there are no lines, so it may point past the weights then.
            from: packed.wrapping_add(next.start * panel_bytes),
            line: 0,
            lines,
            per_step: lines.div_ceil(steps.max(1)),
            level,
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per_step {
            if self.line < self.lines {
                // SAFETY: a prefetch never faults, and the address is inside the packed
                // weights (line < the next panels' lines).
                unsafe {
                    use std::arch::x86_64::*;
                    let at = self.from.add(self.line * 64).cast();
                    match self.level {
                        CacheLevel::L1 => _mm_prefetch::<_MM_HINT_T0>(at),
                        CacheLevel::L2 => _mm_prefetch::<_MM_HINT_T1>(at),
                    }
                }
                self.line += 1;
            }
        }
    }
}

/// Rows and panels per parallel task.
const TASK_ROWS: usize = 48;
const TASK_PANELS: usize = 4;

thread_local! {
    static ON_ONE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every product and elementwise pass it makes on the calling thread: for a
/// caller that already shares the work out at a coarser grain (one group of sequences per
/// thread), where splitting each product again would only add synchronisation.
pub fn on_one_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_ONE_THREAD.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(ON_ONE_THREAD.with(|flag| flag.replace(true)));
    f()
}

/// Whether work may be split across the rayon pool here (more than one thread, and not
/// inside [`on_one_thread`]).
pub fn may_split() -> bool {
    rayon::current_num_threads() > 1 && !ON_ONE_THREAD.with(Cell::get)
}

/// The SIMD features this CPU has among those the kernels choose by, for benchmarks to print
/// beside their numbers.
pub fn cpu_flags() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vl", has!("avx512vl")),
            ("avx512vnni", has!("avx512vnni")),
            ("avxvnni", has!("avxvnni")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

/// The matrix kernel in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// `vpdpbusd` on zmm registers (Intel Ice Lake and later, AMD Zen 4 and later).
    Avx512Vnni,
    /// `vpdpbusd` on ymm registers, VEX-encoded (Intel Alder Lake and later, AMD Zen 5).
    AvxVnni,
    /// The AVX-VNNI kernel compiled for the EVEX encoding of the same instruction
    /// (AVX512-VL + VNNI): lets machines with AVX-512 run and test the 256-bit VNNI code.
    Avx512VlVnni256,
    /// `vpmaddubsw` + `vpmaddwd`, exact for operands in `[-127, 127]` (Haswell and later).
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Avx512Vnni,
        Isa::AvxVnni,
        Isa::Avx512VlVnni256,
        Isa::Avx2,
        Isa::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512VlVnni256 => "avx512vl-vnni-256",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("avx2")
                }
                Isa::AvxVnni => has!("avx2") && has!("avxvnni"),
                Isa::Avx512VlVnni256 => {
                    has!("avx2") && has!("avx512f") && has!("avx512vl") && has!("avx512vnni")
                }
                Isa::Avx2 => has!("avx2"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every kernel this CPU can run, fastest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Portable)
    }

    /// The VNNI kernels multiply unsigned by signed bytes, so their activations are stored
    /// offset by 128 and the weights' column sums take the offset back out.
    fn unsigned_activations(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::AvxVnni | Isa::Avx512VlVnni256)
    }

    /// The avx2 kernel multiplies `|a|` by `w` with `a`'s sign. Taking `|a|` once per row at
    /// quantizing, instead of once per row and group in every panel, saves one of the nine
    /// vector instructions per row and group of its inner loop (kernels bench, AMD EPYC,
    /// median of 7 runs: +5%, 117.0 → 122.3 GOP/s at 331 rows).
    fn magnitudes_after_values(self) -> bool {
        self == Isa::Avx2
    }
}

static SELECTED: OnceLock<Isa> = OnceLock::new();

/// Picks the kernel for this process, once: `name` (e.g. from a command-line flag) if given
/// and the CPU runs it, else the fastest the CPU has. Later calls return the first choice.
pub fn select(name: Option<&str>) -> Result<Isa, String> {
    let wanted = match name {
        None | Some("auto") => Isa::detect(),
        Some(name) => {
            let isa = Isa::from_name(name).ok_or_else(|| {
                let names: Vec<_> = Isa::ALL.iter().map(|i| i.name()).collect();
                format!(
                    "unknown int8 kernel {name:?}; one of auto, {}",
                    names.join(", ")
                )
            })?;
            if !isa.supported() {
                return Err(format!("this CPU cannot run the {name} int8 kernel"));
            }
            isa
        }
    };
    Ok(*SELECTED.get_or_init(|| wanted))
}

/// The kernel in use ([`select`]ed, or detected on first use), unless [`with_kernel`]
/// overrides it on this thread.
pub fn selected() -> Isa {
    OVERRIDE
        .get()
        .unwrap_or_else(|| *SELECTED.get_or_init(Isa::detect))
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `isa` as the kernel of the layers it runs on this thread (tests and
/// benchmarks comparing kernels in one process).
pub fn with_kernel<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
    assert!(isa.supported(), "{} is not supported here", isa.name());
    let previous = OVERRIDE.replace(Some(isa));
    let result = f();
    OVERRIDE.set(previous);
    result
}

/// How a layer's activations are quantized, per row (token) at run time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// `q = round(x / s)` in `[-127, 127]`, `s = max|x| / 127`: for rows of both signs.
    #[default]
    Symmetric,
    /// `q = round(x / s) + z` in `[0, 127]`, `s = (max − min) / 126` over the row and zero,
    /// `z` the row's zero point: for rows mostly of one sign, as an activation function's
    /// outputs are (GELU's are ≥ −0.17). There the step is within a few percent of
    /// `Symmetric`'s, and the operands are unsigned 7-bit: the avx2 kernel multiplies them
    /// directly, without the two sign instructions per row and group that share its two
    /// multiply pipes (AMD Zen 4: 4 cycles per 128 multiply-adds instead of 6).
    ZeroPoint,
}

/// A linear layer `y = x · Wᵀ + b` with int8 weights.
pub struct QuantizedLinear {
    /// `[panel][group][column in panel][value in group]`: each (panel, group) block is one
    /// 64-byte vector of 16 columns × 4 inner values.
    packed: Vec<i8>,
    /// Per output column, padded to whole panels with zeros.
    scales: Vec<f32>,
    bias: Vec<f32>,
    /// Σₖ W[n][k] per column, to undo the unsigned-activation offset.
    column_sums: Vec<i32>,
    n_in: usize,
    n_out: usize,
    groups: usize,
    activations: Activations,
}

/// Activations quantized per row, in the form one kernel reads.
pub struct QuantizedRows {
    /// `stride` bytes per row; for the avx2 kernel's symmetric rows each row's values are
    /// followed by their magnitudes ([`Isa::magnitudes_after_values`]).
    values: Vec<u8>,
    scales: Vec<f32>,
    /// Per row, what the stored bytes add to each value: 128 for the VNNI kernels (which
    /// take unsigned bytes), the zero point for [`Activations::ZeroPoint`] rows of the
    /// others, else 0. The kernels take `zero · Σₖ w` back out of each sum.
    zeros: Vec<i32>,
    stride: usize,
    isa: Isa,
    activations: Activations,
}

impl QuantizedLinear {
    /// Quantizes `weight`, `(n_out, n_in)` row-major (the checkpoint's layout), per output
    /// channel.
    pub fn new(weight: &[f32], bias: &[f32], n_out: usize, n_in: usize) -> Self {
        assert_eq!(weight.len(), n_out * n_in, "weight size");
        assert_eq!(bias.len(), n_out, "bias size");
        let groups = n_in.div_ceil(GROUP);
        let panels = n_out.div_ceil(PANEL);
        let padded = panels * PANEL;
        let mut packed = vec![0i8; panels * groups * PANEL * GROUP];
        let mut scales = vec![0f32; padded];
        let mut column_sums = vec![0i32; padded];
        let mut row = vec![0i8; n_in];
        for n in 0..n_out {
            let w = &weight[n * n_in..(n + 1) * n_in];
            scales[n] = quantize_symmetric(w, &mut row);
            column_sums[n] = row.iter().map(|&v| v as i32).sum();
            let (panel, column) = (n / PANEL, n % PANEL);
            for (k, &v) in row.iter().enumerate() {
                let (group, lane) = (k / GROUP, k % GROUP);
                packed[((panel * groups + group) * PANEL + column) * GROUP + lane] = v;
            }
        }
        let mut padded_bias = vec![0f32; padded];
        padded_bias[..n_out].copy_from_slice(bias);
        Self {
            packed,
            scales,
            bias: padded_bias,
            column_sums,
            n_in,
            n_out,
            groups,
            activations: Activations::Symmetric,
        }
    }

    /// The same layer with its activations quantized as `activations`.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Bytes held for the weights, scales, bias and column sums.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scales.len() + self.bias.len() + self.column_sums.len())
    }

    /// `out = x · Wᵀ + b` for `rows` rows of `x`, with the [`selected`] kernel.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        self.forward_with(selected(), x, rows, out);
    }

    /// [`forward`](Self::forward) into a slice of exactly `rows × n_out` floats (rows of a
    /// larger matrix).
    pub fn forward_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.forward_into_with(selected(), x, rows, out);
    }

    /// [`forward`](Self::forward) with a given kernel (benchmarks and tests).
    pub fn forward_with(&self, isa: Isa, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        // Every output is written, so stale values need no zeroing.
        out.resize(rows * self.n_out, 0.0);
        self.forward_into_with(isa, x, rows, out);
    }

    fn forward_into_with(&self, isa: Isa, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(isa.supported(), "{} is not supported here", isa.name());
        assert_eq!(out.len(), rows * self.n_out, "output size");
        let quantized = QuantizedRows::new(isa, x, rows, self.n_in, self.activations);
        self.multiply(&quantized, out);
    }

    fn multiply(&self, a: &QuantizedRows, out: &mut [f32]) {
        let rows = a.scales.len();
        let panels = self.n_out.div_ceil(PANEL);
        let ptr = OutPtr(out.as_mut_ptr());
        for_each_tile(
            rows,
            panels,
            rows * self.n_out * self.n_in,
            |rows, panels| self.tile_range(a, rows, panels, ptr),
        );
    }

    /// Writes `out[rows, columns of panels]`.
    fn tile_range(
        &self,
        a: &QuantizedRows,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: OutPtr,
    ) {
        let job = kernels::Job {
            a: &a.values,
            a_stride: a.stride,
            a_scales: &a.scales,
            a_zeros: &a.zeros,
            zero_point: a.activations == Activations::ZeroPoint,
            packed: &self.packed,
            groups: self.groups,
            scales: &self.scales,
            bias: &self.bias,
            column_sums: &self.column_sums,
            n_out: self.n_out,
            out: out.0,
            rows,
            panels,
        };
        // SAFETY: `out` points to `a.rows × n_out` floats (sized in forward_with); every
        // task writes only its own rows × panel columns, and the kernel's CPU features were
        // checked when the rows were quantized for it.
        unsafe { kernels::run(a.isa, &job) }
    }
}

/// Runs `f` over `rows × panels` in tasks of `TASK_ROWS × TASK_PANELS` on the rayon pool, or
/// in one call when the product (`macs` multiply-adds) is too small to share.
fn for_each_tile(
    rows: usize,
    panels: usize,
    macs: usize,
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    if !may_split() || macs < PAR_MIN_MACS {
        return f(0..rows, 0..panels);
    }
    let tasks: Vec<_> = (0..rows)
        .step_by(TASK_ROWS)
        .flat_map(|r| {
            (0..panels).step_by(TASK_PANELS).map(move |p| {
                (
                    r..(r + TASK_ROWS).min(rows),
                    p..(p + TASK_PANELS).min(panels),
                )
            })
        })
        .collect();
    tasks.into_par_iter().for_each(|(r, p)| f(r, p));
}

/// The output matrix, shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint tiles, see `multiply`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Sync) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `n_in` values for `isa`'s kernel.
    pub fn new(isa: Isa, x: &[f32], rows: usize, n_in: usize, activations: Activations) -> Self {
        assert_eq!(x.len(), rows * n_in, "activation size");
        let padded = n_in.div_ceil(GROUP) * GROUP;
        let zero_point = activations == Activations::ZeroPoint;
        let stride = if isa.magnitudes_after_values() && !zero_point {
            2 * padded
        } else {
            padded
        };
        let offset = if isa.unsigned_activations() { 128u8 } else { 0 };
        let mut values = vec![offset; rows * stride];
        // (scale, zero) per row.
        let mut params = vec![(0f32, i32::from(offset)); rows];
        /// A row, its bytes, and its (scale, zero).
        type Row<'a> = (&'a [f32], (&'a mut [u8], &'a mut (f32, i32)));
        let quantize = |(row, (values, (scale, zero))): Row<'_>| {
            let (values, magnitudes) = values.split_at_mut(padded);
            let values = &mut values[..n_in];
            if zero_point {
                (*scale, *zero) = quantize_zero_point(row, values);
                if offset != 0 {
                    // The VNNI kernels take 128 · Σw out of every sum: q − z + 128, in
                    // [2, 255], gives them the other kernels' integer sums.
                    let shift = (128 - *zero) as u8;
                    values.iter_mut().for_each(|v| *v += shift);
                    *zero = 128;
                }
                return;
            }
            // SAFETY: i8 and u8 have the same size and alignment.
            let signed: &mut [i8] = unsafe { &mut *(values as *mut [u8] as *mut [i8]) };
            *scale = quantize_symmetric(row, signed);
            if isa.magnitudes_after_values() {
                // In [0, 127]: quantize_symmetric never gives -128.
                for (m, &v) in magnitudes.iter_mut().zip(signed.iter()) {
                    *m = v.unsigned_abs();
                }
            }
            if offset != 0 {
                values.iter_mut().for_each(|v| *v ^= 0x80);
            }
        };
        if rows * n_in >= PAR_MIN_MACS / 8 && may_split() {
            x.par_chunks(n_in)
                .zip(values.par_chunks_mut(stride).zip(params.par_iter_mut()))
                .for_each(quantize);
        } else {
            x.chunks(n_in)
                .zip(values.chunks_mut(stride).zip(params.iter_mut()))
                .for_each(quantize);
        }
        let (scales, zeros) = params.into_iter().unzip();
        Self {
            values,
            scales,
            zeros,
            stride,
            isa,
            activations,
        }
    }
}

/// [`Activations::ZeroPoint`]: `q = round(x / s) + z` in `[0, 127]`; returns `(s, z)`,
/// `(0, 0)` for an all-zero row and a NaN scale if any value is not finite.
///
/// `s = (hi − lo) / 126` over the row's range widened to hold zero, so that zero is exactly
/// `z` and the two roundings, of `x / s` and of `z = round(−lo / s)`, sum to at most 127.
pub fn quantize_zero_point(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    assert_eq!(x.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.supported() {
        // SAFETY: AVX2 is present.
        return unsafe { kernels::quantize_zero_point_avx2(x, q) };
    }
    quantize_zero_point_with(x, q, min_max(x), zero_point_portable)
}

/// [`quantize_zero_point`] given the row's `(min, max)` (with zero; NaN if any value is not
/// finite) and `fill(x, q, 1 / s, z)` for the per-value loop.
#[inline(always)]
fn quantize_zero_point_with(
    x: &[f32],
    q: &mut [u8],
    (lo, hi): (f32, f32),
    fill: impl FnOnce(&[f32], &mut [u8], f32, i32),
) -> (f32, i32) {
    if !(lo.is_finite() && hi.is_finite()) {
        q.fill(0);
        return (f32::NAN, 0);
    }
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let range = hi - lo;
    if range <= 0.0 || !range.is_finite() {
        q.fill(0);
        return (if range == 0.0 { 0.0 } else { f32::NAN }, 0);
    }
    let inv = 126.0 / range;
    let zero = (-lo * inv).round_ties_even() as i32;
    fill(x, q, inv, zero);
    (range / 126.0, zero)
}

fn zero_point_portable(x: &[f32], q: &mut [u8], inv: f32, zero: i32) {
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * inv).round_ties_even() as i32 + zero).clamp(0, 127) as u8;
    }
}

/// (min, max) of `x` and zero, in one lane-wise pass that vectorises; NaN if any value is
/// not finite (`v · 0` is NaN exactly then, and a lane's sum of them stays NaN).
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi, mut poison) = ([0f32; 16], [0f32; 16], [0f32; 16]);
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (((lo, hi), poison), &v) in lo.iter_mut().zip(&mut hi).zip(&mut poison).zip(chunk) {
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
            *poison += v * 0.0;
        }
    }
    let rest = chunks.remainder();
    let poison = poison.iter().chain(rest).fold(0f32, |a, &v| a + v * 0.0);
    if poison.is_nan() {
        return (f32::NAN, f32::NAN);
    }
    let lo = rest.iter().chain(&lo).fold(0f32, |a, &b| a.min(b));
    let hi = rest.iter().chain(&hi).fold(0f32, |a, &b| a.max(b));
    (lo, hi)
}

/// `q = round(x / s)` in `[-127, 127]` with `s = max|x| / 127`; returns `s` (0 for all-zero
/// input, NaN if any value is not finite).
pub fn quantize_symmetric(x: &[f32], q: &mut [i8]) -> f32 {
    assert_eq!(x.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.supported() {
        // SAFETY: AVX2 is present.
        return unsafe { kernels::quantize_avx2(x, q) };
    }
    quantize_portable(x, q)
}

fn quantize_portable(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = abs_max(min_max(x));
    let Some(inv) = inverse_scale(amax) else {
        q.fill(0);
        return scale_for(amax);
    };
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale_for(amax)
}

/// max |x| from a row's [`min_max`]: NaN stays NaN and ±∞ becomes +∞, both of which
/// [`scale_for`] turns into a NaN scale.
#[inline(always)]
fn abs_max((lo, hi): (f32, f32)) -> f32 {
    if lo.is_nan() { lo } else { hi.max(-lo) }
}

/// `127 / max|x|`, or None when nothing can be scaled (all zeros, or not finite).
#[inline(always)]
fn inverse_scale(amax: f32) -> Option<f32> {
    (amax > 0.0 && amax.is_finite()).then(|| 127.0 / amax)
}

#[inline(always)]
fn scale_for(amax: f32) -> f32 {
    if amax.is_finite() {
        amax / 127.0
    } else {
        f32::NAN
    }
}

/// Int8 rows with one scale each (`value ≈ q · scale`): an embedding table stored in a
/// quarter of the memory, dequantized one row at a time.
pub struct QuantizedTable {
    values: Vec<i8>,
    scales: Vec<f32>,
    width: usize,
}

impl QuantizedTable {
    pub fn new(table: &[f32], width: usize) -> Self {
        assert!(width > 0 && table.len().is_multiple_of(width), "table size");
        let mut values = vec![0i8; table.len()];
        let scales = table
            .chunks_exact(width)
            .zip(values.chunks_exact_mut(width))
            .map(|(row, q)| quantize_symmetric(row, q))
            .collect();
        Self {
            values,
            scales,
            width,
        }
    }

    pub fn rows(&self) -> usize {
        self.scales.len()
    }

    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// Row `i`, dequantized, added into `out`.
    pub fn add_row(&self, i: usize, out: &mut [f32]) {
        let scale = self.scales[i];
        let row = &self.values[i * self.width..(i + 1) * self.width];
        for (o, &q) in out.iter_mut().zip(row) {
            *o += q as f32 * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, n: usize, spread: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-spread..spread)).collect()
    }

    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, n_out: usize) -> Vec<f32> {
        let n_in = w.len() / n_out;
        let mut out = vec![0f32; rows * n_out];
        for r in 0..rows {
            for n in 0..n_out {
                let dot: f32 = (0..n_in).map(|k| x[r * n_in + k] * w[n * n_in + k]).sum();
                out[r * n_out + n] = dot + b[n];
            }
        }
        out
    }

    /// Every kernel this machine runs gives the portable kernel's answer, over shapes that
    /// exercise partial panels, partial groups, partial row tiles and the parallel split.
    #[test]
    fn every_kernel_here_matches_portable() {
        let available = Isa::available();
        eprintln!("int8 kernels on this machine: {available:?}");
        let mut rng = StdRng::seed_from_u64(7);
        for &(rows, n_in, n_out) in &[
            (1, 4, 16),
            (1, 384, 384),
            (3, 5, 17),
            (7, 383, 33),
            (13, 64, 1152),
            (200, 384, 1536),
            (65, 1536, 384),
        ] {
            let x = random(&mut rng, rows * n_in, 3.0);
            let w = random(&mut rng, n_out * n_in, 0.2);
            let b = random(&mut rng, n_out, 1.0);
            for activations in [Activations::Symmetric, Activations::ZeroPoint] {
                let layer = QuantizedLinear::new(&w, &b, n_out, n_in).with_activations(activations);
                let mut expected = Vec::new();
                layer.forward_with(Isa::Portable, &x, rows, &mut expected);
                for &isa in &available {
                    // Stale values in a reused buffer: every output must be written.
                    let mut got = vec![f32::NAN; rows * n_out];
                    layer.forward_with(isa, &x, rows, &mut got);
                    assert_eq!(got.len(), rows * n_out);
                    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                        assert!(
                            g == e,
                            "{} vs portable, {activations:?}, at {i} of {rows}x{n_in}x{n_out}: \
                             {g} vs {e}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    /// Quantized output stays within the error int8 allows of the f32 product.
    #[test]
    fn close_to_f32() {
        let mut rng = StdRng::seed_from_u64(11);
        let (rows, n_in, n_out) = (9, 384, 96);
        let x = random(&mut rng, rows * n_in, 2.0);
        let w = random(&mut rng, n_out * n_in, 0.1);
        let b = random(&mut rng, n_out, 0.5);
        let exact = reference(&x, &w, &b, rows, n_out);
        let layer = QuantizedLinear::new(&w, &b, n_out, n_in);
        let mut got = Vec::new();
        layer.forward(&x, rows, &mut got);
        let err: f32 = got.iter().zip(&exact).map(|(g, e)| (g - e).powi(2)).sum();
        let norm: f32 = exact.iter().map(|e| e.powi(2)).sum();
        assert!(
            (err / norm).sqrt() < 0.01,
            "relative error {}",
            (err / norm).sqrt()
        );
    }

    /// On rows of one sign mostly, as GELU leaves them, zero-point rows come as close to
    /// the f32 product as symmetric ones (their step is at most 127/126 · (1 + 0.17/max)
    /// of symmetric's), and on rows of both signs they are the coarser, as expected.
    #[test]
    fn zero_point_rows_are_as_close_as_symmetric_on_gelu_outputs() {
        let mut rng = StdRng::seed_from_u64(13);
        let (rows, n_in, n_out) = (16, 1536, 96);
        let gelu = |x: f32| 0.5 * x * (1.0 + (x * 0.797_884_6 * (1.0 + 0.044715 * x * x)).tanh());
        let lopsided: Vec<f32> = random(&mut rng, rows * n_in, 4.0)
            .into_iter()
            .map(gelu)
            .collect();
        let both_signs = random(&mut rng, rows * n_in, 4.0);
        let w = random(&mut rng, n_out * n_in, 0.1);
        let b = random(&mut rng, n_out, 0.5);
        let error = |x: &[f32], activations| {
            let exact = reference(x, &w, &b, rows, n_out);
            let layer = QuantizedLinear::new(&w, &b, n_out, n_in).with_activations(activations);
            let mut got = Vec::new();
            layer.forward(x, rows, &mut got);
            let err: f32 = got.iter().zip(&exact).map(|(g, e)| (g - e).powi(2)).sum();
            let norm: f32 = exact.iter().map(|e| e.powi(2)).sum();
            (err / norm).sqrt()
        };
        let (symmetric, zero_point) = (
            error(&lopsided, Activations::Symmetric),
            error(&lopsided, Activations::ZeroPoint),
        );
        eprintln!("GELU outputs: relative error zero point {zero_point}, symmetric {symmetric}");
        assert!(
            zero_point < 0.01 && zero_point <= symmetric * 1.1,
            "GELU outputs: zero point {zero_point}, symmetric {symmetric}"
        );
        let (symmetric, zero_point) = (
            error(&both_signs, Activations::Symmetric),
            error(&both_signs, Activations::ZeroPoint),
        );
        assert!(
            zero_point > symmetric * 1.5,
            "both signs: zero point {zero_point}, symmetric {symmetric}"
        );
    }

    /// The zero-point quantizer's bytes from its AVX2 and portable loops, and its edge cases.
    #[test]
    fn zero_point_quantizer_bounds_and_simd() {
        let mut rng = StdRng::seed_from_u64(17);
        for n in [1, 31, 32, 33, 384, 1537] {
            for shift in [-0.17f32, 0.0, 2.0, -3.0] {
                let mut x: Vec<f32> = random(&mut rng, n, 5.0)
                    .into_iter()
                    .map(|v| v.max(shift))
                    .collect();
                for (i, v) in x.iter_mut().enumerate().skip(1).step_by(3) {
                    *v = (i % 255) as f32 / 252.0 * 5.0 - 0.5;
                }
                let mut q = vec![0u8; n];
                let (scale, zero) = quantize_zero_point(&x, &mut q);
                assert!((0..=127).contains(&zero), "zero point {zero}");
                assert!(q.iter().all(|&v| v <= 127));
                for (&q, &v) in q.iter().zip(&x) {
                    let back = (i32::from(q) - zero) as f32 * scale;
                    assert!(
                        (back - v).abs() <= 0.5 * scale * 1.001,
                        "{v} came back {back}"
                    );
                }
                let mut portable = vec![0u8; n];
                let same =
                    quantize_zero_point_with(&x, &mut portable, min_max(&x), zero_point_portable);
                assert_eq!((scale, zero), same);
                assert_eq!(q, portable, "n = {n}, floor {shift}");
            }
        }
        let mut q = [9u8; 3];
        assert!(
            quantize_zero_point(&[1.0, f32::NAN, 2.0], &mut q)
                .0
                .is_nan()
        );
        assert!(
            quantize_zero_point(&[1.0, f32::INFINITY], &mut q[..2])
                .0
                .is_nan()
        );
        assert_eq!(quantize_zero_point(&[0.0; 3], &mut q), (0.0, 0));
        assert_eq!(q, [0; 3]);
        // Zero is exact, and so are the ends of a range already holding it.
        let mut q = [0u8; 3];
        let (scale, zero) = quantize_zero_point(&[-1.0, 0.0, 125.0], &mut q);
        assert_eq!((scale, zero, q), (1.0, 1, [0, 1, 126]));
    }

    #[test]
    fn zero_rows_and_extremes_are_safe() {
        let w = vec![0.5f32; 8 * 4];
        let layer = QuantizedLinear::new(&w, &[1.0; 8], 8, 4);
        let mut out = Vec::new();
        layer.forward(&[0.0; 8], 2, &mut out);
        assert_eq!(out, vec![1.0; 16]);
        layer.forward(&[], 0, &mut out);
        assert!(out.is_empty());
        let mut q = [0i8; 3];
        assert_eq!(quantize_symmetric(&[-4.0, 2.0, 4.0], &mut q), 4.0 / 127.0);
        assert_eq!(q, [-127, 64, 127]);
    }

    /// The SIMD row quantizer gives the portable one's bytes, ties and remainders included.
    #[test]
    fn simd_quantizer_matches_portable() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in [1, 31, 32, 33, 384, 1537] {
            let mut x = random(&mut rng, n, 5.0);
            // Values landing exactly on .5 steps: 127 · k / (2 · 127) for a max of 1.
            x[0] = 1.0;
            for (i, v) in x.iter_mut().enumerate().skip(1).step_by(3) {
                *v = (i % 255) as f32 / 254.0 - 0.5;
            }
            let (mut a, mut b) = (vec![0i8; n], vec![0i8; n]);
            let sa = quantize_symmetric(&x, &mut a);
            let sb = quantize_portable(&x, &mut b);
            assert_eq!((sa, &a), (sb, &b), "n = {n}");
        }
        let mut q = [1i8; 3];
        assert!(quantize_symmetric(&[1.0, f32::NAN, 2.0], &mut q).is_nan());
        assert!(quantize_symmetric(&[1.0, f32::NEG_INFINITY, 2.0], &mut q).is_nan());
        // Past the 16-value blocks of the SIMD range scan, and inside them.
        for at in [5, 37] {
            let mut long = vec![1.0f32; 40];
            long[at] = f32::NAN;
            assert!(quantize_symmetric(&long, &mut [0; 40]).is_nan());
            assert!(quantize_zero_point(&long, &mut [0; 40]).0.is_nan());
        }
        assert_eq!(quantize_symmetric(&[0.0; 3], &mut q), 0.0);
        assert_eq!(q, [0; 3]);
    }

    #[test]
    fn selection_by_name() {
        assert_eq!(Isa::from_name("avx2"), Some(Isa::Avx2));
        assert!(select(Some("sse9")).unwrap_err().contains("unknown"));
        assert!(Isa::Portable.supported());
    }

    #[test]
    fn table_rows_round_trip() {
        let table: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let t = QuantizedTable::new(&table, 8);
        assert_eq!(t.rows(), 5);
        for r in 0..5 {
            let mut out = vec![0f32; 8];
            t.add_row(r, &mut out);
            for (o, v) in out.iter().zip(&table[r * 8..(r + 1) * 8]) {
                assert!((o - v).abs() <= 0.5 * v.abs().max(1.0) / 127.0 * 3.0);
            }
        }
    }
}
