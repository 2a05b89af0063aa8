//! Shared helpers: the real `embedder` binary on a loopback port, killed when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL: &str = "all-MiniLM-L6-v2";
/// A second, different model (a fine-tune of the first with its own weights).
pub const SECOND_MODEL: &str = "sre-embedding-model";

/// The bundled model, fetched by embedder/models/fetch.sh.
pub fn model_dir() -> PathBuf {
    model_dir_of(MODEL)
}

/// A model from embedder/models/models.tsv, fetched by embedder/models/fetch.sh. Missing
/// weights fail the test: the README's test command fetches them first.
pub fn model_dir_of(name: &str) -> PathBuf {
    let cache = std::env::var_os("EMBEDROLL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
                .join("embedroll")
        });
    let dir = cache.join("models").join(name);
    assert!(
        dir.join("model.safetensors").exists(),
        "model weights missing at {}; run embedder/models/fetch.sh",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    // Read at run time: cargo hashes workspace members by relative path, so checkouts that
    // share a target directory (CI's cache, a fresh clone) reuse each other's test binaries
    // and a compile-time path could point into another, possibly deleted, checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures")
        .join(name)
}

/// The workspace's reqwest has rustls without a built-in crypto provider (the operator
/// picks ring, as kube does, rather than compiling aws-lc); with `cargo test --workspace`
/// that feature reaches these test clients too, so they install ring before building one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Server {
    child: Child,
    pub base: String,
}

impl Server {
    /// Starts the server for the bundled model with extra flags and waits until it is ready.
    pub async fn start(extra: &[&str]) -> Self {
        let server = Self::spawn(extra);
        server.wait_ready(Duration::from_secs(120)).await;
        server
    }

    /// Starts the server without waiting for readiness.
    /// Serves the bundled model as default plus the second model.
    pub async fn start_two_models(extra: &[&str]) -> Self {
        let second = format!("{SECOND_MODEL}={}", model_dir_of(SECOND_MODEL).display());
        let mut args = vec!["--model", &second];
        args.extend_from_slice(extra);
        Self::start(&args).await
    }

    pub fn spawn(extra: &[&str]) -> Self {
        install_crypto_provider();
        let port = free_port();
        let model = format!("{MODEL}={}", model_dir().display());
        let child = Command::new(env!("CARGO_BIN_EXE_embedder"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--model", &model])
            .args(["--default-model", MODEL, "--threads", "2"])
            .args(extra)
            .env("EMBEDDER_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start embedder");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = client.get(self.url("/health/ready")).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "embedder not ready within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }

    /// Waits for the process to exit by itself and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "embedder did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET a JSON route: its status code and body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::get(self.url(path)).await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn info(&self) -> serde_json::Value {
        reqwest::get(self.url("/info"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POSTs JSON to `path`: the status and the JSON answer (a non-JSON answer fails the test).
pub async fn post(
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let (status, _, body) = post_full(server, path, body).await;
    (status, body)
}

/// [`post`], with the answer's headers.
pub async fn post_full(
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    serde_json::Value,
) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, headers, json)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The value of one exact series line in a Prometheus exposition, if present.
pub fn series_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.trim().split(' ').next()?.parse().ok()
    })
}
