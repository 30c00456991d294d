//! Failover of a three-node cluster of real `raftmq` processes on loopback
//! (issue 3, "How it is checked"): kill -9 of the leader under QoS 1 and
//! QoS 2 traffic to persistent sessions, a follower catching up from a
//! snapshot, start order, and what a follower answers to CONNECT.
//!
//! Every test builds its own cluster (tests/cluster/mod.rs). Clients find the
//! leader the way a load balancer does, through `/health/leader`, and follow a
//! CONNACK 0x9C's Server Reference.

mod cluster;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use cluster::mqtt::{self, Client, Conn, Pkt, Pub};
use cluster::{wait_for, Cluster, Endpoints, Opts};

const LEADER_WAIT: Duration = Duration::from_secs(10);
const RECONNECT_WAIT: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_secs(5);
/// For a publisher's first acknowledgements before a kill: sequential QoS 2
/// exchanges (two commits each) took over 100 ms apiece in a full suite run
/// on a loaded two-core box (eight three-node clusters at once).
const PROGRESS_WAIT: Duration = Duration::from_secs(30);

fn num_of(p: &Pub) -> Option<u32> {
    std::str::from_utf8(&p.payload).ok()?.parse().ok()
}

/// What a persistent subscriber saw.
#[derive(Default)]
struct SubLog {
    /// Message number -> times handed to the application.
    got: BTreeMap<u32, u32>,
    /// Every PUBLISH received, per number: (connection #, packet id, DUP,
    /// handed on). Printed when a check fails.
    trace: BTreeMap<u32, Vec<(usize, u16, bool, bool)>>,
    /// Every PUBREL received: (connection #, packet id).
    rels: Vec<(usize, u16)>,
    /// Session Present of every reconnect after the first connection.
    resumed: Vec<bool>,
    errors: Vec<String>,
    /// When set, the next PUBREL received is signalled here (after the
    /// PUBCOMP is sent), so a test can kill the leader at that moment.
    on_pubrel: Option<Arc<tokio::sync::Notify>>,
}

/// A persistent subscriber that acknowledges everything (QoS 1: PUBACK; QoS 2:
/// PUBREC then PUBCOMP on PUBREL) and reconnects to the leader whenever its
/// connection drops, with Clean Start 0. QoS 2 is received as MQTT 4.3.3
/// "method B" says: a PUBLISH whose packet id has a PUBREC outstanding (no
/// PUBREL yet) is a duplicate and not handed on; that state survives
/// reconnects, as a client's session state must.
async fn run_subscriber(
    ep: Endpoints,
    mut cl: Client,
    conn: Conn,
    log: Arc<Mutex<SubLog>>,
    stop: Arc<AtomicBool>,
) {
    let mut awaiting_rel: HashSet<u16> = HashSet::new();
    let resume = conn.clean(false);
    loop {
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match cl.recv(Duration::from_millis(100)).await {
                Ok(Some(Pkt::Publish(p))) => {
                    let Some(n) = num_of(&p) else {
                        log.lock().errors.push(format!("bad payload {:?}", p.payload));
                        continue;
                    };
                    let pid = p.pid.unwrap_or(0);
                    let conn_no = log.lock().resumed.len();
                    let fresh = p.qos != 2 || !awaiting_rel.contains(&pid);
                    log.lock().trace.entry(n).or_default().push((conn_no, pid, p.dup, fresh));
                    let ok = match p.qos {
                        1 => {
                            *log.lock().got.entry(n).or_default() += 1;
                            cl.send(&mqtt::puback(pid)).await
                        }
                        2 => {
                            if awaiting_rel.insert(pid) {
                                *log.lock().got.entry(n).or_default() += 1;
                            }
                            cl.send(&mqtt::pubrec(pid)).await
                        }
                        _ => {
                            *log.lock().got.entry(n).or_default() += 1;
                            Ok(())
                        }
                    };
                    if ok.is_err() {
                        break;
                    }
                }
                Ok(Some(Pkt::PubRel { pid })) => {
                    awaiting_rel.remove(&pid);
                    let conn_no = log.lock().resumed.len();
                    log.lock().rels.push((conn_no, pid));
                    if cl.send(&mqtt::pubcomp(pid)).await.is_err() {
                        break;
                    }
                    if let Some(n) = log.lock().on_pubrel.take() {
                        n.notify_one();
                    }
                }
                Ok(Some(Pkt::Disconnect { .. })) | Err(_) => break,
                Ok(Some(_)) | Ok(None) => {}
            }
        }
        match ep.connect_leader(&resume, RECONNECT_WAIT).await {
            Ok((c, present, _)) => {
                log.lock().resumed.push(present);
                cl = c;
            }
            Err(e) => {
                log.lock().errors.push(e);
                return;
            }
        }
    }
}

