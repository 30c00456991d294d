//! Errors of the codec: [`DecodeError`] (bytes from a peer that break a rule of
//! MQTT 3.1.1 or 5.0) and [`EncodeError`] (a packet that cannot be written).

use std::fmt;

use super::packet::{PacketType, ProtocolVersion};
use super::reason;

/// Where a decode error happened: the packet type and, once known, the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub packet: PacketType,
    /// The session's version, or for a CONNECT the version it declares (None
    /// when the CONNECT failed before its protocol level was read).
    pub version: Option<ProtocolVersion>,
}

impl fmt::Display for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(ProtocolVersion::V311) => write!(f, "{} (MQTT 3.1.1)", self.packet),
            Some(ProtocolVersion::V5) => write!(f, "{} (MQTT 5)", self.packet),
            None => write!(f, "{}", self.packet),
        }
    }
}

/// A packet that breaks the protocol. Every variant maps to an MQTT 5 reason
/// code ([`DecodeError::reason_code`]); after any of them the connection must
/// be closed (with a CONNACK when [`DecodeError::is_connect_error`], else with a
/// DISCONNECT for MQTT 5).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Packet type 0, or AUTH (15) in an MQTT 3.1.1 session.
    #[error("reserved control packet type {packet_type} (first byte {byte:#04x})")]
    InvalidPacketType { packet_type: u8, byte: u8 },
    /// The first packet of a connection must be CONNECT.
    #[error("first packet is {packet}, expected CONNECT")]
    ExpectedConnect { packet: PacketType },
    /// The flags of the fixed header are not the ones the packet type requires.
    #[error("{ctx}: invalid fixed header flags {flags:#06b}")]
    InvalidFlags { ctx: Ctx, flags: u8 },
    /// QoS 3 in PUBLISH or in the will QoS of CONNECT.
    #[error("{ctx}: QoS 3 is not a valid QoS")]
    InvalidQoS { ctx: Ctx },
    /// A variable byte integer longer than 4 bytes, or not in its shortest form.
    #[error("{ctx}: malformed variable byte integer")]
    InvalidVarInt { ctx: Ctx },
    /// The whole packet would exceed the maximum packet size (detected as soon as
    /// the remaining length is read, before the packet is buffered), or its
    /// decoded form would need more memory than that size.
    #[error("{ctx}: packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { ctx: Ctx, size: usize, max: usize },
    /// The decoded packet would need more heap than max_packet_size bytes (only
    /// possible with a flood of tiny user properties or topic filters).
    #[error("{ctx}: decoded packet would need more than {max} bytes of memory")]
    MemoryLimit { ctx: Ctx, max: usize },
    /// A field runs past the end of the packet (or of its property block).
    #[error("{ctx}: truncated {what}")]
    UnexpectedEnd { ctx: Ctx, what: &'static str },
    /// Bytes are left after the last field.
    #[error("{ctx}: {extra} unexpected trailing bytes")]
    TrailingBytes { ctx: Ctx, extra: usize },
    /// A UTF-8 string field is not well-formed UTF-8 (MQTT 1.5.4).
    #[error("{ctx}: string is not valid UTF-8")]
    InvalidUtf8 { ctx: Ctx },
    /// A UTF-8 string field contains U+0000 (MQTT 1.5.4).
    #[error("{ctx}: string contains U+0000")]
    NullCharacter { ctx: Ctx },
    /// The CONNECT protocol name is neither "MQTT" nor "MQIsdp".
    #[error("CONNECT: unknown protocol name {name:?}")]
    InvalidProtocolName { name: String },
    /// A protocol level other than 4 (3.1.1) or 5 (5.0), e.g. 3 for MQTT 3.1.
    #[error("CONNECT: unsupported protocol level {level}")]
    UnsupportedProtocolVersion { level: u8 },
    /// A reserved bit is set (CONNECT flags, CONNACK flags, subscription options).
    #[error("{ctx}: reserved bits set in {what}")]
    ReservedBits { ctx: Ctx, what: &'static str },
    /// MQTT 3.1.1: the password flag is set without the user name flag.
    #[error("CONNECT (MQTT 3.1.1): password without user name")]
    PasswordWithoutUsername,
    /// MQTT 3.1.1: an empty client identifier requires clean session 1.
    #[error("CONNECT (MQTT 3.1.1): empty client identifier with clean session 0")]
    EmptyClientIdWithoutCleanSession,
    /// A property identifier that MQTT 5 does not define.
    #[error("{ctx}: unknown property identifier {id:#04x}")]
    UnknownProperty { ctx: Ctx, id: u8 },
    /// A property that exists but is not allowed in this packet.
    #[error("{ctx}: property {id:#04x} is not allowed in this packet")]
    PropertyNotAllowed { ctx: Ctx, id: u8 },
    /// A property that may appear only once appears twice.
    #[error("{ctx}: property {id:#04x} appears more than once")]
    DuplicateProperty { ctx: Ctx, id: u8 },
    /// A property value the spec forbids (topic alias 0, receive maximum 0, ...).
    #[error("{ctx}: invalid value of property {id:#04x}: {what}")]
    InvalidPropertyValue { ctx: Ctx, id: u8, what: &'static str },
    /// Packet identifier 0 where a non-zero one is required.
    #[error("{ctx}: packet identifier 0")]
    ZeroPacketId { ctx: Ctx },
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter.
    #[error("{ctx}: no topic filter")]
    NoTopicFilters { ctx: Ctx },
    /// A reason (or 3.1.1 return) code that this packet type cannot carry.
    #[error("{ctx}: invalid reason code {code:#04x}")]
    InvalidReasonCode { ctx: Ctx, code: u8 },
    /// A topic name (PUBLISH, will) with wildcards, or empty without a topic alias.
    #[error("{ctx}: invalid topic name: {what}")]
    TopicNameInvalid { ctx: Ctx, what: &'static str },
    /// Any other rule the packet breaks, described for the log.
    #[error("{ctx}: protocol violation: {what}")]
    ProtocolViolation { ctx: Ctx, what: &'static str },
}

impl DecodeError {
    /// The MQTT 5 reason code for the CONNACK or DISCONNECT that answers this error.
    pub fn reason_code(&self) -> u8 {
        use DecodeError::*;
        match self {
            InvalidPacketType { .. }
            | InvalidFlags { .. }
            | InvalidQoS { .. }
            | InvalidVarInt { .. }
            | UnexpectedEnd { .. }
            | TrailingBytes { .. }
            | InvalidUtf8 { .. }
            | NullCharacter { .. }
            | ReservedBits { .. }
            | PasswordWithoutUsername
            | UnknownProperty { .. }
            | PropertyNotAllowed { .. } => reason::MALFORMED_PACKET,
            ExpectedConnect { .. }
            | DuplicateProperty { .. }
            | InvalidPropertyValue { .. }
            | ZeroPacketId { .. }
            | NoTopicFilters { .. }
            | InvalidReasonCode { .. }
            | ProtocolViolation { .. } => reason::PROTOCOL_ERROR,
            InvalidProtocolName { .. } | UnsupportedProtocolVersion { .. } => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
            PacketTooLarge { .. } | MemoryLimit { .. } => reason::PACKET_TOO_LARGE,
            TopicNameInvalid { .. } => reason::TOPIC_NAME_INVALID,
            EmptyClientIdWithoutCleanSession => reason::CLIENT_IDENTIFIER_NOT_VALID,
        }
    }

    /// Where the error happened, when a packet type was recognised.
    pub fn ctx(&self) -> Option<Ctx> {
        use DecodeError::*;
        match self {
            InvalidPacketType { .. } | ExpectedConnect { .. } => None,
            InvalidProtocolName { .. } | UnsupportedProtocolVersion { .. } => {
                Some(Ctx { packet: PacketType::Connect, version: None })
            }
            PasswordWithoutUsername | EmptyClientIdWithoutCleanSession => {
                Some(Ctx { packet: PacketType::Connect, version: Some(ProtocolVersion::V311) })
            }
            InvalidFlags { ctx, .. }
            | InvalidQoS { ctx }
            | InvalidVarInt { ctx }
            | PacketTooLarge { ctx, .. }
            | MemoryLimit { ctx, .. }
            | UnexpectedEnd { ctx, .. }
            | TrailingBytes { ctx, .. }
            | InvalidUtf8 { ctx }
            | NullCharacter { ctx }
            | ReservedBits { ctx, .. }
            | UnknownProperty { ctx, .. }
            | PropertyNotAllowed { ctx, .. }
            | DuplicateProperty { ctx, .. }
            | InvalidPropertyValue { ctx, .. }
            | ZeroPacketId { ctx }
            | NoTopicFilters { ctx }
            | InvalidReasonCode { ctx, .. }
            | TopicNameInvalid { ctx, .. }
            | ProtocolViolation { ctx, .. } => Some(*ctx),
        }
    }

    /// True when the error is in a CONNECT: the broker answers with a CONNACK
    /// carrying [`Self::reason_code`] (for 3.1.1 via `reason::connack_v311_code`,
    /// see [`Self::connack_version`]) and closes the connection.
    pub fn is_connect_error(&self) -> bool {
        self.ctx().is_some_and(|c| c.packet == PacketType::Connect)
    }

    /// For a CONNECT error, the version to encode the CONNACK with: the one the
    /// CONNECT declared, or 3.1.1 when the version is unknown or unsupported
    /// (a 3.1 or 3.1.1 client then reads return code 1, as the specs ask).
    /// None for errors outside CONNECT.
    pub fn connack_version(&self) -> Option<ProtocolVersion> {
        let ctx = self.ctx().filter(|c| c.packet == PacketType::Connect)?;
        Some(ctx.version.unwrap_or(ProtocolVersion::V311))
    }
}

/// A packet that cannot be encoded.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A UTF-8 string field over 65535 bytes.
    #[error("{packet}: string of {len} bytes exceeds 65535")]
    StringTooLong { packet: PacketType, len: usize },
    /// A binary field (password, payload of a will, correlation data) over 65535 bytes.
    #[error("{packet}: binary data of {len} bytes exceeds 65535")]
    BinaryTooLong { packet: PacketType, len: usize },
    /// The packet does not fit the 268,435,455 bytes a remaining length can express.
    #[error("{packet}: remaining length {len} exceeds {}", super::MAX_REMAINING_LENGTH)]
    PacketTooLarge { packet: PacketType, len: usize },
    /// A subscription identifier (or property length) beyond 268,435,455.
    #[error("{packet}: value {value} does not fit a variable byte integer")]
    VarIntTooLarge { packet: PacketType, value: usize },
    /// A PUBLISH of QoS > 0 without packet identifier, or a packet identifier 0.
    #[error("{packet}: missing or zero packet identifier")]
    MissingPacketId { packet: PacketType },
    /// AUTH asked for in MQTT 3.1.1.
    #[error("{packet} does not exist in MQTT 3.1.1")]
    NotInVersion { packet: PacketType },
    /// MQTT 3.1.1 CONNECT with a password but no user name.
    #[error("CONNECT (MQTT 3.1.1): a password requires a user name")]
    PasswordWithoutUsername,
}
