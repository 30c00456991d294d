//! A small HTTP/1.1 client for the admin API (hyper's connection-level
//! client): used by a follower to forward requests to the leader's admin
//! port, to ask peers for their health, and by `raftmq ctl`.
//!
//! One request per connection (admin traffic is rare), a timeout over the
//! whole exchange and a cap on the response body. Plain HTTP only, as the
//! admin listener serves.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body accepted.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    #[error("invalid URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP exchange with {addr} failed: {message}")]
    Http { addr: String, message: String },
}

/// An HTTP base URL: `http://host:port` plus an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` (port 80 when the URL names none).
    pub authority: String,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/prefix]`; a bare `host:port` is accepted too.
    pub fn parse(url: &str) -> Result<BaseUrl, ClientError> {
        let bad = || ClientError::BadUrl(url.to_string());
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.contains("://") {
            return Err(bad());
        } else {
            url
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', ' ', '?', '#']) {
            return Err(bad());
        }
        let authority = match authority.rsplit_once(':') {
            // A port, unless the colon belongs to a bracketed IPv6 literal.
            Some((host, port)) if !port.contains(']') => {
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                authority.to_string()
            }
            _ => format!("{authority}:80"),
        };
        Ok(BaseUrl { authority, prefix: prefix.to_string() })
    }

    /// The URL as text (`http://authority/prefix`).
    pub fn as_url(&self) -> String {
        format!("http://{}{}", self.authority, self.prefix)
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// One request: `authority` is `host:port`, `path` starts with `/`. The
/// body, when given, is sent as JSON. `headers` are added as they are.
pub async fn request(
    authority: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&'static str, String)],
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let exchange = async {
        let http = |message: String| ClientError::Http { addr: authority.to_string(), message };
        let stream = TcpStream::connect(authority)
            .await
            .map_err(|source| ClientError::Connect { addr: authority.to_string(), source })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        // Drives the connection; ends when the exchange is done or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder().method(method).uri(path).header(HOST, authority);
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| http("invalid token".into()))?;
            builder = builder.header(AUTHORIZATION, value);
        }
        for (name, value) in headers {
            builder = builder.header(*name, value.as_str());
        }
        let body = match body {
            Some(b) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                b
            }
            None => Bytes::new(),
        };
        let req = builder.body(Full::new(body)).map_err(|e| http(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| http(e.to_string()))?;
        let status = resp.status().as_u16();
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        Ok(Response { status, content_type, body })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout { addr: authority.to_string(), timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.authority.as_str(), u.prefix.as_str()), ("127.0.0.1:8080", ""));
        let u = BaseUrl::parse("http://example.org/admin/").unwrap();
        assert_eq!((u.authority.as_str(), u.prefix.as_str()), ("example.org:80", "/admin"));
        assert_eq!(u.as_url(), "http://example.org:80/admin");
        let u = BaseUrl::parse("localhost:9000").unwrap();
        assert_eq!(u.authority, "localhost:9000");
        let u = BaseUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(u.authority, "[::1]:8080");
        let u = BaseUrl::parse("http://[::1]").unwrap();
        assert_eq!(u.authority, "[::1]:80");
        for bad in ["https://x:1", "http://", "http://x:notaport", "http://:80", "ftp://x", "http://u@x:1"] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn connection_refused_names_the_address() {
        // Bind then drop: the port is (very likely) closed now.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err =
            request(&addr, Method::GET, "/", None, &[], None, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }
}