/// A QoS 1 publisher with up to `window` messages in flight, numbered from 0;
/// on a lost connection it reconnects to the leader and goes on with new
/// numbers (what was not acknowledged is not counted). Returns when `stop` is
/// set and the in-flight messages are answered (or the connection is gone).
async fn run_qos1_publisher(
    ep: Endpoints,
    topic: String,
    window: usize,
    acked: Arc<Mutex<BTreeSet<u32>>>,
    stop: Arc<AtomicBool>,
) -> Result<u32, String> {
    let conn = Conn::v5("pub-q1");
    let mut next = 0u32;
    let mut pid: u16 = 0;
    loop {
        let (mut cl, _, _) = ep.connect_leader(&conn, RECONNECT_WAIT).await?;
        let mut inflight: HashMap<u16, u32> = HashMap::new();
        'conn: loop {
            let stopping = stop.load(Ordering::SeqCst);
            if stopping && inflight.is_empty() {
                return Ok(next);
            }
            while !stopping && inflight.len() < window {
                pid = if pid == u16::MAX { 1 } else { pid + 1 };
                let p = Pub::new(&topic, next.to_string().as_bytes(), 1, pid);
                if cl.publish(&p).await.is_err() {
                    break 'conn;
                }
                inflight.insert(pid, next);
                next += 1;
            }
            match cl.recv(Duration::from_millis(500)).await {
                Ok(Some(Pkt::PubAck { pid, code })) => {
                    if let Some(n) = inflight.remove(&pid) {
                        if code < 0x80 {
                            acked.lock().insert(n);
                        }
                    }
                }
                Ok(Some(Pkt::Disconnect { .. })) | Err(_) => break 'conn,
                Ok(Some(_)) => {}
                Ok(None) if stopping => return Ok(next),
                Ok(None) => {}
            }
        }
    }
}

async fn wait_count(what: &str, set: &Arc<Mutex<BTreeSet<u32>>>, n: usize, timeout: Duration) {
    wait_for(what, timeout, || {
        let len = set.lock().len();
        async move { (len >= n).then_some(()) }
    })
    .await;
}

