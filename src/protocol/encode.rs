//! Encoding: one [`Packet`] to bytes for MQTT 3.1.1 or 5.0.
//!
//! The remaining length is computed first (the same arithmetic serves
//! [`encoded_len`]), then the packet is written in one pass into a buffer
//! reserved to its exact size. For 3.1.1 everything MQTT 5 only is dropped:
//! properties, reason codes (CONNACK maps to a return code, SUBACK failures
//! become 0x80). For 5.0 the short forms are used (PUBACK & co. with reason 0
//! and no properties take 2 bytes, DISCONNECT/AUTH 0 take none).

use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::packet::*;
use super::reason;
use super::MAX_REMAINING_LENGTH;

/// Appends the encoding of `packet` for `version` to `out`. On error nothing
/// is appended.
pub fn encode(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    let res = encode_inner(packet, version.is_v5(), out);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// Size in bytes `encode` would produce (fixed header included), without allocating.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let rem = remaining_len(packet, version.is_v5());
    1 + vbi_len(rem) + rem
}

fn encode_inner(packet: &Packet, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    let ptype = packet.packet_type();
    if !v5 && ptype == PacketType::Auth {
        return Err(EncodeError::NotInVersion { packet: ptype });
    }
    let rem = remaining_len(packet, v5);
    if rem > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { packet: ptype, len: rem });
    }
    out.reserve(1 + vbi_len(rem) + rem);
    out.put_u8(first_byte(packet));
    put_vbi(out, rem);
    let mut w = Writer { out, packet: ptype };
    match packet {
        Packet::Connect(c) => w.connect(c, v5),
        Packet::ConnAck(c) => {
            w.u8(u8::from(c.session_present && c.reason_code == reason::SUCCESS));
            if v5 {
                w.u8(c.reason_code);
                w.connack_props(&c.properties)
            } else {
                w.u8(reason::connack_v311_code(c.reason_code));
                Ok(())
            }
        }
        Packet::Publish(p) => w.publish(p, v5),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            w.packet_id(Some(r.packet_id))?;
            if v5 {
                let pl = reason_props_len(&r.reason_string, &r.user_properties);
                if r.reason_code != 0 || pl != 0 {
                    w.u8(r.reason_code);
                }
                if pl != 0 {
                    w.reason_props(pl, &r.reason_string, &r.user_properties)?;
                }
            }
            Ok(())
        }
        Packet::Subscribe(s) => w.subscribe(s, v5),
        Packet::SubAck(s) => {
            w.packet_id(Some(s.packet_id))?;
            if v5 {
                let pl = reason_props_len(&s.reason_string, &s.user_properties);
                w.reason_props(pl, &s.reason_string, &s.user_properties)?;
                w.out.put_slice(&s.reason_codes);
            } else {
                for &c in &s.reason_codes {
                    w.u8(if c <= 2 { c } else { reason::UNSPECIFIED_ERROR });
                }
            }
            Ok(())
        }
        Packet::Unsubscribe(u) => {
            w.packet_id(Some(u.packet_id))?;
            if v5 {
                let pl = user_props_len(&u.user_properties);
                w.vbi(pl)?;
                w.user_props(&u.user_properties)?;
            }
            for f in &u.filters {
                w.str(f)?;
            }
            Ok(())
        }
        Packet::UnsubAck(u) => {
            w.packet_id(Some(u.packet_id))?;
            if v5 {
                let pl = reason_props_len(&u.reason_string, &u.user_properties);
                w.reason_props(pl, &u.reason_string, &u.user_properties)?;
                w.out.put_slice(&u.reason_codes);
            }
            Ok(())
        }
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => {
            if v5 {
                let pl = disconnect_props_len(d);
                if d.reason_code != 0 || pl != 0 {
                    w.u8(d.reason_code);
                }
                if pl != 0 {
                    w.vbi(pl)?;
                    w.p_u32(0x11, d.session_expiry_interval);
                    w.p_str(0x1F, &d.reason_string)?;
                    w.user_props(&d.user_properties)?;
                    w.p_str(0x1C, &d.server_reference)?;
                }
            }
            Ok(())
        }
        Packet::Auth(a) => {
            let pl = auth_props_len(a);
            if a.reason_code != 0 || pl != 0 {
                w.u8(a.reason_code);
            }
            if pl != 0 {
                w.vbi(pl)?;
                w.p_str(0x15, &a.authentication_method)?;
                w.p_bin(0x16, &a.authentication_data)?;
                w.p_str(0x1F, &a.reason_string)?;
                w.user_props(&a.user_properties)?;
            }
            Ok(())
        }
    }
}

fn first_byte(packet: &Packet) -> u8 {
    let t = (packet.packet_type() as u8) << 4;
    match packet {
        Packet::Publish(p) => t | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain),
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => t | 0b0010,
        _ => t,
    }
}

