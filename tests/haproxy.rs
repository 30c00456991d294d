//! raftmq as users run it: a real HAProxy (Debian's) in front of real
//! raftmq nodes, configured by the shipped haproxy/full-sync.cfg (only
//! addresses and ports substituted, tests/lb). Clients know only HAProxy's
//! address. Checked: the PROXY protocol (v1 and v2) carries the client's
//! address to the broker; clients keep working when the leader is killed
//! (the time from kill -9 to the first PUBACK through HAProxy is printed),
//! when leadership is moved with `raftmq ctl leader pin`, and during a
//! rolling restart with SIGTERM (one reconnect per client per restart of
//! the leader); in every case no acknowledged QoS 1 message is lost for a
//! persistent subscriber connected through HAProxy. The same in Docker
//! containers (nodes built from our binary, private networks), with a
//! partition of the leader; like tests/cluster_docker.rs it is skipped, with
//! a SKIPPED line, only when `docker info` fails.
//!
//! In dynsec-sync mode, with the shipped haproxy/dynsec-sync.cfg: a client
//! reconnecting with the same client id lands on the node that holds its
//! session (sticky table), clients are spread by leastconn, and when a node
//! is killed its clients move to another node and stick to that one.

mod cluster;
mod docker;
mod lb;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use cluster::mqtt::{self, Client, Conn, Pkt, Pub};
use cluster::{http_get, wait_for, Cluster, Opts};
use lb::{Backend, Haproxy};

const TOPIC: &str = "ha/t";
const SUB_ID: &str = "ha-sub";
const PUB_ID: &str = "ha-pub";

fn backends(c: &Cluster) -> Vec<Backend> {
    c.nodes.iter().map(|n| Backend { mqtt: n.mqtt, admin: n.admin }).collect()
}

/// Connects through the load balancer until a CONNACK 0 (a follower's 0x9C,
/// a refused or cut connection: try again), at most 30 s.
async fn connect_via(lb: SocketAddr, conn: &Conn) -> Result<(Client, bool), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match Client::connect(lb, conn, Duration::from_secs(3)).await {
            Ok((cl, Pkt::ConnAck { code: 0, session_present, .. })) => return Ok((cl, session_present)),
            Ok((_, other)) => last = format!("{other:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(cluster::POLL).await;
    }
    Err(format!("{}: no connection through {lb} within 30 s: {last}", conn.client_id))
}

/// One acknowledged publish.
#[derive(Clone, Copy, Debug)]
struct Ack {
    seq: u64,
    sent: Instant,
    acked: Instant,
}

/// A QoS 1 publisher and a persistent QoS 1 subscriber, both connected
/// through HAProxy and reconnecting through it whenever their connection
/// ends. Each counts its successful connections.
struct Traffic {
    stop_pub: Arc<AtomicBool>,
    stop_sub: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    received: Arc<Mutex<BTreeSet<u64>>>,
    pub_conns: Arc<AtomicU64>,
    sub_conns: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    publisher: tokio::task::JoinHandle<()>,
    subscriber: tokio::task::JoinHandle<()>,
}

struct Outcome {
    acked: usize,
    missing: Vec<u64>,
    pub_conns: u64,
    sub_conns: u64,
    errors: Vec<String>,
}