/// Waits until the subscriber has every acknowledged number; panics with the
/// missing ones.
async fn wait_delivered(acked: &BTreeSet<u32>, log: &Arc<Mutex<SubLog>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: Vec<u32> = {
            let l = log.lock();
            acked.iter().copied().filter(|n| !l.got.contains_key(n)).collect()
        };
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let errors = log.lock().errors.clone();
            panic!(
                "{} of {} acknowledged messages never reached the subscriber (first: {:?}); subscriber errors: {errors:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subscribes a fresh client to `filter` on the leader and collects the
/// retained messages it gets: topic -> payload.
async fn retained(c: &Cluster, filter: &str, expect: usize) -> (BTreeMap<String, Vec<u8>>, u64) {
    let id = format!("retained-check-{}", filter.len());
    let (mut cl, _, node) = match c.connect_leader(&Conn::v5(&id), RECONNECT_WAIT).await {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let (codes, early) = match cl.subscribe(1, filter, 1, STEP).await {
        Ok(r) => r,
        Err(e) => panic!("subscribe {filter}: {e}"),
    };
    assert_eq!(codes, vec![1], "SUBACK for {filter}");
    let mut out = BTreeMap::new();
    let handle = |p: Pkt, out: &mut BTreeMap<String, Vec<u8>>| {
        if let Pkt::Publish(p) = p {
            assert!(p.retain, "a retained message arrives with RETAIN set: {p:?}");
            out.insert(p.topic.clone(), p.payload.clone());
            p.pid
        } else {
            None
        }
    };
    for p in early {
        if let Some(pid) = handle(p, &mut out) {
            let _ = cl.send(&mqtt::puback(pid)).await;
        }
    }
    let deadline = Instant::now() + STEP;
    while out.len() < expect && Instant::now() < deadline {
        match cl.recv(deadline.saturating_duration_since(Instant::now())).await {
            Ok(Some(p)) => {
                if let Some(pid) = handle(p, &mut out) {
                    let _ = cl.send(&mqtt::puback(pid)).await;
                }
            }
            Ok(None) => break,
            Err(e) => panic!("retained check connection: {e}"),
        }
    }
    cl.disconnect().await;
    (out, node)
}

/// Connects `conn` (first connection, Clean Start 1) and subscribes `filter`.
async fn subscriber(c: &Cluster, conn: &Conn, filter: &str, qos: u8) -> Client {
    let (mut cl, present, _) = match c.connect_leader(conn, RECONNECT_WAIT).await {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert!(!present, "a fresh cluster has no session for {}", conn.client_id);
    match cl.subscribe(1, filter, qos, STEP).await {
        Ok((codes, _)) => assert_eq!(codes, vec![qos], "SUBACK for {filter}"),
        Err(e) => panic!("subscribe: {e}"),
    }
    cl
}

// ---------------------------------------------------------------- (a)

/// kill -9 of the leader while a QoS 1 publisher streams to a persistent
/// MQTT 3.1.1 subscriber (clean session 0): every PUBACKed message reaches
/// it (duplicates allowed), its session and subscription survive (it never
/// subscribes again), and a retained message set before the failover is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_loses_no_acknowledged_qos1_message() {
    let c = Cluster::start(&Opts::three()).await;
    let l1 = c.leader(LEADER_WAIT).await;

    let conn = Conn::v3("sub-q1").persistent();
    let sub = subscriber(&c, &conn, "t/#", 1).await;

    // A retained message, acknowledged before the failover.
    let (mut rc, _, _) =
        c.connect_leader(&Conn::v5("retainer"), RECONNECT_WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    rc.publish_acked(&Pub::new("r/keep", b"kept", 1, 1).retain(true), STEP)
        .await
        .unwrap_or_else(|e| panic!("retained publish: {e}"));
    rc.disconnect().await;

    let log = Arc::new(Mutex::new(SubLog::default()));
    let stop_sub = Arc::new(AtomicBool::new(false));
    let sub_task = tokio::spawn(run_subscriber(c.ep(), sub, conn.clone(), log.clone(), stop_sub.clone()));

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let pub_task =
        tokio::spawn(run_qos1_publisher(c.ep(), "t/a".into(), 16, acked.clone(), stop_pub.clone()));

    wait_count("100 PUBACKs before the kill", &acked, 100, PROGRESS_WAIT).await;
    let mut c = c;
    c.kill9(l1);
    let before = acked.lock().len();
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != l1).collect();
    let l2 = c.leader_among(&others, LEADER_WAIT).await;
    wait_count("100 PUBACKs after the failover", &acked, before + 100, RECONNECT_WAIT).await;
    stop_pub.store(true, Ordering::SeqCst);
    let published = match pub_task.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => panic!("publisher: {e}"),
        Err(e) => panic!("publisher task: {e}"),
    };
    let acked: BTreeSet<u32> = acked.lock().clone();
    eprintln!("published {published}, acknowledged {}; leader {l1} -> {l2}", acked.len());

    wait_delivered(&acked, &log, RECONNECT_WAIT).await;
    stop_sub.store(true, Ordering::SeqCst);
    let _ = sub_task.await;
    {
        let l = log.lock();
        assert!(l.errors.is_empty(), "subscriber errors: {:?}", l.errors);
        assert!(!l.resumed.is_empty(), "the subscriber was never disconnected by the failover");
        assert!(l.resumed.iter().all(|&p| p), "session present on every reconnect: {:?}", l.resumed);
        let dups = l.got.values().filter(|&&n| n > 1).count();
        eprintln!("subscriber got {} distinct messages, {dups} more than once", l.got.len());
    }

    let (r, _) = retained(&c, "r/#", 1).await;
    assert_eq!(r.get("r/keep").map(Vec::as_slice), Some(&b"kept"[..]), "retained message after the failover");
}

// ---------------------------------------------------------------- (b)

/// QoS 2 across a failover: a persistent MQTT 5 publisher (sequential,
/// numbered messages, resending PUBLISH with DUP or PUBREL on resume as MQTT
/// requires) and a persistent QoS 2 subscriber: no number delivered twice,
/// none that got a PUBREC lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_exactly_once_across_failover() {
    let mut c = Cluster::start(&Opts::three()).await;
    let l1 = c.leader(LEADER_WAIT).await;

    let sconn = Conn::v5("sub-q2").persistent();
    let sub = subscriber(&c, &sconn, "q/#", 2).await;
    let log = Arc::new(Mutex::new(SubLog::default()));
    let stop_sub = Arc::new(AtomicBool::new(false));
    let sub_task = tokio::spawn(run_subscriber(c.ep(), sub, sconn.clone(), log.clone(), stop_sub.clone()));

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let pub_task = tokio::spawn(run_qos2_publisher(c.ep(), acked.clone(), stop_pub.clone()));

    wait_count("50 PUBRECs before the kill", &acked, 50, PROGRESS_WAIT).await;
    // Kill the leader right after it completed a delivery to the subscriber
    // (PUBREC, PUBREL, PUBCOMP): the moment where the subscriber's QoS 2
    // state matters most. MQTT 4.3.3: once the server sent PUBREL it must
    // never send that PUBLISH again.
    let rel = Arc::new(tokio::sync::Notify::new());
    log.lock().on_pubrel = Some(rel.clone());
    if tokio::time::timeout(STEP, rel.notified()).await.is_err() {
        panic!("no PUBREL reached the subscriber within {STEP:?}");
    }
    c.kill9(l1);
    let before = acked.lock().len();
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != l1).collect();
    let l2 = c.leader_among(&others, LEADER_WAIT).await;
    wait_count("50 PUBRECs after the failover", &acked, before + 50, RECONNECT_WAIT).await;
    stop_pub.store(true, Ordering::SeqCst);
    let (published, resumed, pub_resends) = match pub_task.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("publisher: {e}"),
        Err(e) => panic!("publisher task: {e}"),
    };
    let acked: BTreeSet<u32> = acked.lock().clone();
    eprintln!("published {published}, acknowledged {}; leader {l1} -> {l2}", acked.len());
    assert!(resumed.iter().all(|&p| p), "publisher session present on every reconnect: {resumed:?}");

    wait_delivered(&acked, &log, RECONNECT_WAIT).await;
    // Let late duplicates, if any, arrive: the new leader resends its
    // in-flight window right after the reconnect, which has happened.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_sub.store(true, Ordering::SeqCst);
    let _ = sub_task.await;
    let l = log.lock();
    assert!(l.errors.is_empty(), "subscriber errors: {:?}", l.errors);
    assert!(!l.resumed.is_empty(), "the subscriber was never disconnected by the failover");
    assert!(l.resumed.iter().all(|&p| p), "subscriber session present on every reconnect: {:?}", l.resumed);
    let twice: Vec<(u32, u32)> = l.got.iter().filter(|(_, &k)| k > 1).map(|(&n, &k)| (n, k)).collect();
    let detail: Vec<String> = twice
        .iter()
        .map(|(n, _)| {
            let seen = l.trace.get(n).cloned().unwrap_or_default();
            let pids: BTreeSet<u16> = seen.iter().map(|t| t.1).collect();
            let rels: Vec<&(usize, u16)> = l.rels.iter().filter(|r| pids.contains(&r.1)).collect();
            format!(
                "{n}: received as (connection #, packet id, DUP, handed on) {seen:?}; PUBREL (connection #, packet id) for those ids: {rels:?}"
            )
        })
        .collect();
    assert!(
        twice.is_empty(),
        "QoS 2 messages delivered more than once (number, times): {twice:?}\n{}\npublisher resumes (number, phase): {pub_resends:?}",
        detail.join("\n")
    );
    let unknown: Vec<u32> = l.got.keys().copied().filter(|n| *n >= published).collect();
    assert!(unknown.is_empty(), "delivered numbers never published: {unknown:?}");
}

