//! A tiny MQTT 3.1.1 / 5.0 client written independently of the crate's codec,
//! for the tests that check exact bytes: reason codes, properties, DUP flags,
//! malformed input. It never acknowledges anything by itself, so a test can
//! hold acknowledgements back on purpose.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

// Property identifiers (MQTT 5 2.2.2.2).
pub const PAYLOAD_FORMAT: u8 = 0x01;
pub const MESSAGE_EXPIRY: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_ID: u8 = 0x0B;
pub const SESSION_EXPIRY: u8 = 0x11;
pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
pub const AUTH_METHOD: u8 = 0x15;
pub const AUTH_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
pub const WILL_DELAY: u8 = 0x18;
pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
pub const RESPONSE_INFO: u8 = 0x1A;
pub const SERVER_REFERENCE: u8 = 0x1C;
pub const REASON_STRING: u8 = 0x1F;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUB_AVAILABLE: u8 = 0x28;
pub const SUB_ID_AVAILABLE: u8 = 0x29;
pub const SHARED_SUB_AVAILABLE: u8 = 0x2A;

/// One property: identifier and value.
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
    pub fn user(k: &str, v: &str) -> Prop {
        Prop::Pair(USER_PROPERTY, k.into(), v.into())
    }
}

/// Helpers to read a property list.
pub trait Props {
    fn find(&self, id: u8) -> Option<&Prop>;
    fn u8_of(&self, id: u8) -> Option<u8>;
    fn u16_of(&self, id: u8) -> Option<u16>;
    fn u32_of(&self, id: u8) -> Option<u32>;
    fn str_of(&self, id: u8) -> Option<&str>;
    fn bin_of(&self, id: u8) -> Option<&[u8]>;
    fn sub_ids(&self) -> Vec<u32>;
    fn users(&self) -> Vec<(String, String)>;
}

