use std::io::Write as _;

use bytes::Bytes;

use super::*;
use crate::backup::export::{write_backup, Progress};
use crate::backup::SnapshotAt;
use crate::state::{Limits, State};

fn cmd(c: spb::command::Cmd) -> spb::Command {
    spb::Command { cmd: Some(c) }
}

/// A State with two persistent sessions (one with a queue), two retained messages.
pub(crate) fn sample_state() -> State {
    let mut st = State::new(Limits::default());
    let msg = |topic: &str, payload: &'static [u8], retain: bool| spb::Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos: 1,
        retain,
        ..Default::default()
    };
    let mut cmds = Vec::new();
    for c in ["alice", "bob"] {
        cmds.push(cmd(spb::command::Cmd::SessionOpen(spb::SessionOpen {
            client_id: c.into(),
            session_expiry_s: 3600,
            protocol_version: 5,
            ..Default::default()
        })));
        cmds.push(cmd(spb::command::Cmd::Subscribe(spb::Subscribe {
            client_id: c.into(),
            subscriptions: vec![spb::Subscription {
                filter: format!("t/{c}/#"),
                qos: 1,
                ..Default::default()
            }],
            queue_retained: false,
        })));
        cmds.push(cmd(spb::command::Cmd::SessionClose(spb::SessionClose {
            client_id: c.into(),
            ..Default::default()
        })));
    }
    for (t, r) in [("t/alice/1", false), ("t/alice/2", false), ("r/1", true), ("r/2", true)] {
        cmds.push(cmd(spb::command::Cmd::Publish(spb::Publish {
            message: Some(msg(t, b"hello", r)),
            ..Default::default()
        })));
    }
    let res = st.apply_batch(&spb::Batch { now_ms: 1_000, commands: cmds });
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    st
}

pub(crate) fn write_sample(dir: &Path, st: &State) -> PathBuf {
    let at = SnapshotAt { state: st.snapshot_bytes().into(), log_index: 42, log_term: 3, members: vec![] };
    let out = dir.join("raftmq-backup-x.tar.gz");
    let cfg = pb::EffectiveConfig { text: "cfg".into(), redacted: vec!["admin.token".into()] };
    write_backup(&at, &out, 1, &cfg, "export", &Progress::default()).unwrap();
    out
}

struct Collect(Vec<(String, Vec<u8>)>);
impl PartVisitor for Collect {
    fn record(&mut self, name: &str, rec: Vec<u8>) -> Result<(), FormatError> {
        self.0.push((name.to_string(), rec));
        Ok(())
    }
}

#[test]
fn round_trip_keeps_every_record_and_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let st = sample_state();
    let path = write_sample(dir.path(), &st);
    let m = validate(&path).unwrap();
    assert_eq!((m.magic.as_str(), m.format_version, m.log_index, m.log_term), (MAGIC, 1, 42, 3));
    assert_eq!(m.content_digest, hex(&st.content_digest()));
    let names: Vec<&str> = m.parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, [PART_SESSIONS, PART_RETAINED, PART_CLUSTER, PART_CONFIG]);
    let mut c = Collect(Vec::new());
    read_all(&path, Some(&mut c)).unwrap();
    let snap = st.snapshot();
    let sessions: Vec<spb::SessionState> =
        c.0.iter()
            .filter(|(n, _)| n == PART_SESSIONS)
            .map(|(_, r)| spb::SessionState::decode(&r[..]).unwrap())
            .collect();
    assert_eq!(sessions, snap.sessions);
    assert_eq!(sessions[0].queue.len() + sessions[0].inflight.len(), 2);
    let retained: Vec<spb::RetainedMessage> =
        c.0.iter()
            .filter(|(n, _)| n == PART_RETAINED)
            .map(|(_, r)| spb::RetainedMessage::decode(&r[..]).unwrap())
            .collect();
    assert_eq!(retained, snap.retained);
    assert_eq!(read_manifest(&path).unwrap(), m);
}