/// Where the one outstanding QoS 2 message of the publisher is.
#[derive(Clone, Copy, Debug)]
enum Phase {
    AwaitRec,
    AwaitComp,
}

/// Sequential QoS 2 publisher with a persistent session ("pub-q2"). Returns
/// the count of numbers used and the session-present flags of its reconnects.
async fn run_qos2_publisher(
    ep: Endpoints,
    acked: Arc<Mutex<BTreeSet<u32>>>,
    stop: Arc<AtomicBool>,
) -> Result<(u32, Vec<bool>, Vec<(u32, Phase)>), String> {
    let mut resends = Vec::new();
    let mut conn = Conn::v5("pub-q2").persistent();
    let mut resumed = Vec::new();
    let mut next = 0u32;
    let mut pid: u16 = 0;
    let mut cur: Option<(u32, u16, Phase)> = None;
    let mut first = true;
    loop {
        let (mut cl, present, _) = ep.connect_leader(&conn, RECONNECT_WAIT).await?;
        if !first {
            resumed.push(present);
        }
        first = false;
        conn = conn.clean(false);
        // Resume the outstanding exchange (MQTT 4.4: resend unacknowledged
        // PUBLISH with DUP, and PUBREL for what got a PUBREC).
        if let Some((n, p, phase)) = cur {
            resends.push((n, phase));
            let r = match phase {
                Phase::AwaitRec => {
                    cl.publish(&Pub::new("q/a", n.to_string().as_bytes(), 2, p).dup(true)).await
                }
                Phase::AwaitComp => cl.send(&mqtt::pubrel(p)).await,
            };
            if r.is_err() {
                continue;
            }
        }
        loop {
            if cur.is_none() {
                if stop.load(Ordering::SeqCst) {
                    cl.disconnect().await;
                    return Ok((next, resumed, resends));
                }
                pid = if pid == u16::MAX { 1 } else { pid + 1 };
                cur = Some((next, pid, Phase::AwaitRec));
                next += 1;
                if cl.publish(&Pub::new("q/a", (next - 1).to_string().as_bytes(), 2, pid)).await.is_err() {
                    break;
                }
            }
            let Some((n, p, _)) = cur else { continue };
            match cl.recv(Duration::from_secs(1)).await {
                Ok(Some(Pkt::PubRec { pid: got, code })) if got == p => {
                    if code >= 0x80 {
                        cur = None; // refused: not acknowledged, nothing to release
                        continue;
                    }
                    acked.lock().insert(n);
                    cur = Some((n, p, Phase::AwaitComp));
                    if cl.send(&mqtt::pubrel(p)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Pkt::PubComp { pid: got, .. })) if got == p => cur = None,
                Ok(Some(Pkt::Disconnect { .. })) | Err(_) => break,
                Ok(Some(_)) | Ok(None) => {}
            }
        }
    }
}