/// Remaining length of the packet (everything after the fixed header).
fn remaining_len(packet: &Packet, v5: bool) -> usize {
    match packet {
        Packet::Connect(c) => connect_len(c, v5),
        Packet::ConnAck(c) => 2 + if v5 { with_len(connack_props_len(&c.properties)) } else { 0 },
        Packet::Publish(p) => {
            let id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
            let props = if v5 { with_len(publish_props_len(&p.properties)) } else { 0 };
            2 + p.topic.len() + id + props + p.payload.len()
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            if !v5 {
                return 2;
            }
            match reason_props_len(&r.reason_string, &r.user_properties) {
                0 if r.reason_code == 0 => 2,
                0 => 3,
                pl => 3 + with_len(pl),
            }
        }
        Packet::Subscribe(s) => {
            let props = if v5 { with_len(subscribe_props_len(s)) } else { 0 };
            2 + props + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>()
        }
        Packet::SubAck(s) => {
            let props = if v5 { with_len(reason_props_len(&s.reason_string, &s.user_properties)) } else { 0 };
            2 + props + s.reason_codes.len()
        }
        Packet::Unsubscribe(u) => {
            let props = if v5 { with_len(user_props_len(&u.user_properties)) } else { 0 };
            2 + props + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
        }
        Packet::UnsubAck(u) => {
            if !v5 {
                return 2;
            }
            2 + with_len(reason_props_len(&u.reason_string, &u.user_properties)) + u.reason_codes.len()
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if !v5 {
                return 0;
            }
            short_reason_len(d.reason_code, disconnect_props_len(d))
        }
        Packet::Auth(a) => short_reason_len(a.reason_code, auth_props_len(a)),
    }
}

/// DISCONNECT and AUTH: nothing for reason 0 without properties, else the
/// reason byte and, when there are properties, the property block.
fn short_reason_len(code: u8, pl: usize) -> usize {
    match pl {
        0 if code == 0 => 0,
        0 => 1,
        pl => 1 + with_len(pl),
    }
}

fn connect_len(c: &Connect, v5: bool) -> usize {
    // Protocol name "MQTT", level, flags, keep alive.
    let mut n = 2 + 4 + 1 + 1 + 2;
    if v5 {
        n += with_len(connect_props_len(&c.properties));
    }
    n += 2 + c.client_id.len();
    if let Some(w) = &c.will {
        if v5 {
            n += with_len(will_props_len(&w.properties));
        }
        n += 2 + w.topic.len() + 2 + w.payload.len();
    }
    if let Some(u) = &c.username {
        n += 2 + u.len();
    }
    if let Some(p) = &c.password {
        n += 2 + p.len();
    }
    n
}

/// A property block with its length prefix.
#[inline]
fn with_len(pl: usize) -> usize {
    vbi_len(pl) + pl
}

