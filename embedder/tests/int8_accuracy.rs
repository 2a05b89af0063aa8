//! `--quantize int8` keeps the vectors: against the f32 model on the parity fixtures, the
//! operator's built-in golden set and a 310-text corpus in 12 topics
//! (tests/fixtures/accuracy-corpus.txt), per-text cosine mean ≥ 0.995 and min ≥ 0.98, and
//! top-10 nearest neighbours within the corpus agree ≥ 0.9.
//! Runs the int8 kernel this machine picks (AVX-512 VNNI, AVX-VNNI, AVX2 or portable), plus
//! every other kernel it can run on the parity texts.

mod common;

use common::{MODEL, SECOND_MODEL, cosine, fixture, model_dir_of};
use embedder::{Quantization, SentenceModel};
use serde_json::Value;

fn parity_texts(model: &str) -> Vec<String> {
    let path = fixture(&format!("reference-{model}.json"));
    let file: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    file["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().to_string())
        .collect()
}

fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(fixture("accuracy-corpus.txt")).unwrap();
    let golden = include_str!("../../operator/src/golden-set.txt");
    text.lines()
        .map(|l| l.replace("\\n", "\n"))
        .chain(golden.lines().map(str::to_string))
        .collect()
}

fn embed_all(model: &SentenceModel, texts: &[String]) -> Vec<Vec<f32>> {
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    ids.chunks(32)
        .flat_map(|chunk| {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            model.embed(&refs).unwrap()
        })
        .collect()
}

/// The `k` nearest other texts of text `i`.
fn neighbours(vectors: &[Vec<f32>], i: usize, k: usize) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = vectors
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(j, v)| (cosine(&vectors[i], v), j))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, j)| j).collect()
}

struct Agreement {
    mean: f64,
    min: f64,
    worst: usize,
}

fn agreement(f32s: &[Vec<f32>], int8s: &[Vec<f32>]) -> Agreement {
    let cos: Vec<f64> = f32s.iter().zip(int8s).map(|(a, b)| cosine(a, b)).collect();
    let (worst, min) = cos
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    Agreement {
        mean: cos.iter().sum::<f64>() / cos.len() as f64,
        min,
        worst,
    }
}

fn check(model_name: &str) {
    let dir = model_dir_of(model_name);
    let f32_model = SentenceModel::load(model_name, &dir, Quantization::None).unwrap();
    let int8_model = SentenceModel::load(model_name, &dir, Quantization::Int8).unwrap();
    let kernel = embedroll_int8::selected();
    let saved = 1.0 - int8_model.info.weight_bytes as f64 / f32_model.info.weight_bytes as f64;
    assert!(
        saved >= 0.6,
        "{model_name}: int8 weights only {:.0}% smaller",
        100.0 * saved
    );

    let mut texts = parity_texts(model_name);
    texts.extend(corpus());
    let reference = embed_all(&f32_model, &texts);
    let quantized = embed_all(&int8_model, &texts);
    let a = agreement(&reference, &quantized);
    // The operator's golden set comes last: what its vector gate compares, so what
    // `compatibility.minCosine` must allow for an f32 → int8 rollout.
    let golden = include_str!("../../operator/src/golden-set.txt")
        .lines()
        .count();
    let g = agreement(
        &reference[texts.len() - golden..],
        &quantized[texts.len() - golden..],
    );

    let k = 10;
    let nn: f64 = (0..texts.len())
        .map(|i| {
            let want = neighbours(&reference, i, k);
            let got = neighbours(&quantized, i, k);
            want.iter().filter(|j| got.contains(j)).count() as f64 / k as f64
        })
        .sum::<f64>()
        / texts.len() as f64;
    eprintln!(
        "{model_name}, {} texts, int8 kernel {}: cosine mean {:.5} min {:.5} ({:?}), top-{k} agreement {nn:.3}, weights {:.1} -> {:.1} MB; golden set: mean {:.5} min {:.5}",
        texts.len(),
        kernel.name(),
        a.mean,
        a.min,
        texts[a.worst],
        f32_model.info.weight_bytes as f64 / 1e6,
        int8_model.info.weight_bytes as f64 / 1e6,
        g.mean,
        g.min,
    );
    assert!(a.mean >= 0.995, "{model_name}: mean cosine {:.5}", a.mean);
    assert!(
        a.min >= 0.98,
        "{model_name}: cosine {:.5} for {:?}",
        a.min,
        texts[a.worst]
    );
    assert!(nn >= 0.9, "{model_name}: top-{k} agreement {nn:.3}");
}

#[test]
fn int8_tracks_f32_on_the_bundled_model() {
    check(MODEL);
}

#[test]
fn int8_tracks_f32_on_the_second_model() {
    check(SECOND_MODEL);
}

/// Every kernel this CPU runs gives the vectors of the one picked: they sum the same
/// integers and scale them with the same fused multiply-add, so the accuracy above holds
/// whichever kernel a machine picks.
#[test]
fn every_kernel_here_gives_the_same_vectors() {
    let dir = model_dir_of(MODEL);
    let model = SentenceModel::load(MODEL, &dir, Quantization::Int8).unwrap();
    let texts = parity_texts(MODEL);
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let picked = model.embed(&refs).unwrap();
    for isa in embedroll_int8::Isa::available() {
        let got = embedroll_int8::with_kernel(isa, || model.embed(&refs).unwrap());
        for (i, (a, b)) in picked.iter().zip(&got).enumerate() {
            let cos = cosine(a, b);
            assert!(cos >= 0.99999, "{}: cosine {cos} on text {i}", isa.name());
        }
    }
}