// ---------------------------------------------------------------- (c)

/// A follower that was down while the cluster wrote many more entries than
/// the snapshot interval (so the leader's log no longer has them) catches up
/// through a snapshot, becomes a healthy member, and once leader it serves the
/// state it never saw as log entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_catches_up_from_snapshot() {
    let opts = Opts::three().cluster("snapshot_every = 20").cluster("keep_after_snapshot = 5");
    let mut c = Cluster::start(&opts).await;
    let l = c.leader(LEADER_WAIT).await;
    let f = c.ids().into_iter().find(|&i| i != l).unwrap_or(0);
    c.kill9(f);

    // 200 retained messages, one at a time: each is at least one log entry.
    // With one follower down, a starved follower can cost the leader its
    // lease (it then stops serving, by design): the filler follows the leader
    // (a retained message sent twice leaves the same state).
    const N: usize = 200;
    let filler = Conn::v5("filler");
    let (mut cl, _, _) = c.connect_leader(&filler, RECONNECT_WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    for i in 0..N {
        let p =
            Pub::new(&format!("c/{i}"), format!("v{i}").as_bytes(), 1, (i % 60000) as u16 + 1).retain(true);
        let mut changes = 0;
        while let Err(e) = cl.publish_acked(&p, STEP).await {
            changes += 1;
            assert!(changes <= 3, "publish {i}: {e} (after {changes} leader changes)");
            eprintln!("publish {i}: {e}; reconnecting to the leader");
            cl = c.connect_leader(&filler, RECONNECT_WAIT).await.unwrap_or_else(|e| panic!("{e}")).0;
        }
    }
    cl.disconnect().await;
    let l = c.leader(LEADER_WAIT).await;
    let lead = c.health(l).await.and_then(|(_, s)| s).unwrap_or_else(|| panic!("leader status"));
    assert!(lead.commit_index > 20 + 5 + 20, "more entries than the snapshot interval: {lead:?}");

    c.restart(f).await;
    let all = c.ids();
    let st = c.settled(&all, Duration::from_secs(10)).await;
    eprintln!("settled after the restart of {f}: {st:?}");
    // For the reader of --nocapture output (openraft's own log lines are not
    // a contract, so they are shown, not asserted).
    for line in
        c.node(f).log_text().lines().filter(|l| l.contains("install") && l.contains("snapshot")).take(5)
    {
        eprintln!("node {f}: {line}");
    }

    // A failover onto f, made certain: the third node o is down while a few
    // more entries commit (leader + f), so o's log is behind f's; then the
    // leader is killed and o restarted. o cannot win (f refuses a candidate
    // with an older log), f can (o votes for the more up-to-date log). o is
    // killed, not frozen: a frozen node keeps the leader's AppendEntries in its
    // socket buffer and may append them when thawed, catching up with f.
    let l = c.leader(LEADER_WAIT).await;
    let o = all.iter().copied().find(|&i| i != l && i != f).unwrap_or(0);
    c.kill9(o);
    let (mut cl, _, at) =
        c.connect_leader(&Conn::v5("filler-2"), RECONNECT_WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(at, l, "the leader keeps serving with f while o is down");
    for i in N..N + 5 {
        let p = Pub::new(&format!("c/{i}"), format!("v{i}").as_bytes(), 1, i as u16 + 1).retain(true);
        cl.publish_acked(&p, STEP).await.unwrap_or_else(|e| panic!("publish {i}: {e}"));
    }
    c.kill9(l);
    c.restart(o).await;
    let next = c.leader_among(&[f, o], LEADER_WAIT).await;
    assert_eq!(next, f, "the caught-up node {f} takes over (o = {o} was behind)");
    const TOTAL: usize = N + 5;
    let (r, at) = retained(&c, "c/#", TOTAL).await;
    assert_eq!(at, f, "the retained messages were read from node {f}");
    assert_eq!(r.len(), TOTAL, "retained messages on the caught-up node");
    for i in 0..TOTAL {
        assert_eq!(r.get(&format!("c/{i}")).map(Vec::as_slice), Some(format!("v{i}").as_bytes()), "c/{i}");
    }
}
// ---------------------------------------------------------------- (d)

/// Nodes started in the order 3, 2, 1, with pauses between, form one
/// cluster: exactly one serving leader, and every node reports that leader
/// and the same term. While they start, never two nodes serve at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_start_order_forms_one_cluster() {
    let mut c = Cluster::new(&Opts::three());
    for id in [3, 2, 1] {
        c.spawn(id);
        c.wait_live(id).await;
        // The pause is the scenario (staggered starts), watched the whole time.
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            assert!(serving(&c).await.len() <= 1, "two nodes serve at once while starting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let all = c.ids();
    let st = c.settled(&all, LEADER_WAIT).await;
    let leader = st.iter().find(|s| s.serving).map(|s| s.node_id);
    assert!(leader.is_some(), "a serving leader: {st:?}");
    // It stays one cluster: for a second, one leader, everyone agreeing.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let s = serving(&c).await;
        assert!(s.len() <= 1, "two serving leaders: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = c.settled(&all, LEADER_WAIT).await;
    assert_eq!(again.iter().find(|s| s.serving).map(|s| s.node_id), leader, "same leader");
    assert_eq!(again[0].term, st[0].term, "no election happened after the cluster formed");
}

/// Ids of the nodes answering 200 on /health/leader now.
async fn serving(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for id in c.ids() {
        if let Some((200, _)) = c.health(id).await {
            out.push(id);
        }
    }
    out
}

// ---------------------------------------------------------------- (e)

/// A follower answers CONNECT with CONNACK 0x9C and a Server Reference to the
/// leader's MQTT address (MQTT 5), or return code 3 (3.1.1), then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_refers_clients_to_the_leader() {
    let c = Cluster::start(&Opts::three()).await;
    let all = c.ids();
    c.settled(&all, LEADER_WAIT).await;
    let l = c.leader(LEADER_WAIT).await;
    let leader_mqtt = c.node(l).mqtt.to_string();
    for f in all.into_iter().filter(|&i| i != l) {
        let addr = c.node(f).mqtt;
        let (mut cl, ack) = Client::connect(addr, &Conn::v5(&format!("v5-at-{f}")), STEP)
            .await
            .unwrap_or_else(|e| panic!("node {f}: {e}"));
        match ack {
            Pkt::ConnAck { code, props, session_present } => {
                assert_eq!(code, mqtt::USE_ANOTHER_SERVER, "MQTT 5 CONNACK from follower {f}");
                assert!(!session_present);
                assert_eq!(
                    mqtt::prop_str(&props, mqtt::SERVER_REFERENCE),
                    Some(leader_mqtt.as_str()),
                    "Server Reference from follower {f}"
                );
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        assert!(closes(&mut cl).await, "follower {f} closes the MQTT 5 connection");

        let (mut cl, ack) = Client::connect(addr, &Conn::v3(&format!("v3-at-{f}")), STEP)
            .await
            .unwrap_or_else(|e| panic!("node {f}: {e}"));
        match ack {
            Pkt::ConnAck { code, session_present, .. } => {
                assert_eq!(code, mqtt::SERVER_UNAVAILABLE_V311, "3.1.1 CONNACK from follower {f}");
                assert!(!session_present);
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        assert!(closes(&mut cl).await, "follower {f} closes the 3.1.1 connection");
    }
    // And the leader accepts both.
    let (cl, ack) = Client::connect(c.node(l).mqtt, &Conn::v5("v5-at-leader"), STEP)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(ack, Pkt::ConnAck { code: 0, .. }), "leader CONNACK {ack:?}");
    cl.disconnect().await;
    let (cl, ack) = Client::connect(c.node(l).mqtt, &Conn::v3("v3-at-leader"), STEP)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(ack, Pkt::ConnAck { code: 0, .. }), "leader CONNACK {ack:?}");
    cl.disconnect().await;
}

/// True when the server closes the connection within 2 s (packets before
/// the close are ignored).
async fn closes(cl: &mut Client) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match cl.recv(deadline.saturating_duration_since(Instant::now())).await {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(_)) => {}
        }
    }
}

// ---------------------------------------------------------------- (f)

/// `raftmq ctl leader pin P` (sent to a follower, which forwards it) moves
/// leadership to P; after P is killed another node leads; once P is back and
/// caught up, leadership returns to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_leader_takes_over_and_returns_after_restart() {
    let mut c = Cluster::start(&Opts::three()).await;
    let all = c.ids();
    c.settled(&all, LEADER_WAIT).await;
    let l = c.leader(LEADER_WAIT).await;
    let p = all.iter().copied().find(|&i| i != l).unwrap_or(0);
    let via = all.iter().copied().find(|&i| i != l && i != p).unwrap_or(0);
    let (ok, out) = c.ctl_async(via, &["leader", "pin", &p.to_string()]).await;
    assert!(ok, "raftmq ctl leader pin {p} (via node {via}): {out}");
    c.wait_leader_is(p, LEADER_WAIT).await;

    c.kill9(p);
    let others: Vec<u64> = all.iter().copied().filter(|&i| i != p).collect();
    let interim = c.leader_among(&others, LEADER_WAIT).await;
    eprintln!("pinned {p}; killed it; interim leader {interim}");
    c.restart(p).await;
    c.wait_leader_is(p, Duration::from_secs(15)).await;
    c.settled(&all, LEADER_WAIT).await;

    let (ok, out) = c.ctl_async(interim, &["leader", "unpin"]).await;
    assert!(ok, "raftmq ctl leader unpin: {out}");
}