impl Props for Vec<Prop> {
    fn find(&self, id: u8) -> Option<&Prop> {
        self.iter().find(|p| p.id() == id)
    }
    fn u8_of(&self, id: u8) -> Option<u8> {
        match self.find(id) {
            Some(Prop::Byte(_, v)) => Some(*v),
            _ => None,
        }
    }
    fn u16_of(&self, id: u8) -> Option<u16> {
        match self.find(id) {
            Some(Prop::U16(_, v)) => Some(*v),
            _ => None,
        }
    }
    fn u32_of(&self, id: u8) -> Option<u32> {
        match self.find(id) {
            Some(Prop::U32(_, v)) | Some(Prop::VarInt(_, v)) => Some(*v),
            _ => None,
        }
    }
    fn str_of(&self, id: u8) -> Option<&str> {
        match self.find(id) {
            Some(Prop::Str(_, v)) => Some(v.as_str()),
            _ => None,
        }
    }
    fn bin_of(&self, id: u8) -> Option<&[u8]> {
        match self.find(id) {
            Some(Prop::Bin(_, v)) => Some(v.as_slice()),
            _ => None,
        }
    }
    fn sub_ids(&self) -> Vec<u32> {
        self.iter()
            .filter_map(|p| match p {
                Prop::VarInt(SUBSCRIPTION_ID, v) => Some(*v),
                _ => None,
            })
            .collect()
    }
    fn users(&self) -> Vec<(String, String)> {
        self.iter()
            .filter_map(|p| match p {
                Prop::Pair(_, k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------- encoding

pub fn put_varint(out: &mut Vec<u8>, mut v: u32) {
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

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

pub fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

pub fn encode_props(props: &[Prop]) -> Vec<u8> {
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

/// Fixed header + body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len() as u32);
    out.extend_from_slice(body);
    out
}

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub props: Vec<Prop>,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8]) -> Will {
        Will { topic: topic.into(), payload: payload.into(), qos: 0, retain: false, props: vec![] }
    }
    pub fn qos(mut self, q: u8) -> Will {
        self.qos = q;
        self
    }
    pub fn prop(mut self, p: Prop) -> Will {
        self.props.push(p);
        self
    }
}

/// A CONNECT to send.
#[derive(Debug, Clone)]
pub struct Conn {
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will: Option<Will>,
    pub props: Vec<Prop>,
}

impl Conn {
    pub fn v5(id: &str) -> Conn {
        Conn {
            level: 5,
            client_id: id.into(),
            clean: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            props: vec![],
        }
    }
    pub fn v3(id: &str) -> Conn {
        Conn { level: 4, ..Conn::v5(id) }
    }
    pub fn version(v5: bool, id: &str) -> Conn {
        if v5 {
            Conn::v5(id)
        } else {
            Conn::v3(id)
        }
    }
    pub fn clean(mut self, c: bool) -> Conn {
        self.clean = c;
        self
    }
    pub fn keep_alive(mut self, k: u16) -> Conn {
        self.keep_alive = k;
        self
    }
    pub fn creds(mut self, u: &str, p: &str) -> Conn {
        self.username = Some(u.into());
        self.password = Some(p.as_bytes().to_vec());
        self
    }
    pub fn will(mut self, w: Will) -> Conn {
        self.will = Some(w);
        self
    }
    pub fn prop(mut self, p: Prop) -> Conn {
        self.props.push(p);
        self
    }
    /// Session expiry for v5 (ignored by 3.1.1 which uses clean=false instead).
    pub fn expiry(self, s: u32) -> Conn {
        self.prop(Prop::U32(SESSION_EXPIRY, s))
    }
    pub fn is_v5(&self) -> bool {
        self.level == 5
    }
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut b = Vec::new();
        put_str(&mut b, "MQTT");
        b.push(self.level);
        let mut flags = 0u8;
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.clean {
            flags |= 0x02;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            b.extend_from_slice(&encode_props(&self.props));
        }
        put_str(&mut b, &self.client_id);
        if let Some(w) = &self.will {
            if v5 {
                b.extend_from_slice(&encode_props(&w.props));
            }
            put_str(&mut b, &w.topic);
            put_bin(&mut b, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(&mut b, u);
        }
        if let Some(p) = &self.password {
            put_bin(&mut b, p);
        }
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
    pub props: Vec<Prop>,
    pub payload: Vec<u8>,
}

impl Pub {
    pub fn new(topic: &str, payload: &[u8], qos: u8) -> Pub {
        Pub {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            pid: if qos > 0 { Some(1) } else { None },
            ..Default::default()
        }
    }
    pub fn pid(mut self, pid: u16) -> Pub {
        self.pid = Some(pid);
        self
    }
    pub fn retain(mut self, r: bool) -> Pub {
        self.retain = r;
        self
    }
    pub fn dup(mut self, d: bool) -> Pub {
        self.dup = d;
        self
    }
    pub fn prop(mut self, p: Prop) -> Pub {
        self.props.push(p);
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
            b.extend_from_slice(&encode_props(&self.props));
        }
        b.extend_from_slice(&self.payload);
        frame(first, &b)
    }
}

/// SUBSCRIBE option byte: QoS | no local | retain as published | retain handling.
pub fn sub_opts(qos: u8, no_local: bool, rap: bool, rh: u8) -> u8 {
    qos | if no_local { 0x04 } else { 0 } | if rap { 0x08 } else { 0 } | (rh << 4)
}

pub fn subscribe(v5: bool, pid: u16, filters: &[(&str, u8)], props: &[Prop]) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v5 {
        b.extend_from_slice(&encode_props(props));
    }
    for (f, o) in filters {
        put_str(&mut b, f);
        b.push(*o);
    }
    frame(0x82, &b)
}

pub fn unsubscribe(v5: bool, pid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v5 {
        b.extend_from_slice(&encode_props(&[]));
    }
    for f in filters {
        put_str(&mut b, f);
    }
    frame(0xA2, &b)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62), PUBCOMP (0x70) with reason code 0.
pub fn ack(first: u8, pid: u16) -> Vec<u8> {
    frame(first, &pid.to_be_bytes())
}
pub fn puback(pid: u16) -> Vec<u8> {
    ack(0x40, pid)
}
pub fn pubrec(pid: u16) -> Vec<u8> {
    ack(0x50, pid)
}
pub fn pubrel(pid: u16) -> Vec<u8> {
    ack(0x62, pid)
}
pub fn pubcomp(pid: u16) -> Vec<u8> {
    ack(0x70, pid)
}
pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}
/// DISCONNECT; for 3.1.1 pass `None`.
pub fn disconnect(code: Option<u8>, props: &[Prop]) -> Vec<u8> {
    match code {
        None => vec![0xE0, 0x00],
        Some(c) => {
            let mut b = vec![c];
            b.extend_from_slice(&encode_props(props));
            frame(0xE0, &b)
        }
    }
}
pub fn auth(code: u8, props: &[Prop]) -> Vec<u8> {
    let mut b = vec![code];
    b.extend_from_slice(&encode_props(props));
    frame(0xF0, &b)
}

// ---------------------------------------------------------------- decoding

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    ConnAck { session_present: bool, code: u8, props: Vec<Prop> },
    Publish(Pub),
    PubAck { pid: u16, code: u8, props: Vec<Prop> },
    PubRec { pid: u16, code: u8, props: Vec<Prop> },
    PubRel { pid: u16, code: u8, props: Vec<Prop> },
    PubComp { pid: u16, code: u8, props: Vec<Prop> },
    SubAck { pid: u16, codes: Vec<u8>, props: Vec<Prop> },
    UnsubAck { pid: u16, codes: Vec<u8>, props: Vec<Prop> },
    PingResp,
    Disconnect { code: u8, props: Vec<Prop> },
    Auth { code: u8, props: Vec<Prop> },
    Other { first: u8, body: Vec<u8> },
}

