//! Fuzz target: arbitrary bytes into `raftmq::protocol::decode` for both
//! versions (and before CONNECT). Nothing may panic, and every packet that
//! decodes must re-encode to bytes that decode to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use raftmq::protocol::{decode, encode, encoded_len, Packet, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the size limit, so small limits get exercised too.
    let Some((&limit, data)) = data.split_first() else { return };
    let max = if limit & 0x80 != 0 { usize::from(limit & 0x7F) * 8 } else { 1 << 16 };
    for version in [None, Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            match decode(&mut buf, version, max) {
                Ok(Some(p)) => check_round_trip(&p, version),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "incomplete packet consumed bytes");
                    break;
                }
                Err(e) => {
                    assert!(e.reason_code() >= 0x80);
                    break;
                }
            }
        }
    }
});

fn check_round_trip(p: &Packet, version: Option<ProtocolVersion>) {
    let v = match (p, version) {
        (Packet::Connect(c), _) => c.protocol.0,
        (_, Some(v)) => v,
        (_, None) => panic!("only CONNECT decodes before the version is known"),
    };
    let mut out = BytesMut::new();
    encode(p, v, &mut out).expect("a decoded packet encodes");
    assert_eq!(out.len(), encoded_len(p, v));
    let again = decode(&mut out, version, usize::MAX).expect("re-encoded packet decodes").expect("complete");
    assert_eq!(&again, p);
    assert!(out.is_empty());
}