/// Builds a tar.gz with raw entry names (so unsafe ones can be written).
fn archive(path: &Path, entries: &[(&[u8], &[u8])]) {
    let f = File::create(path).unwrap();
    let mut tar = tar::Builder::new(GzEncoder::new(f, flate2::Compression::fast()));
    for (name, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

fn manifest_bytes(m: &pb::Manifest) -> Vec<u8> {
    m.encode_to_vec()
}

fn good_manifest() -> (pb::Manifest, Vec<u8>) {
    let mut rec = Vec::new();
    let cs = spb::ClusterSettings::default().encode_to_vec();
    prost::encoding::encode_varint(cs.len() as u64, &mut rec);
    rec.extend_from_slice(&cs);
    let m = pb::Manifest {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        parts: vec![pb::Part {
            name: PART_CLUSTER.into(),
            records: 1,
            bytes: rec.len() as u64,
            sha256: hex(&Sha256::digest(&rec)),
        }],
        ..Default::default()
    };
    (m, rec)
}

#[test]
fn a_hand_built_good_archive_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.tar.gz");
    let (m, rec) = good_manifest();
    archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m)), (PART_CLUSTER.as_bytes(), &rec)]);
    validate(&p).unwrap();
}

#[test]
fn bad_files_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_sample(dir.path(), &sample_state());
    let bytes = std::fs::read(&good).unwrap();

    // Truncated.
    let p = dir.path().join("cut.tar.gz");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = validate(&p).unwrap_err();
    assert!(matches!(e, FormatError::Truncated(_)), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");

    // Wrong magic bytes (not gzip).
    let p = dir.path().join("magic.tar.gz");
    let mut b = bytes.clone();
    b[0] = b'P';
    std::fs::write(&p, &b).unwrap();
    let e = validate(&p).unwrap_err();
    assert!(matches!(e, FormatError::NotGzip), "{e}");
    assert!(e.to_string().contains("wrong magic"), "{e}");

    // Foreign: a tar.gz of something else.
    let p = dir.path().join("foreign.tar.gz");
    archive(&p, &[(b"hello.txt", b"hi")]);
    let e = validate(&p).unwrap_err();
    assert!(matches!(e, FormatError::Foreign(_)), "{e}");
    assert!(e.to_string().contains("not a raftmq backup"), "{e}");

    // A manifest with another magic.
    let (mut m, rec) = good_manifest();
    m.magic = "something-else".into();
    archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m)), (PART_CLUSTER.as_bytes(), &rec)]);
    assert!(matches!(validate(&p).unwrap_err(), FormatError::Foreign(_)));

    // Newer format version.
    let (mut m, rec) = good_manifest();
    m.format_version = FORMAT_VERSION + 1;
    archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m)), (PART_CLUSTER.as_bytes(), &rec)]);
    let e = validate(&p).unwrap_err();
    assert!(matches!(e, FormatError::NewerVersion { found: 2, supported: 1 }), "{e}");
    assert!(e.to_string().contains("newer"), "{e}");

    // Wrong checksum.
    let (mut m, rec) = good_manifest();
    m.parts[0].sha256 = hex(&[0u8; 32]);
    archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m)), (PART_CLUSTER.as_bytes(), &rec)]);
    let e = validate(&p).unwrap_err();
    assert!(matches!(e, FormatError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("checksum mismatch in part cluster.pbd"), "{e}");

    // Path traversal.
    let (m, rec) = good_manifest();
    for bad in [&b"../cluster.pbd"[..], b"/etc/passwd", b"a/../../b"] {
        archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m)), (bad, &rec)]);
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, FormatError::UnsafePath(_)), "{e}");
        assert!(e.to_string().contains("path traversal"), "{e}");
    }

    // A listed part missing.
    let (m, _) = good_manifest();
    archive(&p, &[(MANIFEST.as_bytes(), &manifest_bytes(&m))]);
    assert!(matches!(validate(&p).unwrap_err(), FormatError::Truncated(_)));

    // A corrupt byte inside the compressed stream.
    let p = dir.path().join("flip.tar.gz");
    let mut b = bytes.clone();
    let i = b.len() * 2 / 3;
    b[i] ^= 0x55;
    std::fs::write(&p, &b).unwrap();
    assert!(validate(&p).is_err());
}

#[test]
fn record_reader_refuses_oversized_and_cut_records() {
    let mut buf = Vec::new();
    prost::encoding::encode_varint((MAX_RECORD + 1) as u64, &mut buf);
    let mut r = RecordReader::new(&buf[..]);
    assert_eq!(r.next_record().unwrap_err().kind(), io::ErrorKind::InvalidData);
    let mut buf = Vec::new();
    prost::encoding::encode_varint(10, &mut buf);
    buf.write_all(b"abc").unwrap();
    let mut r = RecordReader::new(&buf[..]);
    assert_eq!(r.next_record().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
}
