//! Property test: whatever bytes arrive, the server answers with JSON and never a 5xx, and
//! keeps serving afterwards.

mod common;

use common::{Server, series_value};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

const ROUTES: [&str; 5] = [
    "/api/v1/embed",
    "/v1/embeddings",
    "/embed",
    "/",
    "/tokenize",
];
const KEYS: [&str; 13] = [
    "texts",
    "input",
    "inputs",
    "model",
    "normalize",
    "encoding_format",
    "dimensions",
    "user",
    "truncate",
    "truncation_direction",
    "prompt_name",
    "add_special_tokens",
    "query",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("all-MiniLM-L6-v2")),
        Just(Value::from("base64")),
        Just(Value::from("left")),
        (0u32..40_000).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                |pairs| {
                    Value::Object(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<_, _>>(),
                    )
                }
            ),
        ]
    })
}

/// Requests that are valid in shape but carry arbitrary Unicode, lengths and options.
fn near_valid() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(any::<String>(), 0..6),
        prop::option::of(prop_oneof![Just("all-MiniLM-L6-v2".to_string()), ".{0,12}"]),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(texts, model, normalize, openai)| {
            // The same texts under each route's field name; the runner picks the route.
            let mut body = if openai {
                json!({"input": texts, "inputs": texts})
            } else {
                json!({"texts": texts})
            };
            if let Some(model) = model {
                body["model"] = json!(model);
            }
            if let (Some(normalize), false) = (normalize, openai) {
                body["normalize"] = json!(normalize);
            }
            body
        })
}

fn body() -> impl Strategy<Value = (usize, Vec<u8>)> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        near_valid().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    (0..ROUTES.len(), bytes)
}

#[test]
fn random_bodies_never_crash_the_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(Server::start(&[]));
    let client = reqwest::Client::new();
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let successes = std::cell::Cell::new(0);
    let result = runner.run(&body(), |(route, bytes)| {
        let url = server.url(ROUTES[route]);
        let (status, text) = runtime.block_on(async {
            let response = client
                .post(url)
                .body(bytes.clone())
                .send()
                .await
                .expect("server unreachable");
            (response.status().as_u16(), response.text().await.unwrap())
        });
        let parsed: Value = serde_json::from_str(&text)
            .map_err(|_| TestCaseError::fail(format!("non-JSON answer {status}: {text}")))?;
        prop_assert!(
            status < 500,
            "{} answered {status} {text} to {:?}",
            ROUTES[route],
            String::from_utf8_lossy(&bytes)
        );
        if status == 200 {
            successes.set(successes.get() + 1);
        }
        if status >= 400 {
            // TEI's routes answer in TEI's shape, the others in OpenAI's.
            let tei = ["/embed", "/", "/tokenize"].contains(&ROUTES[route]);
            let code = if tei {
                &parsed["error_type"]
            } else {
                &parsed["error"]["code"]
            };
            prop_assert!(code.is_string(), "error without code: {text}");
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    // The generators must reach the model, not only the JSON parser.
    assert!(
        successes.get() >= 20,
        "only {} bodies were embedded",
        successes.get()
    );

    runtime.block_on(async {
        let ready = reqwest::get(server.url("/health/ready")).await.unwrap();
        assert_eq!(ready.status(), 200, "server unhealthy after fuzzing");
        let metrics = server.metrics().await;
        assert!(series_value(&metrics, "embedder_inflight_requests") == Some(0.0));
        assert!(
            !metrics.contains(r#"code="500""#),
            "5xx answers recorded:\n{metrics}"
        );
    });
}
