//! Backup and restore on real clusters of the `raftmq` binary (issue 5,
//! "How it is checked"), driven through `raftmq ctl backup` and the REST API:
//!
//! - round trip: cluster A is filled (persistent sessions with subscriptions
//!   and queued messages, retained messages) and backed up through a
//!   follower; the file is downloaded through a node that does not hold it
//!   (redirect), and restored with `--mode replace` into a fresh cluster B
//!   from a local path (so it is uploaded first): every replica of B reports
//!   the backed-up content digest; clients reconnect with session present and
//!   get their queued messages; retained messages are delivered;
//! - bad files (truncated, wrong magic, newer version, path traversal,
//!   wrong checksum) are refused with what is wrong, and B does not change;
//! - one job at a time: while another job holds the cluster lock, a backup
//!   request gets 409 naming it;
//! - live merge into B with a client connected: every conflict rule with
//!   both sides present;
//! - `restore` accepts an id, a bare file name, a relative and an absolute
//!   path of a file in the node's backup folder (no upload then).
//!
//! Every wait is on a condition with a deadline.

mod cluster;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message as _;
use serde::Deserialize;

use cluster::mqtt::{puback, Client, Conn, Pkt, Pub};
use cluster::{http_get, wait_for, Cluster, Opts};

const WAIT: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
struct Digest {
    content_digest: String,
    sessions: u64,
    retained: u64,
}

async fn digest(c: &Cluster, id: u64) -> Option<Digest> {
    let (status, body) = http_get(c.node(id).admin, "/api/v1/state/digest").await?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// Waits until every node of `c` reports `content` as its content digest.
async fn converged(c: &Cluster, content: &str) {
    let ids = c.ids();
    wait_for(&format!("every replica at content digest {content}"), WAIT, || async {
        for &id in &ids {
            if digest(c, id).await?.content_digest != content {
                return None;
            }
        }
        Some(())
    })
    .await;
}

async fn ctl(c: &Cluster, via: u64, args: &[&str]) -> String {
    let (ok, out) = c.ctl_async(via, args).await;
    if !ok {
        c.print_logs(40);
        panic!("ctl {args:?} via node {via} failed: {out}");
    }
    out
}

async fn ctl_fails(c: &Cluster, via: u64, args: &[&str]) -> String {
    let (ok, out) = c.ctl_async(via, args).await;
    assert!(!ok, "ctl {args:?} should fail, printed: {out}");
    out
}

async fn connect(c: &Cluster, conn: &Conn) -> (Client, bool) {
    match c.connect_leader(conn, WAIT).await {
        Ok((cl, present, _)) => (cl, present),
        Err(e) => panic!("{e}"),
    }
}

/// A persistent MQTT 5 session `id` (new, or resumed with `resume`)
/// subscribed to `filter`, then disconnected.
async fn persistent_subscriber(c: &Cluster, id: &str, filter: &str, resume: bool) {
    let (mut cl, _) = connect(c, &Conn::v5(id).persistent().clean(!resume)).await;
    let (codes, _) = cl.subscribe(1, filter, 1, STEP).await.expect("subscribe");
    assert_eq!(codes, vec![1]);
    cl.disconnect().await;
}

async fn publish(c: &Cluster, msgs: &[(&str, &str, bool)]) {
    let (mut cl, _) = connect(c, &Conn::v5("publisher")).await;
    for (i, (topic, payload, retain)) in msgs.iter().enumerate() {
        let p = Pub::new(topic, payload.as_bytes(), 1, i as u16 + 1).retain(*retain);
        cl.publish_acked(&p, STEP).await.expect("publish");
    }
    cl.disconnect().await;
}

/// Receives PUBLISHes (acknowledging them) until `want` distinct payloads
/// arrived; returns topic -> payload.
async fn receive(cl: &mut Client, want: usize) -> BTreeMap<String, String> {
    let mut got = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match cl.recv(left).await {
            Ok(Some(Pkt::Publish(p))) => {
                if let Some(pid) = p.pid {
                    cl.send(&puback(pid)).await.expect("puback");
                }
                got.insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).to_string());
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("only {got:?} of {want} messages within {WAIT:?}"),
            Err(e) => panic!("receive: {e} (got {got:?})"),
        }
    }
    got
}

