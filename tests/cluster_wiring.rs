//! Smoke tests of the cluster wiring with the real binary (`raftmq serve`),
//! loopback ports and temporary data folders:
//! - a single node (a Raft group of one) keeps persistent sessions, their
//!   queued messages and retained messages across a kill -9 and restart;
//! - three nodes: exactly one `/health/leader` answers 200; a follower refuses
//!   CONNECT (MQTT 5: 0x9C + Server Reference; 3.1.1: return code 3); a QoS 1
//!   message PUBACKed by the leader for a persistent subscriber is in every
//!   replica's state; after kill -9 of the leader a new leader serves within
//!   a few seconds and the subscriber gets every PUBACKed message there.
//!
//! The MQTT client here is a few lines over the crate's own codec (blocking
//! sockets with timeouts). Every wait is on a condition with a deadline.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use raftmq::protocol::{
    self, reason, ConnAck, Connect, ConnectProperties, Packet, ProtocolVersion, ProtocolVersionOrDefault,
    PubResp, Publish, QoS, Subscribe, SubscriptionOptions,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// `n` distinct free loopback ports (all held until all are chosen, so no
/// port is handed out twice).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

// ---------------------------------------------------------------- processes

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(args: &[&str], dir: &Path, name: &str) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .args(args)
            .current_dir(dir)
            .env("RAFTMQ_LOG", "info,openraft=warn")
            .env_remove("RAFTMQ_DATA_DIR")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn raftmq");
        Proc { child, log }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- {}:\n{}", self.log.display(), self.log());
        }
    }
}

// ---------------------------------------------------------------- HTTP

/// GET `path`: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

fn leader_status(admin: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let (code, body) = http_get(admin, "/health/leader")?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// The value of an unlabelled Prometheus metric.
fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let (code, body) = http_get(admin, "/metrics")?;
    if code != 200 {
        return None;
    }
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- MQTT

struct Client {
    s: TcpStream,
    rbuf: BytesMut,
    version: ProtocolVersion,
}

struct Opts {
    version: ProtocolVersion,
    client_id: &'static str,
    clean: bool,
    expiry: Option<u32>,
}

impl Client {
    /// Connects and returns the CONNACK (the client is usable when its code is 0).
    fn connect(addr: SocketAddr, o: Opts) -> (Client, ConnAck) {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = Client { s, rbuf: BytesMut::new(), version: o.version };
        c.send(&Packet::Connect(Connect {
            protocol: ProtocolVersionOrDefault(o.version),
            clean_start: o.clean,
            keep_alive: 60,
            client_id: o.client_id.into(),
            properties: ConnectProperties { session_expiry_interval: o.expiry, ..Default::default() },
            ..Default::default()
        }));
        match c.recv() {
            Some(Packet::ConnAck(a)) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        protocol::encode(p, self.version, &mut out).unwrap();
        self.s.write_all(&out).unwrap();
    }

    /// The next packet; None at end of stream or timeout.
    fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Ok(Some(p)) = protocol::decode(&mut self.rbuf, Some(self.version), 1 << 20) {
                return Some(p);
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True when the server closed the connection (no packet, end of stream).
    fn closed(&mut self) -> bool {
        self.recv().is_none()
    }

    fn subscribe(&mut self, filter: &str) {
        let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() };
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), opts)],
            ..Default::default()
        }));
        match self.recv() {
            Some(Packet::SubAck(a)) => assert_eq!(a.reason_codes, vec![1], "SUBACK"),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// QoS 1 PUBLISH; true when PUBACKed with success.
    fn publish(&mut self, id: u16, topic: &str, payload: &str, retain: bool) -> bool {
        self.send(&Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            retain,
            topic: topic.into(),
            packet_id: Some(id),
            payload: Bytes::from(payload.to_owned()),
            ..Default::default()
        }));
        matches!(self.recv(), Some(Packet::PubAck(a)) if a.packet_id == id && a.reason_code == 0)
    }

    /// Receives QoS 1 messages (acknowledging each) until `n` distinct
    /// payloads arrived or nothing comes for the read timeout.
    fn collect(&mut self, n: usize) -> BTreeSet<String> {
        self.collect_until(|got| got.len() >= n)
    }

    /// Receives QoS 1 messages (acknowledging each) until `done` or nothing
    /// comes for the read timeout.
    fn collect_until(&mut self, done: impl Fn(&BTreeSet<String>) -> bool) -> BTreeSet<String> {
        let mut got = BTreeSet::new();
        while !done(&got) {
            match self.recv() {
                Some(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        self.send(&Packet::PubAck(PubResp::new(id)));
                    }
                    got.insert(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Some(_) => {}
                None => break,
            }
        }
        got
    }

    fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Default::default()));
    }
}

