//! The embedding-compatibility check: a golden set of texts embedded by one Ready pod of each
//! color, compared text by text (cosine) and as neighbourhoods (top-k agreement: whether each
//! text's nearest neighbours within the set stay the same), and the canary's answers held to
//! the contract of `spec.model` (its name served, its dimensions).
//!
//! Latency and error gates cannot see a canary that answers fast, with 200s, and with other
//! vectors; this can. The statistics are pure functions; [`run`] does the I/O.

use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_json::json;

/// The built-in golden set: one text per line; short and long (past a small model's
/// `max_seq_length`), non-ASCII, code, numbers.
pub const DEFAULT_GOLDEN_SET: &str = include_str!("golden-set.txt");

/// Texts per request to a pod: small enough that one request stays well under the timeout on
/// a one-thread pod.
const BATCH: usize = 8;

/// The golden set's texts: one per non-blank line.
pub fn golden_texts(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    dot / (aa.sqrt() * bb.sqrt())
}

/// The `k` nearest neighbours of text `i` within the set (itself excluded), by cosine; ties
/// broken by index so the answer is deterministic.
fn neighbours(vectors: &[Vec<f32>], i: usize, k: usize) -> Vec<usize> {
    let mut others: Vec<(f64, usize)> = (0..vectors.len())
        .filter(|j| *j != i)
        .map(|j| (cosine(&vectors[i], &vectors[j]), j))
        .collect();
    others.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    others.into_iter().take(k).map(|(_, j)| j).collect()
}

/// Mean over texts of the overlap between each text's `k` nearest neighbours under the two
/// sets of vectors (1.0: every neighbourhood is the same). `k` is capped at the set's size
/// less one.
pub fn top_k_agreement(stable: &[Vec<f32>], canary: &[Vec<f32>], k: usize) -> f64 {
    let n = stable.len().min(canary.len());
    let k = k.min(n.saturating_sub(1));
    if k == 0 {
        return 1.0;
    }
    let total: f64 = (0..n)
        .map(|i| {
            let a = neighbours(&stable[..n], i, k);
            let b = neighbours(&canary[..n], i, k);
            a.iter().filter(|j| b.contains(j)).count() as f64 / k as f64
        })
        .sum();
    total / n as f64
}

/// How the canary's vectors compare with stable's on the golden set.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub min_cosine: f64,
    pub mean_cosine: f64,
    /// The index (in the golden set) of the text with the lowest cosine.
    pub worst_text: usize,
    pub top_k_agreement: f64,
    pub k: usize,
    pub texts: usize,
}

pub fn compare(stable: &[Vec<f32>], canary: &[Vec<f32>], k: usize) -> Comparison {
    let n = stable.len().min(canary.len());
    let mut min_cosine = f64::INFINITY;
    let mut worst_text = 0;
    let mut sum = 0.0;
    for i in 0..n {
        let c = cosine(&stable[i], &canary[i]);
        sum += c;
        if c < min_cosine {
            min_cosine = c;
            worst_text = i;
        }
    }
    Comparison {
        min_cosine: if n == 0 { 0.0 } else { min_cosine },
        mean_cosine: if n == 0 { 0.0 } else { sum / n as f64 },
        worst_text,
        top_k_agreement: top_k_agreement(stable, canary, k),
        k: k.min(n.saturating_sub(1)),
        texts: n,
    }
}

/// What one check found.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Both colors embedded the golden set; the canary keeps the contract.
    Compared {
        comparison: Comparison,
        dimensions: usize,
    },
    /// The canary keeps the contract (a model change: there is nothing to compare with).
    ContractKept { dimensions: usize },
    /// The canary's pods do not serve `spec.model` as declared (`DimensionMismatch`,
    /// `ModelMismatch`).
    ContractBroken {
        reason: &'static str,
        message: String,
    },
    /// The check could not run (no Ready pod, timeout, an error answer): never a pass.
    Inconclusive(String),
}

/// A pod to send the golden set to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddress {
    pub ip: String,
    pub port: i32,
}

/// A Ready endpoint of `slices` whose pod is one of `pods` (by name), with the slice's port.
pub fn ready_endpoint(
    slices: &[EndpointSlice],
    pods: &std::collections::BTreeSet<String>,
) -> Option<PodAddress> {
    slices.iter().find_map(|slice| {
        let port = slice.ports.as_ref()?.iter().find_map(|p| p.port)?;
        slice.endpoints.iter().flatten().find_map(|endpoint| {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true);
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| target.name.as_ref())
                .is_some_and(|name| pods.contains(name));
            let ip = endpoint.addresses.first()?;
            (ready && pod).then(|| PodAddress {
                ip: ip.clone(),
                port,
            })
        })
    })
}