// ---------------------------------------------------------------- (g)

/// Under QoS 1 load to a persistent subscriber: `ctl add-node` brings a
/// fourth node in (learner, catch-up, voter), `ctl remove-node` takes a
/// follower out, and a failover afterwards needs the new node's vote. No
/// PUBACKed message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_node_under_load() {
    let mut c = Cluster::start(&Opts::three().joiners(1)).await;
    c.settled(&[1, 2, 3], LEADER_WAIT).await;

    let conn = Conn::v5("sub-q1").persistent();
    let sub = subscriber(&c, &conn, "t/#", 1).await;
    let log = Arc::new(Mutex::new(SubLog::default()));
    let stop_sub = Arc::new(AtomicBool::new(false));
    let sub_task = tokio::spawn(run_subscriber(c.ep(), sub, conn.clone(), log.clone(), stop_sub.clone()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let pub_task = tokio::spawn(run_qos1_publisher(c.ep(), "t/a".into(), 8, acked.clone(), stop_pub.clone()));
    wait_count("50 PUBACKs", &acked, 50, STEP).await;

    c.restart(4).await;
    let n4 = (c.node(4).cluster.to_string(), c.node(4).mqtt.to_string(), c.node(4).admin.to_string());
    let (ok, out) =
        c.ctl_async(1, &["add-node", "4", "--cluster", &n4.0, "--mqtt", &n4.1, "--admin", &n4.2]).await;
    assert!(ok, "raftmq ctl add-node 4: {out}");
    c.settled(&[1, 2, 3, 4], Duration::from_secs(15)).await;
    let n = acked.lock().len();
    wait_count("50 PUBACKs after add-node", &acked, n + 50, STEP).await;

    let l = c.leader(LEADER_WAIT).await;
    let r = [1, 2, 3].into_iter().find(|&i| i != l).unwrap_or(0);
    let (ok, out) = c.ctl_async(4, &["remove-node", &r.to_string()]).await;
    assert!(ok, "raftmq ctl remove-node {r}: {out}");
    c.kill9(r);
    let voters: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != r).collect();
    c.settled(&voters, LEADER_WAIT).await;
    let n = acked.lock().len();
    wait_count("50 PUBACKs after remove-node", &acked, n + 50, STEP).await;

    // Voters now: l, 4 and one more; with l gone, 4's vote is needed.
    let l = c.leader(LEADER_WAIT).await;
    c.kill9(l);
    let rest: Vec<u64> = voters.iter().copied().filter(|&i| i != l).collect();
    let l2 = c.leader_among(&rest, LEADER_WAIT).await;
    let n = acked.lock().len();
    wait_count("50 PUBACKs after the failover", &acked, n + 50, RECONNECT_WAIT).await;
    stop_pub.store(true, Ordering::SeqCst);
    match pub_task.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("publisher: {e}"),
        Err(e) => panic!("publisher task: {e}"),
    }
    let acked: BTreeSet<u32> = acked.lock().clone();
    eprintln!("acknowledged {}; removed {r}; leader {l} -> {l2}", acked.len());
    wait_delivered(&acked, &log, RECONNECT_WAIT).await;
    stop_sub.store(true, Ordering::SeqCst);
    let _ = sub_task.await;
    let l = log.lock();
    assert!(l.errors.is_empty(), "subscriber errors: {:?}", l.errors);
    assert!(l.resumed.iter().all(|&p| p), "session present on every reconnect: {:?}", l.resumed);
}

