//! The restore rules as State applies them, and the small helpers.

use bytes::Bytes;

use super::format::hex;
use super::*;
use crate::state::pb as spb;
use crate::state::{Limits, State, StateError};

fn cmd(c: spb::command::Cmd) -> spb::Command {
    spb::Command { cmd: Some(c) }
}

fn apply(
    st: &mut State,
    now_ms: u64,
    cmds: Vec<spb::Command>,
) -> Vec<Result<crate::state::Applied, StateError>> {
    st.apply_batch(&spb::Batch { now_ms, commands: cmds })
}

fn lock(id: &str, ttl_ms: u64) -> spb::Command {
    cmd(spb::command::Cmd::JobLock(spb::JobLock {
        job: Some(spb::ClusterJob { id: id.into(), kind: "restore".into(), node_id: 1, expires_at_ms: 0 }),
        ttl_ms,
    }))
}

/// Restores `snap` into `st` as a job would: lock, begin, one chunk, end, release.
fn restore(st: &mut State, now_ms: u64, snap: &spb::Snapshot, mode: spb::RestoreMode) {
    let id = "restore-1".to_string();
    let mode = mode as i32;
    let cmds = vec![
        lock(&id, 30_000),
        cmd(spb::command::Cmd::RestoreBegin(spb::RestoreBegin { id: id.clone(), mode })),
        cmd(spb::command::Cmd::RestoreChunk(spb::RestoreChunk {
            id: id.clone(),
            mode,
            sessions: snap.sessions.clone(),
            retained: snap.retained.clone(),
        })),
        cmd(spb::command::Cmd::RestoreEnd(spb::RestoreEnd {
            id: id.clone(),
            mode,
            cluster: snap.cluster.clone(),
            dynsec: Bytes::new(),
        })),
        cmd(spb::command::Cmd::JobRelease(spb::JobRelease { id })),
    ];
    for r in apply(st, now_ms, cmds) {
        r.unwrap();
    }
}

fn open(client: &str, expiry: u32) -> spb::Command {
    cmd(spb::command::Cmd::SessionOpen(spb::SessionOpen {
        client_id: client.into(),
        session_expiry_s: expiry,
        protocol_version: 5,
        ..Default::default()
    }))
}

fn close(client: &str) -> spb::Command {
    cmd(spb::command::Cmd::SessionClose(spb::SessionClose { client_id: client.into(), ..Default::default() }))
}

fn sub(client: &str, filter: &str) -> spb::Command {
    cmd(spb::command::Cmd::Subscribe(spb::Subscribe {
        client_id: client.into(),
        subscriptions: vec![spb::Subscription { filter: filter.into(), qos: 1, ..Default::default() }],
        queue_retained: false,
    }))
}

fn publish(topic: &str, payload: &'static [u8], retain: bool) -> spb::Command {
    cmd(spb::command::Cmd::Publish(spb::Publish {
        message: Some(spb::Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain,
            ..Default::default()
        }),
        ..Default::default()
    }))
}

#[test]
fn replace_into_a_fresh_state_gives_the_same_content_digest() {
    let src = super::format::tests::sample_state();
    let mut dst = State::new(Limits::default());
    // Something to be replaced.
    apply(&mut dst, 500, vec![open("zed", 60), close("zed"), publish("old/r", b"x", true)]);
    restore(&mut dst, 5_000, &src.snapshot(), spb::RestoreMode::Replace);
    assert_eq!(hex(&dst.content_digest()), hex(&src.content_digest()));
    assert!(dst.session("zed").is_none());
    assert!(dst.retained("old/r").is_none());
    assert_ne!(dst.digest(), src.digest(), "the clocks differ; the content does not");
}

