//! Per-core rate of every matrix kernel this CPU runs, f32 and int8, on the linear layers of
//! one all-MiniLM-L6-v2 layer (384→1152, 384→384, 384→1536, 1536→384) at the row counts the
//! server sees: one short text (21 rows), one thread's lane of 32 short texts (331), and a
//! whole 32-text pass (662). No model needed: weights and activations are random, which
//! costs the kernels the same as real ones. Then the fastest f32 and int8 kernels over six
//! layers of distinct weights (the model's size, past L2 and close to L3), one thread alone and
//! two at once on their own rows, as the server's lanes run: how much a core loses to its
//! neighbour (shared caches and memory, clock, or a shared physical core under SMT).
//! `cargo bench -p embedroll-int8 --bench kernels`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use embedroll_int8::dense::{Level, PackedLinear};
use embedroll_int8::{Activations, Isa, QuantizedLinear, on_one_thread};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPES: [(usize, usize); 4] = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];

/// int8 activations per layer, as the model quantizes them: the feed-forward output layer
/// (1536→384) takes the activation function's outputs, with a zero point.
fn activations(n_in: usize, n_out: usize) -> Activations {
    if n_in > n_out {
        Activations::ZeroPoint
    } else {
        Activations::Symmetric
    }
}
const ROWS: [usize; 3] = [21, 331, 662];
const LAYERS: usize = 6;
/// Rows per thread in the two-thread table: a 256-token pass (the default budget) and 32
/// short texts in one pass, each cut in two lanes.
const LANE_ROWS: [usize; 2] = [128, 331];

#[derive(Clone, Copy)]
enum Kernel {
    F32(Level),
    Int8(Isa),
}

impl Kernel {
    fn name(self) -> String {
        match self {
            Kernel::F32(level) => format!("f32 {level:?}"),
            Kernel::Int8(isa) => format!("int8 {}", isa.name()),
        }
    }

    /// One layer through this kernel: the f32 or the int8 form of the same weights.
    fn forward(
        self,
        f32_layer: &PackedLinear,
        int8_layer: &QuantizedLinear,
        x: &[f32],
        rows: usize,
        out: &mut Vec<f32>,
    ) {
        match self {
            Kernel::F32(level) => f32_layer.forward_with(level, x, rows, out),
            Kernel::Int8(isa) => int8_layer.forward_with(isa, x, rows, out),
        }
    }
}

fn random(rng: &mut StdRng, n: usize, spread: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-spread..spread)).collect()
}

/// Best of five timings of `pass`, each repeated for at least 50 ms; returns GFLOP/s.
fn rate(flops: f64, mut pass: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let (start, mut n) = (Instant::now(), 0u32);
        while n == 0 || start.elapsed() < Duration::from_millis(50) {
            pass();
            n += 1;
        }
        best = best.min(start.elapsed() / n);
    }
    flops / best.as_secs_f64() / 1e9
}

fn main() {
    println!("cpu flags: {}", embedroll_int8::cpu_flags().join(" "));
    let mut rng = StdRng::seed_from_u64(7);
    let layers: Vec<_> = SHAPES
        .iter()
        .map(|&(n_in, n_out)| {
            let w = random(&mut rng, n_in * n_out, 0.08);
            let b = random(&mut rng, n_out, 0.1);
            (
                n_in,
                PackedLinear::new(&w, &b, n_out, n_in),
                QuantizedLinear::new(&w, &b, n_out, n_in)
                    .with_activations(activations(n_in, n_out)),
            )
        })
        .collect();
    let inputs: Vec<Vec<Vec<f32>>> = ROWS
        .iter()
        .map(|&rows| {
            SHAPES
                .iter()
                .map(|&(n_in, _)| random(&mut rng, rows * n_in, 2.0))
                .collect()
        })
        .collect();
    let flops = |rows: usize| -> f64 {
        SHAPES
            .iter()
            .map(|&(n_in, n_out)| 2.0 * (rows * n_in * n_out) as f64)
            .sum()
    };

    println!("GFLOP/s (int8: GOP/s) on one thread, one layer's linears, by rows:");
    print!("{:<22}", "kernel");
    for rows in ROWS {
        print!("{:>10}", format!("{rows} rows"));
    }
    println!();
    let mut out = Vec::new();
    let every = [Level::Avx512, Level::Avx2, Level::Portable]
        .into_iter()
        .filter(|level| level.supported())
        .map(Kernel::F32)
        .chain(Isa::available().into_iter().map(Kernel::Int8));
    for kernel in every {
        print!("{:<22}", kernel.name());
        for (i, &rows) in ROWS.iter().enumerate() {
            let r = on_one_thread(|| {
                rate(flops(rows), || {
                    for (l, (_, f32_layer, int8_layer)) in layers.iter().enumerate() {
                        let x = black_box(&inputs[i][l]);
                        kernel.forward(f32_layer, int8_layer, x, rows, &mut out);
                    }
                })
            });
            print!("{r:>10.1}");
        }
        println!();
    }

    let model: Vec<_> = (0..LAYERS * SHAPES.len())
        .map(|i| {
            let (n_in, n_out) = SHAPES[i % SHAPES.len()];
            let w = random(&mut rng, n_in * n_out, 0.08);
            let b = random(&mut rng, n_out, 0.1);
            (
                PackedLinear::new(&w, &b, n_out, n_in),
                QuantizedLinear::new(&w, &b, n_out, n_in)
                    .with_activations(activations(n_in, n_out)),
            )
        })
        .collect();
    let (level, isa) = (Level::detect(), Isa::detect());
    println!(
        "\n{LAYERS} layers of distinct weights ({:.1} MB f32, {:.1} MB int8), per core, one thread alone / two at once:",
        model.iter().map(|l| l.0.bytes()).sum::<usize>() as f64 / 1e6,
        model.iter().map(|l| l.1.bytes()).sum::<usize>() as f64 / 1e6,
    );
    print!("{:<22}", "kernel");
    for rows in LANE_ROWS {
        print!("{:>18}", format!("{rows} rows each"));
    }
    println!();
    for kernel in [Kernel::F32(level), Kernel::Int8(isa)] {
        print!("{:<22}", kernel.name());
        for rows in LANE_ROWS {
            let pass = |x: &[Vec<f32>], out: &mut Vec<f32>| {
                for (l, (f32_layer, int8_layer)) in model.iter().enumerate() {
                    let x = black_box(&x[l % SHAPES.len()]);
                    kernel.forward(f32_layer, int8_layer, x, rows, out);
                }
            };
            let flops = LAYERS as f64 * flops(rows);
            let xs: Vec<Vec<Vec<f32>>> = (0..2)
                .map(|_| {
                    SHAPES
                        .iter()
                        .map(|&(n_in, _)| random(&mut rng, rows * n_in, 2.0))
                        .collect()
                })
                .collect();
            let alone = on_one_thread(|| {
                let mut out = Vec::new();
                rate(flops, || pass(&xs[0], &mut out))
            });
            let start = Barrier::new(2);
            let together: Vec<f64> = std::thread::scope(|scope| {
                let workers: Vec<_> = xs
                    .iter()
                    .map(|x| {
                        let start = &start;
                        scope.spawn(move || {
                            on_one_thread(|| {
                                let mut out = Vec::new();
                                start.wait();
                                rate(flops, || pass(x, &mut out))
                            })
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            let both = together.iter().sum::<f64>() / 2.0;
            print!("{:>18}", format!("{alone:.1} / {both:.1}"));
        }
        println!();
    }
}