/// What a check needs besides the pods.
pub struct Request<'a> {
    /// `spec.model.name`; unset, the pods' default model answers.
    pub model: Option<&'a str>,
    pub dimensions: Option<i32>,
    pub texts: &'a [String],
    pub k: usize,
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct OpenAiResponse {
    data: Vec<OpenAiVector>,
}

#[derive(Deserialize)]
struct OpenAiVector {
    index: usize,
    embedding: Vec<f32>,
}

/// Why a pod's answer cannot be used.
enum Failure {
    /// The pod does not serve the model by that name.
    ModelNotServed(String),
    Other(String),
}

/// Attempts per batch: a transient error (a 5xx, a reset connection) is tried again; a pod
/// that keeps failing makes the check inconclusive.
const ATTEMPTS: usize = 3;

/// The header that marks a request as a rollout's check, not traffic (the embedder's
/// `embedder::api::CHECK_HEADER`; other servers ignore it).
pub const CHECK_HEADER: &str = "x-embedroll-check";

/// One batch embedded by the pod at `url`.
async fn embed_batch(
    http: &reqwest::Client,
    url: &str,
    request: &Request<'_>,
    batch: &[String],
    left: Duration,
) -> Result<Vec<Vec<f32>>, Failure> {
    let response = http
        .post(url)
        .timeout(left)
        // The pods count a marked request apart from their traffic: the check lands in a
        // step's first seconds, where its long golden texts would outweigh the canary's few
        // user requests in the P95, request count and tokens the analysis reads.
        .header(CHECK_HEADER, "vectors")
        .json(&match request.model {
            Some(model) => json!({"model": model, "input": batch, "encoding_format": "float"}),
            None => json!({"input": batch, "encoding_format": "float"}),
        })
        .send()
        .await
        .map_err(|e| Failure::Other(format!("{url}: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        if status == reqwest::StatusCode::NOT_FOUND && body.contains("model") {
            return Err(Failure::ModelNotServed(body));
        }
        return Err(Failure::Other(format!("{url} answered {status}: {body}")));
    }
    let mut answer: OpenAiResponse = response
        .json()
        .await
        .map_err(|e| Failure::Other(format!("{url}: unreadable answer: {e}")))?;
    if answer.data.len() != batch.len() {
        return Err(Failure::Other(format!(
            "{url}: {} vectors for {} texts",
            answer.data.len(),
            batch.len()
        )));
    }
    answer.data.sort_by_key(|v| v.index);
    Ok(answer.data.into_iter().map(|v| v.embedding).collect())
}

/// The HTTP client for checks. It follows no redirect: a check talks to this rollout's
/// pods and nowhere else, and trusts only their own answers.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap_or_default()
}

/// The pod's OpenAI-compatible route; an IPv6 address goes in brackets (IPv6 and dual-stack
/// clusters list such pod addresses in their EndpointSlices).
fn embeddings_url(pod: &PodAddress) -> String {
    match pod.ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("http://[{ip}]:{}/v1/embeddings", pod.port),
        _ => format!("http://{}:{}/v1/embeddings", pod.ip, pod.port),
    }
}

/// The golden set embedded by the pod at `pod`, through the OpenAI-compatible route (which
/// this project's embedder, TEI and most others serve), each request marked [`CHECK_HEADER`]
/// so that the embedder counts it apart from the traffic the analysis judges.
async fn embed(
    http: &reqwest::Client,
    pod: &PodAddress,
    request: &Request<'_>,
    deadline: Instant,
) -> Result<Vec<Vec<f32>>, Failure> {
    let url = embeddings_url(pod);
    let mut vectors = Vec::with_capacity(request.texts.len());
    for batch in request.texts.chunks(BATCH) {
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Other(format!(
                    "timed out after {:?} ({} of {} texts embedded by {})",
                    request.timeout,
                    vectors.len(),
                    request.texts.len(),
                    pod.ip
                )));
            }
            match embed_batch(http, &url, request, batch, left).await {
                Err(Failure::Other(why)) if attempt < ATTEMPTS => {
                    tracing::debug!(%why, attempt, "vector check: batch failed; trying again");
                }
                answer => break answer?,
            }
        };
        vectors.extend(answer);
    }
    Ok(vectors)
}

