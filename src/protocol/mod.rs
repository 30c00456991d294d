//! MQTT 3.1.1 and 5.0 wire protocol: packet types, decoding, encoding, reason codes.
//!
//! Owns the bytes-to-packets boundary and nothing else: it knows no sessions,
//! no sockets and no configuration beyond the limits passed in. Rules that need
//! connection state (a second CONNECT, topic alias ranges, packet ids in use,
//! which side sent a packet) belong to the broker.

mod decode;
mod encode;
mod error;
pub mod packet;
pub mod reason;

pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use error::{Ctx, DecodeError, EncodeError};
pub use packet::*;

/// The largest remaining length a variable byte integer can express.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

#[cfg(test)]
mod tests;
