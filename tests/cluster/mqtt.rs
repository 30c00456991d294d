//! A small MQTT 3.1.1 / 5.0 client for the cluster tests, written
//! independently of the crate's codec. Unlike the single-node harness's raw
//! client (tests/common/raw.rs, which panics when the server closes), every
//! operation here returns a `Result`: during a failover a closed connection
//! is an expected event the test reacts to (reconnect), not a failure. It
//! never acknowledges anything by itself.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Errors are plain text: the tests only print them.
pub type Res<T> = Result<T, String>;

pub const SESSION_EXPIRY: u8 = 0x11;
pub const SERVER_REFERENCE: u8 = 0x1C;

/// CONNACK / DISCONNECT reason "use another server" (MQTT 5).
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
/// CONNACK return code "server unavailable" (MQTT 3.1.1).
pub const SERVER_UNAVAILABLE_V311: u8 = 0x03;

/// One MQTT 5 property (identifier, value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    Byte(u8, u8),
    U16(u8, u16),
    U32(u8, u32),
    VarInt(u8, u32),
    Str(u8, String),
    Bin(u8, Vec<u8>),
    Pair(u8, String, String),
}

impl Prop {
    pub fn id(&self) -> u8 {
        match self {
            Prop::Byte(i, _)
            | Prop::U16(i, _)
            | Prop::U32(i, _)
            | Prop::VarInt(i, _)
            | Prop::Str(i, _)
            | Prop::Bin(i, _)
            | Prop::Pair(i, _, _) => *i,
        }
    }
}

/// The string value of property `id`, if present.
pub fn prop_str(props: &[Prop], id: u8) -> Option<&str> {
    props.iter().find_map(|p| match p {
        Prop::Str(i, s) if *i == id => Some(s.as_str()),
        _ => None,
    })
}

// ---------------------------------------------------------------- encoding

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

fn encode_props(props: &[Prop]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in props {
        body.push(p.id());
        match p {
            Prop::Byte(_, v) => body.push(*v),
            Prop::U16(_, v) => body.extend_from_slice(&v.to_be_bytes()),
            Prop::U32(_, v) => body.extend_from_slice(&v.to_be_bytes()),
            Prop::VarInt(_, v) => put_varint(&mut body, *v),
            Prop::Str(_, s) => put_str(&mut body, s),
            Prop::Bin(_, b) => put_bin(&mut body, b),
            Prop::Pair(_, k, v) => {
                put_str(&mut body, k);
                put_str(&mut body, v);
            }
        }
    }
    let mut out = Vec::new();
    put_varint(&mut out, body.len() as u32);
    out.extend_from_slice(&body);
    out
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len() as u32);
    out.extend_from_slice(body);
    out
}

/// A CONNECT to send.
#[derive(Debug, Clone)]
pub struct Conn {
    pub v5: bool,
    pub client_id: String,
    /// Clean Start (5) / Clean Session (3.1.1).
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    pub expiry: Option<u32>,
}

impl Conn {
    pub fn v5(id: &str) -> Conn {
        Conn { v5: true, client_id: id.into(), clean: true, keep_alive: 30, expiry: None }
    }
    pub fn v3(id: &str) -> Conn {
        Conn { v5: false, ..Conn::v5(id) }
    }
    pub fn clean(mut self, c: bool) -> Conn {
        self.clean = c;
        self
    }
    pub fn expiry(mut self, s: u32) -> Conn {
        self.expiry = Some(s);
        self
    }
    /// A persistent session: 3.1.1 clean session 0, or MQTT 5 with an expiry of
    /// one hour (Clean Start stays as set: true for the first connect).
    pub fn persistent(self) -> Conn {
        if self.v5 {
            self.expiry(3600)
        } else {
            self.clean(false)
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_str(&mut b, "MQTT");
        b.push(if self.v5 { 5 } else { 4 });
        b.push(if self.clean { 0x02 } else { 0 });
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.v5 {
            let props: Vec<Prop> = self.expiry.map(|e| Prop::U32(SESSION_EXPIRY, e)).into_iter().collect();
            b.extend_from_slice(&encode_props(&props));
        }
        put_str(&mut b, &self.client_id);
        frame(0x10, &b)
    }
}

/// A PUBLISH, to send or as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pub {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pid: Option<u16>,
    pub payload: Vec<u8>,
}

impl Pub {
    pub fn new(topic: &str, payload: &[u8], qos: u8, pid: u16) -> Pub {
        Pub {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            pid: if qos > 0 { Some(pid) } else { None },
            ..Default::default()
        }
    }
    pub fn retain(mut self, r: bool) -> Pub {
        self.retain = r;
        self
    }
    pub fn dup(mut self, d: bool) -> Pub {
        self.dup = d;
        self
    }
    pub fn encode(&self, v5: bool) -> Vec<u8> {
        let mut first = 0x30 | (self.qos << 1);
        if self.dup {
            first |= 0x08;
        }
        if self.retain {
            first |= 0x01;
        }
        let mut b = Vec::new();
        put_str(&mut b, &self.topic);
        if self.qos > 0 {
            b.extend_from_slice(&self.pid.unwrap_or(1).to_be_bytes());
        }
        if v5 {
            b.extend_from_slice(&encode_props(&[]));
        }
        b.extend_from_slice(&self.payload);
        frame(first, &b)
    }
}

