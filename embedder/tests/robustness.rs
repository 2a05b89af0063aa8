//! The real server under clients that are heavy, slow or never finish: admission by work,
//! fair batching, input caps, read timeouts and a bounded shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{MODEL, Server, cosine, series_value};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn post(server: &Server, body: Value) -> (StatusCode, Value) {
    let response = Client::new()
        .post(server.url("/api/v1/embed"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Forward passes run so far (the warm-up included).
async fn passes(server: &Server) -> f64 {
    let metrics = server.metrics().await;
    series_value(
        &metrics,
        &format!("embedder_batch_size_count{{model=\"{MODEL}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits until a forward pass beyond `before` has run.
async fn wait_for_a_pass(server: &Server, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes(server).await <= before {
        assert!(Instant::now() < deadline, "no forward pass ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// About `words` words of varied text (about 1.3 tokens each).
fn long_text(seed: usize, words: usize) -> String {
    (0..words)
        .map(|i| format!("w{}", (seed * 31 + i * 7) % 997))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A connection that sends its headers and the start of a body, then nothing.
async fn stalled_mid_body(server: &Server) -> TcpStream {
    let address = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"texts\": [",
        )
        .await
        .unwrap();
    stream
}

/// What the server sends on `stream` before closing it, within `within`.
async fn answer_of(stream: &mut TcpStream, within: Duration) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_request_is_answered_while_a_heavy_one_is_still_running() {
    // A small pass budget: the heavy request needs many passes (and, in a debug build on a
    // busy machine, may take long: no deadline here).
    let server = Server::start(&[
        "--max-batch-tokens",
        "256",
        "--request-timeout-ms",
        "600000",
    ])
    .await;
    let heavy: Vec<String> = (0..16).map(|i| long_text(i, 220)).collect();
    let url = server.url("/api/v1/embed");
    let before = passes(&server).await;
    let heavy = tokio::spawn(async move {
        Client::new()
            .post(url)
            .json(&json!({"texts": heavy}))
            .send()
            .await
            .unwrap()
            .status()
    });
    // The heavy request's texts are queued once its first pass ran.
    wait_for_a_pass(&server, before).await;
    let (status, body) = post(&server, json!({"texts": ["a small request"]})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !heavy.is_finished(),
        "the small request waited for the whole heavy one (first-in first-out)"
    );
    assert_eq!(heavy.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_request_overtakes_a_long_pass_between_its_layers() {
    let server = Server::start(&["--request-timeout-ms", "600000"]).await;
    // One text of max_seq_length tokens: a single pass, which no packing order can split.
    let heavy = json!({"texts": [long_text(1, 220)]});
    let started = Instant::now();
    let (status, _) = post(&server, heavy.clone()).await;
    assert_eq!(status, 200);
    let alone = started.elapsed();

    let url = server.url("/api/v1/embed");
    let heavy = tokio::spawn(async move {
        let response = Client::new().post(url).json(&heavy).send().await.unwrap();
        (response.status(), Instant::now())
    });
    // A quarter into the heavy pass (the clock is only a way to land inside it: if the small
    // request arrives first, the heavy pass starts after it and the order holds as well).
    tokio::time::sleep(alone / 4).await;
    let (status, body) = post(&server, json!({"texts": ["a small request"]})).await;
    let small_answered = Instant::now();
    assert_eq!(status, 200, "{body}");
    let (status, heavy_answered) = heavy.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        small_answered < heavy_answered,
        "the small request waited for the whole heavy pass"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_is_admitted_by_tokens_not_requests() {
    let server = Server::start(&["--max-queued-tokens", "2000", "--max-batch-tokens", "64"]).await;
    // One request over the whole budget can never fit: 413, and it says how to fix it.
    let too_big: Vec<String> = (0..12).map(|i| long_text(i, 220)).collect();
    let (status, body) = post(&server, json!({"texts": too_big})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_many_tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queued-tokens"),
        "{body}"
    );

    // While 1,500 tokens are in flight, another 1,000 are turned away with Retry-After; a
    // small request still fits.
    let queued: Vec<String> = (0..6).map(|i| long_text(i, 190)).collect();
    let url = server.url("/api/v1/embed");
    let before = passes(&server).await;
    let first = tokio::spawn(async move {
        Client::new()
            .post(url)
            .json(&json!({"texts": queued}))
            .send()
            .await
            .unwrap()
            .status()
    });
    wait_for_a_pass(&server, before).await;
    let more: Vec<String> = (10..14).map(|i| long_text(i, 190)).collect();
    let response = Client::new()
        .post(server.url("/api/v1/embed"))
        .json(&json!({"texts": more}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    let (status, _) = post(&server, json!({"texts": ["small"]})).await;
    assert_eq!(status, 200);
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_text_is_cut_before_the_tokenizer_with_the_same_tokens() {
    let server = Server::start(&[]).await;
    // About a megabyte of prose in one text: the tokenizer reads max_seq_length × 250 chars of it.
    let huge = "embedding ".repeat(100_000);
    let (status, body) = post(&server, json!({"texts": [huge]})).await;
    assert_eq!(status, 200, "{body}");
    let short = "embedding ".repeat(400);
    let (_, reference) = post(&server, json!({"texts": [short]})).await;
    let a: Vec<f32> = serde_json::from_value(body["embeddings"][0].clone()).unwrap();
    let b: Vec<f32> = serde_json::from_value(reference["embeddings"][0].clone()).unwrap();
    assert!(cosine(&a, &b) > 0.99999, "truncated the same way");
    assert_eq!(body["usage"]["tokens"], reference["usage"]["tokens"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_hold_no_permit_and_are_cut_off() {
    let server = Server::start(&[
        "--max-concurrent-requests",
        "4",
        "--body-read-timeout-ms",
        "1500",
        "--header-read-timeout-ms",
        "1000",
    ])
    .await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(stalled_mid_body(&server).await);
    }
    // Headers started, never finished.
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut half_headers = TcpStream::connect(&address).await.unwrap();
    half_headers
        .write_all(b"POST /api/v1/embed HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Twenty stalled bodies hold none of the 4 permits.
    let (status, body) = post(&server, json!({"texts": ["still served"]})).await;
    assert_eq!(status, 200, "{body}");

    // The stalled bodies are answered 408 once their time is up; the half headers closed.
    let answer = answer_of(&mut stalled[0], Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    let answer = answer_of(&mut half_headers, Duration::from_secs(10)).await;
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "a half-sent request is not served: {answer}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("code=\"408\""),
        "timed-out bodies are counted"
    );
}

/// Sends one keep-alive request on `stream` and reads its whole answer; returns the status line.
async fn exchange(stream: &mut TcpStream, body: &str) -> String {
    let request = format!(
        "POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .map(|v| v.trim().parse().unwrap())
                .unwrap();
            if answer.len() >= end + 4 + length {
                return text.lines().next().unwrap().to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    // Proxies (Traefik, nginx) keep idle upstream connections for a minute or more; closing
    // them sooner races the proxy's next request into a 502.
    let server = Server::start(&[
        "--header-read-timeout-ms",
        "300",
        "--idle-timeout-ms",
        "2500",
    ])
    .await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let body = r#"{"texts":["keep me alive"]}"#;
    assert!(
        exchange(&mut stream, body)
            .await
            .starts_with("HTTP/1.1 200")
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        exchange(&mut stream, body)
            .await
            .starts_with("HTTP/1.1 200"),
        "an idle keep-alive connection was closed by the header timeout"
    );

    // The header timeout still counts from a request's first byte after an idle spell.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream
        .write_all(b"POST /api/v1/embed HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let answer = answer_of(&mut stream, Duration::from_secs(20)).await;
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");

    // A connection that stays idle past --idle-timeout-ms is closed.
    let mut idle = TcpStream::connect(&address).await.unwrap();
    assert!(exchange(&mut idle, body).await.starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle connection was never closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_answers_is_cut_off() {
    let server = Server::start(&["--write-timeout-ms", "1000"]).await;
    let address: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    // A small receive window, so the server's writes stall once its own buffer is full.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    // Eight pipelined requests of 256 one-word texts: about 8 MB of answers, cheap to compute.
    let body = json!({"texts": vec!["a"; 256]}).to_string();
    let request = format!(
        "POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..8 {
        stream.write_all(request.as_bytes()).await.unwrap();
    }
    // Read nothing for longer than the write timeout (and the passes' time).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut answers = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answers)).await;
    assert!(
        ended.is_ok(),
        "the connection of a client that stopped reading was still open ({} bytes read)",
        answers.len()
    );
    let complete = String::from_utf8_lossy(&answers)
        .matches("HTTP/1.1 200")
        .count();
    assert!(complete < 8, "all {complete} answers were written");
    // The server still answers others.
    let (status, body) = post(&server, json!({"texts": ["still served"]})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_not_held_up_by_a_stalled_client() {
    // Neither the body timeout nor the shutdown bound would end it soon.
    let mut server = Server::start(&[
        "--body-read-timeout-ms",
        "120000",
        "--shutdown-timeout-ms",
        "120000",
    ])
    .await;
    let _stalled = stalled_mid_body(&server).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.terminate();
    // The stalled request is cut off at once (503 shutting_down); the process exits.
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_is_answered_503() {
    let server =
        Server::start(&["--request-timeout-ms", "300", "--fault-latency-ms", "2000"]).await;
    let (status, body) = post(&server, json!({"texts": ["late"]})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
}
