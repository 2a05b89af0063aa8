//! The real server on a loopback port: both embed routes, dynamic batching under concurrency,
//! overload, client errors, readiness, metrics, faults, multiple models and graceful shutdown.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{MODEL, SECOND_MODEL, Server, cosine, post, series_value};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

async fn post_raw(
    server: &Server,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let response = Client::new()
        .post(server.url(path))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, json)
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(body["embeddings"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn native_and_openai_routes_agree() {
    let server = Server::start(&[]).await;
    let texts = ["first text", "a second, longer text about embeddings"];
    let (status, native) = post(&server, "/api/v1/embed", json!({"texts": texts})).await;
    assert_eq!(status, 200);
    assert_eq!(native["model"], MODEL);
    assert_eq!(native["dimensions"], 384);
    assert!(native["usage"]["tokens"].as_u64().unwrap() > 4);
    let native = vectors(&native);

    let (status, openai) = post(
        &server,
        "/v1/embeddings",
        json!({"input": texts, "model": MODEL}),
    )
    .await;
    assert_eq!(status, 200, "{openai}");
    assert_eq!(openai["object"], "list");
    assert_eq!(openai["model"], MODEL);
    assert!(openai["usage"]["prompt_tokens"].as_u64().unwrap() > 4);
    assert_eq!(
        openai["usage"]["prompt_tokens"],
        openai["usage"]["total_tokens"]
    );
    let data = openai["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let v: Vec<f32> = serde_json::from_value(item["embedding"].clone()).unwrap();
        assert!(cosine(&v, &native[i]) > 0.99999);
    }

    // A single string input, base64-encoded little-endian f32s.
    let (status, b64) = post(
        &server,
        "/v1/embeddings",
        json!({"input": texts[0], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, 200, "{b64}");
    let encoded = b64["data"][0]["embedding"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded.len(), 384);
    assert!(cosine(&decoded, &native[0]) > 0.99999);

    // normalize: false returns the raw mean-pooled vector, same direction, not unit length.
    let (_, raw) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": [texts[0]], "normalize": false}),
    )
    .await;
    let raw = &vectors(&raw)[0];
    let norm: f32 = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 0.01,
        "raw vector unexpectedly unit length"
    );
    assert!(cosine(raw, &native[0]) > 0.99999);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_get_their_own_results_in_order() {
    let server = Server::start(&[]).await;
    // Each client sends a different number of distinct texts of varied lengths.
    let requests: Vec<Vec<String>> = (0..48)
        .map(|client| {
            (0..1 + client % 5)
                .map(|i| {
                    format!(
                        "client {client} text {i} {}",
                        "word ".repeat((client * 7 + i * 13) % 60)
                    )
                })
                .collect()
        })
        .collect();

    // Expected vectors, one text per request, one request at a time.
    let mut expected = Vec::new();
    for texts in &requests {
        let mut per_request = Vec::new();
        for text in texts {
            let (status, body) = post(&server, "/api/v1/embed", json!({"texts": [text]})).await;
            assert_eq!(status, 200);
            per_request.push(vectors(&body).remove(0));
        }
        expected.push(per_request);
    }
    let before = server.metrics().await;
    let passes_before = series_value(
        &before,
        &format!("embedder_batch_size_count{{model=\"{MODEL}\"}}"),
    )
    .unwrap();

    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|texts| {
            let url = server.url("/api/v1/embed");
            tokio::spawn(async move {
                let response = Client::new()
                    .post(url)
                    .json(&json!({"texts": texts}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let body: Value = response.json().await.unwrap();
                vectors(&body)
            })
        })
        .collect();
    let mut texts_total = 0.0;
    for (handle, want) in handles.into_iter().zip(&expected) {
        let got = handle.await.unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                cosine(g, w) > 0.9999,
                "a client got someone else's or a misordered vector"
            );
        }
        texts_total += want.len() as f64;
    }

    // Dynamic batching really merged texts from different requests: fewer forward passes than
    // texts.
    let after = server.metrics().await;
    let passes = series_value(
        &after,
        &format!("embedder_batch_size_count{{model=\"{MODEL}\"}}"),
    )
    .unwrap()
        - passes_before;
    assert!(
        passes < texts_total,
        "{passes} passes for {texts_total} texts: no batching happened"
    );
}

/// `--fault-vector-noise`: answers stay 200 and unit-length, but the vectors are not the
/// model's (what only a vector-compatibility check can see).
#[tokio::test(flavor = "multi_thread")]
async fn vector_noise_fault_gives_fast_200s_with_wrong_vectors() {
    let texts = json!({"texts": ["the cat sat on the mat", "kubernetes rollouts"]});
    let clean = Server::start(&[]).await;
    let (code, good) = post(&clean, "/api/v1/embed", texts.clone()).await;
    assert_eq!(code, StatusCode::OK);
    let noisy = Server::start(&["--fault-vector-noise", "0.05"]).await;
    let (code, bad) = post(&noisy, "/api/v1/embed", texts).await;
    assert_eq!(code, StatusCode::OK, "{bad}");
    let vector = |v: &Value, i: usize| -> Vec<f64> {
        v["embeddings"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for i in 0..2 {
        let (a, b) = (vector(&good, i), vector(&bad, i));
        let norm: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "still normalised: {norm}");
        let cosine: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(cosine < 0.999, "text {i}: cosine {cosine} with noise");
        assert!(
            cosine > 0.5,
            "text {i}: cosine {cosine}: noise, not another model"
        );
    }
    let info = noisy.info().await;
    let noise = info["fault_injection"]["vector_noise"].as_f64().unwrap();
    assert!((noise - 0.05).abs() < 1e-6, "/info says {noise}");
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_answers_429_with_retry_after() {
    let server = Server::start(&[
        "--max-concurrent-requests",
        "2",
        "--fault-latency-ms",
        "700",
    ])
    .await;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let url = server.url("/api/v1/embed");
            tokio::spawn(async move {
                let response = Client::new()
                    .post(url)
                    .json(&json!({"texts": ["hi"]}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: Value = response.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut rejected = 0;
    for handle in handles {
        let (status, retry_after, body) = handle.await.unwrap();
        match status.as_u16() {
            200 => ok += 1,
            429 => {
                rejected += 1;
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "overloaded");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(ok, 2, "exactly the admitted requests succeed");
    assert_eq!(rejected, 6);
    let metrics = server.metrics().await;
    let series = r#"embedder_requests_total{model="",route="/api/v1/embed",code="429"}"#;
    assert_eq!(series_value(&metrics, series), Some(6.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_json_with_a_reason() {
    let server = Server::start(&["--max-client-batch", "4", "--max-body-bytes", "4096"]).await;
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/api/v1/embed", json!({"texts": []}), 400, "empty_input"),
        (
            "/api/v1/embed",
            json!({"texts": ["ok", ""]}),
            400,
            "empty_input",
        ),
        (
            "/api/v1/embed",
            json!({"texts": "not a list"}),
            422,
            "invalid_request",
        ),
        (
            "/api/v1/embed",
            json!({"texts": [1, 2]}),
            422,
            "invalid_request",
        ),
        (
            "/api/v1/embed",
            json!({"text": ["typo in field name"]}),
            422,
            "invalid_request",
        ),
        (
            "/api/v1/embed",
            json!({"texts": ["x"], "normalize": "yes"}),
            422,
            "invalid_request",
        ),
        ("/api/v1/embed", json!([1, 2, 3]), 422, "invalid_request"),
        (
            "/api/v1/embed",
            json!({"texts": ["a", "b", "c", "d", "e"]}),
            413,
            "too_many_inputs",
        ),
        (
            "/api/v1/embed",
            json!({"texts": ["x"], "model": "no-such-model"}),
            404,
            "model_not_found",
        ),
        ("/v1/embeddings", json!({"input": []}), 400, "empty_input"),
        (
            "/v1/embeddings",
            json!({"input": [[101, 99_999_999, 102]]}),
            422,
            "invalid_tokens",
        ),
        (
            "/v1/embeddings",
            json!({"input": [101, -1]}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"input": ["text", [101, 102]]}),
            422,
            "invalid_request",
        ),
        ("/v1/embeddings", json!({"input": [[]]}), 400, "empty_input"),
        (
            "/v1/embeddings",
            json!({"input": {"a": 1}}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "encoding_format": "int8"}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "dimensions": 385}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "dimensions": 0}),
            422,
            "invalid_request",
        ),
        (
            "/api/v1/embed",
            json!({"texts": ["x"], "prompt_name": "query"}),
            422,
            "invalid_request",
        ),
        (
            "/api/v1/embed",
            json!({"texts": ["x"], "truncation_direction": "middle"}),
            422,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "model": "text-embedding-3-small"}),
            404,
            "model_not_found",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, error) = post(&server, path, body.clone()).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {error}");
        assert_eq!(error["error"]["code"], code, "{path} {body}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }

    let (status, error) = post_raw(&server, "/api/v1/embed", "{not json").await;
    assert_eq!(
        (status.as_u16(), error["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, error) = post_raw(&server, "/api/v1/embed", vec![0xffu8, 0xfe, 0x00]).await;
    assert_eq!(status, 400, "{error}");
    let big = format!(r#"{{"texts":["{}"]}}"#, "x".repeat(8192));
    let (status, error) = post_raw(&server, "/api/v1/embed", big).await;
    assert_eq!(
        (status.as_u16(), error["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    let (status, body) = server.get("/api/v1/embed").await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let (status, body) = server.get("/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // Nothing above hurt the server.
    let (status, _) = post(&server, "/api/v1/embed", json!({"texts": ["still fine"]})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_after_the_default_model_is_warm() {
    let server = Server::spawn(&["--fault-startup-delay-ms", "1500"]);
    let client = Client::new();
    // Liveness answers as soon as the port is open; readiness does not.
    let mut live = None;
    for _ in 0..200 {
        if let Ok(response) = client.get(server.url("/health/live")).send().await {
            live = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live, Some(StatusCode::OK));
    let (status, body) = server.get("/health/ready").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "loading");
    let info: Value = server.get_json("/info").await;
    assert_eq!(info["models"][0]["loaded"], false);

    server.wait_ready(Duration::from_secs(60)).await;
    let info: Value = server.get_json("/info").await;
    assert_eq!(info["default_model"], MODEL);
    assert_eq!(info["models"][0]["loaded"], true);
    assert_eq!(info["models"][0]["dimensions"], 384);
    assert_eq!(info["models"][0]["max_seq_length"], 256);
    assert_eq!(info["models"][0]["pooling"], "mean");
    assert!(info["version"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_tokens_and_latency() {
    let server = Server::start(&[]).await;
    for _ in 0..3 {
        let (status, _) = post(
            &server,
            "/api/v1/embed",
            json!({"texts": ["count me", "and me"]}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = post(&server, "/v1/embeddings", json!({"input": "openai"})).await;
    assert_eq!(status, 200);
    let (status, _) = post(&server, "/api/v1/embed", json!({"texts": []})).await;
    assert_eq!(status, 400);

    let response = Client::new()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics")
    );
    let text = response.text().await.unwrap();
    let value = |series: &str| {
        series_value(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(
        value(&format!(
            r#"embedder_requests_total{{model="{MODEL}",route="/api/v1/embed",code="200"}}"#
        )),
        3.0
    );
    assert_eq!(
        value(&format!(
            r#"embedder_requests_total{{model="{MODEL}",route="/v1/embeddings",code="200"}}"#
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"embedder_requests_total{{model="{MODEL}",route="/api/v1/embed",code="400"}}"#
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"embedder_request_duration_seconds_count{{model="{MODEL}",route="/api/v1/embed"}}"#
        )),
        3.0
    );
    // Buckets fine enough to tell 20 ms from 35 ms.
    for le in ["0.02", "0.025", "0.03", "0.035"] {
        value(&format!(
            r#"embedder_request_duration_seconds_bucket{{le="{le}",model="{MODEL}",route="/api/v1/embed"}}"#
        ));
    }
    assert!(value(&format!(r#"embedder_tokens_total{{model="{MODEL}"}}"#)) > 10.0);
    assert_eq!(
        value(&format!(r#"embedder_model_loaded{{model="{MODEL}"}}"#)),
        1.0
    );
    assert_eq!(
        value(&format!(r#"embedder_queue_depth{{model="{MODEL}"}}"#)),
        0.0
    );
    assert_eq!(value("embedder_inflight_requests"), 0.0);
    assert!(value(&format!(r#"embedder_batch_size_count{{model="{MODEL}"}}"#)) >= 4.0);
}

/// A rollout's vector check embeds its golden set on the canary pod itself, marked with
/// `x-embedroll-check`. Those requests must not be the canary's traffic: the analysis reads its
/// P95, error rate, request count and tokens per request from these series, and a check landing
/// in a step's first seconds outweighed the few user requests there (CI, 2026-11-28: a canary
/// rolled back on p95 235 ms, 2 s after its check).
#[tokio::test(flavor = "multi_thread")]
async fn check_requests_are_counted_apart_from_traffic() {
    let server = Server::start(&[]).await;
    let (status, _) = post(&server, "/api/v1/embed", json!({"texts": ["user traffic"]})).await;
    assert_eq!(status, 200);
    let http = Client::new();
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"input": ["golden one", "golden two"]}),
        ),
        ("/api/v1/embed", json!({"texts": ["golden three"]})),
        ("/embed", json!({"inputs": "golden four"})),
    ] {
        let response = http
            .post(server.url(path))
            .header("x-embedroll-check", "vectors")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let text = server.metrics().await;
    let value = |series: &str| series_value(&text, series);
    let traffic = value(&format!(
        r#"embedder_requests_total{{model="{MODEL}",route="/api/v1/embed",code="200"}}"#
    ));
    assert_eq!(traffic, Some(1.0), "{text}");
    for route in ["/v1/embeddings", "/embed"] {
        assert_eq!(
            value(&format!(
                r#"embedder_requests_total{{model="{MODEL}",route="{route}",code="200"}}"#
            )),
            None,
            "{text}"
        );
        assert_eq!(
            value(&format!(
                r#"embedder_check_requests_total{{model="{MODEL}",route="{route}",code="200"}}"#
            )),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(
        value(&format!(
            r#"embedder_request_duration_seconds_count{{model="{MODEL}",route="/api/v1/embed"}}"#
        )),
        Some(1.0),
        "{text}"
    );
    // "user traffic" is [CLS] user traffic [SEP]: the golden texts' tokens are not counted.
    assert_eq!(
        value(&format!(r#"embedder_tokens_total{{model="{MODEL}"}}"#)),
        Some(4.0),
        "{text}"
    );
}

/// A check turned away before its handler runs (here its body is over `--max-body-bytes`) is
/// still a check: a canary refusing the operator's golden set for its size is not failing its
/// users, and must not show in the error rate the rollout gate reads.
#[tokio::test(flavor = "multi_thread")]
async fn check_requests_refused_before_the_handler_are_counted_apart() {
    let server = Server::start(&["--max-body-bytes", "256"]).await;
    let big = json!({"texts": ["golden text ".repeat(64)]});
    let http = Client::new();
    for check in [true, false] {
        let mut request = http.post(server.url("/api/v1/embed")).json(&big);
        if check {
            request = request.header("x-embedroll-check", "vectors");
        }
        assert_eq!(request.send().await.unwrap().status(), 413);
    }
    let text = server.metrics().await;
    let value = |series: &str| series_value(&text, series);
    assert_eq!(
        value(r#"embedder_requests_total{model="",route="/api/v1/embed",code="413"}"#),
        Some(1.0),
        "only the request without the mark is traffic: {text}"
    );
    assert_eq!(
        value(r#"embedder_check_requests_total{model="",route="/api/v1/embed",code="413"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_faults_fail_and_slow_requests() {
    let server = Server::start(&["--fault-error-rate", "1", "--fault-latency-ms", "300"]).await;
    let started = std::time::Instant::now();
    let (status, body) = post(&server, "/api/v1/embed", json!({"texts": ["x"]})).await;
    assert_eq!(status, 500);
    assert_eq!(body["error"]["code"], "fault_injected");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let metrics = server.metrics().await;
    let series =
        format!(r#"embedder_requests_total{{model="{MODEL}",route="/api/v1/embed",code="500"}}"#);
    assert_eq!(series_value(&metrics, &series), Some(1.0));
    // TEI answers a server failure with 424, as TEI does; it is counted as the 500 it stands
    // for, with its latency, so the rollout gate's error rate (5xx) and P95 see it.
    let (status, body) = post(&server, "/embed", json!({"inputs": "x"})).await;
    assert_eq!(status, 424, "{body}");
    assert_eq!(body["error_type"], "Backend");
    let metrics = server.metrics().await;
    for series in [
        format!(r#"embedder_requests_total{{model="{MODEL}",route="/embed",code="500"}}"#),
        format!(r#"embedder_request_duration_seconds_count{{model="{MODEL}",route="/embed"}}"#),
    ] {
        assert_eq!(series_value(&metrics, &series), Some(1.0), "{series}");
    }
    // Health is never faulted.
    let response = Client::new()
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_loaded_for_clients_that_left_stay_within_max_models() {
    // Three more names for the second model's weights; at most 2 models in memory.
    let dir = common::model_dir_of(SECOND_MODEL);
    let names = ["sre-a", "sre-b", "sre-c"];
    let specs: Vec<String> = names
        .iter()
        .map(|name| format!("{name}={}", dir.display()))
        .collect();
    let mut args = vec!["--max-models", "2"];
    for spec in &specs {
        args.extend(["--model", spec.as_str()]);
    }
    let server = Server::start(&args).await;
    // Each asks for another model at once and leaves before it is loaded.
    let url = server.url("/api/v1/embed");
    let asked: Vec<_> = names
        .iter()
        .map(|name| {
            let request = Client::new()
                .post(&url)
                .timeout(Duration::from_millis(20))
                .json(&json!({"texts": ["x"], "model": name}));
            tokio::spawn(async move { request.send().await.map(|r| r.status()) })
        })
        .collect();
    for request in asked {
        assert!(
            request.await.unwrap().is_err(),
            "left before the load ended"
        );
    }
    // The loads go on without them; then at most 2 models are in memory.
    let loaded = |metrics: &str| -> Vec<String> {
        std::iter::once(MODEL)
            .chain(names)
            .filter(|model| {
                series_value(
                    metrics,
                    &format!(r#"embedder_model_loaded{{model="{model}"}}"#),
                ) == Some(1.0)
            })
            .map(str::to_owned)
            .collect()
    };
    // Watched for a while (the three loads take about a second): never more than 2, and in
    // the end the default and one of the three.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let mut last = Vec::new();
    while std::time::Instant::now() < until {
        last = loaded(&server.metrics().await);
        assert!(
            last.len() <= 2,
            "more models in memory than --max-models 2: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.len(), 2, "the loads ran: {last:?}");
    let metrics = server.metrics().await;
    assert!(
        loaded(&metrics).contains(&MODEL.to_owned()),
        "the default stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_several_models_with_lru_eviction() {
    // The second model's weights under a second name too, so eviction can be watched with
    // --max-models 2: the default is pinned, the other slot goes to the most recent one.
    let alias = format!("sre-alias={}", common::model_dir_of(SECOND_MODEL).display());
    let server = Server::start_two_models(&["--model", &alias, "--max-models", "2"]).await;
    let embed = |model: &'static str| {
        let server = &server;
        async move {
            let (status, body) = post(
                server,
                "/api/v1/embed",
                json!({"texts": ["disk full on the db node"], "model": model}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["model"], model);
            vectors(&body).remove(0)
        }
    };
    let loaded = |metrics: &str, model: &str| {
        series_value(
            metrics,
            &format!(r#"embedder_model_loaded{{model="{model}"}}"#),
        )
    };

    let default = embed(MODEL).await;
    let second = embed(SECOND_MODEL).await;
    assert!(
        cosine(&default, &second) < 0.999,
        "different models must give different vectors"
    );
    let metrics = server.metrics().await;
    assert_eq!(loaded(&metrics, SECOND_MODEL), Some(1.0));

    let alias_vector = embed("sre-alias").await;
    assert!(
        cosine(&alias_vector, &second) > 0.99999,
        "same weights, same vectors"
    );
    let metrics = server.metrics().await;
    assert_eq!(
        loaded(&metrics, MODEL),
        Some(1.0),
        "the default model is never evicted"
    );
    assert_eq!(loaded(&metrics, "sre-alias"), Some(1.0));
    assert_eq!(
        loaded(&metrics, SECOND_MODEL),
        Some(0.0),
        "least recently used model evicted"
    );

    let info: Value = server.get_json("/info").await;
    let state: Vec<(String, bool)> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["loaded"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        state,
        vec![
            (MODEL.into(), true),
            ("sre-alias".into(), true),
            (SECOND_MODEL.into(), false)
        ]
    );
    // An evicted model comes back on demand.
    let again = embed(SECOND_MODEL).await;
    assert!(cosine(&again, &second) > 0.99999);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_turns_unready_finishes_in_flight_then_exits() {
    let mut server =
        Server::start(&["--fault-latency-ms", "1500", "--drain-delay-ms", "500"]).await;
    let url = server.url("/api/v1/embed");
    let in_flight = tokio::spawn(async move {
        Client::new()
            .post(url)
            .json(&json!({"texts": ["finish me"]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.terminate();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body) = server.get("/health/ready").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "draining");

    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request must complete"
    );
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_requests_count_as_499_with_their_duration() {
    let server = Server::start(&["--fault-latency-ms", "1500"]).await;
    let client = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let result = client
        .post(server.url("/api/v1/embed"))
        .json(&json!({"texts": ["slow"]}))
        .send()
        .await;
    assert!(result.is_err(), "the client should have timed out");
    let series =
        format!(r#"embedder_requests_total{{model="{MODEL}",route="/api/v1/embed",code="499"}}"#);
    let mut seen = None;
    for _ in 0..50 {
        seen = series_value(&server.metrics().await, &series);
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some(1.0));
    let metrics = server.metrics().await;
    let duration = format!(
        r#"embedder_request_duration_seconds_count{{model="{MODEL}",route="/api/v1/embed"}}"#
    );
    assert_eq!(
        series_value(&metrics, &duration),
        Some(1.0),
        "abandoned requests keep their latency"
    );
    assert_eq!(
        series_value(&metrics, "embedder_inflight_requests"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_model_answers_503_without_leaking_paths_and_spares_the_rest() {
    let broken =
        std::env::temp_dir().join(format!("embedroll-broken-model-{}", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{ not json").unwrap();
    let spec = format!("broken={}", broken.display());
    let server = Server::start_two_models(&["--model", &spec, "--max-models", "2"]).await;
    // A healthy second model in the one slot besides the default.
    let (status, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": ["x"], "model": SECOND_MODEL}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..2 {
        let (status, body) = post(
            &server,
            "/api/v1/embed",
            json!({"texts": ["x"], "model": "broken"}),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "model_unavailable");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains(&*broken.to_string_lossy()),
            "server path leaked: {message}"
        );
    }
    let (status, _) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": ["the default still works"]}),
    )
    .await;
    assert_eq!(status, 200);
    let metrics = server.metrics().await;
    assert_eq!(
        series_value(
            &metrics,
            &format!(r#"embedder_model_loaded{{model="{SECOND_MODEL}"}}"#)
        ),
        Some(1.0),
        "the broken model evicted a healthy one to make room"
    );
    std::fs::remove_dir_all(&broken).unwrap();
}

/// `NAME=DIR:int8` serves that model quantized beside an f32 one: /info and /metrics say
/// which is which, and the int8 vectors stay close to the f32 ones.
#[tokio::test(flavor = "multi_thread")]
async fn int8_model_served_beside_f32_and_reported() {
    let quantized = format!("{MODEL}-int8={}:int8", common::model_dir().display());
    let server =
        Server::start(&["--model", &quantized, "--preload", &format!("{MODEL}-int8")]).await;
    let text = "rollback the canary when p95 latency breaches the slo";
    let embed = |model: String| {
        let server = &server;
        async move {
            let (status, body) = post(
                server,
                "/api/v1/embed",
                json!({"texts": [text], "model": model}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            vectors(&body).remove(0)
        }
    };
    let f32_vector = embed(MODEL.to_string()).await;
    let int8_vector = embed(format!("{MODEL}-int8")).await;
    let cos = cosine(&f32_vector, &int8_vector);
    assert!((0.98..0.99999).contains(&cos), "int8 vs f32 cosine {cos}");

    let info = server.info().await;
    let model = |name: &str| {
        info["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap()
    };
    let (plain, int8) = (model(MODEL), model(&format!("{MODEL}-int8")));
    assert_eq!(plain["quantization"], "none");
    assert_eq!(int8["quantization"], "int8");
    let kernel = int8["int8_kernel"].as_str().unwrap().to_string();
    assert!(
        embedroll_int8::Isa::from_name(&kernel).is_some(),
        "{kernel}"
    );
    let (f32_bytes, int8_bytes) = (
        plain["weight_bytes"].as_f64().unwrap(),
        int8["weight_bytes"].as_f64().unwrap(),
    );
    assert!(int8_bytes < 0.4 * f32_bytes, "{int8_bytes} vs {f32_bytes}");

    let metrics = server.metrics().await;
    let series = |s: String| series_value(&metrics, &s);
    assert_eq!(
        series(format!(
            r#"embedder_model_info{{model="{MODEL}-int8",quantization="int8",kernel="{kernel}"}}"#
        )),
        Some(1.0)
    );
    assert_eq!(
        series(format!(
            r#"embedder_model_info{{model="{MODEL}",quantization="none",kernel=""}}"#
        )),
        Some(1.0)
    );
    assert_eq!(
        series(format!(
            r#"embedder_model_weights_bytes{{model="{MODEL}-int8"}}"#
        )),
        Some(int8_bytes)
    );
    assert_eq!(
        series(format!(r#"embedder_model_loaded{{model="{MODEL}-int8"}}"#)),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_quantization_or_kernel_is_refused_at_start() {
    for args in [&["--quantize", "int4"][..], &["--int8-kernel", "sse9"][..]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_embedder"))
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("int8") || stderr.contains("int4"),
            "{args:?}: {stderr}"
        );
    }
}
