//! [`ClientStream`]: the byte stream of one accepted client, whatever its transport.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::ws::WsStream;
use super::ListenerKind;

/// One client connection after its handshakes. An enum rather than a boxed trait
/// object: no allocation per read, and the broker can ask for transport details.
/// Variants other than TCP are boxed: rustls and tungstenite state is large.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WsStream<TcpStream>>),
    Wss(Box<WsStream<TlsStream<TcpStream>>>),
}

impl ClientStream {
    /// The transport this client came over.
    pub fn kind(&self) -> ListenerKind {
        match self {
            ClientStream::Tcp(_) => ListenerKind::Tcp,
            ClientStream::Tls(_) => ListenerKind::Tls,
            ClientStream::Ws(_) => ListenerKind::Ws,
            ClientStream::Wss(_) => ListenerKind::Wss,
        }
    }

    /// The TCP socket under the transport.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Tcp(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
            ClientStream::Ws(s) => s.get_ref(),
            ClientStream::Wss(s) => s.get_ref().get_ref().0,
        }
    }

    /// The client's verified certificate chain (leaf first), when it sent one on a
    /// TLS listener with `client_ca_file`.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            ClientStream::Tcp(_) | ClientStream::Ws(_) => None,
            ClientStream::Tls(s) => s.get_ref().1.peer_certificates(),
            ClientStream::Wss(s) => s.get_ref().get_ref().1.peer_certificates(),
        }
    }

    /// The subject common name (CN) of the client's verified certificate, if any.
    pub fn peer_cert_common_name(&self) -> Option<String> {
        let leaf = self.peer_certificates()?.first()?;
        super::x509::subject_common_name(leaf.as_ref())
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Ws(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Wss(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Ws(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Wss(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            ClientStream::Ws(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            ClientStream::Wss(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Tcp(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
            ClientStream::Ws(s) => s.is_write_vectored(),
            ClientStream::Wss(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Ws(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Wss(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Ws(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Wss(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