struct Rd<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Rd<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.i).ok_or("short read u8")?;
        self.i += 1;
        Ok(v)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }
    fn varint(&mut self) -> Result<u32, String> {
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
    fn bin(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u16()? as usize;
        let s = self.b.get(self.i..self.i + n).ok_or("short read bin")?.to_vec();
        self.i += n;
        Ok(s)
    }
    fn str(&mut self) -> Result<String, String> {
        String::from_utf8(self.bin()?).map_err(|e| e.to_string())
    }
    fn rest(&mut self) -> Vec<u8> {
        let r = self.b[self.i..].to_vec();
        self.i = self.b.len();
        r
    }
    fn left(&self) -> usize {
        self.b.len() - self.i
    }
    fn props(&mut self) -> Result<Vec<Prop>, String> {
        let len = self.varint()? as usize;
        let end = self.i + len;
        if end > self.b.len() {
            return Err("property length beyond packet".into());
        }
        let mut out = Vec::new();
        while self.i < end {
            let id = self.varint()? as u8;
            let p = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Prop::Byte(id, self.u8()?),
                0x13 | 0x21 | 0x22 | 0x23 => Prop::U16(id, self.u16()?),
                0x02 | 0x11 | 0x18 | 0x27 => Prop::U32(id, self.u32()?),
                0x0B => Prop::VarInt(id, self.varint()?),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => Prop::Str(id, self.str()?),
                0x09 | 0x16 => Prop::Bin(id, self.bin()?),
                0x26 => Prop::Pair(id, self.str()?, self.str()?),
                other => return Err(format!("unknown property id {other:#x}")),
            };
            out.push(p);
        }
        Ok(out)
    }
}

/// Decodes one packet from the front of `buf`: Ok(None) = need more bytes.
pub fn decode(buf: &mut Vec<u8>, v5: bool) -> Result<Option<Pkt>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
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
    let ptype = first >> 4;
    let resp = |r: &mut Rd| -> Result<(u16, u8, Vec<Prop>), String> {
        let pid = r.u16()?;
        let code = if v5 && r.left() > 0 { r.u8()? } else { 0 };
        let props = if v5 && r.left() > 0 { r.props()? } else { vec![] };
        Ok((pid, code, props))
    };
    let p = match ptype {
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
            let props = if v5 { r.props()? } else { vec![] };
            Pkt::Publish(Pub {
                dup: first & 0x08 != 0,
                qos,
                retain: first & 1 == 1,
                topic,
                pid,
                props,
                payload: r.rest(),
            })
        }
        4 => {
            let (pid, code, props) = resp(&mut r)?;
            Pkt::PubAck { pid, code, props }
        }
        5 => {
            let (pid, code, props) = resp(&mut r)?;
            Pkt::PubRec { pid, code, props }
        }
        6 => {
            let (pid, code, props) = resp(&mut r)?;
            Pkt::PubRel { pid, code, props }
        }
        7 => {
            let (pid, code, props) = resp(&mut r)?;
            Pkt::PubComp { pid, code, props }
        }
        9 => {
            let pid = r.u16()?;
            let props = if v5 { r.props()? } else { vec![] };
            Pkt::SubAck { pid, codes: r.rest(), props }
        }
        11 => {
            let pid = r.u16()?;
            let props = if v5 { r.props()? } else { vec![] };
            Pkt::UnsubAck { pid, codes: r.rest(), props }
        }
        13 => Pkt::PingResp,
        14 => {
            let code = if r.left() > 0 { r.u8()? } else { 0 };
            let props = if r.left() > 0 { r.props()? } else { vec![] };
            Pkt::Disconnect { code, props }
        }
        15 => {
            let code = if r.left() > 0 { r.u8()? } else { 0 };
            let props = if r.left() > 0 { r.props()? } else { vec![] };
            Pkt::Auth { code, props }
        }
        _ => Pkt::Other { first, body: body.clone() },
    };
    Ok(Some(p))
}

