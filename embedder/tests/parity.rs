//! Embeddings match sentence-transformers (cos ≥ 0.9999 per text), truncation included.
//! The reference vectors were made by sentence-transformers itself
//! (tests/fixtures/make_reference.py) and are committed, so this test needs no torch.

mod common;

use common::{MODEL, SECOND_MODEL, Server, cosine, fixture};
use serde_json::{Value, json};

struct Reference {
    text: String,
    tokens: u64,
    embedding: Vec<f32>,
}

fn references(model: &str) -> Vec<Reference> {
    let path = fixture(&format!("reference-{model}.json"));
    let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let texts = file["texts"].as_array().unwrap();
    assert!(texts.len() >= 20, "fixture should hold at least 20 texts");
    texts
        .iter()
        .map(|t| Reference {
            text: t["text"].as_str().unwrap().to_string(),
            tokens: t["num_tokens"].as_u64().unwrap(),
            embedding: serde_json::from_value(t["embedding"].clone()).unwrap(),
        })
        .collect()
}

async fn embed(server: &Server, model: &str, texts: &[&str]) -> Value {
    let response = reqwest::Client::new()
        .post(server.url("/api/v1/embed"))
        .json(&json!({"texts": texts, "model": model}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(body["embeddings"].clone()).unwrap()
}

async fn check_model(server: &Server, model: &str) {
    let refs = references(model);
    // Truncation parity matters: the fixture holds texts far past max_seq_length.
    assert!(
        refs.iter().any(|r| r.tokens == 256),
        "fixture lacks a truncated text"
    );

    // One at a time.
    for r in &refs {
        let body = embed(server, model, &[&r.text]).await;
        let got = &vectors(&body)[0];
        let cos = cosine(got, &r.embedding);
        assert!(cos >= 0.9999, "{model}: cosine {cos} for {:?}", r.text);
        assert_eq!(
            body["usage"]["tokens"], r.tokens,
            "{model}: token count for {:?}",
            r.text
        );
        assert_eq!(body["dimensions"], 384);
    }

    // All in one request: mixed lengths packed into shared forward passes.
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let body = embed(server, model, &texts).await;
    let got = vectors(&body);
    assert_eq!(got.len(), refs.len());
    for (v, r) in got.iter().zip(&refs) {
        let cos = cosine(v, &r.embedding);
        assert!(
            cos >= 0.9999,
            "{model} (batched): cosine {cos} for {:?}",
            r.text
        );
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not a unit vector: {norm}");
    }
    let total: u64 = refs.iter().map(|r| r.tokens).sum();
    assert_eq!(body["usage"]["tokens"], total);
}

#[tokio::test(flavor = "multi_thread")]
async fn matches_sentence_transformers_for_both_models() {
    let server = Server::start_two_models(&[]).await;
    check_model(&server, MODEL).await;
    check_model(&server, SECOND_MODEL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acceptance_curl_example_gives_unit_vectors_equal_to_reference() {
    let server = Server::start(&[]).await;
    // What the README's curl sends: no content type header, raw JSON body.
    let response = reqwest::Client::new()
        .post(server.url("/api/v1/embed"))
        .body(r#"{"texts":["Hello world","Test embedding"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let got = vectors(&body);
    let refs = references(MODEL);
    for (v, text) in got.iter().zip(["Hello world", "Test embedding"]) {
        assert_eq!(v.len(), 384);
        let r = refs.iter().find(|r| r.text == text).unwrap();
        assert!(cosine(v, &r.embedding) >= 0.9999);
    }
}

/// A pass whose rows are shared out to the threads (a lane each, cut through the middle of a
/// text) gives the same vectors, bit for bit, as the same pass with every product split across
/// the threads, and as each text on its own; in f32 and int8.
#[test]
fn rows_shared_out_to_threads_give_the_same_vectors() {
    use embedder::{Quantization, SentenceModel};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for quantization in [Quantization::None, Quantization::Int8] {
        let model = SentenceModel::load(MODEL, &common::model_dir(), quantization).unwrap();
        // Enough rows for a lane per thread.
        let texts: Vec<String> = (0..12)
            .map(|i| format!("ticket {i}: the canary's p95 latency rose after rollout {i}"))
            .collect();
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
        let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let (split, lanes) = pool.install(|| {
            let lanes = model.begin(&batch).unwrap().lanes();
            (model.embed(&batch).unwrap(), lanes)
        });
        assert_eq!(
            lanes, 2,
            "{quantization:?}: the pass was not shared out by rows"
        );
        let (whole, lanes) = pool.install(|| {
            embedroll_int8::on_one_thread(|| {
                let lanes = model.begin(&batch).unwrap().lanes();
                (model.embed(&batch).unwrap(), lanes)
            })
        });
        assert_eq!(lanes, 1);
        assert_eq!(split, whole, "{quantization:?}: split pass differs");
        for (i, seq) in batch.iter().enumerate() {
            let alone = pool.install(|| model.embed(&[seq]).unwrap());
            let cos = cosine(&alone[0], &split[i]);
            assert!(
                cos >= 0.99999,
                "{quantization:?} text {i}: cosine {cos} alone"
            );
        }
    }
}