/// Retained messages under `filter`, as a new subscriber gets them.
async fn retained(c: &Cluster, filter: &str, want: usize) -> BTreeMap<String, String> {
    let (mut cl, _) = connect(c, &Conn::v5("retained-reader")).await;
    let (_, early) = cl.subscribe(1, filter, 1, STEP).await.expect("subscribe");
    let mut got: BTreeMap<String, String> = early
        .into_iter()
        .filter_map(|p| match p {
            Pkt::Publish(p) => Some((p.topic, String::from_utf8_lossy(&p.payload).to_string())),
            _ => None,
        })
        .collect();
    if got.len() < want {
        got.extend(receive(&mut cl, want - got.len()).await);
    }
    cl.disconnect().await;
    got
}

fn backup_id(out: &str) -> String {
    // "backup ID written on node N: ..." / "uploaded as backup ID on node N"
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "backup").expect("an id in the output");
    words[i + 1].to_string()
}

async fn inspect(c: &Cluster, via: u64, id: &str) -> serde_json::Value {
    let out = ctl(c, via, &["backup", "inspect", id]).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect output {out}: {e}"))
}

async fn leader_and_follower(c: &Cluster) -> (u64, u64) {
    let leader = c.leader(WAIT).await;
    let follower = c.ids().into_iter().find(|&i| i != leader).expect("a follower");
    (leader, follower)
}

/// A tar.gz with raw entry names (unsafe ones included).
fn archive(path: &Path, entries: &[(&[u8], Vec<u8>)]) {
    let f = std::fs::File::create(path).expect("create");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::fast()));
    for (name, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, &data[..]).expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gz");
}

/// The parts of a real backup, to rebuild altered copies of it.
fn entries_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = std::fs::File::open(path).expect("open");
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut out = Vec::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = String::from_utf8_lossy(&e.path_bytes()).to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        out.push((name, data));
    }
    out
}

