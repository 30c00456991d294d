//! Three in-process Raft nodes on loopback ports with temporary data
//! directories (`raftmq::raft`): election, replication of Batches with
//! per-command results, equal state digests, failover, restart from snapshot
//! plus log, catch-up of a lagging follower by snapshot after log compaction,
//! and refusal of a peer whose certificate is not from the cluster CA.
//! Every wait is on a condition with a deadline; nothing sleeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use raftmq::raft::network::PeerClient;
use raftmq::raft::{pb as rpb, ClusterConfig, ClusterTls, NodeInfo, RaftError, RaftNode, Role, TlsConfig};
use raftmq::state::pb::command::Cmd;
use raftmq::state::{self, Limits, State};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(20);

/// A free loopback port below the kernel's ephemeral range, so no outgoing
/// connection (of this or another process) takes it between this choice and
/// the node's bind (a port from `bind(0)` is in that range).
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768)
        .max(10_001);
    for _ in 0..10_000 {
        let port = rand::random_range(10_000..low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}")
}

fn retained(topic: &str, payload: String) -> state::pb::Command {
    state::pb::Command {
        cmd: Some(Cmd::Publish(state::pb::Publish {
            message: Some(state::pb::Message {
                topic: topic.into(),
                payload: Bytes::from(payload),
                qos: 1,
                retain: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn batch(i: usize) -> state::pb::Batch {
    state::pb::Batch {
        now_ms: 1_000 + i as u64,
        commands: vec![
            retained(&format!("t/{}", i % 7), format!("m{i}")),
            retained(&format!("u/{i}"), "x".into()),
        ],
    }
}

struct Node {
    cfg: ClusterConfig,
    dir: PathBuf,
    state: Arc<RwLock<State>>,
    raft: Option<RaftNode>,
}

struct Cluster {
    _tmp: TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Configures `n` nodes (ids 1..=n); `tweak` adjusts every config.
    fn new(n: u64, tweak: impl Fn(&mut ClusterConfig)) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let infos: Vec<NodeInfo> = (1..=n)
            .map(|id| NodeInfo {
                id,
                cluster_addr: format!("127.0.0.1:{}", free_port()),
                mqtt_addr: format!("127.0.0.1:{}", 1883 + id),
                admin_addr: format!("127.0.0.1:{}", 8080 + id),
            })
            .collect();
        let nodes = infos
            .iter()
            .map(|info| {
                let mut cfg = ClusterConfig {
                    node_id: info.id,
                    listen: info.cluster_addr.clone(),
                    nodes: infos.clone(),
                    ..Default::default()
                };
                tweak(&mut cfg);
                let dir = tmp.path().join(format!("node-{}", info.id));
                Node { cfg, dir, state: fresh_state(), raft: None }
            })
            .collect();
        Cluster { _tmp: tmp, nodes }
    }

    fn node(&self, id: u64) -> &RaftNode {
        self.nodes[(id - 1) as usize].raft.as_ref().unwrap()
    }

    async fn start(&mut self, id: u64) {
        let n = &mut self.nodes[(id - 1) as usize];
        n.state = fresh_state();
        let raft = RaftNode::start(&n.cfg, &n.dir, n.state.clone(), Box::new(|_| {})).await.unwrap();
        n.raft = Some(raft);
    }

    async fn stop(&mut self, id: u64) {
        let n = &mut self.nodes[(id - 1) as usize];
        n.raft.take().unwrap().shutdown().await.unwrap();
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.raft.is_some())
    }

    /// The serving leader among the running nodes, as soon as there is one.
    async fn leader(&self) -> u64 {
        let deadline = std::time::Instant::now() + DEADLINE;
        let up: Vec<u64> = self.running().map(|n| n.cfg.node_id).collect();
        let first = self.node(up[0]);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let m = first.wait_for(left, |m| m.leader.is_some_and(|l| up.contains(&l))).await.unwrap();
            let leader = m.leader.unwrap();
            // It may lose the leadership before it serves: then ask again.
            if self.node(leader).wait_for(Duration::from_secs(1), |m| m.serving).await.is_ok() {
                return leader;
            }
            assert!(std::time::Instant::now() < deadline, "no serving leader within {DEADLINE:?}");
        }
    }

    /// Waits until every running node applied `index`, then checks digests.
    async fn assert_converged(&self, index: u64) -> [u8; 32] {
        let mut digest = None;
        for n in self.running() {
            n.raft.as_ref().unwrap().wait_for(DEADLINE, |m| m.applied_index >= Some(index)).await.unwrap();
            let d = n.state.read().digest();
            if let Some(prev) = digest {
                assert_eq!(prev, d, "node {} diverged", n.cfg.node_id);
            }
            digest = Some(d);
        }
        digest.unwrap()
    }
}

fn fresh_state() -> Arc<RwLock<State>> {
    Arc::new(RwLock::new(State::new(Limits::default())))
}

/// Proposes batches `range` on `leader`; returns the last applied index.
async fn propose_all(node: &RaftNode, range: std::ops::Range<usize>) -> u64 {
    let mut last = 0;
    for i in range {
        let (index, results) = node.propose_indexed(&batch(i)).await.unwrap();
        assert!(index > last, "entries are appended in order");
        assert_eq!(results.len(), 2, "one result per command, in order");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        last = index;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_fail_over_and_restart() {
    let mut c = Cluster::new(3, |_| {});
    // Any start order forms one cluster; only the lowest id bootstraps it, so
    // nodes 3 and 2 alone stay uninitialized (no leader, no membership).
    c.start(3).await;
    c.start(2).await;
    let alone = c.node(2).wait_for(Duration::from_secs(1), |m| m.leader.is_some()).await;
    assert!(matches!(alone, Err(RaftError::Timeout(_))), "{alone:?}");
    assert!(c.node(3).metrics().voters.is_empty());
    c.start(1).await;
    let leader = c.leader().await;
    let applied = propose_all(c.node(leader), 0..30).await;
    let digest = c.assert_converged(applied).await;
    for n in c.running() {
        let st = n.state.read();
        assert_eq!(st.retained("u/29").map(|m| m.payload.clone()), Some(Bytes::from("x")));
    }
    let voters = c.node(leader).metrics().voters;
    assert_eq!(voters.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);

    // A follower refuses and names the leader.
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    match c.node(follower).propose(&batch(99)).await {
        Err(RaftError::ForwardToLeader { leader_id, leader: addr }) => {
            assert_eq!(leader_id, Some(leader));
            assert_eq!(addr.map(|a| a.mqtt_addr), Some(format!("127.0.0.1:{}", 1883 + leader)));
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }

    // Leadership moves on request (openraft's leader transfer).
    c.node(leader).transfer_leader(follower).await.unwrap();
    c.node(follower).wait_for(DEADLINE, |m| m.serving).await.unwrap();
    let leader = c.leader().await;
    assert_eq!(leader, follower);

    // Kill the leader: the other two elect a new one and keep committing.
    let t = std::time::Instant::now();
    c.stop(leader).await;
    let stopped = t.elapsed();
    let new_leader = c.leader().await;
    eprintln!("failover: stop took {stopped:?}; new serving leader {:?} after it", t.elapsed() - stopped);
    assert!(c.node(new_leader).metrics().leader_changes >= 2, "saw the first leader, then another");
    assert_ne!(new_leader, leader);
    let applied = propose_all(c.node(new_leader), 30..50).await;
    let digest_after = c.assert_converged(applied).await;
    assert_ne!(digest, digest_after);

    // The old leader restarts from its data directory (snapshot + log) with
    // an empty State, and catches up to the same digest.
    c.start(leader).await;
    c.assert_converged(applied).await;
    let restarted = &c.nodes[(leader - 1) as usize];
    assert_eq!(restarted.state.read().retained("u/49").map(|m| m.payload.clone()), Some(Bytes::from("x")));
    for id in 1..=3 {
        c.stop(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_from_snapshot_plus_log_and_lagging_follower_gets_snapshot() {
    let mut c = Cluster::new(3, |cfg| {
        cfg.snapshot_every = 10;
        cfg.keep_after_snapshot = 0;
    });
    for id in 1..=3 {
        c.start(id).await;
    }
    let leader = c.leader().await;
    let lagging = (1..=3).find(|&i| i != leader).unwrap();
    let applied = propose_all(c.node(leader), 0..5).await;
    c.assert_converged(applied).await;
    let lagging_last = c.node(lagging).metrics().last_log_index.unwrap();

    // The follower misses many entries; the leader snapshots and purges them.
    c.stop(lagging).await;
    let applied = propose_all(c.node(leader), 5..60).await;
    let lm = c
        .node(leader)
        .wait_for(DEADLINE, |m| m.purged_index.is_some_and(|p| p > lagging_last + 10))
        .await
        .unwrap();
    assert!(lm.snapshot_index.is_some());

    // Back, it cannot get the purged entries from the log: it installs a snapshot.
    c.start(lagging).await;
    let digest = c.assert_converged(applied).await;
    let m = c.node(lagging).wait_for(DEADLINE, |m| m.snapshot_index.is_some()).await.unwrap();
    assert!(m.snapshot_index.unwrap() > lagging_last, "caught up through a snapshot: {m:?}");

    // A full restart: a node alone (no quorum, no leader to learn from)
    // rebuilds its State from its own snapshot file plus the committed log
    // after it.
    for id in 1..=3 {
        c.stop(id).await;
    }
    c.start(lagging).await;
    let alone = c.node(lagging).wait_for(DEADLINE, |m| m.applied_index >= Some(applied)).await.unwrap();
    assert_ne!(alone.role, Role::Leader);
    assert_eq!(c.nodes[(lagging - 1) as usize].state.read().digest(), digest);
    for id in (1..=3).filter(|&i| i != lagging) {
        c.start(id).await;
    }
    let leader = c.leader().await;
    let m = c.node(leader).metrics();
    assert!(m.applied_index >= Some(applied));
    // Nothing new was proposed (a new leader's blank entry changes no state).
    assert_eq!(c.assert_converged(applied).await, digest);
    for id in 1..=3 {
        c.stop(id).await;
    }
}

// ---------------------------------------------------------------- TLS

struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A CA and one certificate per node id (serverAuth + clientAuth, SAN 127.0.0.1).
    fn new(ids: &[u64], ca_name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
            KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for id in ids {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, format!("node-{id}"));
            params.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("node-{id}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("node-{id}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn tls(&self, id: u64) -> TlsConfig {
        let p = |n: String| -> PathBuf { self.dir.path().join(n) };
        TlsConfig {
            ca_file: p("ca.pem".into()),
            cert_file: p(format!("node-{id}.pem")),
            key_file: p(format!("node-{id}.key")),
            server_name: None,
        }
    }
}

fn vote_request() -> rpb::raft_request::Request {
    rpb::raft_request::Request::Vote(rpb::VoteRequest {
        vote: Some(rpb::Vote { leader_id: Some(rpb::LeaderId { term: 0, node_id: 9 }), committed: false }),
        last_log_id: None,
        leadership_transfer: false,
    })
}

async fn call_as(tls: Option<ClusterTls>, addr: &str) -> Result<rpb::raft_response::Response, String> {
    let mut client = PeerClient::new(9, 1, addr.to_owned(), tls);
    client.call(vote_request(), Duration::from_secs(5)).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_cluster_works_and_refuses_foreign_peers() {
    let pki = Pki::new(&[1, 2, 3, 9], "raftmq cluster CA");
    let foreign = Pki::new(&[9], "someone else's CA");
    let mut c = Cluster::new(3, |_| {});
    for n in &mut c.nodes {
        n.cfg.tls = Some(pki.tls(n.cfg.node_id));
    }
    for id in 1..=3 {
        c.start(id).await;
    }
    let leader = c.leader().await;
    let applied = propose_all(c.node(leader), 0..5).await;
    c.assert_converged(applied).await;

    let addr = c.nodes[0].cfg.listen.clone();
    // Control: a certificate from the cluster CA is served.
    let ok = call_as(Some(ClusterTls::load(&pki.tls(9)).unwrap()), &addr).await;
    assert!(matches!(ok, Ok(rpb::raft_response::Response::Vote(_))), "{ok:?}");
    // A certificate from another CA is refused.
    let refused = call_as(Some(ClusterTls::load(&foreign.tls(9)).unwrap()), &addr).await;
    assert!(refused.is_err(), "foreign CA accepted: {refused:?}");
    // So is plain TCP.
    let plain = call_as(None, &addr).await;
    assert!(plain.is_err(), "plaintext accepted: {plain:?}");
    // The cluster is unharmed.
    let applied = propose_all(c.node(c.leader().await), 5..8).await;
    c.assert_converged(applied).await;
    for id in 1..=3 {
        c.stop(id).await;
    }
}

#[test]
fn config_is_validated() {
    let mut cfg = ClusterConfig::default();
    assert!(cfg.validate().is_ok());
    cfg.node_id = 7;
    assert!(matches!(cfg.validate(), Err(RaftError::Config(_))));
    cfg.join = true;
    assert!(cfg.validate().is_ok());
    let mut cfg = ClusterConfig { heartbeat_ms: 60, ..Default::default() };
    assert!(cfg.validate().is_err());
    cfg.heartbeat_ms = 50;
    cfg.nodes.push(cfg.nodes[0].clone());
    assert!(cfg.validate().is_err());
    let parsed: ClusterConfig = toml::from_str(
        r#"
        listen = "0.0.0.0:7800"
        nodes = [
          { id = 1, cluster_addr = "a:7800", mqtt_addr = "a:1883", admin_addr = "a:8080" },
          { id = 2, cluster_addr = "b:7800", mqtt_addr = "b:1883", admin_addr = "b:8080" },
        ]
        [tls]
        ca_file = "ca.pem"
        cert_file = "n2.pem"
        key_file = "n2.key"
        "#,
    )
    .unwrap();
    // node_id is the node's top-level key, copied in by `Config`, not a [cluster] key.
    assert_eq!(parsed.node_id, ClusterConfig::default().node_id);
    assert_eq!(parsed.nodes[1].cluster_addr, "b:7800");
    assert_eq!(parsed.election_timeout_min_ms, 100);
    assert_eq!(parsed.tls.unwrap().ca_file, Path::new("ca.pem"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_serves_and_group_commits() {
    let mut c = Cluster::new(1, |_| {});
    c.start(1).await;
    assert_eq!(c.leader().await, 1);
    let node = c.node(1).clone();
    // Many concurrent proposals share appends and fsyncs.
    let before = node.storage_stats();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let node = node.clone();
            tokio::spawn(async move { node.propose(&batch(i)).await })
        })
        .collect();
    for t in tasks {
        let results = t.await.unwrap().unwrap();
        assert_eq!(results.len(), 2);
    }
    let after = node.storage_stats();
    let entries = after.entries - before.entries;
    let flushes = after.flushes - before.flushes;
    assert!(entries >= 200, "{after:?}");
    assert!(flushes < entries, "group commit: {flushes} fsyncs for {entries} entries");
    eprintln!("group commit: {flushes} fsyncs for {entries} entries, {:?}", after);

    // Garbage from the network closes that connection, nothing else.
    for frame in [&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..], &[0x7f, 0xff, 0xff, 0xff][..]] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(&c.nodes[0].cfg.listen).await.unwrap();
        tcp.write_all(frame).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "the server closes a connection that sends garbage");
    }
    assert!(node.metrics().serving);
    node.propose(&batch(1)).await.unwrap();

    // An explicit snapshot covers everything applied so far.
    let applied = node.metrics().applied_index.unwrap();
    assert!(node.snapshot(DEADLINE).await.unwrap() >= applied);

    // A batch that could never fit one replication frame is refused up front.
    let huge = state::pb::Batch {
        now_ms: 1,
        commands: vec![retained("big", "x".repeat(raftmq::raft::MAX_ENTRY_BYTES + 1))],
    };
    assert!(matches!(node.propose(&huge).await, Err(RaftError::TooLarge { .. })));
    c.stop(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_without_quorum_stops_serving_and_commits_nothing() {
    let mut c = Cluster::new(3, |_| {});
    for id in 1..=3 {
        c.start(id).await;
    }
    let leader = c.leader().await;
    let applied = propose_all(c.node(leader), 0..3).await;
    c.assert_converged(applied).await;
    for id in (1..=3).filter(|&i| i != leader) {
        c.stop(id).await;
    }
    let m = c.node(leader).wait_for(DEADLINE, |m| !m.serving).await.unwrap();
    assert!(m.applied_index >= Some(applied));
    let stuck = tokio::time::timeout(Duration::from_millis(500), c.node(leader).propose(&batch(9))).await;
    assert!(!matches!(stuck, Ok(Ok(_))), "committed without a quorum: {stuck:?}");
    c.stop(leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_as_learner_becomes_voter_and_is_removed() {
    let mut c = Cluster::new(4, |cfg| {
        cfg.snapshot_every = 10;
        cfg.keep_after_snapshot = 0;
    });
    // Node 4 is not part of the bootstrap list: it joins at run time.
    let bootstrap: Vec<NodeInfo> =
        c.nodes[..3].iter().map(|n| n.cfg.nodes[(n.cfg.node_id - 1) as usize].clone()).collect();
    for n in &mut c.nodes[..3] {
        n.cfg.nodes = bootstrap.clone();
    }
    c.nodes[3].cfg.join = true;
    for id in 1..=4 {
        c.start(id).await;
    }
    let leader = c.leader().await;
    let applied = propose_all(c.node(leader), 0..40).await;
    assert_eq!(c.node(4).metrics().voters.len(), 0, "node 4 is not a member yet");

    let info = &c.nodes[3].cfg.nodes[3];
    let addr = raftmq::raft::NodeAddr {
        cluster_addr: info.cluster_addr.clone(),
        mqtt_addr: info.mqtt_addr.clone(),
        admin_addr: info.admin_addr.clone(),
    };
    c.node(leader).add_learner(4, addr, true).await.unwrap();
    let m = c.node(leader).wait_for(DEADLINE, |m| m.learners.contains(&4)).await.unwrap();
    assert_eq!(m.voters.len(), 3);
    c.assert_converged(applied).await;

    c.node(leader).change_membership([1, 2, 3, 4].into(), false).await.unwrap();
    c.node(4).wait_for(DEADLINE, |m| m.voters.len() == 4 && m.voters.contains(&4)).await.unwrap();
    let applied = propose_all(c.node(c.leader().await), 40..45).await;
    c.assert_converged(applied).await;

    let leader = c.leader().await;
    let keep: std::collections::BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != 4).collect();
    c.node(leader).change_membership(keep, false).await.unwrap();
    let m = c
        .node(c.leader().await)
        .wait_for(DEADLINE, |m| !m.voters.contains(&4) && !m.learners.contains(&4))
        .await
        .unwrap();
    assert_eq!(m.voters.len(), 3);
    for id in 1..=4 {
        c.stop(id).await;
    }
}
