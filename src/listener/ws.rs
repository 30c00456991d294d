//! MQTT over WebSocket: the server handshake (subprotocol, path) and a byte-stream
//! adapter over a tungstenite `WebSocketStream`.
//!
//! MQTT rides in binary frames; frame boundaries mean nothing (a packet may span
//! frames, a frame may carry several packets), so the adapter turns the message
//! stream back into a plain byte stream. A text frame closes the connection
//! (MQTT 5 §6.0).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Subprotocols we answer, in order of preference ("mqttv3.1" is the MQTT 3.1 era name
/// some older clients still offer).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Performs the server side of the WebSocket handshake on `stream`. With `path`,
/// any other request path is answered 404.
pub(super) async fn accept<S>(stream: S, path: Option<&str>) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.map(str::to_owned);
    // The callback's signature (a large http::Response as error) is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if let Some(expected) = &path {
            if request.uri().path() != expected {
                let mut not_found = ErrorResponse::new(Some("not found".to_owned()));
                *not_found.status_mut() = StatusCode::NOT_FOUND;
                return Err(not_found);
            }
        }
        if let Some(chosen) = choose_subprotocol(request) {
            response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, chosen);
        }
        Ok(response)
    };
    let inner = tokio_tungstenite::accept_hdr_async(stream, callback).await?;
    Ok(WsStream::new(inner))
}

/// The subprotocol to answer: "mqtt" when offered, else "mqttv3.1". The offered token
/// is echoed as spelled by the client (clients compare exactly). A client offering
/// none of them gets no Sec-WebSocket-Protocol answer (lenient: some MQTT clients
/// offer nothing).
fn choose_subprotocol(request: &Request) -> Option<HeaderValue> {
    let offered: Vec<&str> = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    SUBPROTOCOLS.iter().find_map(|wanted| {
        offered.iter().find(|o| o.eq_ignore_ascii_case(wanted)).and_then(|o| HeaderValue::from_str(o).ok())
    })
}

/// A byte stream over a WebSocket: reads concatenate the payloads of binary messages,
/// each write becomes one binary message (sent on flush or when tungstenite's write
/// buffer fills).
#[derive(Debug)]
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// Unread rest of the last binary message.
    pending: Bytes,
    /// Set once the close handshake is done; then shut the transport down.
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    fn new(inner: WebSocketStream<S>) -> Self {
        WsStream { inner, pending: Bytes::new(), closed: false }
    }

    /// The transport under the WebSocket (TCP or TLS).
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::from(io::ErrorKind::BrokenPipe),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                // Tungstenite answers pings itself (on the next read or write).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket frame on an MQTT connection",
                    )))
                }
                // A close frame or the end of the stream: end of the byte stream.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let inner = Pin::new(&mut self.inner);
        ready!(inner.poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.inner).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            // Sends our Close frame; its answer is not awaited (the broker is done).
            ready!(Pin::new(&mut self.inner).poll_close(cx)).map_err(to_io)?;
            self.closed = true;
        }
        Pin::new(self.inner.get_mut()).poll_shutdown(cx)
    }
}