fn v311(client_id: &'static str, clean: bool) -> Opts {
    Opts { version: ProtocolVersion::V311, client_id, clean, expiry: None }
}

fn v5(client_id: &'static str, expiry: u32) -> Opts {
    Opts { version: ProtocolVersion::V5, client_id, clean: false, expiry: Some(expiry) }
}

fn connected(addr: SocketAddr, o: Opts) -> (Client, bool) {
    let (c, ack) = Client::connect(addr, o);
    assert_eq!(ack.reason_code, 0, "CONNACK {ack:?}");
    (c, ack.session_present)
}

// ---------------------------------------------------------------- single node

#[test]
fn single_node_restart_keeps_persistent_session_queue_and_retained() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let mqtt: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let (m, a) = (mqtt.to_string(), admin.to_string());
    let args = ["serve", "--mqtt-listen", &m, "--admin-listen", &a, "--data-dir", "data"];
    let mut node = Proc::start(&args, dir.path(), "single-1");
    wait_until("the single node to serve", DEADLINE, || {
        leader_status(admin).filter(|(c, _)| *c == 200).map(|_| ())
    });

    let (mut sub, present) = connected(mqtt, v5("keeper", 3600));
    assert!(!present);
    sub.subscribe("q/#");
    sub.disconnect();
    let (mut publ, _) = connected(mqtt, v311("pub-1", true));
    assert!(publ.publish(1, "q/1", "queued-1", false), "PUBACK");
    assert!(publ.publish(2, "keep/1", "retained-1", true), "PUBACK");
    drop(publ);

    // kill -9: what was acknowledged is on disk.
    node.kill9();
    let _node = Proc::start(&args, dir.path(), "single-2");
    wait_until("the restarted node to serve", DEADLINE, || {
        leader_status(admin).filter(|(c, _)| *c == 200).map(|_| ())
    });
    let (mut sub, present) = connected(mqtt, v5("keeper", 3600));
    assert!(present, "the persistent session survives the restart");
    let got = sub.collect(1);
    assert_eq!(got.into_iter().collect::<Vec<_>>(), vec!["queued-1".to_string()]);

    let (mut other, _) = connected(mqtt, v311("reader", true));
    other.subscribe("keep/#");
    match other.recv() {
        Some(Packet::Publish(p)) => {
            assert!(p.retain);
            assert_eq!(&p.payload[..], b"retained-1");
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
}

// ---------------------------------------------------------------- three nodes

struct NodeAddrs {
    mqtt: SocketAddr,
    admin: SocketAddr,
}

fn write_cluster(dir: &Path) -> Vec<(PathBuf, NodeAddrs)> {
    let p = free_ports(9);
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|i| (p[3 * i], p[3 * i + 1], p[3 * i + 2])).collect();
    let nodes: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (m, a, c))| {
            format!(
                "  {{ id = {}, cluster_addr = \"127.0.0.1:{c}\", mqtt_addr = \"127.0.0.1:{m}\", admin_addr = \"127.0.0.1:{a}\" }},",
                i + 1
            )
        })
        .collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, (m, a, c))| {
            let id = i + 1;
            let toml = format!(
                "node_id = {id}\ndata_dir = \"node-{id}\"\n[[listeners]]\nbind = \"127.0.0.1:{m}\"\n[admin]\nlisten = \"127.0.0.1:{a}\"\n[cluster]\nlisten = \"127.0.0.1:{c}\"\nnodes = [\n{}\n]\n",
                nodes.join("\n")
            );
            let path = dir.join(format!("node-{id}.toml"));
            std::fs::write(&path, toml).unwrap();
            let addrs = NodeAddrs {
                mqtt: format!("127.0.0.1:{m}").parse().unwrap(),
                admin: format!("127.0.0.1:{a}").parse().unwrap(),
            };
            (path, addrs)
        })
        .collect()
}

