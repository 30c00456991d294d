//! MQTT 3.1.1 and 5.0 wire protocol: packet types, decoding, encoding.
//!
//! Owns the bytes-to-packets boundary and nothing else: it knows no sessions,
//! no sockets and no configuration beyond the limits passed in.

pub mod packet;

pub use packet::*;
