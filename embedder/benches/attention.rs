//! Attention alone: the fused kernel for short sequences against the `gemm` path, by tokens
//! per text, over one pass of about 256 tokens (the default token budget) with the
//! model's shape (all-MiniLM-L6-v2: 384 wide, 12 heads), on all the rayon threads.
//! Prints ms per 1,000 tokens for each path (best of many runs, the two alternating) and
//! their ratio; where the fused kernel loses is where `short_attention::MAX_LEN` belongs.
//! `cargo bench -p embedder --bench attention`.

use std::time::Instant;

use embedder::bert::BertEncoder;
use embedder::short_attention;

fn main() {
    println!("cpu flags: {}", embedroll_int8::cpu_flags().join(" "));
    let (hidden, heads) = (384, 12);
    if !short_attention::available(hidden / heads) {
        println!("no fused attention kernel on this CPU: every length takes gemm");
        return;
    }
    println!(
        "attention, {} threads, ms per 1,000 tokens (fused kernel up to {} tokens):",
        rayon::current_num_threads(),
        short_attention::MAX_LEN
    );
    println!("tokens per text    fused     gemm   gemm/fused");
    for len in [8usize, 16, 21, 32, 40, 48, 64, 80, 96, 112, 128, 192] {
        let texts = (256 / len).max(2);
        let spans: Vec<_> = (0..texts).map(|i| i * len..(i + 1) * len).collect();
        let tokens = texts * len;
        let qkv: Vec<f32> = (0..tokens * 3 * hidden)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut context = vec![0f32; tokens * hidden];
        let mut best = [f64::MAX; 2];
        for _ in 0..400 {
            for (path, fused_up_to) in [(0, usize::MAX), (1, 0)] {
                let started = Instant::now();
                BertEncoder::attention(&qkv, &spans, &mut context, heads, fused_up_to);
                best[path] = best[path].min(started.elapsed().as_secs_f64());
            }
        }
        let per_k = |s: f64| s * 1e6 / tokens as f64;
        println!(
            "{len:15}  {:7.3}  {:7.3}  {:10.2}x",
            per_k(best[0]),
            per_k(best[1]),
            best[1] / best[0]
        );
    }
}