// ---------------------------------------------------------------- client

/// What a wait for the next packet gave.
#[derive(Debug)]
pub enum Recv {
    Packet(Pkt),
    Closed,
    Timeout,
}

pub struct RawClient {
    pub stream: TcpStream,
    pub v5: bool,
    buf: Vec<u8>,
    closed: bool,
}

pub const WAIT: Duration = Duration::from_secs(5);

impl RawClient {
    pub async fn tcp(addr: SocketAddr) -> RawClient {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => panic!("connect to {addr}: {e}"),
        };
        let _ = stream.set_nodelay(true);
        RawClient { stream, v5: true, buf: Vec::new(), closed: false }
    }

    /// Opens a socket, sends CONNECT, waits for CONNACK; returns the client and the CONNACK.
    pub async fn connect(addr: SocketAddr, c: &Conn) -> (RawClient, Pkt) {
        let mut cl = RawClient::tcp(addr).await;
        cl.v5 = c.is_v5();
        cl.send(&c.encode()).await;
        let ack = cl.expect(WAIT).await;
        (cl, ack)
    }

    /// Like `connect` but asserts the CONNACK is a success (code 0).
    pub async fn connect_ok(addr: SocketAddr, c: &Conn) -> (RawClient, bool /*session present*/) {
        let (cl, ack) = RawClient::connect(addr, c).await;
        match ack {
            Pkt::ConnAck { code: 0, session_present, .. } => (cl, session_present),
            other => panic!("{}: expected CONNACK success, got {other:?}", c.client_id),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes).await {
            panic!("write failed: {e}");
        }
    }

    /// Writes, tolerating a connection the server already closed.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    pub async fn recv(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        loop {
            match decode(&mut self.buf, self.v5) {
                Ok(Some(p)) => return Recv::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable packet: {e}"),
            }
            if self.closed {
                return Recv::Closed;
            }
            // Read straight into the heap buffer: a big array here would make every
            // test future huge (and overflow test-thread stacks in debug builds).
            let old_len = self.buf.len();
            self.buf.resize(old_len + 64 * 1024, 0);
            let res = tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf[old_len..])).await;
            let n = match &res {
                Ok(Ok(n)) => *n,
                _ => 0,
            };
            self.buf.truncate(old_len + n);
            match res {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics on close or timeout.
    pub async fn expect(&mut self, timeout: Duration) -> Pkt {
        match self.recv(timeout).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn expect_pub(&mut self) -> Pub {
        match self.expect(WAIT).await {
            Pkt::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next PUBLISH, acknowledged as a well-behaved subscriber would
    /// (PUBACK, or PUBREC and later PUBCOMP); PUBRELs arriving in between are
    /// answered with PUBCOMP, so pipelined QoS 2 deliveries are handled.
    pub async fn recv_pub_auto(&mut self) -> Pub {
        loop {
            match self.expect(WAIT).await {
                Pkt::Publish(m) => {
                    match m.qos {
                        1 => self.send(&puback(m.pid.unwrap_or(0))).await,
                        2 => self.send(&pubrec(m.pid.unwrap_or(0))).await,
                        _ => {}
                    }
                    return m;
                }
                Pkt::PubRel { pid, .. } => self.send(&pubcomp(pid)).await,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Like `recv_pub_auto`, but returns None when nothing arrives within `d`.
    pub async fn try_recv_pub_auto(&mut self, d: Duration) -> Option<Pub> {
        loop {
            match self.recv(d).await {
                Recv::Packet(Pkt::Publish(m)) => {
                    match m.qos {
                        1 => self.send(&puback(m.pid.unwrap_or(0))).await,
                        2 => self.send(&pubrec(m.pid.unwrap_or(0))).await,
                        _ => {}
                    }
                    return Some(m);
                }
                Recv::Packet(Pkt::PubRel { pid, .. }) => self.send(&pubcomp(pid)).await,
                Recv::Timeout => return None,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Waits for the server to close the connection; returns what it sent before.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<Pkt> {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())).await {
                Recv::Packet(p) => got.push(p),
                Recv::Closed => return got,
                Recv::Timeout => panic!("connection not closed within {timeout:?}; got {got:?}"),
            }
        }
    }

    /// Waits for the server to close the connection; None if it is still open
    /// at the deadline.
    pub async fn closed_within(&mut self, timeout: Duration) -> Option<Vec<Pkt>> {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())).await {
                Recv::Packet(p) => got.push(p),
                Recv::Closed => return Some(got),
                Recv::Timeout => return None,
            }
        }
    }

    /// Asserts that nothing arrives within `d` (used only for absence checks).
    pub async fn expect_nothing(&mut self, d: Duration) {
        match self.recv(d).await {
            Recv::Timeout => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, pid: u16, filters: &[(&str, u8)], props: &[Prop]) -> Vec<u8> {
        let b = subscribe(self.v5, pid, filters, props);
        self.send(&b).await;
        match self.expect(WAIT).await {
            Pkt::SubAck { pid: p, codes, .. } if p == pid => codes,
            other => panic!("expected SUBACK {pid}, got {other:?}"),
        }
    }

    pub async fn sub(&mut self, filter: &str, qos: u8) {
        let codes = self.subscribe(1, &[(filter, qos)], &[]).await;
        assert_eq!(codes, vec![qos], "SUBACK for {filter}");
    }

    pub async fn publish(&mut self, p: &Pub) {
        let b = p.encode(self.v5);
        self.send(&b).await;
    }

    /// Publishes and completes the handshake for its QoS (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish_acked(&mut self, p: &Pub) {
        self.publish(p).await;
        let pid = p.pid.unwrap_or(1);
        match p.qos {
            0 => {}
            1 => match self.expect(WAIT).await {
                Pkt::PubAck { pid: got, code, .. } if got == pid && code < 0x80 => {}
                other => panic!("expected PUBACK {pid}, got {other:?}"),
            },
            _ => {
                match self.expect(WAIT).await {
                    Pkt::PubRec { pid: got, code, .. } if got == pid && code < 0x80 => {}
                    other => panic!("expected PUBREC {pid}, got {other:?}"),
                }
                self.send(&pubrel(pid)).await;
                match self.expect(WAIT).await {
                    Pkt::PubComp { pid: got, code: 0, .. } if got == pid => {}
                    other => panic!("expected PUBCOMP {pid}, got {other:?}"),
                }
            }
        }
    }

    pub async fn ping(&mut self) {
        self.send(&pingreq()).await;
        match self.expect(WAIT).await {
            Pkt::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Sends a normal DISCONNECT and waits until the server closes the socket, so
    /// the broker has handled it (session offline) before the test goes on.
    pub async fn disconnect(mut self) {
        let b = if self.v5 { disconnect(Some(0), &[]) } else { disconnect(None, &[]) };
        let _ = self.stream.write_all(&b).await;
        match self.closed_within(WAIT).await {
            Some(_) => {}
            None => panic!("server did not close the connection after DISCONNECT"),
        }
    }
}

/// The reason code of a CONNACK.
pub fn connack_code(p: &Pkt) -> u8 {
    match p {
        Pkt::ConnAck { code, .. } => *code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

pub fn connack_props(p: &Pkt) -> Vec<Prop> {
    match p {
        Pkt::ConnAck { props, .. } => props.clone(),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}