/// Bad copies of `good`, each with the words its refusal must contain.
fn bad_files(dir: &Path, good: &Path) -> Vec<(PathBuf, &'static str)> {
    let bytes = std::fs::read(good).expect("read");
    let mut out = Vec::new();
    let p = dir.join("truncated.tar.gz");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).expect("write");
    out.push((p, "truncated"));
    let p = dir.join("magic.tar.gz");
    let mut b = bytes.clone();
    b[1] = 0;
    std::fs::write(&p, &b).expect("write");
    out.push((p, "wrong magic"));

    let entries = entries_of(good);
    let manifest = raftmq::backup::pb::Manifest::decode(&entries[0].1[..]).expect("manifest");
    let rebuild = |name: &str, m: &raftmq::backup::pb::Manifest, rename: Option<&[u8]>| {
        let p = dir.join(name);
        let mut es: Vec<(&[u8], Vec<u8>)> = vec![(b"manifest.pb", m.encode_to_vec())];
        for (i, (n, d)) in entries.iter().enumerate().skip(1) {
            let n: &[u8] = if i == 1 { rename.unwrap_or(n.as_bytes()) } else { n.as_bytes() };
            es.push((n, d.clone()));
        }
        archive(&p, &es);
        p
    };
    let mut newer = manifest.clone();
    newer.format_version += 1;
    out.push((rebuild("newer.tar.gz", &newer, None), "newer than this raftmq reads"));
    let mut sum = manifest.clone();
    sum.parts[0].sha256 = "00".repeat(32);
    out.push((rebuild("checksum.tar.gz", &sum, None), "checksum mismatch"));
    out.push((rebuild("traversal.tar.gz", &manifest, Some(b"../../sessions.pbd")), "path traversal"));
    let p = dir.join("foreign.tar.gz");
    archive(&p, &[(b"notes.txt", b"hello".to_vec())]);
    out.push((p, "not a raftmq backup"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_replace_merge_and_bad_files() {
    let a = Cluster::start(&Opts::three()).await;
    let (a_leader, a_follower) = leader_and_follower(&a).await;
    let work = tempfile::tempdir().expect("tempdir");

    // ---- fill A
    for s in ["s1", "s2", "s3"] {
        persistent_subscriber(&a, s, &format!("q/{s}/#"), false).await;
    }
    publish(
        &a,
        &[
            ("q/s1/0", "a", false),
            ("q/s1/1", "b", false),
            ("q/s2/0", "c", false),
            ("q/s2/1", "d", false),
            ("q/s3/0", "e", false),
            ("r/1", "A1", true),
            ("r/2", "A2", true),
            ("r/3", "A3", true),
        ],
    )
    .await;

    // Dynamic security too: Mosquitto's `dynsec init` file (admin/adminpass),
    // with every default access open so the anonymous test clients keep working.
    let dynsec = work.path().join("dynsec.json");
    let made = std::process::Command::new("/usr/bin/mosquitto_ctrl")
        .args(["dynsec", "init", &dynsec.display().to_string(), "admin", "adminpass"])
        .output()
        .expect("mosquitto_ctrl");
    assert!(made.status.success(), "mosquitto_ctrl dynsec init: {made:?}");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dynsec).expect("dynsec file")).expect("dynsec JSON");
    doc["defaultACLAccess"] = serde_json::json!({
        "publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true
    });
    std::fs::write(&dynsec, doc.to_string()).expect("write dynsec file");
    ctl(&a, a_leader, &["dynsec", "import", &dynsec.display().to_string()]).await;

    // ---- back up through a follower (it proposes through the leader)
    let out = ctl(&a, a_follower, &["backup", "create"]).await;
    let bk1 = backup_id(&out);
    assert!(out.contains("sessions=3") && out.contains("retained=3"), "{out}");
    let m = inspect(&a, a_leader, &bk1).await; // held by the follower: redirected
    let content = m["manifest"]["content_digest"].as_str().expect("digest").to_string();
    assert_eq!(m["manifest"]["nodes"].as_array().map(|n| n.len()), Some(3));
    assert_eq!(m["info"]["node_id"].as_u64(), Some(a_follower));
    let a_digest = digest(&a, a_leader).await.expect("digest");
    assert_eq!(a_digest.content_digest, content, "nothing changed A since the backup");
    let list = ctl(&a, a_leader, &["backup", "list"]).await;
    assert!(list.contains(&bk1) && list.contains("complete"), "{list}");

    // Downloaded through the leader (redirected to the follower holding it).
    let file = work.path().join("bk1.tar.gz");
    let file_s = file.display().to_string();
    ctl(&a, a_leader, &["backup", "download", &bk1, "-o", &file_s]).await;
    let held = a.node(a_follower).data_dir.join("backup").join(format!("raftmq-backup-{bk1}.tar.gz"));
    assert_eq!(std::fs::read(&file).expect("downloaded"), std::fs::read(&held).expect("held"));

    // ---- one job at a time: another job holds the lock -> 409 naming it
    let holder = raftmq::state::pb::ClusterJob {
        id: "test-holder".into(),
        kind: "restore".into(),
        node_id: 9,
        expires_at_ms: 0,
    };
    let lock = raftmq::state::pb::Command {
        cmd: Some(raftmq::state::pb::command::Cmd::JobLock(raftmq::state::pb::JobLock {
            job: Some(holder),
            ttl_ms: 60_000,
        })),
    };
    let release = raftmq::state::pb::Command {
        cmd: Some(raftmq::state::pb::command::Cmd::JobRelease(raftmq::state::pb::JobRelease {
            id: "test-holder".into(),
        })),
    };
    let propose = |cmd: raftmq::state::pb::Command| {
        let admin = a.node(a_leader).admin.to_string();
        async move {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
            let batch = raftmq::state::pb::Batch { now_ms: now.as_millis() as u64, commands: vec![cmd] };
            let r = raftmq::admin::client::request(
                &admin,
                hyper::Method::POST,
                "/api/v1/backups/internal/propose",
                None,
                &[],
                Some(batch.encode_to_vec().into()),
                STEP,
            )
            .await
            .expect("propose");
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    };
    propose(lock).await;
    let busy = ctl_fails(&a, a_follower, &["backup", "create"]).await;
    assert!(busy.contains("HTTP 409") && busy.contains("restore test-holder is running on node 9"), "{busy}");
    propose(release).await;
    // The internal route takes nothing but backup commands.
    let other = raftmq::state::pb::Batch {
        now_ms: 1,
        commands: vec![raftmq::state::pb::Command {
            cmd: Some(raftmq::state::pb::command::Cmd::Tick(raftmq::state::pb::Tick {})),
        }],
    };
    let r = raftmq::admin::client::request(
        &a.node(a_leader).admin.to_string(),
        hyper::Method::POST,
        "/api/v1/backups/internal/propose",
        None,
        &[],
        Some(other.encode_to_vec().into()),
        STEP,
    )
    .await
    .expect("request");
    assert_eq!(r.status, 400);

    // ---- replace into a fresh cluster B, from a local file (uploaded first)
    let b = Cluster::start(&Opts::three()).await;
    let (b_leader, b_follower) = leader_and_follower(&b).await;
    let empty = digest(&b, b_leader).await.expect("digest");
    assert_eq!((empty.sessions, empty.retained), (0, 0));

    // Bad files are refused with what is wrong; B does not change.
    for (bad, words) in bad_files(work.path(), &file) {
        let p = bad.display().to_string();
        let out = ctl_fails(&b, b_follower, &["backup", "restore", &p, "--mode", "replace"]).await;
        assert!(out.contains(words), "{p}: expected {words:?} in: {out}");
    }
    let after_bad = digest(&b, b_leader).await.expect("digest");
    assert_eq!(after_bad.content_digest, empty.content_digest);
    let listed = ctl(&b, b_leader, &["backup", "list", "--json"]).await;
    assert!(listed.contains("\"backups\":[]"), "refused uploads are not kept: {listed}");

    let out = ctl(&b, b_follower, &["backup", "restore", &file_s, "--mode", "replace"]).await;
    assert!(out.contains("sessions=3") && out.contains("retained=3"), "{out}");
    converged(&b, &content).await;

    // Clients come back with their sessions and queued messages.
    for (s, want) in [("s1", 2), ("s2", 2), ("s3", 1)] {
        let (mut cl, present) = connect(&b, &Conn::v5(s).persistent().clean(false)).await;
        assert!(present, "{s}: session present after the restore");
        let got = receive(&mut cl, want).await;
        assert!(got.keys().all(|t| t.starts_with(&format!("q/{s}/"))), "{s}: {got:?}");
        cl.disconnect().await;
    }
    let r = retained(&b, "r/#", 3).await;
    assert_eq!(r.values().cloned().collect::<Vec<_>>(), ["A1", "A2", "A3"]);
    // Users log in on B with the passwords they had on A (hashes carried over).
    let (b_now, _) = leader_and_follower(&b).await;
    let port = b.node(b_now).mqtt.port().to_string();
    for (password, code) in [("adminpass", 0), ("wrong", 135)] {
        let out = std::process::Command::new("/usr/bin/mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-u", "admin", "-P", password])
            .args(["-t", "$CONTROL/dynamic-security/v1/other", "-m", "x", "-q", "1"])
            .output()
            .expect("mosquitto_pub");
        assert_eq!(out.status.code(), Some(code), "admin with {password:?} on B: {out:?}");
    }

    // ---- live merge into B with a connected client: both sides present
    // A (the backup side) moves on: r/2 newer there, s1 gains a subscription
    // and a queued message, a session only A has.
    publish(&a, &[("r/2", "A2-newer", true)]).await;
    persistent_subscriber(&a, "s1", "extra/#", true).await;
    persistent_subscriber(&a, "only-a", "oa/#", false).await;
    publish(&a, &[("q/s1/2", "A-queued", false), ("oa/1", "for-only-a", false)]).await;
    // B (live) : r/1 newer here (set after A's r/2), s1 connected with a
    // subscription of its own.
    publish(&b, &[("r/1", "B1-newer", true)]).await;
    let (mut s1, present) = connect(&b, &Conn::v5("s1").persistent().clean(false)).await;
    assert!(present);
    s1.subscribe(2, "bonly/#", 1, STEP).await.expect("subscribe");
    let out = ctl(&a, a_leader, &["backup", "create"]).await;
    let bk2 = backup_id(&out);
    let file2 = work.path().join("bk2.tar.gz");
    let file2_s = file2.display().to_string();
    ctl(&a, a_leader, &["backup", "download", &bk2, "-o", &file2_s]).await;
    // Replace is refused while a persistent session is connected.
    let out = ctl_fails(&b, b_leader, &["backup", "restore", &file2_s, "--mode", "replace"]).await;
    assert!(out.contains("HTTP 409") && out.contains("without connected persistent sessions"), "{out}");
    let out = ctl(&b, b_leader, &["backup", "restore", &file2_s]).await; // merge by default
    assert!(out.contains("(merge)"), "{out}");

    // Existing session kept (still connected), subscriptions only added, the
    // backed-up queue appended: the live client gets A's queued message.
    let got = receive(&mut s1, 3).await;
    assert_eq!(got.get("q/s1/2").map(String::as_str), Some("A-queued"), "{got:?}");
    publish(&b, &[("extra/1", "x", false), ("bonly/1", "y", false)]).await;
    let got = receive(&mut s1, 2).await;
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), ["bonly/1", "extra/1"]);
    s1.disconnect().await;
    // A session only in the backup is added with its queue.
    let (mut oa, present) = connect(&b, &Conn::v5("only-a").persistent().clean(false)).await;
    assert!(present);
    assert_eq!(receive(&mut oa, 1).await.get("oa/1").map(String::as_str), Some("for-only-a"));
    oa.disconnect().await;
    // Retained: the newest wins, each way.
    let r = retained(&b, "r/#", 3).await;
    assert_eq!(r.get("r/1").map(String::as_str), Some("B1-newer"));
    assert_eq!(r.get("r/2").map(String::as_str), Some("A2-newer"));
    assert_eq!(r.get("r/3").map(String::as_str), Some("A3"));

    // ---- path forms on A: id, bare file name, relative, absolute path of a
    // file in the node's backup folder: restored without an upload.
    let folder = a.node(a_follower).data_dir.join("backup");
    let name = format!("raftmq-backup-{bk1}.tar.gz");
    let abs = folder.join(&name).display().to_string();
    let url = format!("http://{}", a.node(a_follower).admin);
    for arg in [bk1.clone(), name.clone(), format!("./{name}"), abs] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .current_dir(if arg.starts_with("./") { folder.clone() } else { work.path().to_path_buf() })
            .args(["ctl", "--url", &url, "backup", "restore", &arg])
            .output()
            .expect("spawn");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "restore {arg}: {text}");
        assert!(text.contains(&format!("restored {bk1} (merge)")), "restore {arg}: {text}");
    }
    let list = ctl(&a, a_leader, &["backup", "list", "--json"]).await;
    let n = list.matches("\"id\"").count();
    assert_eq!(n, 2, "no upload happened (bk1, bk2 only): {list}");

    // Delete.
    ctl(&a, a_leader, &["backup", "delete", &bk2]).await;
    let list = ctl(&a, a_leader, &["backup", "list"]).await;
    assert!(!list.contains(&bk2), "{list}");
}

