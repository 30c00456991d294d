//! A lean MQTT client connection for the load tool: one TCP stream, one read
//! buffer, one write buffer. Packets are encoded into the write buffer and
//! written in batches by [`Conn::flush`]; the caller owns the protocol logic
//! (windows, acknowledgements), so there is no background task and no channel
//! between the socket and the scenario.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};

use super::BenchError;
use crate::protocol::{
    decode, encode, Connect, Disconnect, Packet, ProtocolVersion, ProtocolVersionOrDefault, QoS, Subscribe,
    SubscriptionOptions,
};

/// Largest packet accepted from the broker.
const MAX_INCOMING_PACKET: usize = 256 * 1024 * 1024;

/// Bytes made room for before a read when the read buffer is nearly full.
const READ_CHUNK: usize = 16 * 1024;

pub(crate) struct Conn {
    pub name: String,
    stream: TcpStream,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: ProtocolVersion,
    /// The broker's Receive Maximum from CONNACK (MQTT 5; 65535 when absent).
    pub receive_maximum: u16,
    /// Session Present of the CONNACK.
    pub session_present: bool,
}

/// Session Expiry Interval a persistent MQTT 5 client asks for, seconds.
pub(crate) const PERSISTENT_EXPIRY_S: u32 = 3600;

/// What `open` needs to reach the broker.
pub(crate) struct Dial {
    pub addr: SocketAddr,
    pub source: Option<IpAddr>,
    pub client_id: String,
    pub keepalive: u16,
    pub version: ProtocolVersion,
    /// Initial read buffer capacity (small for the connection scenarios).
    pub buffer: usize,
    pub deadline: Instant,
    pub name: String,
    /// Keep the session: clean session 0 (3.1.1), or clean start 0 with a
    /// session expiry of [`PERSISTENT_EXPIRY_S`] (MQTT 5).
    pub persistent: bool,
    pub username: Option<String>,
    pub password: Option<bytes::Bytes>,
}

