//! The cluster routes against in-process Raft nodes, each with its own admin
//! server on loopback, driven through `raftmq ctl`'s client: requests sent to
//! a follower are forwarded to the leader; transfer, pin (also across a
//! restart of the pinned node), add-node and remove-node change the cluster.
//! Every wait is on a condition with a deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use super::cluster::{route, ClusterInfo, Route};
use super::{AdminConfig, AdminServer, AdminView, Mode, NodeStatus, Role};
use crate::ctl::{self, CtlArgs, CtlCommand, CtlError, LeaderCommand};
use crate::raft::{self, ClusterConfig, NodeId, NodeInfo, NodeMetrics, RaftNode};
use crate::state::{Limits, State};

const DEADLINE: Duration = Duration::from_secs(30);

/// A free port below the ephemeral range (so no outgoing connection takes it
/// between now and the bind), never handed out twice in this process (tests
/// run in parallel: two clusters sharing a port would talk to each other).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let p: u16 = rand::random_range(23_000..32_000);
        if !given.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            return p;
        }
    }
}

/// What a clustered node reports on its health endpoints.
struct RaftView(Arc<RaftNode>);

impl AdminView for RaftView {
    fn node_status(&self) -> NodeStatus {
        let m = self.0.metrics();
        NodeStatus {
            node_id: m.node_id,
            role: match m.role {
                raft::Role::Leader => Role::Leader,
                raft::Role::Candidate => Role::Candidate,
                raft::Role::Learner => Role::Learner,
                raft::Role::Follower | raft::Role::Shutdown => Role::Follower,
            },
            leader_id: m.leader,
            leader_mqtt_addr: m.leader_addr.map(|a| a.mqtt_addr),
            term: m.term,
            commit_index: m.commit_index.unwrap_or(0),
            applied_index: m.applied_index.unwrap_or(0),
            mode: Mode::FullSync,
            serving: m.serving,
            ready: m.serving,
        }
    }
    fn render_metrics(&self, _out: &mut String) {}
}

struct TestNode {
    info: NodeInfo,
    cfg: ClusterConfig,
    dir: PathBuf,
    raft: Option<Arc<RaftNode>>,
    admin_stop: CancellationToken,
}

struct Cluster {
    _tmp: tempfile::TempDir,
    nodes: Vec<TestNode>,
    token: Option<String>,
}

fn info(id: NodeId) -> NodeInfo {
    NodeInfo {
        id,
        cluster_addr: format!("127.0.0.1:{}", free_port()),
        mqtt_addr: format!("127.0.0.1:{}", 1883 + id),
        admin_addr: format!("127.0.0.1:{}", free_port()),
    }
}

