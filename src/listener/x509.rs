//! Just enough DER to read the subject common name of a client certificate (for a
//! later "use the certificate CN as user name" option). The certificate has been
//! verified by webpki before we look at it, but this code still treats it as
//! untrusted input: every length is checked, nothing panics, anything unexpected
//! gives `None`.

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_VERSION: u8 = 0xA0; // [0] EXPLICIT, context-specific constructed
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03]; // 2.5.4.3

/// The first CN attribute of the certificate's subject, decoded to a string.
pub(super) fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    let (tag, cert, _) = tlv(cert_der)?;
    expect(tag, TAG_SEQUENCE)?;
    let (tag, tbs, _) = tlv(cert)?;
    expect(tag, TAG_SEQUENCE)?;
    // Optional [0] version, then serialNumber, signature, issuer, validity; subject is next.
    let mut rest = tbs;
    let (tag, _, after_version) = tlv(rest)?;
    if tag == TAG_VERSION {
        rest = after_version;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, subject, _) = tlv(rest)?;
    expect(tag, TAG_SEQUENCE)?;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, rdn, after) = tlv(rdns)?;
        expect(tag, TAG_SET)?;
        rdns = after;
        let mut attrs = rdn;
        while !attrs.is_empty() {
            let (tag, attr, after) = tlv(attrs)?;
            expect(tag, TAG_SEQUENCE)?;
            attrs = after;
            let (tag, oid, value) = tlv(attr)?;
            expect(tag, TAG_OID)?;
            if oid == OID_COMMON_NAME {
                let (tag, text, _) = tlv(value)?;
                return decode_string(tag, text);
            }
        }
    }
    None
}

fn expect(tag: u8, wanted: u8) -> Option<()> {
    (tag == wanted).then_some(())
}

/// Splits one DER tag-length-value off the front: (tag, content, rest). Only
/// single-byte tags (all that certificates use up to the subject).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (len_bytes, after) = input.split_at(n);
        input = after;
        len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    Some((tag, content, rest))
}

fn decode_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, TeletexString (ASCII in practice)
        0x0C | 0x13 | 0x16 | 0x14 => String::from_utf8(bytes.to_vec()).ok(),
        // BMPString: UTF-16BE
        0x1E => {
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    fn cert_with_subject(push: impl FnOnce(&mut rcgen::DistinguishedName)) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        push(&mut params.distinguished_name);
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_common_name() {
        let der = cert_with_subject(|dn| {
            dn.push(DnType::CountryName, "DE");
            dn.push(DnType::OrganizationName, "raftmq");
            dn.push(DnType::CommonName, "sensor-42");
        });
        assert_eq!(subject_common_name(&der).as_deref(), Some("sensor-42"));
        let der = cert_with_subject(|dn| {
            dn.push(DnType::CommonName, DnValue::PrintableString("dev-1".try_into().unwrap()))
        });
        assert_eq!(subject_common_name(&der).as_deref(), Some("dev-1"));
        let der = cert_with_subject(|dn| {
            dn.push(DnType::CommonName, DnValue::BmpString("Zürich".try_into().unwrap()))
        });
        assert_eq!(subject_common_name(&der).as_deref(), Some("Zürich"));
    }

    #[test]
    fn no_common_name_or_garbage_gives_none() {
        let der = cert_with_subject(|dn| dn.push(DnType::OrganizationName, "no cn"));
        assert_eq!(subject_common_name(&der), None);
        assert_eq!(subject_common_name(b""), None);
        assert_eq!(subject_common_name(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(subject_common_name(b"not a certificate"), None);
    }

    #[test]
    fn every_truncation_is_handled_without_panic() {
        let der = cert_with_subject(|dn| dn.push(DnType::CommonName, "truncated"));
        for len in 0..der.len() {
            // The outer length no longer fits: always None.
            assert_eq!(subject_common_name(&der[..len]), None, "prefix of {len} bytes");
        }
        // Flipping bytes must not panic either.
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = subject_common_name(&bad);
        }
    }
}
