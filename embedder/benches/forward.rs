//! In-process timings of the model's forward pass: batch 1 and batch 32 over texts of mixed
//! length, and throughput and pass time by token budget (what `--max-batch-tokens` trades:
//! a small request waits up to one pass behind a heavy one), no HTTP.
//! `cargo bench -p embedder --bench forward [-- [--quantize int8] [--int8-kernel NAME] [MODEL_DIR]]`.
//! For the comparison with sentence-transformers use benches/compare.sh.

use std::path::PathBuf;
use std::time::Instant;

use embedder::{Quantization, SentenceModel};

fn texts(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "embedding",
        "service",
        "maps",
        "text",
        "to",
        "dense",
        "vectors",
        "for",
        "semantic",
        "search",
        "while",
        "operator",
        "rolls",
        "new",
        "revisions",
        "behind",
        "canary",
        "gates",
    ];
    let mut state: u64 = 12345;
    (0..n)
        .map(|i| {
            state = (state * 1103515245 + 12345) % (1 << 31);
            let len = 4 + (state % 57) as usize;
            let words: Vec<&str> = (0..len)
                .map(|k| WORDS[((state as usize >> (k % 16)) ^ (k * 7)) % WORDS.len()])
                .collect();
            format!("{i}: {}", words.join(" "))
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut quantization, mut kernel) = (None, Quantization::None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quantize" => {
                let name = args.next().unwrap_or_default();
                quantization = Quantization::from_name(&name).expect("--quantize none|int8");
            }
            "--int8-kernel" => kernel = args.next(),
            "--bench" => {}
            other if !other.starts_with('-') => dir = Some(PathBuf::from(other)),
            _ => {}
        }
    }
    let dir = dir.unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/embedroll/models/all-MiniLM-L6-v2")
    });
    let kernel = embedroll_int8::select(kernel.as_deref()).expect("int8 kernel");
    let model = SentenceModel::load("bench", &dir, quantization).expect("load model");
    println!(
        "quantization {}{}, weights {:.1} MB",
        quantization.name(),
        if quantization == Quantization::Int8 {
            format!(" ({} kernel)", kernel.name())
        } else {
            String::new()
        },
        model.info.weight_bytes as f64 / 1e6
    );
    let corpus = texts(512);
    let ids: Vec<Vec<u32>> = corpus.iter().map(|t| model.tokenize(t).unwrap()).collect();
    for chunk in ids.chunks(8).take(4) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        model.embed(&refs).unwrap();
    }

    let mut latencies: Vec<f64> = ids[..200]
        .iter()
        .map(|seq| {
            let started = Instant::now();
            rayon::scope(|_| model.embed(&[seq.as_slice()])).unwrap();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let total: f64 = latencies.iter().sum();
    println!(
        "batch 1:  {:7.1} texts/s  p50 {:6.2} ms  p95 {:6.2} ms",
        latencies.len() as f64 / total * 1e3,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95)
    );

    let started = Instant::now();
    let mut batch_ms = Vec::new();
    for chunk in ids.chunks(32) {
        let t0 = Instant::now();
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        rayon::scope(|_| model.embed(&refs)).unwrap();
        batch_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let elapsed = started.elapsed().as_secs_f64();
    batch_ms.sort_by(f64::total_cmp);
    println!(
        "batch 32: {:7.1} texts/s  p50 {:6.2} ms  p95 {:6.2} ms (per 32 texts)",
        ids.len() as f64 / elapsed,
        percentile(&batch_ms, 0.5),
        percentile(&batch_ms, 0.95)
    );

    // Long texts, as a heavy client sends them, packed under each budget.
    let long: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            let text = corpus[i * 4..i * 4 + 8].join(" ");
            model.tokenize(&text).unwrap()
        })
        .collect();
    let all_tokens: usize = long.iter().map(Vec::len).sum();
    println!(
        "budget (tokens per pass) over {} texts, {all_tokens} tokens:",
        long.len()
    );
    for budget in [64, 128, 256, 512, 1024, 2048, 4096, 16384] {
        let mut passes: Vec<Vec<&[u32]>> = vec![Vec::new()];
        let mut tokens = 0;
        for seq in &long {
            if !passes.last().unwrap().is_empty() && tokens + seq.len() > budget {
                passes.push(Vec::new());
                tokens = 0;
            }
            tokens += seq.len();
            passes.last_mut().unwrap().push(seq.as_slice());
        }
        let started = Instant::now();
        let mut pass_ms: Vec<f64> = passes
            .iter()
            .map(|pass| {
                let t0 = Instant::now();
                rayon::scope(|_| model.embed(pass)).unwrap();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let elapsed = started.elapsed().as_secs_f64();
        pass_ms.sort_by(f64::total_cmp);
        println!(
            "  {budget:6}: {:8.0} tokens/s  pass p50 {:7.2} ms  max {:7.2} ms  ({} passes)",
            all_tokens as f64 / elapsed,
            percentile(&pass_ms, 0.5),
            pass_ms.last().copied().unwrap_or_default(),
            pass_ms.len()
        );
    }
}
