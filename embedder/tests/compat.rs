//! The APIs existing clients speak, against the real server: OpenAI's `/v1/embeddings` in full
//! (dimensions, token ids, compact floats, a served-model-name alias), TEI's `/embed`,
//! `/tokenize`, errors and timing headers, prompts from `config_sentence_transformers.json`
//! (parity with sentence-transformers) and the truncation policy.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::{MODEL, Server, cosine, fixture, model_dir, post, post_full};

use reqwest::Client;
use serde_json::{Value, json};

fn floats(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

async fn native_vector(server: &Server, text: &str) -> Vec<f32> {
    let (status, body) = post(server, "/api/v1/embed", json!({"texts": [text]})).await;
    assert_eq!(status, 200, "{body}");
    floats(&body["embeddings"][0])
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_route_takes_dimensions_token_ids_and_an_alias_and_writes_compact_floats() {
    let server = Server::start(&["--served-model-name", "text-embedding-3-small"]).await;
    let text = "Rolling back a canary takes seconds.";
    let full = native_vector(&server, text).await;

    // dimensions: the first components, re-normalised, on the OpenAI and TEI routes alike.
    let (status, body) = post(
        &server,
        "/v1/embeddings",
        json!({"input": text, "dimensions": 128}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let short = floats(&body["data"][0]["embedding"]);
    assert_eq!(short.len(), 128);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    assert!(cosine(&short, &full[..128]) > 0.99999);
    let (status, body) = post(
        &server,
        "/embed",
        json!({"inputs": text, "dimensions": 128}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(cosine(&floats(&body[0]), &short) > 0.99999);
    // Not normalised when asked not to: the raw first components.
    let (_, raw) = post(
        &server,
        "/embed",
        json!({"inputs": text, "dimensions": 64, "normalize": false}),
    )
    .await;
    let (_, raw_full) = post(
        &server,
        "/embed",
        json!({"inputs": text, "normalize": false}),
    )
    .await;
    let raw_full = floats(&raw_full[0]);
    assert_eq!(floats(&raw[0]), raw_full[..64].to_vec());
    // base64 carries the same 128 little-endian f32s.
    let (_, body) = post(
        &server,
        "/v1/embeddings",
        json!({"input": [text], "dimensions": 128, "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, short);

    // Token ids, the model's own as /tokenize gives them: [int] and [[int]].
    let (status, tokens) = post(&server, "/tokenize", json!({"inputs": text})).await;
    assert_eq!(status, 200, "{tokens}");
    let ids: Vec<u32> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    for input in [json!(ids), json!([ids, ids])] {
        let (status, body) = post(&server, "/v1/embeddings", json!({"input": input})).await;
        assert_eq!(status, 200, "{body}");
        for item in body["data"].as_array().unwrap() {
            assert!(cosine(&floats(&item["embedding"]), &full) > 0.99999);
        }
        assert_eq!(
            body["usage"]["prompt_tokens"],
            ids.len() * body["data"].as_array().unwrap().len()
        );
    }

    // The alias answers as the default model and is named back as the client named it.
    let (status, body) = post(
        &server,
        "/v1/embeddings",
        json!({"input": text, "model": "text-embedding-3-small"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert!(cosine(&floats(&body["data"][0]["embedding"]), &full) > 0.99999);
    let info = server.get_json("/info").await;
    assert_eq!(
        info["served_model_names"],
        json!(["text-embedding-3-small"])
    );

    // Compact floats: f32's shortest digits, not f64's widening (0.10000000149011612).
    let raw = Client::new()
        .post(server.url("/v1/embeddings"))
        .json(&json!({"input": text}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = raw.find("\"embedding\":[").unwrap() + "\"embedding\":[".len();
    let numbers = &raw[start..start + raw[start..].find(']').unwrap()];
    for number in numbers.split(',') {
        let parsed: f32 = number.parse().unwrap();
        assert_eq!(
            number,
            serde_json::to_string(&parsed).unwrap(),
            "not f32's shortest form"
        );
        assert!(number.len() <= 15, "{number} is longer than an f32 needs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tei_routes_answer_as_tei_does() {
    let server = Server::start(&[]).await;
    let texts = [
        "What is a canary release?",
        "Blue-green deployments swap colors.",
    ];
    let expected = [
        native_vector(&server, texts[0]).await,
        native_vector(&server, texts[1]).await,
    ];

    // A bare [[f32]], for a string or a list, at /embed and at / (huggingface_hub's URL).
    for path in ["/embed", "/"] {
        let (status, headers, body) = post_full(&server, path, json!({"inputs": texts})).await;
        assert_eq!(status, 200, "{path}: {body}");
        let vectors: Vec<Vec<f32>> = serde_json::from_value(body).unwrap();
        assert_eq!(vectors.len(), 2);
        for (got, want) in vectors.iter().zip(&expected) {
            assert!(cosine(got, want) > 0.99999);
        }
        assert_eq!(headers["x-compute-type"], "cpu");
        let tokens: usize = headers["x-compute-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(tokens > 10);
        let characters: usize = headers["x-compute-characters"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            characters,
            texts.iter().map(|t| t.chars().count()).sum::<usize>()
        );
    }
    let (_, body) = post(&server, "/embed", json!({"inputs": texts[0]})).await;
    assert_eq!(
        body.as_array().unwrap().len(),
        1,
        "one string is still a nested list"
    );

    // TEI's timing headers, as whole milliseconds, on every embed route.
    for (path, body) in [
        ("/embed", json!({"inputs": "x"})),
        ("/v1/embeddings", json!({"input": "x"})),
        ("/api/v1/embed", json!({"texts": ["x"]})),
    ] {
        let (status, headers, _) = post_full(&server, path, body).await;
        assert_eq!(status, 200);
        for header in [
            "x-compute-time",
            "x-total-time",
            "x-tokenization-time",
            "x-queue-time",
            "x-inference-time",
            "x-compute-tokens",
        ] {
            let value = headers
                .get(header)
                .unwrap_or_else(|| panic!("{path} lacks {header}"));
            value.to_str().unwrap().parse::<u64>().unwrap();
        }
    }

    // /tokenize: nested lists of {id, text, special, start, stop}, byte offsets, no truncation.
    let text = "Café rollouts";
    let (status, body) = post(&server, "/tokenize", json!({"inputs": [text, "a"]})).await;
    assert_eq!(status, 200, "{body}");
    let tokens = body[0].as_array().unwrap();
    assert_eq!(tokens.first().unwrap()["text"], "[CLS]");
    assert_eq!(tokens.first().unwrap()["special"], true);
    assert_eq!(tokens.first().unwrap()["start"], Value::Null);
    assert_eq!(tokens.last().unwrap()["text"], "[SEP]");
    for token in &tokens[1..tokens.len() - 1] {
        let (start, stop) = (
            token["start"].as_u64().unwrap() as usize,
            token["stop"].as_u64().unwrap() as usize,
        );
        assert_eq!(token["text"], text[start..stop], "{token}");
        assert_eq!(token["special"], false);
    }
    assert_eq!(body[1].as_array().unwrap().len(), 3);
    let (_, body) = post(
        &server,
        "/tokenize",
        json!({"inputs": text, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(body[0].as_array().unwrap().len(), tokens.len() - 2);
    let long = "word ".repeat(600);
    let (_, body) = post(&server, "/tokenize", json!({"inputs": long})).await;
    assert_eq!(
        body[0].as_array().unwrap().len(),
        602,
        "tokenize does not truncate"
    );

    // TEI's errors: {"error", "error_type"} with TEI's status codes.
    let cases = [
        (json!({"inputs": []}), 400, "Empty"),
        (json!({"inputs": ""}), 400, "Empty"),
        (
            json!({"inputs": "x", "dimensions": 1000}),
            422,
            "Validation",
        ),
        (
            json!({"inputs": long, "truncate": false}),
            413,
            "Validation",
        ),
        (
            json!({"inputs": "x", "prompt_name": "query"}),
            422,
            "Validation",
        ),
        (json!({"inputs": [[101, 99_999_999]]}), 422, "Tokenizer"),
        (json!({"inputs": {"a": 1}}), 422, "Validation"),
    ];
    for (body, status, kind) in cases {
        let (got, error) = post(&server, "/embed", body.clone()).await;
        assert_eq!(got.as_u16(), status, "{body}: {error}");
        assert_eq!(error["error_type"], kind, "{body}: {error}");
        assert!(error["error"].as_str().unwrap().len() > 10, "{error}");
    }
    let (status, error) = post(&server, "/tokenize", json!({"inputs": ""})).await;
    assert_eq!(
        (status.as_u16(), error["error_type"].as_str()),
        (400, Some("Empty"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn truncation_is_silent_by_default_and_refused_when_asked() {
    let long = "rollback ".repeat(400); // well past 256 tokens
    let exact = "word ".repeat(254); // 254 + [CLS] + [SEP] = max_seq_length
    let server = Server::start(&[]).await;
    let (status, body) = post(&server, "/api/v1/embed", json!({"texts": [long]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["tokens"], 256);
    let (status, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": [exact], "truncate": false}),
    )
    .await;
    assert_eq!(status, 200, "exactly max_seq_length tokens is fine: {body}");
    let (status, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": ["short", long], "truncate": false}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "input_too_long");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("input 1") && message.contains("802 tokens"),
        "{message}"
    );
    // Token ids longer than the model takes are held to the same policy.
    let ids: Vec<u32> = std::iter::once(101)
        .chain(std::iter::repeat_n(2000, 300))
        .chain([102])
        .collect();
    let (status, _) = post(&server, "/v1/embeddings", json!({"input": ids})).await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &server,
        "/embed",
        json!({"inputs": [ids], "truncate": false}),
    )
    .await;
    assert_eq!(status, 413, "TEI's status for a validation error");
    drop(server);

    // --auto-truncate false: refused unless the request asks for truncation.
    let server = Server::start(&["--auto-truncate", "false"]).await;
    let (status, body) = post(&server, "/v1/embeddings", json!({"input": long})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "input_too_long");
    let (status, body) = post(&server, "/embed", json!({"inputs": long})).await;
    assert_eq!(
        (status.as_u16(), body["error_type"].as_str()),
        (413, Some("Validation"))
    );
    let (status, _) = post(&server, "/embed", json!({"inputs": long, "truncate": true})).await;
    assert_eq!(status, 200);
    let info = server.get_json("/info").await;
    assert_eq!(info["limits"]["auto_truncate"], false);
}

/// The bundled model's files plus the committed prompts config: the directory the parity
/// fixture (tests/fixtures/make_prompt_reference.py) was made from.
fn prompted_model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("embedder-prompted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    link_tree(&model_dir(), &dir);
    let config = dir.join("config_sentence_transformers.json");
    let _ = std::fs::remove_file(&config);
    std::fs::copy(fixture("prompts/config_sentence_transformers.json"), config).unwrap();
    dir
}

fn link_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            link_tree(&entry.path(), &target);
        } else {
            std::os::unix::fs::symlink(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_match_sentence_transformers() {
    let dir = prompted_model_dir();
    let model = format!("prompted={}", dir.display());
    let server = Server::start(&["--model", &model]).await;
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixture("reference-prompts.json")).unwrap()).unwrap();
    let texts: Vec<String> = serde_json::from_value(reference["texts"].clone()).unwrap();
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let options = &case["options"];
        let want: Vec<Vec<f32>> = serde_json::from_value(case["embeddings"].clone()).unwrap();
        // The same options on TEI's route and on the native one.
        let mut tei = json!({"inputs": texts, "model": "prompted"});
        let mut native = json!({"texts": texts, "model": "prompted"});
        match name {
            "default_prompt" => {}
            "prompt_passage" | "prompt_classification" => {
                tei["prompt_name"] = options["prompt_name"].clone();
                native["prompt_name"] = options["prompt_name"].clone();
            }
            "dimensions_128" => {
                tei["dimensions"] = json!(128);
                native["dimensions"] = json!(128);
            }
            "truncate_left" => {
                tei["truncation_direction"] = json!("left");
                native["truncation_direction"] = json!("left");
            }
            // Not an option the routes take: checked against the prompted cases below.
            "no_prompt" => continue,
            other => panic!("unknown case {other}"),
        }
        let (status, tei) = post(&server, "/embed", tei).await;
        assert_eq!(status, 200, "{name}: {tei}");
        let (status, native) = post(&server, "/api/v1/embed", native).await;
        assert_eq!(status, 200, "{name}: {native}");
        let tei: Vec<Vec<f32>> = serde_json::from_value(tei).unwrap();
        let native: Vec<Vec<f32>> = serde_json::from_value(native["embeddings"].clone()).unwrap();
        for (i, want) in want.iter().enumerate() {
            for got in [&tei[i], &native[i]] {
                assert_eq!(got.len(), want.len(), "{name}");
                let cos = cosine(got, want);
                assert!(cos >= 0.9999, "{name}: cosine {cos} for {:?}", texts[i]);
                assert!((norm(got) - 1.0).abs() < 1e-4);
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
    let info = server.get_json("/info").await;
    let prompted = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "prompted")
        .unwrap();
    assert_eq!(prompted["default_prompt_name"], "query");
    assert_eq!(
        prompted["prompts"],
        json!(["classification", "passage", "query"])
    );

    // The prompt did change the vectors: a short text with and without "query: " differs.
    let no_prompt = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "no_prompt")
        .unwrap();
    let bare = floats(&no_prompt["embeddings"][0]);
    let (_, body) = post(
        &server,
        "/embed",
        json!({"inputs": texts[0], "model": "prompted"}),
    )
    .await;
    assert!(
        cosine(&floats(&body[0]), &bare) < 0.99,
        "the default prompt was not applied"
    );
    // The bundled model (no prompts) gives the unprompted vectors.
    let (_, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": [texts[0]], "model": MODEL}),
    )
    .await;
    assert!(cosine(&floats(&body["embeddings"][0]), &bare) >= 0.9999);

    // /tokenize shows the prompt's tokens, with offsets into the prompted text.
    let (_, body) = post(
        &server,
        "/tokenize",
        json!({"inputs": "restart", "prompt_name": "passage", "model": "prompted"}),
    )
    .await;
    let words: Vec<&str> = body[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert_eq!(words, ["[CLS]", "passage", ":", "restart", "[SEP]"]);
    let _ = std::fs::remove_dir_all(dir);
}

async fn vector_with(server: &Server, body: Value) -> Vec<f32> {
    let (status, body) = post(server, "/api/v1/embed", body).await;
    assert_eq!(status, 200, "{body}");
    floats(&body["embeddings"][0])
}

async fn token_count(server: &Server, text: &str) -> usize {
    let (status, body) = post(server, "/tokenize", json!({"inputs": text})).await;
    assert_eq!(status, 200, "{body}");
    body[0].as_array().unwrap().len()
}

/// Texts are read only so far (250 characters per token of max_seq_length) before
/// tokenising, but what is cut must never change the tokens a text keeps: WordPiece makes a
/// word of over 100 characters one [UNK], so 64,000 characters can be a single token.
#[tokio::test(flavor = "multi_thread")]
async fn texts_past_the_character_cap_keep_the_tokens_truncation_promises() {
    let server = Server::start(&[]).await;
    // A 65,000-character blob (one [UNK]) then 360 tokens of prose.
    let tail = " the quick brown fox jumps over the lazy dog".repeat(40);
    let long = format!("{}{tail}", "ab12".repeat(16_250));
    // The same tokens from a text under the cap: a 120-character blob is one [UNK] too.
    let short = format!("{}{tail}", "ab12".repeat(30));
    assert_eq!(token_count(&server, &short).await, 363);
    assert_eq!(
        token_count(&server, &long).await,
        363,
        "/tokenize does not truncate"
    );
    let (status, body) = post(&server, "/api/v1/embed", json!({"texts": [&long]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["usage"]["tokens"], 256,
        "the prose is kept, not cut off"
    );
    let cos = cosine(
        &floats(&body["embeddings"][0]),
        &native_vector(&server, &short).await,
    );
    assert!(cos > 0.9999, "right truncation: cosine {cos}");
    let (status, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": [&long], "truncate": false}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("363 tokens"), "{message}");

    // Left truncation keeps the end, however long the start.
    let end = "the quick brown fox jumps over the lazy dog ".repeat(10);
    let long = format!("{}{end}", "apple ".repeat(11_000));
    let short = format!("{}{end}", "apple ".repeat(300));
    let left = |text: &str| json!({"texts": [text], "truncation_direction": "left"});
    let cos = cosine(
        &vector_with(&server, left(&long)).await,
        &vector_with(&server, left(&short)).await,
    );
    assert!(cos > 0.9999, "left truncation: cosine {cos}");
    // A refused text says how many tokens it has, however long.
    let words = "a ".repeat(40_000);
    let (status, body) = post(
        &server,
        "/api/v1/embed",
        json!({"texts": [words], "truncate": false}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("40002 tokens"), "{message}");
}

/// The bundled model with `do_lower_case: true` in `sentence_bert_config.json`, as some
/// sentence-transformers models ship.
fn lowercasing_model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("embedder-lowercase-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    link_tree(&model_dir(), &dir);
    let config = dir.join("sentence_bert_config.json");
    std::fs::remove_file(&config).unwrap();
    std::fs::write(config, r#"{"max_seq_length": 256, "do_lower_case": true}"#).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lowercasing_model_tokenizes_any_text_with_offsets_into_it() {
    let dir = lowercasing_model_dir();
    let model = format!("lc={}", dir.display());
    let server = Server::start(&["--model", &model]).await;
    // "İ" (2 bytes) lowercases to "i̇" (3) and the Kelvin sign (3 bytes) to "k" (1): offsets
    // into the lowercased text are not offsets into the request's.
    for text in [
        "İİİİİİ hello world",
        "\u{212A}elvin ΣΑΣ HELLO",
        "ÀB\u{212A}\u{212A}\u{212A}",
    ] {
        let (status, body) =
            post(&server, "/tokenize", json!({"inputs": text, "model": "lc"})).await;
        assert_eq!(status, 200, "{text}: {body}");
        let tokens = body[0].as_array().unwrap();
        let mut covered = 0;
        for token in &tokens[1..tokens.len() - 1] {
            let (start, stop) = (
                token["start"].as_u64().unwrap() as usize,
                token["stop"].as_u64().unwrap() as usize,
            );
            let piece = text
                .get(start..stop)
                .expect("offsets on the text's char boundaries");
            assert_eq!(token["text"], piece, "{text}: {token}");
            assert!(start >= covered, "{text}: offsets in order");
            covered = stop;
        }
    }
    // The vectors are the lower-cased text's, as sentence-transformers makes them.
    let vector = |text: &str| json!({"texts": [text], "model": "lc"});
    let cos = cosine(
        &vector_with(&server, vector("HELLO World")).await,
        &vector_with(&server, vector("hello world")).await,
    );
    assert!(cos > 0.99999, "cosine {cos}");
}

/// A chunker's "\n" chunk is a text like any other, as in sentence-transformers and TEI:
/// [CLS] [SEP]. Only an empty string is refused.
#[tokio::test(flavor = "multi_thread")]
async fn whitespace_only_texts_are_embedded() {
    let server = Server::start(&[]).await;
    let (status, body) = post(
        &server,
        "/v1/embeddings",
        json!({"input": ["ok", "\n", "   "]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    let (status, body) = post(&server, "/api/v1/embed", json!({"texts": [" \t "]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["tokens"], 2);
    let (status, body) = post(&server, "/embed", json!({"inputs": ["ok", ""]})).await;
    assert_eq!(
        (status.as_u16(), body["error_type"].as_str()),
        (400, Some("Empty"))
    );
}

/// TEI takes texts and lists of token ids in one `inputs` list (`Input::Batch` of
/// `InputType`s); clients that re-send some texts as the ids `/tokenize` gave them do so.
#[tokio::test(flavor = "multi_thread")]
async fn texts_and_token_ids_mix_in_one_list() {
    let server = Server::start(&[]).await;
    let text = "Blue-green rollouts of embedding models";
    let (_, tokens) = post(&server, "/tokenize", json!({"inputs": text})).await;
    let ids: Vec<u64> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let (status, body) = post(
        &server,
        "/embed",
        json!({"inputs": [text, ids, "another text"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f32>> = body.as_array().unwrap().iter().map(floats).collect();
    assert_eq!(vectors.len(), 3);
    let cos = cosine(&vectors[0], &vectors[1]);
    assert!(cos > 0.99999, "a text and its own ids: cosine {cos}");
    let cos = cosine(&vectors[0], &native_vector(&server, text).await);
    assert!(cos > 0.99999, "the same as the native route: cosine {cos}");
    // An item that is neither is named.
    let (status, body) = post(&server, "/embed", json!({"inputs": ["ok", 7.5]})).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("inputs[1]"), "{message}");
    // OpenAI's API does not mix the two kinds: http.rs checks that route refuses it.
}