impl Traffic {
    async fn start(lb: SocketAddr) -> Traffic {
        let stop_pub = Arc::new(AtomicBool::new(false));
        let stop_sub = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(BTreeSet::new()));
        let pub_conns = Arc::new(AtomicU64::new(0));
        let sub_conns = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));

        // The subscriber's session exists before the first publish.
        let sub_conn = Conn::v5(SUB_ID).expiry(600);
        let (mut sub, _) = match connect_via(lb, &sub_conn).await {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        match sub.subscribe(1, "ha/#", 1, Duration::from_secs(10)).await {
            Ok((codes, _)) => assert_eq!(codes, vec![1], "SUBACK"),
            Err(e) => panic!("subscribe: {e}"),
        }
        sub_conns.fetch_add(1, Ordering::SeqCst);

        let subscriber = {
            let (stop, received, conns, errors) =
                (stop_sub.clone(), received.clone(), sub_conns.clone(), errors.clone());
            tokio::spawn(async move {
                let resume = Conn::v5(SUB_ID).clean(false).expiry(600);
                let mut cl = Some(sub);
                while !stop.load(Ordering::SeqCst) {
                    let Some(c) = cl.as_mut() else {
                        match connect_via(lb, &resume).await {
                            Ok((c, present)) => {
                                conns.fetch_add(1, Ordering::SeqCst);
                                if !present {
                                    errors.lock().push("subscriber's session was lost".into());
                                }
                                cl = Some(c);
                            }
                            Err(e) => {
                                errors.lock().push(e);
                                return;
                            }
                        }
                        continue;
                    };
                    match c.recv(Duration::from_millis(200)).await {
                        Ok(Some(Pkt::Publish(p))) => {
                            if let Some(pid) = p.pid {
                                if c.send(&mqtt::puback(pid)).await.is_err() {
                                    cl = None;
                                    continue;
                                }
                            }
                            if let Ok(seq) = String::from_utf8_lossy(&p.payload).parse::<u64>() {
                                received.lock().insert(seq);
                            }
                        }
                        Ok(Some(Pkt::Disconnect { .. })) | Err(_) => cl = None,
                        Ok(_) => {}
                    }
                }
            })
        };

        let publisher = {
            let (stop, acks, conns, errors) =
                (stop_pub.clone(), acks.clone(), pub_conns.clone(), errors.clone());
            tokio::spawn(async move {
                let conn = Conn::v5(PUB_ID);
                let mut seq = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while !stop.load(Ordering::SeqCst) {
                    let mut cl = match connect_via(lb, &conn).await {
                        Ok((c, _)) => c,
                        Err(e) => {
                            errors.lock().push(e);
                            return;
                        }
                    };
                    conns.fetch_add(1, Ordering::SeqCst);
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        seq += 1;
                        let p = Pub::new(TOPIC, seq.to_string().as_bytes(), 1, (seq % 60_000) as u16 + 1);
                        let sent = Instant::now();
                        match cl.publish_acked(&p, Duration::from_secs(3)).await {
                            Ok(()) => acks.lock().push(Ack { seq, sent, acked: Instant::now() }),
                            Err(_) => break,
                        }
                    }
                }
            })
        };
        Traffic { stop_pub, stop_sub, acks, received, pub_conns, sub_conns, errors, publisher, subscriber }
    }

    /// (publisher, subscriber) connections so far.
    fn conns(&self) -> (u64, u64) {
        (self.pub_conns.load(Ordering::SeqCst), self.sub_conns.load(Ordering::SeqCst))
    }

    fn acked(&self) -> usize {
        self.acks.lock().len()
    }

    /// Waits until `n` more publishes than now are acknowledged.
    async fn more_acks(&self, n: usize, what: &str) {
        let target = self.acked() + n;
        let acks = self.acks.clone();
        let errors = self.errors.clone();
        wait_for(what, Duration::from_secs(30), || {
            let done = acks.lock().len() >= target;
            let errs = errors.lock().clone();
            async move {
                assert!(errs.is_empty(), "client errors: {errs:?}");
                done.then_some(())
            }
        })
        .await;
        // Shown when the test fails: which phase cost a reconnect.
        eprintln!("{what}: done; connections (publisher, subscriber) so far {:?}", self.conns());
    }

    /// The first publish sent at or after `t` that was acknowledged.
    fn first_ack_sent_after(&self, t: Instant) -> Option<Ack> {
        self.acks.lock().iter().find(|a| a.sent >= t).copied()
    }

    /// Stops publishing, waits (bounded) until the subscriber has every
    /// acknowledged message, then stops it.
    async fn finish(self) -> Outcome {
        self.stop_pub.store(true, Ordering::SeqCst);
        let _ = self.publisher.await;
        let acked: BTreeSet<u64> = self.acks.lock().iter().map(|a| a.seq).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let missing = acked.difference(&self.received.lock()).count();
            if missing == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(cluster::POLL).await;
        }
        self.stop_sub.store(true, Ordering::SeqCst);
        let _ = self.subscriber.await;
        let missing = acked.difference(&self.received.lock()).copied().collect();
        Outcome {
            acked: acked.len(),
            missing,
            pub_conns: self.pub_conns.load(Ordering::SeqCst),
            sub_conns: self.sub_conns.load(Ordering::SeqCst),
            errors: self.errors.lock().clone(),
        }
    }
}