impl Conn {
    /// TCP connect, CONNECT, and wait for a successful CONNACK.
    pub async fn open(dial: Dial) -> Result<Conn, BenchError> {
        let name = dial.name;
        let io = |source: std::io::Error| BenchError::Io { what: name.clone(), source };
        let socket =
            if dial.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(io)?;
        if let Some(ip) = dial.source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
        }
        let stream = timeout_at(dial.deadline, socket.connect(dial.addr))
            .await
            .map_err(|_| BenchError::Timeout(format!("{name}: TCP connect")))?
            .map_err(io)?;
        // Batched writes already; Nagle would only add delay to the last packet of a batch.
        stream.set_nodelay(true).map_err(io)?;
        let mut conn = Conn {
            name: name.clone(),
            stream,
            rbuf: BytesMut::with_capacity(dial.buffer),
            wbuf: BytesMut::with_capacity(dial.buffer),
            version: dial.version,
            receive_maximum: u16::MAX,
            session_present: false,
        };
        let mut connect = Connect {
            protocol: ProtocolVersionOrDefault(dial.version),
            clean_start: !dial.persistent,
            keep_alive: dial.keepalive,
            client_id: dial.client_id,
            username: dial.username,
            password: dial.password,
            ..Connect::default()
        };
        if dial.persistent && dial.version.is_v5() {
            connect.properties.session_expiry_interval = Some(PERSISTENT_EXPIRY_S);
        }
        conn.queue(&Packet::Connect(connect))?;
        conn.flush().await?;
        match conn.recv(dial.deadline).await? {
            Packet::ConnAck(ack) if ack.reason_code == 0 => {
                conn.receive_maximum = ack.properties.receive_maximum.unwrap_or(u16::MAX).max(1);
                conn.session_present = ack.session_present;
                Ok(conn)
            }
            Packet::ConnAck(ack) => Err(BenchError::Refused { what: name, code: ack.reason_code }),
            other => Err(conn.unexpected("CONNACK", &other)),
        }
    }

    /// Subscribes to one filter and waits for a granted SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, deadline: Instant) -> Result<(), BenchError> {
        let sub = Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.to_string(),
                SubscriptionOptions { qos, ..SubscriptionOptions::default() },
            )],
            ..Subscribe::default()
        };
        self.queue(&Packet::Subscribe(sub))?;
        self.flush().await?;
        match self.recv(deadline).await? {
            Packet::SubAck(ack)
                if ack.packet_id == 1 && ack.reason_codes.first().is_some_and(|c| *c < 0x80) =>
            {
                Ok(())
            }
            Packet::SubAck(ack) => Err(BenchError::Refused {
                what: format!("{} SUBSCRIBE {filter}", self.name),
                code: ack.reason_codes.first().copied().unwrap_or(0x80),
            }),
            other => Err(self.unexpected("SUBACK", &other)),
        }
    }

    /// Encodes a packet into the write buffer (sent by the next flush).
    pub fn queue(&mut self, packet: &Packet) -> Result<(), BenchError> {
        encode(packet, self.version, &mut self.wbuf).map_err(|e| BenchError::Encode(e.to_string()))
    }

    /// Writes the whole write buffer.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        result.map_err(|source| BenchError::Io { what: self.name.clone(), source })
    }

    /// Writes the write buffer, giving up at the deadline.
    pub async fn flush_by(&mut self, deadline: Instant) -> Result<(), BenchError> {
        match timeout_at(deadline, self.flush()).await {
            Ok(r) => r,
            Err(_) => Err(BenchError::Timeout(format!("{}: writing", self.name))),
        }
    }

    /// The next complete packet already in the read buffer, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, BenchError> {
        decode(&mut self.rbuf, Some(self.version), MAX_INCOMING_PACKET)
            .map_err(|e| BenchError::Decode { what: self.name.clone(), detail: e.to_string() })
    }

    /// Reads once from the socket into the read buffer. Cancel safe.
    pub async fn fill(&mut self) -> Result<(), BenchError> {
        // Ask for less than the buffer's size: once the decoded packets before the
        // unread tail are dropped, BytesMut then moves the short tail to the front
        // of its allocation instead of reallocating and copying everything.
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(BenchError::Closed(self.name.clone())),
            Ok(_) => Ok(()),
            Err(source) => Err(BenchError::Io { what: self.name.clone(), source }),
        }
    }

    /// The next packet, reading as needed, by the deadline.
    pub async fn recv(&mut self, deadline: Instant) -> Result<Packet, BenchError> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(p);
            }
            match timeout_at(deadline, self.fill()).await {
                Ok(r) => r?,
                Err(_) => return Err(BenchError::Timeout(format!("{}: waiting for the broker", self.name))),
            }
        }
    }

    /// Sends DISCONNECT (by the deadline); errors are ignored: the run is over.
    pub async fn send_disconnect(&mut self, deadline: Instant) {
        self.wbuf.clear();
        if self.queue(&Packet::Disconnect(Disconnect::default())).is_ok() {
            let _ = self.flush_by(deadline).await;
        }
    }

    /// Waits (until the deadline) for the broker to close the connection after
    /// DISCONNECT, so the broker's side of the TCP connection closes first.
    pub async fn wait_closed(mut self, deadline: Instant) {
        loop {
            match timeout_at(deadline, self.fill()).await {
                Ok(Ok(())) => self.rbuf.clear(),
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Tries to write a PINGREQ without waiting (idle connections keep-alive).
    pub fn try_ping(&mut self) -> bool {
        self.wbuf.clear();
        if self.queue(&Packet::PingReq).is_err() {
            return false;
        }
        let ok = matches!(self.stream.try_write(&self.wbuf), Ok(n) if n == self.wbuf.len());
        self.wbuf.clear();
        // Discard whatever the broker sent meanwhile (PINGRESP).
        let mut scratch = [0u8; 256];
        while let Ok(n) = self.stream.try_read(&mut scratch) {
            if n == 0 {
                return false;
            }
        }
        ok
    }

    pub fn unexpected(&self, wanted: &str, got: &Packet) -> BenchError {
        if let Packet::Disconnect(d) = got {
            return BenchError::Refused {
                what: format!("{} disconnected by the broker", self.name),
                code: d.reason_code,
            };
        }
        BenchError::Unexpected {
            what: self.name.clone(),
            detail: format!("wanted {wanted}, got {}", kind(got)),
        }
    }
}

/// The packet's type name, for error messages.
pub(crate) fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}
