//! L3: the HTTP client `jobctl` uses — over the daemon's unix socket (identity from the
//! kernel) or TCP (bearer token). One connection per request; streaming bodies for logs and
//! server-sent events.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::spec::api::{ErrorBody, PREFIX};
use crate::spec::toml_source::Problem;

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { host, port } => write!(f, "http://{host}:{port}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// A socket path (`/run/jobd/jobd.sock`, `unix:PATH`) or `http://HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("http://") {
            let rest = rest.trim_end_matches('/');
            if let Some((_, path)) = rest.split_once('/') {
                return Err(format!(
                    "{s:?} has a path (/{path}); give only http://HOST:PORT (jobctl adds /api/v1)"
                ));
            }
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in {s:?}"))?),
                None => (rest, 80),
            };
            if host.is_empty() {
                return Err(format!("no host in {s:?}"));
            }
            return Ok(Endpoint::Tcp {
                host: host.trim_matches(['[', ']']).to_string(),
                port,
            });
        }
        if s.starts_with("https://") {
            return Err(
                "https is not supported; put jobd behind a TLS proxy or use an SSH tunnel".into(),
            );
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.is_empty() {
            return Err("empty daemon address".into());
        }
        // `127.0.0.1:8080` or `gpu-box:7878` is a TCP address missing its scheme, not a socket
        // file in the current directory.
        if !s.starts_with("unix:")
            && !path.contains('/')
            && path
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        {
            return Err(format!(
                "{s:?} is neither a socket path nor a URL: for TCP write http://{s} (a socket \
                 file here: ./{s})"
            ));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach jobd at {endpoint}: {source} (is the daemon running? `systemctl start \
         jobd`, or `jobd &` for your own; another address: JOBD_URL or --url)"
    )]
    Unreachable {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
        problems: Vec<Problem>,
    },
    #[error("unexpected answer from jobd: {0}")]
    Protocol(String),
    /// The connection broke while a response was still coming (jobd stopped or restarted).
    #[error(
        "the connection to jobd broke ({0}); a change asked for may or may not have been made: \
         check with jobctl list"
    )]
    Interrupted(String),
}

impl ClientError {
    /// The daemon could not be reached, or went away mid-answer (exit code 3 in jobctl).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::Interrupted(_)
        )
    }

    /// Whether waiting for jobd to come back may help: it is unreachable, went away
    /// mid-answer, or said it is shutting down.
    pub fn is_transient(&self) -> bool {
        self.is_unreachable()
            || matches!(self, ClientError::Api { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
}

/// A streaming response body.
pub struct BodyStream {
    body: Incoming,
    headers: hyper::HeaderMap,
}

impl BodyStream {
    /// A response header, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Interrupted(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Reads server-sent events from a body.
pub struct SseStream {
    body: BodyStream,
    buf: String,
}

impl SseStream {
    /// The next event, or `None` when the stream ends.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if any {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Ok(Some(ev));
                }
                continue; // a keep-alive comment
            }
            match self.body.next_chunk().await? {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                None => return Ok(None),
            }
        }
    }
}

impl Client {
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Self {
        Client { endpoint, token }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            source,
        };
        let (host, io) = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(unreachable)?;
                ("localhost".to_string(), Box::new(s) as Box<dyn Io>)
            }
            Endpoint::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable)?;
                let _ = s.set_nodelay(true);
                (format!("{host}:{port}"), Box::new(s) as Box<dyn Io>)
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{PREFIX}{path}"))
            .header(hyper::header::HOST, host)
            .header(
                hyper::header::USER_AGENT,
                concat!("jobctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Interrupted(e.to_string()))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ClientError::Api {
                status,
                code: e.error.code,
                message: e.error.message,
                problems: e.error.problems,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http_error".into(),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
                problems: Vec::new(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(resp: hyper::Response<Incoming>) -> Result<T, ClientError> {
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")))
    }

    /// `GET path` → JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::json(self.send(Method::GET, path, None).await?).await
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Self::json(self.send(Method::POST, path, Some(body)).await?).await
    }

    /// `GET path` as a byte stream.
    pub async fn stream(&self, path: &str) -> Result<BodyStream, ClientError> {
        let (parts, body) = self.send(Method::GET, path, None).await?.into_parts();
        Ok(BodyStream {
            body,
            headers: parts.headers,
        })
    }

    /// `GET path` as server-sent events.
    pub async fn events(&self, path: &str) -> Result<SseStream, ClientError> {
        Ok(SseStream {
            body: self.stream(path).await?,
            buf: String::new(),
        })
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "/run/jobd/jobd.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/jobd/jobd.sock".into())
        );
        assert_eq!(
            "unix:/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/x.sock".into())
        );
        assert_eq!(
            "http://127.0.0.1:8470/".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8470
            }
        );
        assert!("https://x".parse::<Endpoint>().is_err());
        // A TCP address without its scheme is not a socket file named "127.0.0.1:8470".
        let e = "127.0.0.1:8470".parse::<Endpoint>().unwrap_err();
        assert!(e.contains("write http://127.0.0.1:8470"), "{e}");
        assert_eq!(
            "jobd.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("jobd.sock".into())
        );
        assert!("http://:80".parse::<Endpoint>().is_err());
        let e = "http://gpu-box:8470/api".parse::<Endpoint>().unwrap_err();
        assert!(e.contains("has a path (/api)"), "{e}");
    }
}