#[test]
fn merge_rules_with_both_sides_present() {
    // Backup side.
    let mut b = State::new(Limits::default());
    apply(
        &mut b,
        1_000,
        vec![
            open("both", 100),
            sub("both", "a/#"),
            sub("both", "$share/g/s/#"),
            close("both"),
            open("only-backup", 100),
            sub("only-backup", "x/#"),
            close("only-backup"),
            publish("a/1", b"from-backup", false),
            publish("r/old-here", b"backup-newer", true),
        ],
    );
    // A shared-group copy goes through the shared target.
    apply(
        &mut b,
        1_100,
        vec![cmd(spb::command::Cmd::Publish(spb::Publish {
            message: Some(spb::Message {
                topic: "s/2".into(),
                payload: Bytes::from_static(b"g"),
                qos: 1,
                ..Default::default()
            }),
            shared_targets: vec![spb::SharedTarget {
                client_id: "both".into(),
                filter: "$share/g/s/#".into(),
            }],
            ..Default::default()
        }))],
    );
    apply(&mut b, 9_000, vec![publish("r/new-here", b"backup-older", true)]);

    // Live side.
    let mut live = State::new(Limits::default());
    apply(&mut live, 500, vec![publish("r/old-here", b"live-older", true)]);
    apply(
        &mut live,
        2_000,
        vec![open("both", 7_777), sub("both", "b/#"), close("both"), publish("b/1", b"from-live", false)],
    );
    apply(&mut live, 20_000, vec![publish("r/new-here", b"live-newer", true)]);
    let live_pid: Vec<u16> = live.session("both").unwrap().inflight().map(|e| e.packet_id).collect();
    assert_eq!(live_pid.len(), 1);

    restore(&mut live, 30_000, &b.snapshot(), spb::RestoreMode::Merge);

    let s = live.session("both").unwrap();
    // Kept, not overwritten.
    assert_eq!(s.session_expiry_s(), 7_777);
    // Subscriptions only added.
    let filters: Vec<&str> = s.subscriptions().map(|x| x.filter.as_str()).collect();
    assert_eq!(filters, ["$share/g/s/#", "a/#", "b/#"]);
    // The live in-flight message keeps its packet id; the backup's messages
    // (in flight there, incl. the shared-group copy) are appended.
    let inflight: Vec<(u16, &str)> = s
        .inflight()
        .map(|e| (e.packet_id, std::str::from_utf8(&e.delivery.message.payload).unwrap()))
        .collect();
    let payloads: Vec<&str> = inflight.iter().map(|(_, p)| *p).collect();
    assert_eq!(inflight[0], (live_pid[0], "from-live"));
    assert_eq!(payloads, ["from-live", "from-backup", "g"]);
    // A session only in the backup is added (offline, its subscription routed).
    let ob = live.session("only-backup").unwrap();
    assert!(!ob.online());
    apply(&mut live, 31_000, vec![publish("x/1", b"after", false)]);
    assert_eq!(live.session("only-backup").unwrap().inflight_len(), 1);
    // Retained: the newest wins, both ways.
    assert_eq!(&live.retained("r/old-here").unwrap().payload[..], b"backup-newer");
    assert_eq!(&live.retained("r/new-here").unwrap().payload[..], b"live-newer");
    // Merging the same backup again adds no subscription and no session.
    assert!(live.cluster_job().is_none());
}

#[test]
fn one_job_at_a_time_and_a_lapsed_lock_can_be_taken() {
    let mut st = State::new(Limits::default());
    apply(&mut st, 1_000, vec![lock("a", 30_000)]).remove(0).unwrap();
    let e = apply(&mut st, 2_000, vec![lock("b", 30_000)]).remove(0).unwrap_err();
    assert!(matches!(&e, StateError::Busy(m) if m.contains("restore a is running on node 1")), "{e}");
    // Restore commands of a job that does not hold the lock change nothing.
    let before = st.digest();
    let e = apply(
        &mut st,
        2_000,
        vec![cmd(spb::command::Cmd::RestoreBegin(spb::RestoreBegin { id: "b".into(), mode: 1 }))],
    )
    .remove(0)
    .unwrap_err();
    assert!(matches!(e, StateError::Busy(_)));
    assert_eq!(before, st.digest());
    // Renewal by the holder works; after the TTL another job may take it.
    apply(&mut st, 20_000, vec![lock("a", 30_000)]).remove(0).unwrap();
    assert!(apply(&mut st, 49_000, vec![lock("b", 30_000)]).remove(0).is_err());
    apply(&mut st, 50_001, vec![lock("b", 30_000)]).remove(0).unwrap();
    assert_eq!(st.cluster_job().map(|j| j.id.as_str()), Some("b"));
    // The lock is in the snapshot (replicas agree) but not in the content digest.
    let mut other = State::new(Limits::default());
    apply(&mut other, 50_001, vec![]);
    assert_eq!(st.content_digest(), other.content_digest());
}

#[test]
fn ids_and_names() {
    assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(id_for(1_795_250_124_123), "20261121T083524.123Z");
    let id = id_for(now_ms());
    assert!(valid_id(&id));
    assert_eq!(id_of_file(&file_name(&id)), Some(id.as_str()));
    for bad in ["", "../x", ".hidden", "a/b", "x y"] {
        assert!(!valid_id(bad), "{bad}");
    }
    assert_eq!(id_of_file("raftmq-backup-../x.tar.gz"), None);
}

#[test]
fn restore_targets_are_classified() {
    use super::cli::{classify, Target};
    let dir = tempfile::tempdir().unwrap();
    let id = "20261121T083204.123Z";
    assert_eq!(classify(id, dir.path()), Target::Id(id.into()));
    assert_eq!(classify(&file_name(id), dir.path()), Target::Id(id.into()));
    // The same bare name present in the current folder is that file.
    std::fs::write(dir.path().join(file_name(id)), b"x").unwrap();
    assert_eq!(classify(&file_name(id), dir.path()), Target::File(file_name(id).into()));
    assert_eq!(classify("/tmp/a.tar.gz", dir.path()), Target::File("/tmp/a.tar.gz".into()));
    assert_eq!(classify("./b.tar.gz", dir.path()), Target::File("./b.tar.gz".into()));
    assert_eq!(classify("b.tar.gz", dir.path()), Target::File("b.tar.gz".into()));
}

#[test]
fn a_cancelled_export_leaves_no_file() {
    use super::export::{write_backup, Progress};
    let dir = tempfile::tempdir().unwrap();
    let st = super::format::tests::sample_state();
    let at = SnapshotAt { state: st.snapshot_bytes().into(), log_index: 1, log_term: 1, members: vec![] };
    let out = dir.path().join(file_name("x"));
    let progress = Progress::default();
    progress.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let e = write_backup(&at, &out, 1, &pb::EffectiveConfig::default(), "export", &progress).unwrap_err();
    assert!(matches!(&e, BackupError::Cancelled(m) if m.contains("membership changed")), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
