//! MQTT 5 reason codes (MQTT 5.0 section 2.4) and their MQTT 3.1.1 equivalents.
//!
//! Every reason code is a named `u8` constant so the rest of the broker never
//! writes a bare number. MQTT 3.1.1 knows only the CONNACK return codes 0..=5
//! and the SUBACK failure code 0x80; [`connack_v311_code`] maps a CONNACK reason
//! to the closest 3.1.1 return code and the encoder does the SUBACK mapping.

pub const SUCCESS: u8 = 0x00;
pub const NORMAL_DISCONNECTION: u8 = 0x00;
pub const GRANTED_QOS_0: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
pub const DISCONNECT_WITH_WILL_MESSAGE: u8 = 0x04;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
pub const RE_AUTHENTICATE: u8 = 0x19;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BANNED: u8 = 0x8A;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
pub const SERVER_MOVED: u8 = 0x9D;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// MQTT 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3).
pub const V311_ACCEPTED: u8 = 0;
pub const V311_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 1;
pub const V311_IDENTIFIER_REJECTED: u8 = 2;
pub const V311_SERVER_UNAVAILABLE: u8 = 3;
pub const V311_BAD_USER_NAME_OR_PASSWORD: u8 = 4;
pub const V311_NOT_AUTHORIZED: u8 = 5;

/// Maps an MQTT 5 CONNACK reason code to the MQTT 3.1.1 return code.
///
/// 3.1.1 has no code for a malformed CONNECT or a protocol error: the spec says
/// to close the connection without CONNACK there, and this function answers
/// "server unavailable" (3) for every reason it cannot express.
pub fn connack_v311_code(v5_reason: u8) -> u8 {
    match v5_reason {
        SUCCESS => V311_ACCEPTED,
        UNSUPPORTED_PROTOCOL_VERSION => V311_UNACCEPTABLE_PROTOCOL_VERSION,
        CLIENT_IDENTIFIER_NOT_VALID => V311_IDENTIFIER_REJECTED,
        BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => V311_BAD_USER_NAME_OR_PASSWORD,
        NOT_AUTHORIZED => V311_NOT_AUTHORIZED,
        // SERVER_UNAVAILABLE, SERVER_BUSY, BANNED, USE_ANOTHER_SERVER, SERVER_MOVED,
        // CONNECTION_RATE_EXCEEDED and everything without a 3.1.1 equivalent.
        _ => V311_SERVER_UNAVAILABLE,
    }
}

/// The inverse of [`connack_v311_code`] used when decoding a 3.1.1 CONNACK
/// (None for the reserved return codes 6..=255).
pub fn connack_from_v311_code(code: u8) -> Option<u8> {
    Some(match code {
        V311_ACCEPTED => SUCCESS,
        V311_UNACCEPTABLE_PROTOCOL_VERSION => UNSUPPORTED_PROTOCOL_VERSION,
        V311_IDENTIFIER_REJECTED => CLIENT_IDENTIFIER_NOT_VALID,
        V311_SERVER_UNAVAILABLE => SERVER_UNAVAILABLE,
        V311_BAD_USER_NAME_OR_PASSWORD => BAD_USER_NAME_OR_PASSWORD,
        V311_NOT_AUTHORIZED => NOT_AUTHORIZED,
        _ => return None,
    })
}

/// Reason codes a CONNACK may carry (MQTT 5 3.2.2.2).
pub fn valid_connack(c: u8) -> bool {
    matches!(c, 0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99..=0x9D | 0x9F)
}

/// Reason codes of PUBACK and PUBREC (MQTT 5 3.4.2.1, 3.5.2.1).
pub fn valid_puback(c: u8) -> bool {
    matches!(c, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
}

/// Reason codes of PUBREL and PUBCOMP (MQTT 5 3.6.2.1, 3.7.2.1).
pub fn valid_pubrel(c: u8) -> bool {
    matches!(c, 0x00 | 0x92)
}

/// Reason codes of SUBACK (MQTT 5 3.9.3).
pub fn valid_suback(c: u8) -> bool {
    matches!(c, 0x00..=0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2)
}

/// Reason codes of UNSUBACK (MQTT 5 3.11.3).
pub fn valid_unsuback(c: u8) -> bool {
    matches!(c, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91)
}

/// Reason codes of DISCONNECT (MQTT 5 3.14.2.1).
pub fn valid_disconnect(c: u8) -> bool {
    matches!(c, 0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2)
}

/// Reason codes of AUTH (MQTT 5 3.15.2.1).
pub fn valid_auth(c: u8) -> bool {
    matches!(c, 0x00 | 0x18 | 0x19)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v311_connack_mapping() {
        assert_eq!(connack_v311_code(SUCCESS), 0);
        assert_eq!(connack_v311_code(UNSUPPORTED_PROTOCOL_VERSION), 1);
        assert_eq!(connack_v311_code(CLIENT_IDENTIFIER_NOT_VALID), 2);
        for c in [SERVER_UNAVAILABLE, SERVER_BUSY, BANNED, USE_ANOTHER_SERVER, SERVER_MOVED] {
            assert_eq!(connack_v311_code(c), 3);
        }
        assert_eq!(connack_v311_code(CONNECTION_RATE_EXCEEDED), 3);
        assert_eq!(connack_v311_code(BAD_USER_NAME_OR_PASSWORD), 4);
        assert_eq!(connack_v311_code(NOT_AUTHORIZED), 5);
        assert_eq!(connack_v311_code(MALFORMED_PACKET), 3);
    }

    #[test]
    fn v311_connack_inverse_round_trips() {
        for code in 0..=5u8 {
            let v5 = connack_from_v311_code(code);
            assert_eq!(v5.map(connack_v311_code), Some(code));
        }
        assert_eq!(connack_from_v311_code(6), None);
    }

    #[test]
    fn disconnect_codes() {
        assert!(valid_disconnect(NORMAL_DISCONNECTION));
        assert!(valid_disconnect(DISCONNECT_WITH_WILL_MESSAGE));
        assert!(valid_disconnect(SESSION_TAKEN_OVER));
        assert!(valid_disconnect(WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED));
        assert!(!valid_disconnect(BAD_AUTHENTICATION_METHOD));
        assert!(!valid_disconnect(0x01));
    }
}