fn assert_nothing_lost(o: &Outcome) {
    assert!(o.errors.is_empty(), "client errors: {:?}", o.errors);
    assert!(o.acked > 0, "nothing was acknowledged");
    assert!(
        o.missing.is_empty(),
        "{} of {} acknowledged messages never reached the persistent subscriber: {:?}",
        o.missing.len(),
        o.acked,
        &o.missing[..o.missing.len().min(20)]
    );
}

/// What the broker logs each time a node stops serving MQTT (it then
/// disconnects every client).
const STEP_DOWN: &str = "stopped serving MQTT";

/// Times the nodes' logs say a node stopped serving.
fn step_downs(logs: &[String]) -> u64 {
    logs.iter().map(|l| l.matches(STEP_DOWN).count() as u64).sum()
}

/// Each client reconnected at least once per planned leader change
/// (`planned`) and at most once per time the serving node went away: an
/// election (`elections`, the rise of the Raft term), a logged step-down
/// (`stepped_down`) or a kill (`kills`, which logs nothing). These are equal
/// to `planned` on a quiet machine; on a loaded one a late heartbeat can cost
/// an extra election, or a leader can miss its quorum contact for an
/// election timeout and stop serving for a moment, and that costs every
/// client a reconnect too.
fn assert_reconnects(o: &Outcome, planned: u64, elections: u64, stepped_down: u64, kills: u64) {
    let allowed = planned.max(elections).max(stepped_down + kills);
    for (who, conns) in [("publisher", o.pub_conns), ("subscriber", o.sub_conns)] {
        let reconnects = conns.saturating_sub(1);
        assert!(
            reconnects >= planned && reconnects <= allowed,
            "{who}: {reconnects} reconnects for {planned} planned leader changes \
             ({elections} elections, {stepped_down} step-downs, {kills} kills)"
        );
    }
    if allowed > planned {
        eprintln!(
            "note: {planned} planned leader changes, but {elections} elections, {stepped_down} step-downs, {kills} kills"
        );
    }
}

fn cluster_logs(c: &Cluster) -> Vec<String> {
    c.nodes.iter().map(|n| n.log_text()).collect()
}

// ------------------------------------------------------------ PROXY protocol