impl Cluster {
    fn new(n: u64, token: Option<&str>) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let infos: Vec<NodeInfo> = (1..=n).map(info).collect();
        let nodes = infos
            .iter()
            .map(|i| TestNode {
                info: i.clone(),
                cfg: ClusterConfig {
                    node_id: i.id,
                    listen: i.cluster_addr.clone(),
                    nodes: infos.clone(),
                    ..Default::default()
                },
                dir: tmp.path().join(format!("node-{}", i.id)),
                raft: None,
                admin_stop: CancellationToken::new(),
            })
            .collect();
        Cluster { _tmp: tmp, nodes, token: token.map(str::to_owned) }
    }

    /// A node started later with `join = true`, knowing the others.
    fn add_joiner(&mut self, id: NodeId) -> NodeInfo {
        let i = info(id);
        let mut nodes: Vec<NodeInfo> = self.nodes.iter().map(|n| n.info.clone()).collect();
        nodes.push(i.clone());
        self.nodes.push(TestNode {
            info: i.clone(),
            cfg: ClusterConfig {
                node_id: id,
                listen: i.cluster_addr.clone(),
                nodes,
                join: true,
                ..Default::default()
            },
            dir: self._tmp.path().join(format!("node-{id}")),
            raft: None,
            admin_stop: CancellationToken::new(),
        });
        i
    }

    fn idx(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|n| n.info.id == id).unwrap()
    }

    fn raft(&self, id: NodeId) -> &Arc<RaftNode> {
        self.nodes[self.idx(id)].raft.as_ref().unwrap()
    }

    async fn start(&mut self, id: NodeId) {
        let i = self.idx(id);
        let n = &mut self.nodes[i];
        let state = Arc::new(RwLock::new(State::new(Limits::default())));
        // A restarted node's old cluster listener may take a moment to close.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let raft = loop {
            match RaftNode::start(&n.cfg, &n.dir, state.clone(), Box::new(|_| {})).await {
                Ok(r) => break Arc::new(r),
                Err(raft::RaftError::Listen { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("start node {id}: {e}"),
            }
        };
        let cfg = AdminConfig { listen: n.info.admin_addr.parse().unwrap(), token: self.token.clone() };
        let view: Arc<dyn AdminView> = Arc::new(RaftView(raft.clone()));
        let server = AdminServer::bind_with_cluster(&cfg, view, Some(raft.clone())).await.unwrap();
        n.admin_stop = CancellationToken::new();
        tokio::spawn(server.run(n.admin_stop.clone()));
        n.raft = Some(raft);
    }

    async fn stop(&mut self, id: NodeId) {
        let i = self.idx(id);
        let n = &mut self.nodes[i];
        n.admin_stop.cancel();
        n.raft.take().unwrap().shutdown().await.unwrap();
    }

    /// Waits until every running node sees the same leader, satisfying `cond`.
    async fn leader(&self, cond: impl Fn(NodeId) -> bool) -> NodeId {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let seen: Vec<Option<NodeId>> =
                self.nodes.iter().filter_map(|n| n.raft.as_ref()).map(|r| r.metrics().leader).collect();
            if let Some(Some(l)) = seen.first() {
                if seen.iter().all(|s| *s == Some(*l)) && cond(*l) && self.raft(*l).metrics().serving {
                    return *l;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no agreed leader: {seen:?}");
            // Wake on the next metrics change of any node (bounded by a heartbeat).
            let first = self.nodes.iter().find_map(|n| n.raft.as_ref()).unwrap();
            let _ = first.wait_for(Duration::from_millis(100), |_| false).await;
        }
    }

    fn url(&self, id: NodeId) -> String {
        format!("http://{}", self.nodes[self.idx(id)].info.admin_addr)
    }

    async fn ctl(&self, via: NodeId, command: CtlCommand) -> Result<String, CtlError> {
        let args = CtlArgs { url: self.url(via), token: self.token.clone(), json: false, command };
        ctl::execute(&args).await
    }

    async fn cluster_json(&self, via: NodeId) -> ClusterInfo {
        let args = CtlArgs {
            url: self.url(via),
            token: self.token.clone(),
            json: true,
            command: CtlCommand::Members,
        };
        serde_json::from_str(&ctl::execute(&args).await.unwrap()).unwrap()
    }
}

fn other(ids: &[NodeId], not: &[NodeId]) -> NodeId {
    *ids.iter().find(|i| !not.contains(i)).unwrap()
}

#[test]
fn routing_decisions() {
    let mut m = NodeMetrics {
        node_id: 2,
        role: raft::Role::Follower,
        term: 3,
        leader: Some(1),
        leader_addr: Some(raft::NodeAddr {
            cluster_addr: "c".into(),
            mqtt_addr: "m".into(),
            admin_addr: "127.0.0.1:9001".into(),
        }),
        last_log_index: None,
        commit_index: None,
        applied_index: None,
        snapshot_index: None,
        purged_index: None,
        quorum_acked_at: None,
        serving: false,
        leader_changes: 1,
        voters: [1, 2, 3].into(),
        learners: Default::default(),
    };
    assert_eq!(route(&m, false).unwrap(), Route::Forward { leader: 1, admin_addr: "127.0.0.1:9001".into() });
    // Forwarded once already: never again (no loops while leadership moves).
    assert_eq!(route(&m, true).unwrap_err().0, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    m.leader_addr = None;
    assert_eq!(route(&m, false).unwrap_err().0, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    m.role = raft::Role::Leader;
    assert_eq!(route(&m, true).unwrap(), Route::Local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_forwards_and_leadership_moves_by_transfer_and_pin() {
    let mut c = Cluster::new(3, Some("tok"));
    for id in 1..=3 {
        c.start(id).await;
    }
    let ids = [1, 2, 3];
    let leader = c.leader(|_| true).await;
    let follower = other(&ids, &[leader]);

    // A follower's view comes from the leader: replication progress of everyone
    // (once every node has the membership: until then openraft calls it a learner).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let info = loop {
        let info = c.cluster_json(follower).await;
        let settled = info.nodes.iter().all(|n| {
            n.reachable
                && n.matched_index.is_some()
                && matches!(n.role.as_deref(), Some("leader" | "follower"))
        });
        if settled {
            break info;
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info.answered_by, leader);
    assert_eq!(info.leader_id, Some(leader));
    assert_eq!(info.nodes.len(), 3);
    assert!(info.nodes.iter().all(|n| n.voter && n.reachable && n.matched_index.is_some()), "{info:?}");
    assert_eq!(info.nodes.iter().filter(|n| n.leader).count(), 1);
    let text = c.ctl(follower, CtlCommand::Status).await.unwrap();
    assert!(text.contains(&format!("leader       {leader} ")), "{text}");

    // Transfer through a follower (forwarded to the leader).
    let target = other(&ids, &[leader, follower]);
    let out = c.ctl(follower, CtlCommand::Leader(LeaderCommand::Transfer { id: target })).await.unwrap();
    assert_eq!(out, format!("leadership moved to node {target}\n"));
    assert_eq!(c.leader(|l| l == target).await, target);

    // Errors: unknown node, bad token.
    match c.ctl(follower, CtlCommand::Leader(LeaderCommand::Transfer { id: 9 })).await {
        Err(CtlError::Api { status: 404, message }) => assert!(message.contains("not a member"), "{message}"),
        other => panic!("{other:?}"),
    }
    let bad = CtlArgs {
        url: c.url(follower),
        token: Some("nope".into()),
        json: false,
        command: CtlCommand::Members,
    };
    assert!(matches!(ctl::execute(&bad).await, Err(CtlError::Unauthorized { .. })));

    // Pin to a node that does not lead: leadership moves there by itself.
    let pinned = other(&ids, &[target]);
    c.ctl(target, CtlCommand::Leader(LeaderCommand::Pin { id: pinned })).await.unwrap();
    assert_eq!(c.leader(|l| l == pinned).await, pinned);
    assert_eq!(c.cluster_json(target).await.pinned_leader, Some(pinned));
    // A transfer elsewhere would fight the pin: refused.
    match c.ctl(pinned, CtlCommand::Leader(LeaderCommand::Transfer { id: target })).await {
        Err(CtlError::Api { status: 409, .. }) => {}
        other => panic!("{other:?}"),
    }

    // The pinned node fails: another leads; it comes back: leadership returns.
    c.stop(pinned).await;
    let interim = c.leader(|l| l != pinned).await;
    assert_ne!(interim, pinned);
    c.start(pinned).await;
    assert_eq!(c.leader(|l| l == pinned).await, pinned);

    // Unpin: the preference is gone, a transfer works again and stays.
    let out = c.ctl(interim, CtlCommand::Leader(LeaderCommand::Unpin)).await.unwrap();
    assert!(out.starts_with("leadership unpinned"), "{out}");
    assert_eq!(c.cluster_json(interim).await.pinned_leader, None);
    c.ctl(interim, CtlCommand::Leader(LeaderCommand::Transfer { id: interim })).await.unwrap();
    assert_eq!(c.leader(|l| l == interim).await, interim);
    for id in ids {
        c.stop(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_joins_as_learner_then_votes_and_remove_node() {
    let mut c = Cluster::new(3, None);
    for id in 1..=3 {
        c.start(id).await;
    }
    let leader = c.leader(|_| true).await;
    let follower = other(&[1, 2, 3], &[leader]);
    let new = c.add_joiner(4);
    c.start(4).await;

    // Not yet a member: removing it is a 404.
    assert!(matches!(
        c.ctl(follower, CtlCommand::RemoveNode { id: 4 }).await,
        Err(CtlError::Api { status: 404, .. })
    ));

    let add = |learner| CtlCommand::AddNode {
        id: 4,
        cluster: new.cluster_addr.clone(),
        mqtt: new.mqtt_addr.clone(),
        admin: new.admin_addr.clone(),
        learner,
    };
    let out = c.ctl(follower, add(true)).await.unwrap();
    assert!(out.starts_with("node 4 added as a learner"), "{out}");
    let info = c.cluster_json(follower).await;
    let n4 = info.nodes.iter().find(|n| n.id == 4).expect("node 4 listed");
    assert!(!n4.voter);
    c.raft(4).wait_for(DEADLINE, |m| m.learners.contains(&4)).await.unwrap();

    // Promote: same request without --learner.
    let out = c.ctl(follower, add(false)).await.unwrap();
    assert!(out.starts_with("node 4 added as a voter"), "{out}");
    let m = c.raft(4).wait_for(DEADLINE, |m| m.voters.contains(&4)).await.unwrap();
    assert_eq!(m.voters.len(), 4);
    // Adding a voter again is a conflict.
    assert!(matches!(c.ctl(follower, add(false)).await, Err(CtlError::Api { status: 409, .. })));

    // Make the new node the leader, then remove it: the leader removes itself
    // and another node takes over.
    c.raft(4).wait_for(DEADLINE, |m| m.commit_index == m.last_log_index).await.unwrap();
    c.ctl(follower, CtlCommand::Leader(LeaderCommand::Transfer { id: 4 })).await.unwrap();
    assert_eq!(c.leader(|l| l == 4).await, 4);
    let out = c.ctl(follower, CtlCommand::RemoveNode { id: 4 }).await.unwrap();
    assert!(out.starts_with("node 4 removed"), "{out}");
    let m = c
        .raft(follower)
        .wait_for(DEADLINE, |m| !m.voters.contains(&4) && !m.learners.contains(&4))
        .await
        .unwrap();
    assert_eq!(m.voters.len(), 3);
    let leader =
        c.raft(follower).wait_for(DEADLINE, |m| m.leader.is_some_and(|l| l != 4)).await.unwrap().leader;
    assert!(leader.is_some_and(|l| l <= 3));
    let info = c.cluster_json(follower).await;
    assert!(info.nodes.iter().all(|n| n.id != 4), "{info:?}");
    for id in 1..=4 {
        c.stop(id).await;
    }
}