async fn metric(c: &Cluster, id: u64, name: &str) -> Option<f64> {
    let (_, body) = http_get(c.node(id).admin, "/metrics").await?;
    body.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Disaster recovery: with two of three nodes gone the survivor says so (log
/// and metric); `raftmq recover` reads the stopped nodes' data folders
/// offline into one backup that a fresh cluster restores (replace) to the
/// same content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_warning_and_offline_recovery() {
    let mut a = Cluster::start(&Opts::three()).await;
    let leader = a.leader(WAIT).await;
    for s in ["d1", "d2"] {
        persistent_subscriber(&a, s, &format!("q/{s}/#"), false).await;
    }
    publish(&a, &[("q/d1/0", "x", false), ("q/d2/0", "y", false), ("r/d", "kept", true)]).await;
    let before = digest(&a, leader).await.expect("digest").content_digest;
    converged(&a, &before).await;
    assert_eq!(metric(&a, leader, "raftmq_raft_quorum_reachable").await, Some(1.0));

    // Lose the quorum: the survivor warns and reports 0.
    let survivor = leader;
    for id in a.ids().into_iter().filter(|&i| i != survivor) {
        a.kill9(id);
    }
    wait_for("raftmq_raft_quorum_reachable 0 on the survivor", WAIT, || async {
        (metric(&a, survivor, "raftmq_raft_quorum_reachable").await? == 0.0).then_some(())
    })
    .await;
    wait_for("the no-quorum warning in the survivor's log", WAIT, || async {
        a.node(survivor).log_text().contains("NO QUORUM REACHABLE").then_some(())
    })
    .await;
    a.kill9(survivor);

    // Offline: the stopped nodes' folders -> one backup.
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("recovered.tar.gz");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_raftmq"));
    cmd.arg("recover").arg("-o").arg(&out);
    for id in a.ids() {
        cmd.arg("--data-dir").arg(&a.node(id).data_dir);
    }
    let res = cmd.output().expect("spawn recover");
    let text = format!("{}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success(), "{text}");
    assert!(text.contains("2 sessions, 1 retained messages"), "{text}");

    // A fresh cluster (here one node) restores it and holds the same content.
    let b = Cluster::start(&Opts { nodes: 1, ..Opts::three() }).await;
    b.leader(WAIT).await;
    let f = out.display().to_string();
    ctl(&b, 1, &["backup", "restore", &f, "--mode", "replace"]).await;
    converged(&b, &before).await;
    let (mut cl, present) = connect(&b, &Conn::v5("d1").persistent().clean(false)).await;
    assert!(present);
    assert_eq!(receive(&mut cl, 1).await.get("q/d1/0").map(String::as_str), Some("x"));
    cl.disconnect().await;

    // Last resort: restart the old cluster from the survivor alone.
    let data = a.node(survivor).data_dir.clone();
    let aside = work.path().join("survivor-data");
    std::fs::rename(&data, &aside).expect("move the survivor's data aside");
    let id = survivor.to_string();
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_raftmq"))
        .args(["recover", "--data-dir"])
        .arg(&aside)
        .arg("--force-new-cluster")
        .arg(&data)
        .args(["--node-id", &id])
        .output()
        .expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    assert!(!res.status.success(), "refused without --i-accept-data-loss: {text}");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_raftmq"))
        .args(["recover", "--data-dir"])
        .arg(&aside)
        .arg("--force-new-cluster")
        .arg(&data)
        .args(["--node-id", &id, "--i-accept-data-loss"])
        .output()
        .expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success() && text.contains("WARNING: FORCING A NEW CLUSTER"), "{text}");
    a.restart(survivor).await;
    a.wait_leader_is(survivor, WAIT).await;
    assert_eq!(digest(&a, survivor).await.expect("digest").content_digest, before);
    let (mut cl, present) = connect(&a, &Conn::v5("d2").persistent().clean(false)).await;
    assert!(present);
    assert_eq!(receive(&mut cl, 1).await.get("q/d2/0").map(String::as_str), Some("y"));
    cl.disconnect().await;
}

/// Scheduled backups: every `interval_s` the leader takes one; only the
/// newest `retain` are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_with_retention() {
    let opts = Opts { nodes: 1, ..Opts::three() }.extra(1, "[backup]\ninterval_s = 1\nretain = 2");
    let c = Cluster::start(&opts).await;
    c.leader(WAIT).await;
    let folder = c.node(1).data_dir.join("backup");
    let files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&folder)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        v.retain(|n| n.starts_with("raftmq-backup-") && n.ends_with(".tar.gz"));
        v.sort();
        v
    };
    let first = wait_for("a first scheduled backup", WAIT, || async { files().first().cloned() }).await;
    // Two more later: the first is gone by retention, two remain.
    wait_for("retention to delete the first backup", WAIT, || async {
        let f = files();
        (f.len() == 2 && !f.contains(&first)).then_some(())
    })
    .await;
    // The line is written just after the file is removed.
    wait_for("the retention line in the log", WAIT, || async {
        c.node(1).log_text().contains("deleted an old backup (retention)").then_some(())
    })
    .await;
}