/// Waits until the node's log has a line with all of `parts`.
async fn log_has(c: &Cluster, id: u64, parts: &[String]) {
    let log = c.node(id).log_text();
    let found = || {
        let text = c.node(id).log_text();
        text.lines().any(|l| parts.iter().all(|p| l.contains(p.as_str())))
    };
    if !found() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !found() {
            assert!(Instant::now() < deadline, "node {id} never logged {parts:?}; log:\n{log}");
            tokio::time::sleep(cluster::POLL).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v1_and_v2_give_the_broker_the_client_address() {
    let c = Cluster::start(
        &Opts::three()
            .nodes(1)
            .listener("proxy_protocol = true")
            .log("info,raftmq::broker::connection=debug,raftmq::listener=debug"),
    )
    .await;
    c.leader(Duration::from_secs(20)).await;
    for opt in ["send-proxy-v2", "send-proxy"] {
        let h = Haproxy::full_sync(&backends(&c), opt).await;
        let id = format!("pp-{opt}");
        let (cl, _) = match connect_via(h.mqtt, &Conn::v5(&id)).await {
            Ok(x) => x,
            Err(e) => panic!("{e}\nhaproxy log:\n{}", h.log_text()),
        };
        let me = cl.local_addr().expect("local address");
        // The broker saw this client's own address and port, not HAProxy's
        // outgoing connection.
        log_has(&c, 1, &[format!("client_id={id}"), format!("peer={me}")]).await;
        cl.disconnect().await;
    }
    // HAProxy without the PROXY protocol in front of a listener that wants it:
    // the node refuses the connection and says why.
    let h = Haproxy::full_sync(&backends(&c), "").await;
    match Client::connect(h.mqtt, &Conn::v5("no-header"), Duration::from_secs(5)).await {
        Err(_) => {}
        Ok((_, p)) => panic!("a connection without PROXY header got {p:?}"),
    }
    log_has(&c, 1, &["closing connection: bad PROXY protocol header".to_string()]).await;
}

// ------------------------------------------------------------ failover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_behind_haproxy_loses_no_acknowledged_message() {
    let mut c = Cluster::start(&Opts::three()).await;
    let term0 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    let h = Haproxy::full_sync(&backends(&c), "").await;
    let t = Traffic::start(h.mqtt).await;
    t.more_acks(20, "publishes through haproxy").await;

    let leader = c.leader(Duration::from_secs(10)).await;
    let killed_at = Instant::now();
    c.kill9(leader);
    let dead = Instant::now();
    t.more_acks(20, "publishes through haproxy after the kill").await;
    let first = t.first_ack_sent_after(dead).expect("an ack after the kill");
    let failover = first.acked - killed_at;
    println!("kill -9 of leader {leader} -> first PUBACK through haproxy: {} ms", failover.as_millis());

    // The killed node comes back as a follower and nothing changes for clients.
    c.restart(leader).await;
    let term1 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    t.more_acks(10, "publishes after the restart").await;
    let o = t.finish().await;
    assert_nothing_lost(&o);
    assert_reconnects(&o, 1, term1 - term0, step_downs(&cluster_logs(&c)), 1);
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_pin_moves_leadership_and_clients_follow_through_haproxy() {
    let c = Cluster::start(&Opts::three()).await;
    let term0 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    let h = Haproxy::full_sync(&backends(&c), "").await;
    let t = Traffic::start(h.mqtt).await;
    t.more_acks(20, "publishes through haproxy").await;

    let leader = c.leader(Duration::from_secs(10)).await;
    let to = leader % 3 + 1;
    let (ok, out) = c.ctl_async(leader, &["leader", "pin", &to.to_string()]).await;
    assert!(ok, "raftmq ctl leader pin {to}: {out}");
    c.wait_leader_is(to, Duration::from_secs(20)).await;
    let moved = Instant::now();
    t.more_acks(20, "publishes through haproxy after the move").await;
    assert!(t.first_ack_sent_after(moved).is_some());
    let o = t.finish().await;
    assert_nothing_lost(&o);
    let term1 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    assert_reconnects(&o, 1, term1 - term0, step_downs(&cluster_logs(&c)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigterm_costs_one_reconnect_per_leader_restart() {
    let mut c = Cluster::start(&Opts::three()).await;
    let term0 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    let h = Haproxy::full_sync(&backends(&c), "").await;
    let t = Traffic::start(h.mqtt).await;
    t.more_acks(20, "publishes through haproxy").await;

    let mut leader_restarts = 0;
    for id in [1u64, 2, 3] {
        let was_leader = c.leader(Duration::from_secs(10)).await == id;
        let status = c.sigterm(id, Duration::from_secs(15)).await;
        assert!(status.success(), "node {id} exited with {status} after SIGTERM");
        if was_leader {
            leader_restarts += 1;
            let log = c.node(id).log_text();
            assert!(log.contains("leadership handed over"), "node {id} did not hand over:\n{log}");
        }
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != id).collect();
        c.leader_among(&others, Duration::from_secs(10)).await;
        t.more_acks(10, &format!("publishes while node {id} is down")).await;
        c.restart(id).await;
        c.settled(&[1, 2, 3], Duration::from_secs(20)).await;
        t.more_acks(10, &format!("publishes after node {id} is back")).await;
    }
    let o = t.finish().await;
    assert_nothing_lost(&o);
    assert!(leader_restarts >= 1);
    let term1 = c.settled(&[1, 2, 3], Duration::from_secs(20)).await[0].term;
    assert_reconnects(&o, leader_restarts, term1 - term0, step_downs(&cluster_logs(&c)), 0);
}

// ------------------------------------------------------------ in containers

/// The same clients and HAProxy (on the host, shipped configuration) in front
/// of three nodes in containers built from our binary, on private Docker
/// networks: the leader is cut off from its peers (`docker network
/// disconnect` of the cluster network; HAProxy still reaches it, as a load
/// balancer on another network would), then healed, then the new leader's
/// container is killed (SIGKILL) and started again. Clients keep working,
/// each reconnecting once per event, and no acknowledged message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_docker_partition_and_kill_of_the_leader_behind_haproxy() {
    if !docker::available() {
        return;
    }
    let mut env = docker::Env::new();
    docker::build_image(&mut env);
    let image = env.image.clone().unwrap_or_default();
    let (cnet, nodes) = docker::start_three(&mut env, &image, 250);
    let ep = cluster::Endpoints {
        nodes: nodes
            .iter()
            .map(|&(id, _, aip)| (id, SocketAddr::new(aip, 1883), SocketAddr::new(aip, 8080)))
            .collect(),
    };
    let all = [1u64, 2, 3];
    let term0 = ep.settled(&all, Duration::from_secs(30)).await[0].term;
    let backends: Vec<Backend> = ep.nodes.iter().map(|&(_, mqtt, admin)| Backend { mqtt, admin }).collect();
    let h = Haproxy::full_sync(&backends, "").await;
    let t = Traffic::start(h.mqtt).await;
    t.more_acks(20, "publishes through haproxy").await;

    // Partition the leader from its peers.
    let l1 = ep.leader(Duration::from_secs(10)).await;
    let l1_name = env.containers[l1 as usize - 1].clone();
    let cut_at = Instant::now();
    docker::must(docker::docker(&["network", "disconnect", &cnet, &l1_name]));
    let cut = Instant::now();
    t.more_acks(20, "publishes after the partition").await;
    let first = t.first_ack_sent_after(cut).expect("an ack after the cut");
    println!(
        "docker: partition of leader {l1} -> first PUBACK through haproxy: {} ms",
        (first.acked - cut_at).as_millis()
    );
    let others: Vec<u64> = all.iter().copied().filter(|&i| i != l1).collect();
    let l2 = ep.leader_among(&others, Duration::from_secs(10)).await;

    // Heal; the old leader rejoins as a follower.
    let l1_ip = nodes[l1 as usize - 1].1.to_string();
    docker::must(docker::docker(&["network", "connect", "--ip", &l1_ip, &cnet, &l1_name]));
    let st = ep.settled(&all, Duration::from_secs(30)).await;
    if st[0].term == term0 + 1 {
        // Only the partition's election so far: the healed node must not
        // have disrupted the new leader.
        assert_eq!(st[0].leader_id, Some(l2), "the healed node took leadership back: {st:?}");
    }
    t.more_acks(10, "publishes after the heal").await;

    // kill -9 of the new leader's container, then start it again.
    let l2_name = env.containers[l2 as usize - 1].clone();
    let kill_at = Instant::now();
    docker::must(docker::docker(&["kill", "--signal", "KILL", &l2_name]));
    let killed = Instant::now();
    t.more_acks(20, "publishes after the kill").await;
    let first = t.first_ack_sent_after(killed).expect("an ack after the kill");
    println!(
        "docker: kill -9 of leader {l2} -> first PUBACK through haproxy: {} ms",
        (first.acked - kill_at).as_millis()
    );
    docker::must(docker::docker(&["start", &l2_name]));
    let term1 = ep.settled(&all, Duration::from_secs(30)).await[0].term;
    t.more_acks(10, "publishes after the restart").await;

    let o = t.finish().await;
    assert_nothing_lost(&o);
    // raftmq logs to stderr, which `docker logs` replays on its stderr.
    let logs: Vec<String> = env
        .containers
        .iter()
        .filter_map(|c| std::process::Command::new("docker").args(["logs", c]).output().ok())
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .collect();
    assert!(step_downs(&logs) >= 1, "no step-down in the containers' logs (the partitioned leader logs one)");
    assert_reconnects(&o, 2, term1 - term0, step_downs(&logs), 1);
}

// ------------------------------------------------------------ dynsec-sync: sticky by client id

/// Clients of the sticky test. Six over three nodes: leastconn (the shipped
/// dynsec-sync.cfg's balance) puts two on each while all stay connected.
const STICKY_CLIENTS: usize = 6;
const STEP: Duration = Duration::from_secs(10);

/// Each live node's `raftmq_clients_connected` (its serving broker: the
/// local one in dynsec-sync).
async fn clients_per_node(c: &Cluster, ids: &[u64]) -> Option<BTreeMap<u64, u64>> {
    let mut out = BTreeMap::new();
    for &id in ids {
        let (code, body) = http_get(c.node(id).admin, "/metrics").await?;
        if code != 200 {
            return None;
        }
        let n = body.lines().find_map(|l| l.strip_prefix("raftmq_clients_connected "))?;
        out.insert(id, n.trim().parse().ok()?);
    }
    Some(out)
}

/// Waits until the live nodes count `total` clients in all.
async fn wait_total(c: &Cluster, ids: &[u64], total: u64) -> BTreeMap<u64, u64> {
    wait_for(&format!("{total} clients connected over nodes {ids:?}"), STEP, || async move {
        clients_per_node(c, ids).await.filter(|m| m.values().sum::<u64>() == total)
    })
    .await
}

/// The node that took the one client connected since `before` (per-node
/// counts); returns it and the new counts.
async fn landed(c: &Cluster, ids: &[u64], before: &BTreeMap<u64, u64>) -> (u64, BTreeMap<u64, u64>) {
    let now = wait_total(c, ids, before.values().sum::<u64>() + 1).await;
    let up: Vec<u64> = ids.iter().copied().filter(|id| now.get(id) > before.get(id)).collect();
    assert_eq!(up.len(), 1, "one new client, but counts went from {before:?} to {now:?}");
    (up[0], now)
}

/// Publishes `payload` at QoS 1 to the client's own topic, which it
/// subscribes to, and waits for both the PUBACK and the message: the node it
/// is on serves it.
async fn echo(cl: &mut Client, cid: &str, payload: &str, pid: u16) {
    let topic = format!("st/{cid}");
    if let Err(e) = cl.publish(&Pub::new(&topic, payload.as_bytes(), 1, pid)).await {
        panic!("{cid}: publish: {e}");
    }
    let deadline = Instant::now() + STEP;
    let (mut acked, mut got) = (false, false);
    while !(acked && got) {
        match cl.recv(deadline.saturating_duration_since(Instant::now())).await {
            Ok(Some(Pkt::PubAck { pid: p, code })) if p == pid => {
                assert!(code < 0x80, "{cid}: PUBACK code {code:#x}");
                acked = true;
            }
            Ok(Some(Pkt::Publish(p))) => {
                if let Some(id) = p.pid {
                    if let Err(e) = cl.send(&mqtt::puback(id)).await {
                        panic!("{cid}: puback: {e}");
                    }
                }
                if p.topic == topic && p.payload == payload.as_bytes() {
                    got = true;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                panic!("{cid}: no PUBACK and message {payload:?} within {STEP:?} (acked {acked}, got {got})")
            }
            Err(e) => panic!("{cid}: {e}"),
        }
    }
}

/// Connects `cid` through HAProxy with a persistent session (10 min) and
/// returns the client, whether the session was present and the node it
/// landed on (`counts` is updated).
async fn sticky_connect(
    c: &Cluster,
    h: &Haproxy,
    ids: &[u64],
    counts: &mut BTreeMap<u64, u64>,
    cid: &str,
) -> (Client, bool, u64) {
    let conn = Conn::v5(cid).clean(false).expiry(600);
    let (cl, present) = match connect_via(h.mqtt, &conn).await {
        Ok(x) => x,
        Err(e) => panic!("{e}"),
    };
    let (node, now) = landed(c, ids, counts).await;
    *counts = now;
    (cl, present, node)
}

/// Issue 6: in dynsec-sync mode, behind the shipped haproxy/dynsec-sync.cfg
/// (sticky by MQTT client id, /health/ready checks), a reconnecting client
/// lands on the node that holds its session, clients are spread over the
/// nodes (leastconn), and when a node dies its clients move to another node
/// (a new session there: a node's sessions live on that node only) and
/// stick to that one from then on. Which node a client is on is read from
/// the nodes' `raftmq_clients_connected`, one connection at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynsec_sync_haproxy_sends_a_reconnecting_client_to_the_same_node() {
    let mut c = Cluster::start(&Opts::three()).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let (ok, out) = c.ctl_async(leader, &["mode", "set", "dynsec-sync"]).await;
    assert!(ok, "raftmq ctl mode set dynsec-sync: {out}");
    for id in c.ids() {
        let admin = c.node(id).admin;
        wait_for(&format!("node {id} /health/ready 200"), Duration::from_secs(20), || async move {
            matches!(http_get(admin, "/health/ready").await, Some((200, _))).then_some(())
        })
        .await;
    }
    let h = Haproxy::dynsec_sync(&backends(&c)).await;
    let all = c.ids();
    let cids: Vec<String> = (0..STICKY_CLIENTS).map(|i| format!("sticky-{i}")).collect();

    // First connections, one at a time, each kept open: new sessions, spread
    // by leastconn.
    let mut counts = wait_total(&c, &all, 0).await;
    let mut on: BTreeMap<String, u64> = BTreeMap::new();
    let mut live: BTreeMap<String, Client> = BTreeMap::new();
    for cid in &cids {
        let (mut cl, present, node) = sticky_connect(&c, &h, &all, &mut counts, cid).await;
        assert!(!present, "{cid}: a session on its first connection");
        match cl.subscribe(1, &format!("st/{cid}"), 1, STEP).await {
            Ok((codes, _)) => assert_eq!(codes, vec![1], "{cid}: SUBACK"),
            Err(e) => panic!("{cid}: subscribe: {e}"),
        }
        echo(&mut cl, cid, "first", 1).await;
        on.insert(cid.clone(), node);
        live.insert(cid.clone(), cl);
    }
    println!("dynsec-sync behind haproxy: clients per node {counts:?}, placement {on:?}");
    let used: BTreeSet<u64> = on.values().copied().collect();
    assert_eq!(used.len(), all.len(), "leastconn left a node without clients: {on:?}");

    // Everyone disconnects, then reconnects grouped by node, each staying
    // connected: without stickiness leastconn would send a node's second
    // client to another node (its first one is connected there already).
    for (_, cl) in std::mem::take(&mut live) {
        cl.disconnect().await;
    }
    counts = wait_total(&c, &all, 0).await;
    let mut by_node: Vec<(&String, u64)> = on.iter().map(|(k, &v)| (k, v)).collect();
    by_node.sort_by_key(|&(cid, node)| (node, cid.clone()));
    for (cid, node) in by_node {
        let (mut cl, present, now_on) = sticky_connect(&c, &h, &all, &mut counts, cid).await;
        assert_eq!(now_on, node, "{cid} reconnected to node {now_on}, its session is on node {node}");
        assert!(present, "{cid}: no session on its reconnect to node {node}");
        echo(&mut cl, cid, "again", 2).await;
        live.insert(cid.clone(), cl);
    }

    // kill -9 of a node (not the cluster leader: the subject here is the
    // load balancer, not an election).
    let victim = all.iter().copied().find(|&n| n != leader).unwrap_or(1);
    let moved: Vec<String> = on.iter().filter(|&(_, &n)| n == victim).map(|(k, _)| k.clone()).collect();
    let rest: Vec<u64> = all.iter().copied().filter(|&n| n != victim).collect();
    c.kill9(victim);
    counts = wait_total(&c, &rest, (STICKY_CLIENTS - moved.len()) as u64).await;
    // The others never noticed.
    for (cid, cl) in live.iter_mut().filter(|(cid, _)| !moved.contains(cid)) {
        echo(cl, cid, "after the kill", 3).await;
    }
    // The victim's clients find their connection closed and reconnect
    // through HAProxy: to another node, with a new session there.
    for cid in &moved {
        let mut cl = match live.remove(cid) {
            Some(cl) => cl,
            None => panic!("{cid} not connected"),
        };
        match cl.recv(STEP).await {
            Err(_) | Ok(Some(Pkt::Disconnect { .. })) => {}
            other => panic!("{cid}: its node {victim} was killed, yet its connection gave {other:?}"),
        }
        let (mut cl, present, node) = sticky_connect(&c, &h, &rest, &mut counts, cid).await;
        assert_ne!(node, victim);
        assert!(!present, "{cid}: a session on node {node}, but its session was on the killed node {victim}");
        match cl.subscribe(1, &format!("st/{cid}"), 1, STEP).await {
            Ok((codes, _)) => assert_eq!(codes, vec![1], "{cid}: SUBACK"),
            Err(e) => panic!("{cid}: subscribe: {e}"),
        }
        echo(&mut cl, cid, "moved", 4).await;
        on.insert(cid.clone(), node);
        live.insert(cid.clone(), cl);
    }
    // And they now stick to their new node: the table entry follows the
    // node they landed on. Each moved client reconnects while the other
    // node has no client (everyone there disconnected too), so leastconn
    // alone would send it there; then the others reconnect.
    for (round, cid) in moved.iter().enumerate() {
        let home = on[cid];
        let out: Vec<String> =
            on.iter().filter(|&(k, &n)| k == cid || n != home).map(|(k, _)| k.clone()).collect();
        for k in &out {
            if let Some(cl) = live.remove(k) {
                cl.disconnect().await;
            }
        }
        counts = wait_total(&c, &rest, (STICKY_CLIENTS - out.len()) as u64).await;
        // `cid` first, then the rest.
        for k in std::iter::once(cid).chain(out.iter().filter(|&k| k != cid)) {
            let (mut cl, present, node) = sticky_connect(&c, &h, &rest, &mut counts, k).await;
            assert_eq!(node, on[k], "{k} reconnected to node {node}, its session is on node {}", on[k]);
            assert!(present, "{k}: no session on its reconnect to node {node}");
            echo(&mut cl, k, "moved again", 5 + round as u16).await;
            live.insert(k.clone(), cl);
        }
    }
    println!("after kill -9 of node {victim}: clients per node {counts:?}, placement {on:?}");
    for (_, cl) in live {
        cl.disconnect().await;
    }
}
