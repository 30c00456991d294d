//! The PROXY protocol (v1 text and v2 binary, as HAProxy's `send-proxy` /
//! `send-proxy-v2` write it) on a listener with `proxy_protocol = true`.
//!
//! Owns reading exactly the header off the socket (never a byte of the MQTT
//! stream behind it) under a deadline, and turning it into the client's
//! address. Parsing is the `ppp` crate's. A header that is missing,
//! malformed or too slow is an error: the caller closes the connection.
//! Must not touch: anything after the header (TLS, WebSocket, MQTT).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a client (the load balancer) gets to send the whole header. It
/// sends it at once with the connection, so this only bounds a broken peer.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// v2 signature (12 bytes), then version/command, family/protocol, length (u16 BE).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// v1: "PROXY " ... "\r\n", at most 107 bytes (the specification's limit).
const V1_PREFIX: &[u8] = b"PROXY ";
const V1_MAX: usize = 107;
/// The shortest header of either version ("PROXY UNKNOWN\r\n"): read at once.
const MIN_HEADER: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the end of the PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
    #[error("the connection does not start with a PROXY protocol header (first bytes {0})")]
    NotProxy(String),
    #[error("PROXY protocol v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(String),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(String),
}

fn io_error(e: std::io::Error) -> ProxyError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProxyError::Closed
    } else {
        ProxyError::Io(e)
    }
}

/// Reads the PROXY header at the start of `socket` and returns the client's
/// address it carries; `None` when the header carries none (v1 `UNKNOWN`,
/// v2 `LOCAL` such as a load balancer's own health check, or a non-IP
/// family): the socket's peer address stands then.
pub async fn read_header(
    socket: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    match tokio::time::timeout(timeout, read(socket)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}

async fn read(socket: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    let mut header = vec![0u8; MIN_HEADER];
    socket.read_exact(&mut header).await.map_err(io_error)?;
    if header[..V2_SIGNATURE.len()] == V2_SIGNATURE[..] {
        header.resize(V2_FIXED, 0);
        socket.read_exact(&mut header[MIN_HEADER..]).await.map_err(io_error)?;
        let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
        header.resize(V2_FIXED + len, 0);
        socket.read_exact(&mut header[V2_FIXED..]).await.map_err(io_error)?;
        return parse_v2(&header);
    }
    if header.starts_with(V1_PREFIX) {
        read_v1_rest(socket, &mut header).await?;
        return parse_v1(&header);
    }
    Err(ProxyError::NotProxy(hex_prefix(&header)))
}

/// Completes a v1 header up to its "\r\n" without reading past it: peeks at
/// what has arrived, then reads exactly the header's part of it.
async fn read_v1_rest(socket: &mut TcpStream, header: &mut Vec<u8>) -> Result<(), ProxyError> {
    let mut peeked = [0u8; V1_MAX];
    loop {
        if find_crlf(header).is_some() {
            // Past the first 15 bytes the line end is the last byte read; a
            // line end inside the first 15 is a malformed header (parse_v1).
            return Ok(());
        }
        if header.len() >= V1_MAX {
            return Err(ProxyError::V1TooLong);
        }
        let room = V1_MAX - header.len();
        let n = socket.peek(&mut peeked[..room]).await.map_err(io_error)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        // The "\r" may be the last byte already read: search from there.
        let from = header.len() - 1;
        let mut joined = header[from..].to_vec();
        joined.extend_from_slice(&peeked[..n]);
        let take = match find_crlf(&joined) {
            Some(end) => end - 1,
            None => n,
        };
        let start = header.len();
        header.resize(start + take, 0);
        socket.read_exact(&mut header[start..]).await.map_err(io_error)?;
    }
}

/// The index just past the first "\r\n".
fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n").map(|i| i + 2)
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// A complete v1 header ("PROXY ... \r\n").
pub fn parse_v1(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v1::Addresses;
    let parsed = ppp::v1::Header::try_from(header).map_err(|e| ProxyError::V1(e.to_string()))?;
    if parsed.header.len() != header.len() {
        return Err(ProxyError::V1("trailing bytes after the header".into()));
    }
    Ok(match parsed.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    })
}

/// A complete v2 header (16 bytes + its announced length).
pub fn parse_v2(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v2::{Addresses, Command};
    let parsed = ppp::v2::Header::try_from(header).map_err(|e| ProxyError::V2(e.to_string()))?;
    if parsed.command == Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}