#[inline]
fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_vbi(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

#[inline]
fn l_u8<T>(o: &Option<T>) -> usize {
    if o.is_some() {
        2
    } else {
        0
    }
}

#[inline]
fn l_u16<T>(o: &Option<T>) -> usize {
    if o.is_some() {
        3
    } else {
        0
    }
}

#[inline]
fn l_u32(o: &Option<u32>) -> usize {
    if o.is_some() {
        5
    } else {
        0
    }
}

#[inline]
fn l_str<T: AsRef<[u8]>>(o: &Option<T>) -> usize {
    o.as_ref().map_or(0, |s| 3 + s.as_ref().len())
}

fn user_props_len(u: &[UserProperty]) -> usize {
    u.iter().map(|(k, v)| 5 + k.len() + v.len()).sum()
}

fn reason_props_len(reason_string: &Option<String>, user: &[UserProperty]) -> usize {
    l_str(reason_string) + user_props_len(user)
}

fn connect_props_len(p: &ConnectProperties) -> usize {
    l_u32(&p.session_expiry_interval)
        + l_u16(&p.receive_maximum)
        + l_u32(&p.maximum_packet_size)
        + l_u16(&p.topic_alias_maximum)
        + l_u8(&p.request_response_information)
        + l_u8(&p.request_problem_information)
        + user_props_len(&p.user_properties)
        + l_str(&p.authentication_method)
        + l_str(&p.authentication_data)
}

fn will_props_len(p: &WillProperties) -> usize {
    l_u32(&p.will_delay_interval)
        + l_u8(&p.payload_format_indicator)
        + l_u32(&p.message_expiry_interval)
        + l_str(&p.content_type)
        + l_str(&p.response_topic)
        + l_str(&p.correlation_data)
        + user_props_len(&p.user_properties)
}

fn connack_props_len(p: &ConnAckProperties) -> usize {
    l_u32(&p.session_expiry_interval)
        + l_u16(&p.receive_maximum)
        + l_u8(&p.maximum_qos)
        + l_u8(&p.retain_available)
        + l_u32(&p.maximum_packet_size)
        + l_str(&p.assigned_client_identifier)
        + l_u16(&p.topic_alias_maximum)
        + l_str(&p.reason_string)
        + user_props_len(&p.user_properties)
        + l_u8(&p.wildcard_subscription_available)
        + l_u8(&p.subscription_identifiers_available)
        + l_u8(&p.shared_subscription_available)
        + l_u16(&p.server_keep_alive)
        + l_str(&p.response_information)
        + l_str(&p.server_reference)
        + l_str(&p.authentication_method)
        + l_str(&p.authentication_data)
}

fn publish_props_len(p: &PublishProperties) -> usize {
    l_u8(&p.payload_format_indicator)
        + l_u32(&p.message_expiry_interval)
        + l_u16(&p.topic_alias)
        + l_str(&p.response_topic)
        + l_str(&p.correlation_data)
        + user_props_len(&p.user_properties)
        + p.subscription_identifiers.iter().map(|&id| 1 + vbi_len(id as usize)).sum::<usize>()
        + l_str(&p.content_type)
}

fn subscribe_props_len(s: &Subscribe) -> usize {
    s.subscription_identifier.map_or(0, |id| 1 + vbi_len(id as usize)) + user_props_len(&s.user_properties)
}

fn disconnect_props_len(d: &Disconnect) -> usize {
    l_u32(&d.session_expiry_interval)
        + l_str(&d.reason_string)
        + user_props_len(&d.user_properties)
        + l_str(&d.server_reference)
}

fn auth_props_len(a: &Auth) -> usize {
    l_str(&a.authentication_method)
        + l_str(&a.authentication_data)
        + l_str(&a.reason_string)
        + user_props_len(&a.user_properties)
}

struct Writer<'a> {
    out: &'a mut BytesMut,
    packet: PacketType,
}