pub fn subscribe(v5: bool, pid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v5 {
        b.extend_from_slice(&encode_props(&[]));
    }
    put_str(&mut b, filter);
    b.push(qos);
    frame(0x82, &b)
}

pub fn puback(pid: u16) -> Vec<u8> {
    frame(0x40, &pid.to_be_bytes())
}
pub fn pubrec(pid: u16) -> Vec<u8> {
    frame(0x50, &pid.to_be_bytes())
}
pub fn pubrel(pid: u16) -> Vec<u8> {
    frame(0x62, &pid.to_be_bytes())
}
pub fn pubcomp(pid: u16) -> Vec<u8> {
    frame(0x70, &pid.to_be_bytes())
}
pub fn disconnect(v5: bool) -> Vec<u8> {
    if v5 {
        frame(0xE0, &[0, 0])
    } else {
        frame(0xE0, &[])
    }
}

// ---------------------------------------------------------------- decoding

/// A packet from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    ConnAck { session_present: bool, code: u8, props: Vec<Prop> },
    Publish(Pub),
    PubAck { pid: u16, code: u8 },
    PubRec { pid: u16, code: u8 },
    PubRel { pid: u16 },
    PubComp { pid: u16, code: u8 },
    SubAck { pid: u16, codes: Vec<u8> },
    PingResp,
    Disconnect { code: u8, props: Vec<Prop> },
    Other { first: u8 },
}

struct Rd<'a> {
    b: &'a [u8],
    i: usize,
}

impl Rd<'_> {
    fn u8(&mut self) -> Res<u8> {
        let v = *self.b.get(self.i).ok_or("short read")?;
        self.i += 1;
        Ok(v)
    }
    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_be_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }
    fn varint(&mut self) -> Res<u32> {
        let mut v = 0u32;
        let mut mult = 1u32;
        for _ in 0..4 {
            let b = self.u8()?;
            v += (b & 0x7F) as u32 * mult;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            mult *= 128;
        }
        Err("varint too long".into())
    }
    fn bin(&mut self) -> Res<Vec<u8>> {
        let n = self.u16()? as usize;
        let s = self.b.get(self.i..self.i + n).ok_or("short read")?.to_vec();
        self.i += n;
        Ok(s)
    }
    fn str(&mut self) -> Res<String> {
        String::from_utf8(self.bin()?).map_err(|e| e.to_string())
    }
    fn left(&self) -> usize {
        self.b.len() - self.i
    }
    fn rest(&mut self) -> Vec<u8> {
        let r = self.b[self.i..].to_vec();
        self.i = self.b.len();
        r
    }
    fn props(&mut self) -> Res<Vec<Prop>> {
        let end = self.varint()? as usize + self.i;
        if end > self.b.len() {
            return Err("property length beyond packet".into());
        }
        let mut out = Vec::new();
        while self.i < end {
            let id = self.varint()? as u8;
            out.push(match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Prop::Byte(id, self.u8()?),
                0x13 | 0x21 | 0x22 | 0x23 => Prop::U16(id, self.u16()?),
                0x02 | 0x11 | 0x18 | 0x27 => Prop::U32(id, self.u32()?),
                0x0B => Prop::VarInt(id, self.varint()?),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => Prop::Str(id, self.str()?),
                0x09 | 0x16 => Prop::Bin(id, self.bin()?),
                0x26 => Prop::Pair(id, self.str()?, self.str()?),
                other => return Err(format!("unknown property id {other:#x}")),
            });
        }
        Ok(out)
    }
}

