//! The kubelet's HTTPS endpoint that `kubectl logs` reaches through the apiserver:
//! `GET /containerLogs/{namespace}/{pod}/{container}` with `tailLines`, `limitBytes`,
//! `previous` and `follow`, served from the files the pods' stdout and stderr go to.
//!
//! As a real kubelet, it serves TLS with a certificate for the node's address and requires a
//! client certificate from the cluster CA (the apiserver's `--kubelet-client-certificate`).
//! It does not authorize further (a real kubelet asks the apiserver with a
//! SubjectAccessReview): only the apiserver holds such a certificate here.

use std::convert::Infallible;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_rustls::TlsAcceptor;

/// Where the kubelet API listens (a real kubelet's default port).
pub const DEFAULT_PORT: u16 = 10250;
/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

type Body = BoxBody<Bytes, std::io::Error>;

/// The file a container's output goes to; the pod runner writes, this module reads.
pub fn log_path(dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    dir.join(format!("{namespace}_{pod}_{container}.log"))
}

/// Where the output of the container's previous instance is kept after a restart.
pub fn previous(log: &Path) -> PathBuf {
    log.with_extension("log.previous")
}

/// TLS with the serving certificate and key, clients verified against `client_ca`.
pub fn tls_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, String> {
    let read_certs = |path: &Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(client_ca)? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", client_ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("serving certificate: {e}"))
}

/// Serves container logs from `log_dir` until the task is dropped.
pub async fn serve(
    address: SocketAddr,
    tls: ServerConfig,
    log_dir: PathBuf,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "kubelet API (container logs) listening");
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let log_dir = Arc::new(log_dir);
    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let log_dir = log_dir.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%peer, %error, "kubelet API: TLS handshake refused");
                    return;
                }
            };
            let service = service_fn(move |request| respond(request, log_dir.clone()));
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "kubelet API connection ended");
            }
        });
    }
}

/// The query parameters of a log request that change what is returned.
#[derive(Debug, Default, PartialEq)]
struct LogOptions {
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
    follow: bool,
    previous: bool,
}

fn parse_options(query: Option<&str>) -> Result<LogOptions, String> {
    let mut options = LogOptions::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{key}: not a number: {value}"))
        };
        match key {
            "tailLines" => options.tail_lines = Some(number()?),
            "limitBytes" => options.limit_bytes = Some(number()?),
            "follow" => options.follow = value == "true",
            "previous" => options.previous = value == "true",
            // timestamps, sinceSeconds, sinceTime: not recorded by this kubelet; output is
            // returned whole rather than refused.
            _ => {}
        }
    }
    Ok(options)
}

/// `namespace`, `pod`, `container` from the path, each a Kubernetes name (no path tricks).
fn parse_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/containerLogs/")?;
    let mut parts = rest.split('/');
    let (namespace, pod, container) = (parts.next()?, parts.next()?, parts.next()?);
    let is_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    (parts.next().is_none() && [namespace, pod, container].into_iter().all(is_name))
        .then_some((namespace, pod, container))
}

/// The last `tail_lines` lines of `text`, then at most `limit_bytes` bytes.
fn select(text: &[u8], options: &LogOptions) -> Bytes {
    let mut start = 0;
    if let Some(n) = options.tail_lines {
        let body = text.strip_suffix(b"\n").unwrap_or(text);
        start = if n == 0 {
            text.len()
        } else {
            body.iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(n - 1)
                .map_or(0, |(i, _)| i + 1)
        };
    }
    let end = options
        .limit_bytes
        .map_or(text.len(), |limit| (start + limit).min(text.len()));
    Bytes::copy_from_slice(&text[start..end])
}

fn plain(status: StatusCode, message: String) -> Response<Body> {
    let body = Full::new(Bytes::from(message + "\n"))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

async fn respond(
    request: Request<Incoming>,
    log_dir: Arc<PathBuf>,
) -> Result<Response<Body>, Infallible> {
    if request.method() != Method::GET {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served".into(),
        ));
    }
    let Some((namespace, pod, container)) = parse_path(request.uri().path()) else {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            format!(
                "{}: this kubelet serves /containerLogs/{{namespace}}/{{pod}}/{{container}} only",
                request.uri().path()
            ),
        ));
    };
    let options = match parse_options(request.uri().query()) {
        Ok(options) => options,
        Err(message) => return Ok(plain(StatusCode::BAD_REQUEST, message)),
    };
    let mut path = log_path(&log_dir, namespace, pod, container);
    if options.previous {
        path = previous(&path);
        if !path.exists() {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            ));
        }
    }
    let text = match tokio::fs::read(&path).await {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(plain(
                StatusCode::NOT_FOUND,
                format!("container \"{container}\" in pod \"{pod}\" has not started"),
            ));
        }
        Err(error) => return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())),
    };
    let first = select(&text, &options);
    if !options.follow {
        return Ok(Response::new(
            Full::new(first).map_err(|never| match never {}).boxed(),
        ));
    }
    // Follow: what exists now, then whatever is appended, until the client goes away.
    let offset = text.len() as u64;
    let rest = futures::stream::unfold((path, offset), |(path, offset)| async move {
        loop {
            tokio::time::sleep(FOLLOW_POLL).await;
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(error) => return Some((Err(error), (path, offset))),
            };
            let mut appended = Vec::new();
            let read = async {
                file.seek(SeekFrom::Start(offset)).await?;
                file.read_to_end(&mut appended).await
            };
            match read.await {
                Ok(0) => continue,
                Ok(n) => return Some((Ok(Bytes::from(appended)), (path, offset + n as u64))),
                Err(error) => return Some((Err(error), (path, offset))),
            }
        }
    });
    let stream = futures::stream::once(async move { Ok(first) })
        .chain(rest)
        .map(|chunk| chunk.map(Frame::data));
    Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_kubernetes_names_only() {
        assert_eq!(
            parse_path("/containerLogs/ns/pod-1/embedder"),
            Some(("ns", "pod-1", "embedder"))
        );
        assert_eq!(parse_path("/containerLogs/ns/pod/../etc"), None);
        assert_eq!(parse_path("/containerLogs/ns/pod/..x"), None);
        assert_eq!(parse_path("/containerLogs/ns/pod"), None);
        assert_eq!(parse_path("/containerLogs/ns/pod/c/extra"), None);
        assert_eq!(parse_path("/containerLogs/NS/pod/c"), None);
        assert_eq!(parse_path("/pods"), None);
    }

    #[test]
    fn options_parse_and_refuse_bad_numbers() {
        let options = parse_options(Some("tailLines=2&follow=true&timestamps=true")).unwrap();
        assert_eq!(options.tail_lines, Some(2));
        assert!(options.follow && !options.previous);
        assert!(parse_options(Some("limitBytes=-1")).is_err());
    }

    #[test]
    fn tail_and_limit_select_the_end_then_cut() {
        let text = b"one\ntwo\nthree\n";
        let tail = |n| {
            select(
                text,
                &LogOptions {
                    tail_lines: Some(n),
                    ..Default::default()
                },
            )
        };
        assert_eq!(tail(1), "three\n");
        assert_eq!(tail(2), "two\nthree\n");
        assert_eq!(tail(9), "one\ntwo\nthree\n");
        assert_eq!(tail(0), "");
        let limited = LogOptions {
            tail_lines: Some(2),
            limit_bytes: Some(5),
            ..Default::default()
        };
        assert_eq!(select(text, &limited), "two\nt");
        assert_eq!(
            select(
                b"no newline",
                &LogOptions {
                    tail_lines: Some(1),
                    ..Default::default()
                }
            ),
            "no newline"
        );
    }
}