impl Writer<'_> {
    #[inline]
    fn u8(&mut self, v: u8) {
        self.out.put_u8(v);
    }

    #[inline]
    fn u16(&mut self, v: u16) {
        self.out.put_u16(v);
    }

    #[inline]
    fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        let len = u16::try_from(s.len())
            .map_err(|_| EncodeError::StringTooLong { packet: self.packet, len: s.len() })?;
        self.out.put_u16(len);
        self.out.put_slice(s.as_bytes());
        Ok(())
    }

    #[inline]
    fn bin(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(b.len())
            .map_err(|_| EncodeError::BinaryTooLong { packet: self.packet, len: b.len() })?;
        self.out.put_u16(len);
        self.out.put_slice(b);
        Ok(())
    }

    fn vbi(&mut self, v: usize) -> Result<(), EncodeError> {
        if v > MAX_REMAINING_LENGTH {
            return Err(EncodeError::VarIntTooLarge { packet: self.packet, value: v });
        }
        put_vbi(self.out, v);
        Ok(())
    }

    fn packet_id(&mut self, id: Option<u16>) -> Result<(), EncodeError> {
        match id {
            Some(id) if id != 0 => {
                self.u16(id);
                Ok(())
            }
            _ => Err(EncodeError::MissingPacketId { packet: self.packet }),
        }
    }

    fn p_u8(&mut self, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u8(v);
        }
    }

    fn p_bool(&mut self, id: u8, v: Option<bool>) {
        self.p_u8(id, v.map(u8::from));
    }

    fn p_u16(&mut self, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u16(v);
        }
    }

    fn p_u32(&mut self, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u32(v);
        }
    }

    fn p_str(&mut self, id: u8, v: &Option<String>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.str(v)?;
        }
        Ok(())
    }

    fn p_bin(&mut self, id: u8, v: &Option<bytes::Bytes>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.bin(v)?;
        }
        Ok(())
    }

    fn p_vbi(&mut self, id: u8, v: u32) -> Result<(), EncodeError> {
        self.out.put_u8(id);
        self.vbi(v as usize)
    }

    fn user_props(&mut self, u: &[UserProperty]) -> Result<(), EncodeError> {
        for (k, v) in u {
            self.out.put_u8(0x26);
            self.str(k)?;
            self.str(v)?;
        }
        Ok(())
    }

    fn reason_props(
        &mut self,
        pl: usize,
        reason_string: &Option<String>,
        user: &[UserProperty],
    ) -> Result<(), EncodeError> {
        self.vbi(pl)?;
        self.p_str(0x1F, reason_string)?;
        self.user_props(user)
    }

    fn connect(&mut self, c: &Connect, v5: bool) -> Result<(), EncodeError> {
        if !v5 && c.password.is_some() && c.username.is_none() {
            return Err(EncodeError::PasswordWithoutUsername);
        }
        self.str("MQTT")?;
        self.u8(if v5 { 5 } else { 4 });
        let mut flags = 0u8;
        if c.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &c.will {
            flags |= 0x04 | ((w.qos as u8) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if c.password.is_some() {
            flags |= 0x40;
        }
        if c.username.is_some() {
            flags |= 0x80;
        }
        self.u8(flags);
        self.u16(c.keep_alive);
        if v5 {
            let p = &c.properties;
            self.vbi(connect_props_len(p))?;
            self.p_u32(0x11, p.session_expiry_interval);
            self.p_u16(0x21, p.receive_maximum);
            self.p_u32(0x27, p.maximum_packet_size);
            self.p_u16(0x22, p.topic_alias_maximum);
            self.p_bool(0x19, p.request_response_information);
            self.p_bool(0x17, p.request_problem_information);
            self.user_props(&p.user_properties)?;
            self.p_str(0x15, &p.authentication_method)?;
            self.p_bin(0x16, &p.authentication_data)?;
        }
        self.str(&c.client_id)?;
        if let Some(w) = &c.will {
            if v5 {
                let p = &w.properties;
                self.vbi(will_props_len(p))?;
                self.p_u32(0x18, p.will_delay_interval);
                self.p_u8(0x01, p.payload_format_indicator);
                self.p_u32(0x02, p.message_expiry_interval);
                self.p_str(0x03, &p.content_type)?;
                self.p_str(0x08, &p.response_topic)?;
                self.p_bin(0x09, &p.correlation_data)?;
                self.user_props(&p.user_properties)?;
            }
            self.str(&w.topic)?;
            self.bin(&w.payload)?;
        }
        if let Some(u) = &c.username {
            self.str(u)?;
        }
        if let Some(p) = &c.password {
            self.bin(p)?;
        }
        Ok(())
    }

    fn connack_props(&mut self, p: &ConnAckProperties) -> Result<(), EncodeError> {
        self.vbi(connack_props_len(p))?;
        self.p_u32(0x11, p.session_expiry_interval);
        self.p_u16(0x21, p.receive_maximum);
        self.p_u8(0x24, p.maximum_qos);
        self.p_bool(0x25, p.retain_available);
        self.p_u32(0x27, p.maximum_packet_size);
        self.p_str(0x12, &p.assigned_client_identifier)?;
        self.p_u16(0x22, p.topic_alias_maximum);
        self.p_str(0x1F, &p.reason_string)?;
        self.user_props(&p.user_properties)?;
        self.p_bool(0x28, p.wildcard_subscription_available);
        self.p_bool(0x29, p.subscription_identifiers_available);
        self.p_bool(0x2A, p.shared_subscription_available);
        self.p_u16(0x13, p.server_keep_alive);
        self.p_str(0x1A, &p.response_information)?;
        self.p_str(0x1C, &p.server_reference)?;
        self.p_str(0x15, &p.authentication_method)?;
        self.p_bin(0x16, &p.authentication_data)
    }

    fn publish(&mut self, p: &Publish, v5: bool) -> Result<(), EncodeError> {
        self.str(&p.topic)?;
        if p.qos != QoS::AtMostOnce {
            self.packet_id(p.packet_id)?;
        }
        if v5 {
            let pp = &p.properties;
            self.vbi(publish_props_len(pp))?;
            self.p_u8(0x01, pp.payload_format_indicator);
            self.p_u32(0x02, pp.message_expiry_interval);
            self.p_u16(0x23, pp.topic_alias);
            self.p_str(0x08, &pp.response_topic)?;
            self.p_bin(0x09, &pp.correlation_data)?;
            self.user_props(&pp.user_properties)?;
            for &id in &pp.subscription_identifiers {
                self.p_vbi(0x0B, id)?;
            }
            self.p_str(0x03, &pp.content_type)?;
        }
        self.out.put_slice(&p.payload);
        Ok(())
    }

    fn subscribe(&mut self, s: &Subscribe, v5: bool) -> Result<(), EncodeError> {
        self.packet_id(Some(s.packet_id))?;
        if v5 {
            self.vbi(subscribe_props_len(s))?;
            if let Some(id) = s.subscription_identifier {
                self.p_vbi(0x0B, id)?;
            }
            self.user_props(&s.user_properties)?;
        }
        for (f, o) in &s.filters {
            self.str(f)?;
            let mut b = o.qos as u8;
            if v5 {
                b |= (u8::from(o.no_local) << 2)
                    | (u8::from(o.retain_as_published) << 3)
                    | ((o.retain_handling as u8) << 4);
            }
            self.u8(b);
        }
        Ok(())
    }
}