/// Index of the one node whose /health/leader is 200 while the `alive` others answer 503.
fn one_leader(addrs: &[NodeAddrs], alive: &[usize]) -> Option<usize> {
    let mut leaders = Vec::new();
    for &i in alive {
        let (code, body) = leader_status(addrs[i].admin)?;
        match code {
            200 => {
                assert_eq!(body["serving"], true);
                assert_eq!(body["role"], "leader");
                leaders.push(i);
            }
            503 => {}
            other => panic!("/health/leader answered {other}"),
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

#[test]
fn three_nodes_one_leader_followers_redirect_and_failover_keeps_acked_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfgs = write_cluster(dir.path());
    let addrs: Vec<NodeAddrs> =
        cfgs.iter().map(|(_, a)| NodeAddrs { mqtt: a.mqtt, admin: a.admin }).collect();
    let mut procs: Vec<Proc> = cfgs
        .iter()
        .enumerate()
        .map(|(i, (path, _))| {
            Proc::start(
                &["serve", "--config", path.to_str().unwrap()],
                dir.path(),
                &format!("node-{}", i + 1),
            )
        })
        .collect();
    let all = [0, 1, 2];
    let leader = wait_until("exactly one leader", DEADLINE, || one_leader(&addrs, &all));
    let followers: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    // Followers agree on who leads and point there.
    for &f in &followers {
        let (code, body) = wait_until("a follower to know the leader", DEADLINE, || {
            leader_status(addrs[f].admin).filter(|(_, b)| b["leader_id"] == (leader + 1) as u64)
        });
        assert_eq!(code, 503);
        assert_eq!(body["leader_mqtt_addr"], addrs[leader].mqtt.to_string());
        assert_eq!(body["mode"], "full-sync");
    }

    // A follower refuses CONNECT: MQTT 5 0x9C + Server Reference, 3.1.1 code 3.
    let f = followers[0];
    let (mut c, ack) = wait_until("a follower's CONNACK with a Server Reference", DEADLINE, || {
        let (c, ack) = Client::connect(addrs[f].mqtt, v5("lost-5", 0));
        assert_eq!(ack.reason_code, reason::USE_ANOTHER_SERVER);
        ack.properties.server_reference.is_some().then_some((c, ack))
    });
    assert_eq!(ack.properties.server_reference, Some(addrs[leader].mqtt.to_string()));
    assert!(c.closed(), "the follower closes after CONNACK");
    let (mut c, ack) = Client::connect(addrs[f].mqtt, v311("lost-3", true));
    assert_eq!(ack.reason_code, reason::SERVER_UNAVAILABLE, "3.1.1 return code 3 (decoded as 0x88)");
    assert!(c.closed());

    // A persistent subscriber, offline; QoS 1 messages PUBACKed by the leader.
    let (mut sub, _) = connected(addrs[leader].mqtt, v311("durable-sub", false));
    sub.subscribe("fo/#");
    sub.disconnect();
    // And one that stays online on the leader until it dies.
    let (mut live, _) = connected(addrs[leader].mqtt, v5("live-sub", 600));
    live.subscribe("fo/#");
    let live_before = std::thread::spawn(move || live.collect(usize::MAX));
    let (mut publ, _) = connected(addrs[leader].mqtt, v311("fo-pub", true));
    const N: u16 = 40;
    let mut acked = BTreeSet::new();
    for i in 1..=N {
        let payload = format!("m{i:03}");
        assert!(publ.publish(i, &format!("fo/{i}"), &payload, false), "PUBACK {i}");
        acked.insert(payload);
    }
    assert!(publ.publish(N + 1, "fo-retained", "kept", true), "PUBACK retained");
    drop(publ);

    // Every replica holds them (the followers' own state, not the leader's).
    for &i in &all {
        wait_until("every replica to hold the queued messages", DEADLINE, || {
            let pending = metric(addrs[i].admin, "raftmq_state_queued_messages")?
                + metric(addrs[i].admin, "raftmq_state_inflight_messages")?;
            let retained = metric(addrs[i].admin, "raftmq_state_retained")?;
            (pending == f64::from(N) && retained >= 1.0).then_some(())
        });
        // Each node timed its durable appends.
        let appends = metric(addrs[i].admin, "raftmq_raft_append_latency_seconds_count").unwrap_or(0.0);
        assert!(appends >= 1.0, "node {}: {appends} appends timed", i + 1);
    }
    // The leader timed its replication to each follower (answered entries).
    for &f in &followers {
        let series = format!("raftmq_raft_replication_latency_seconds_count{{peer=\"{}\"}}", f + 1);
        wait_until("the leader's replication latency per follower", DEADLINE, || {
            metric(addrs[leader].admin, &series).filter(|&n| n >= 1.0)
        });
    }

    // kill -9 of the leader: a new leader serves within a few seconds.
    let killed_at = Instant::now();
    procs[leader].kill9();
    let new_leader = wait_until("a new leader", Duration::from_secs(10), || one_leader(&addrs, &followers));
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    assert_ne!(new_leader, leader);

    // The subscriber resumes there and gets every PUBACKed message.
    let (mut sub, present) = connected(addrs[new_leader].mqtt, v311("durable-sub", false));
    assert!(present, "the session is on the new leader");
    let got = sub.collect(acked.len());
    let missing: Vec<_> = acked.difference(&got).collect();
    assert!(missing.is_empty(), "lost after failover: {missing:?}");
    // The online one: what it got before the kill plus what the new leader
    // resends (the unacknowledged rest, again) covers every PUBACKed message.
    let before = live_before.join().unwrap();
    let (mut live, present) = connected(addrs[new_leader].mqtt, v5("live-sub", 600));
    assert!(present, "the online session is on the new leader too");
    let after = live.collect_until(|got| acked.iter().all(|m| before.contains(m) || got.contains(m)));
    let seen: BTreeSet<String> = before.union(&after).cloned().collect();
    let missing: Vec<_> = acked.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "live subscriber lost: {missing:?} (before {}, after {})",
        before.len(),
        after.len()
    );
    let (mut reader, _) = connected(addrs[new_leader].mqtt, v311("fo-reader", true));
    reader.subscribe("fo-retained");
    assert!(
        matches!(reader.recv(), Some(Packet::Publish(p)) if p.retain && &p.payload[..] == b"kept"),
        "retained message after failover"
    );
    // The remaining follower refers clients to the new leader.
    let other = followers.iter().copied().find(|&i| i != new_leader).unwrap();
    wait_until("the follower to refer to the new leader", DEADLINE, || {
        let (_, ack) = Client::connect(addrs[other].mqtt, v5("lost-5b", 0));
        assert_eq!(ack.reason_code, reason::USE_ANOTHER_SERVER);
        (ack.properties.server_reference == Some(addrs[new_leader].mqtt.to_string())).then_some(())
    });
    for p in &procs {
        assert!(!p.log().contains("panicked"), "{}", p.log());
    }
}