/// Runs one check: the canary's pod against the contract, and, given a stable pod (same
/// model), against stable's vectors.
pub async fn run(
    http: &reqwest::Client,
    canary: &PodAddress,
    stable: Option<&PodAddress>,
    request: &Request<'_>,
) -> Outcome {
    if request.texts.is_empty() {
        return Outcome::Inconclusive("the golden set has no texts".to_owned());
    }
    let deadline = Instant::now() + request.timeout;
    let canary_vectors = match embed(http, canary, request, deadline).await {
        Ok(vectors) => vectors,
        Err(Failure::ModelNotServed(body)) => {
            return Outcome::ContractBroken {
                reason: "ModelMismatch",
                message: format!(
                    "the canary's pods do not serve model {:?} (spec.model.name): {body}",
                    request.model
                ),
            };
        }
        Err(Failure::Other(why)) => return Outcome::Inconclusive(format!("canary: {why}")),
    };
    let dimensions = canary_vectors.first().map_or(0, Vec::len);
    if let Some(bad) = canary_vectors.iter().position(|v| v.len() != dimensions) {
        return Outcome::ContractBroken {
            reason: "DimensionMismatch",
            message: format!(
                "the canary answered {} dimensions for text {bad} and {dimensions} for text 0",
                canary_vectors[bad].len()
            ),
        };
    }
    if let Some(declared) = request.dimensions
        && usize::try_from(declared).ok() != Some(dimensions)
    {
        return Outcome::ContractBroken {
            reason: "DimensionMismatch",
            message: format!(
                "the canary's vectors have {dimensions} dimensions; spec.model.dimensions says {declared}"
            ),
        };
    }
    let Some(stable) = stable else {
        return Outcome::ContractKept { dimensions };
    };
    let stable_vectors = match embed(http, stable, request, deadline).await {
        Ok(vectors) => vectors,
        Err(Failure::ModelNotServed(body) | Failure::Other(body)) => {
            return Outcome::Inconclusive(format!("stable: {body}"));
        }
    };
    if stable_vectors.first().map_or(0, Vec::len) != dimensions {
        return Outcome::ContractBroken {
            reason: "DimensionMismatch",
            message: format!(
                "the canary's vectors have {dimensions} dimensions, stable's {}",
                stable_vectors.first().map_or(0, Vec::len)
            ),
        };
    }
    Outcome::Compared {
        comparison: compare(&stable_vectors, &canary_vectors, request.k),
        dimensions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(endpoints: &[(&str, &str, bool)]) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "search-green-x"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints.iter().map(|(pod, ip, ready)| json!({
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn the_check_takes_a_ready_pod_of_the_revision_it_judges() {
        // The slice still lists a Ready pod of the color's previous revision, first.
        let slices = [slice(&[
            ("search-green-old-a", "10.0.0.1", true),
            ("search-green-new-a", "10.0.0.2", false),
            ("search-green-new-b", "10.0.0.3", true),
        ])];
        let new = std::collections::BTreeSet::from([
            "search-green-new-a".to_owned(),
            "search-green-new-b".to_owned(),
        ]);
        assert_eq!(
            ready_endpoint(&slices, &new),
            Some(PodAddress {
                ip: "10.0.0.3".to_owned(),
                port: 8080
            })
        );
        let none_ready = std::collections::BTreeSet::from(["search-green-new-a".to_owned()]);
        assert_eq!(ready_endpoint(&slices, &none_ready), None);
        assert_eq!(ready_endpoint(&slices, &Default::default()), None);
    }

    /// One HTTP exchange on a loopback port: returns the request head it read, answering with
    /// one 2-dimensional vector in OpenAI's shape.
    fn answer_once() -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut body = vec![0u8; length];
            conn.read_exact(&mut body).unwrap();
            let answer = r#"{"data":[{"index":0,"embedding":[1.0,0.0]}]}"#;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
            head
        });
        (port, server)
    }

    /// One text embedded by the "pod" on `port` as a check embeds the golden set.
    async fn embed_one_text(port: u16) -> Result<Vec<Vec<f32>>, Failure> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let texts = vec!["one".to_owned()];
        let request = Request {
            model: None,
            dimensions: None,
            texts: &texts,
            k: 1,
            timeout: Duration::from_secs(10),
        };
        let pod = PodAddress {
            ip: "127.0.0.1".into(),
            port: port.into(),
        };
        embed(
            &http_client(),
            &pod,
            &request,
            Instant::now() + request.timeout,
        )
        .await
    }

    #[tokio::test]
    async fn the_golden_set_is_sent_marked_as_a_check() {
        let (port, server) = answer_once();
        let vectors = embed_one_text(port).await;
        let head = server.join().unwrap();
        assert!(head.starts_with("post /v1/embeddings "), "{head}");
        assert!(
            head.contains("\r\nx-embedroll-check: vectors\r\n"),
            "{head}"
        );
        assert!(matches!(vectors, Ok(ref v) if v.len() == 1));
    }

    #[test]
    fn ipv6_pods_are_addressed_in_brackets() {
        let url = |ip: &str| {
            embeddings_url(&PodAddress {
                ip: ip.into(),
                port: 8080,
            })
        };
        assert_eq!(url("10.0.0.7"), "http://10.0.0.7:8080/v1/embeddings");
        assert_eq!(url("fd00::5"), "http://[fd00::5]:8080/v1/embeddings");
        assert!(reqwest::Url::parse(&url("fd00::5")).is_ok());
    }

    #[tokio::test]
    async fn a_check_follows_no_redirect_away_from_the_pod() {
        use std::io::{Read, Write};
        // Elsewhere: where a redirect would send the golden set.
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        elsewhere.set_nonblocking(true).unwrap();
        let target = elsewhere.local_addr().unwrap().port();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            // Every attempt is answered with a redirect.
            for conn in listener.incoming().take(8) {
                let mut conn = conn.unwrap();
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = write!(
                    conn,
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{target}/v1/embeddings\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        let vectors = embed_one_text(port).await;
        assert!(vectors.is_err(), "a redirect is not an answer");
        assert!(
            matches!(elsewhere.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "nothing was sent elsewhere"
        );
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn cosine_is_scale_free_and_handles_zero() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    /// Points on a circle: each one's nearest neighbours are the points beside it.
    fn circle(n: usize, turn: f32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                let a = std::f32::consts::TAU * i as f32 / n as f32 + turn;
                vec![a.cos(), a.sin()]
            })
            .collect()
    }

    #[test]
    fn the_same_vectors_agree_fully() {
        let v = circle(20, 0.0);
        let c = compare(&v, &v, 10);
        assert!((c.min_cosine - 1.0).abs() < 1e-9);
        assert!((c.mean_cosine - 1.0).abs() < 1e-9);
        assert_eq!(c.top_k_agreement, 1.0);
        assert_eq!((c.k, c.texts), (10, 20));
    }

    #[test]
    fn a_rotated_space_keeps_neighbourhoods_but_not_cosines() {
        // Another model's space can keep every neighbourhood and still be incomparable with
        // the index: cosine catches that, top-k does not.
        let (a, b) = (circle(12, 0.0), circle(12, 1.0));
        let c = compare(&a, &b, 4);
        assert!(c.mean_cosine < 0.6, "{c:?}");
        assert_eq!(c.top_k_agreement, 1.0);
    }

    #[test]
    fn shuffled_vectors_lose_neighbourhoods_and_the_worst_text_is_named() {
        let a = circle(12, 0.0);
        let mut b = a.clone();
        b.swap(0, 6); // two opposite points trade places
        let c = compare(&a, &b, 2);
        assert!((c.min_cosine + 1.0).abs() < 1e-6, "{c:?}");
        assert_eq!(c.worst_text, 0, "the first of the worst wins");
        // Texts 0 and 6 keep none of their 2 neighbours; 1, 11, 5 and 7 keep one of two; the
        // other six keep both.
        let expected = (6.0 * 1.0 + 4.0 * 0.5) / 12.0;
        assert!((c.top_k_agreement - expected).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn small_noise_lowers_cosine_slightly() {
        let a: Vec<Vec<f32>> = (0..5)
            .map(|i| unit(&[1.0 + i as f32, 2.0, 3.0 - i as f32]))
            .collect();
        let b: Vec<Vec<f32>> = a
            .iter()
            .map(|v| unit(&[v[0] + 0.01, v[1] - 0.01, v[2]]))
            .collect();
        let c = compare(&a, &b, 10);
        assert!(c.min_cosine > 0.99 && c.min_cosine < 1.0, "{c:?}");
        assert_eq!(c.k, 4, "k capped at the set's size less one");
    }

    #[test]
    fn the_built_in_golden_set_is_varied() {
        let texts = golden_texts(DEFAULT_GOLDEN_SET);
        assert_eq!(texts.len(), 50);
        assert!(
            texts.iter().any(|t| t.split_whitespace().count() > 300),
            "a text past max_seq_length"
        );
        assert!(texts.iter().any(|t| !t.is_ascii()), "non-ASCII");
        assert!(texts.iter().any(|t| t.contains("fn main")), "code");
        assert!(
            texts
                .iter()
                .any(|t| t.chars().filter(char::is_ascii_digit).count() > 10),
            "numbers"
        );
        assert_eq!(golden_texts("a\n\n  b  \n"), ["a", "b"]);
    }
}