/// Decodes one packet from the front of `buf`: Ok(None) = need more bytes.
pub fn decode(buf: &mut Vec<u8>, v5: bool) -> Res<Option<Pkt>> {
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len += (b & 0x7F) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("bad remaining length from server".into());
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    let body: Vec<u8> = buf[i..i + len].to_vec();
    buf.drain(..i + len);
    let mut r = Rd { b: &body, i: 0 };
    let resp = |r: &mut Rd| -> Res<(u16, u8)> {
        let pid = r.u16()?;
        let code = if v5 && r.left() > 0 { r.u8()? } else { 0 };
        Ok((pid, code))
    };
    let p = match first >> 4 {
        2 => {
            let flags = r.u8()?;
            let code = r.u8()?;
            let props = if v5 && r.left() > 0 { r.props()? } else { vec![] };
            Pkt::ConnAck { session_present: flags & 1 == 1, code, props }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let topic = r.str()?;
            let pid = if qos > 0 { Some(r.u16()?) } else { None };
            if v5 {
                r.props()?;
            }
            Pkt::Publish(Pub {
                dup: first & 0x08 != 0,
                qos,
                retain: first & 1 == 1,
                topic,
                pid,
                payload: r.rest(),
            })
        }
        4 => {
            let (pid, code) = resp(&mut r)?;
            Pkt::PubAck { pid, code }
        }
        5 => {
            let (pid, code) = resp(&mut r)?;
            Pkt::PubRec { pid, code }
        }
        6 => Pkt::PubRel { pid: resp(&mut r)?.0 },
        7 => {
            let (pid, code) = resp(&mut r)?;
            Pkt::PubComp { pid, code }
        }
        9 => {
            let pid = r.u16()?;
            if v5 {
                r.props()?;
            }
            Pkt::SubAck { pid, codes: r.rest() }
        }
        13 => Pkt::PingResp,
        14 => {
            let code = if r.left() > 0 { r.u8()? } else { 0 };
            let props = if r.left() > 0 { r.props()? } else { vec![] };
            Pkt::Disconnect { code, props }
        }
        _ => Pkt::Other { first },
    };
    Ok(Some(p))
}

// ---------------------------------------------------------------- client

pub struct Client {
    stream: TcpStream,
    pub v5: bool,
    buf: Vec<u8>,
}

impl Client {
    /// Opens a socket, sends CONNECT, returns the client and the server's first
    /// packet (a CONNACK, whatever its code).
    pub async fn connect(addr: SocketAddr, c: &Conn, timeout: Duration) -> Res<(Client, Pkt)> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr}: timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut cl = Client { stream, v5: c.v5, buf: Vec::new() };
        cl.send(&c.encode()).await?;
        match cl.recv(timeout).await? {
            Some(p @ Pkt::ConnAck { .. }) => Ok((cl, p)),
            Some(other) => Err(format!("expected CONNACK from {addr}, got {other:?}")),
            None => Err(format!("no CONNACK from {addr} within {timeout:?}")),
        }
    }

    /// This client's own address (what a proxy in between reports as the client).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Res<()> {
        self.stream.write_all(bytes).await.map_err(|e| format!("write: {e}"))
    }

    pub async fn publish(&mut self, p: &Pub) -> Res<()> {
        let b = p.encode(self.v5);
        self.send(&b).await
    }

    /// The next packet; Ok(None) when nothing arrives within `timeout`;
    /// Err when the connection is closed or broken.
    pub async fn recv(&mut self, timeout: Duration) -> Res<Option<Pkt>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = decode(&mut self.buf, self.v5)? {
                return Ok(Some(p));
            }
            let old = self.buf.len();
            self.buf.resize(old + 16 * 1024, 0);
            let res = tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf[old..])).await;
            let n = match &res {
                Ok(Ok(n)) => *n,
                _ => 0,
            };
            self.buf.truncate(old + n);
            match res {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err("closed by the server".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK (other packets arriving
    /// first, e.g. resent messages, are returned in the second element).
    pub async fn subscribe(
        &mut self,
        pid: u16,
        filter: &str,
        qos: u8,
        timeout: Duration,
    ) -> Res<(Vec<u8>, Vec<Pkt>)> {
        let b = subscribe(self.v5, pid, filter, qos);
        self.send(&b).await?;
        let deadline = Instant::now() + timeout;
        let mut other = Vec::new();
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())).await? {
                Some(Pkt::SubAck { pid: p, codes }) if p == pid => return Ok((codes, other)),
                Some(p) => other.push(p),
                None => return Err(format!("no SUBACK for {filter} within {timeout:?}")),
            }
        }
    }

    /// Publishes and completes the QoS handshake (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish_acked(&mut self, p: &Pub, timeout: Duration) -> Res<()> {
        self.publish(p).await?;
        let pid = p.pid.unwrap_or(1);
        if p.qos == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())).await? {
                Some(Pkt::PubAck { pid: got, code }) if p.qos == 1 && got == pid => {
                    return if code < 0x80 { Ok(()) } else { Err(format!("PUBACK {pid} code {code:#x}")) };
                }
                Some(Pkt::PubRec { pid: got, code }) if p.qos == 2 && got == pid => {
                    if code >= 0x80 {
                        return Err(format!("PUBREC {pid} code {code:#x}"));
                    }
                    self.send(&pubrel(pid)).await?;
                }
                Some(Pkt::PubComp { pid: got, .. }) if p.qos == 2 && got == pid => return Ok(()),
                Some(other) => return Err(format!("unexpected {other:?} while publishing {pid}")),
                None => return Err(format!("no acknowledgement for {pid} within {timeout:?}")),
            }
        }
    }

    /// Sends DISCONNECT (normal) and waits for the close.
    pub async fn disconnect(mut self) {
        let b = disconnect(self.v5);
        let _ = self.send(&b).await;
        let _ = self.recv(Duration::from_secs(2)).await;
    }
}