// ---------------------------------------------------------------- (h)

/// A CA and node certificates (serverAuth + clientAuth, SAN 127.0.0.1) in PEM
/// files under `dir`: `<prefix>ca.pem`, `<prefix>node-<id>.pem/.key`.
fn make_pki(dir: &std::path::Path, prefix: &str, ids: &[u64]) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { panic!("{what}: {e}") };
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail("ca params", &e));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{prefix}cluster CA"));
    let ca_key = KeyPair::generate().unwrap_or_else(|e| fail("ca key", &e));
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap_or_else(|e| fail("ca cert", &e));
    let write = |name: String, text: String| {
        std::fs::write(dir.join(&name), text).unwrap_or_else(|e| fail(&name, &e));
    };
    write(format!("{prefix}ca.pem"), ca.pem());
    for id in ids {
        let key = KeyPair::generate().unwrap_or_else(|e| fail("key", &e));
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap_or_else(|e| fail("params", &e));
        params.distinguished_name.push(DnType::CommonName, format!("node-{id}"));
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca).unwrap_or_else(|e| fail("cert", &e));
        write(format!("{prefix}node-{id}.pem"), cert.pem());
        write(format!("{prefix}node-{id}.key"), key.serialize_pem());
    }
}

/// Mutual TLS between real node processes: a node whose certificate comes
/// from another CA is refused (it never gets an entry, never learns the
/// leader) while the two others form the cluster and serve; given a proper
/// certificate it joins and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_wrong_tls_identity_is_refused() {
    let pki = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    make_pki(pki.path(), "", &[1, 2, 3]);
    make_pki(pki.path(), "rogue-", &[3]);
    // Node 3's files: a certificate of the rogue CA, under the name it uses.
    let cert3 = pki.path().join("node-3-in-use.pem");
    let key3 = pki.path().join("node-3-in-use.key");
    let copy = |from: &str, to: &std::path::Path| {
        std::fs::copy(pki.path().join(from), to).unwrap_or_else(|e| panic!("copy {from}: {e}"));
    };
    copy("rogue-node-3.pem", &cert3);
    copy("rogue-node-3.key", &key3);
    let tls = |id: u64| {
        let p = |n: &str| format!("{:?}", pki.path().join(n).display().to_string());
        let (cert, key) = if id == 3 {
            (p("node-3-in-use.pem"), p("node-3-in-use.key"))
        } else {
            (p(&format!("node-{id}.pem")), p(&format!("node-{id}.key")))
        };
        format!("[cluster.tls]\nca_file = {}\ncert_file = {cert}\nkey_file = {key}\n", p("ca.pem"))
    };
    let opts = Opts::three().extra(1, &tls(1)).extra(2, &tls(2)).extra(3, &tls(3));
    let mut c = Cluster::start(&opts).await;
    c.settled(&[1, 2], LEADER_WAIT).await;
    let (mut cl, _, _) =
        c.connect_leader(&Conn::v5("tls-writer"), RECONNECT_WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    for i in 0..20u16 {
        let p = Pub::new(&format!("s/{i}"), b"x", 1, i + 1).retain(true);
        cl.publish_acked(&p, STEP).await.unwrap_or_else(|e| panic!("publish {i}: {e}"));
    }
    cl.disconnect().await;
    // Watch node 3 for a second: it never learns the leader nor gets an entry.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match c.health(3).await {
            Some((code, Some(s))) => {
                assert_ne!(code, 200, "the node with a rogue certificate serves");
                assert!(
                    s.leader_id.is_none() && s.applied_index == 0,
                    "the node with a rogue certificate joined: {s:?}"
                );
            }
            other => panic!("node 3 health: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // With a certificate of the cluster CA it joins and catches up.
    c.kill9(3);
    copy("node-3.pem", &cert3);
    copy("node-3.key", &key3);
    c.restart(3).await;
    c.settled(&[1, 2, 3], Duration::from_secs(10)).await;
}
