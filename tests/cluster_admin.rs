//! The cluster admin CLI against real processes: `raftmq local-cluster`
//! starts three nodes (the real binary), and `raftmq ctl` (the real binary
//! too) drives them through any node's admin API:
//! - exactly one leader; `ctl status` / `ctl members` against a follower show
//!   that same leader (the follower asks the leader);
//! - `leader transfer` moves leadership;
//! - `leader pin 3` moves leadership to node 3; after kill -9 of node 3
//!   another node leads (local-cluster keeps the others running); after node 3
//!   is restarted with `raftmq serve --config DIR/node-3/raftmq.toml`,
//!   leadership returns to it;
//! - `add-node 4` (node 4 started with `join = true`) joins as a learner,
//!   catches up and becomes a voter; `remove-node 4` removes it;
//! - SIGTERM to local-cluster stops every node it started.
//!
//! Every wait is on a condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use raftmq::admin::cluster::ClusterInfo;

const DEADLINE: Duration = Duration::from_secs(40);
const EXE: &str = env!("CARGO_BIN_EXE_raftmq");

fn port_free(p: u32) -> bool {
    u16::try_from(p).is_ok_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A base port P whose MQTT, admin and cluster ports for `n` nodes are free,
/// below the ephemeral range (so no outgoing connection takes one of them
/// before the nodes bind) and away from local-cluster's default ports.
fn free_base(n: u32) -> u16 {
    for _ in 0..200 {
        let base: u32 = rand::random_range(23_000..32_000 - 200 - n);
        if (0..n).all(|i| port_free(base + i) && port_free(base + 100 + i) && port_free(base + 200 + i)) {
            return base as u16;
        }
    }
    panic!("no free port range");
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn alive(pid: u32) -> bool {
    // Signal 0 is not available through rustix's Signal; /proc tells as much
    // (a zombie counts as gone).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The processes of one test; everything is killed on drop (also on panic).
struct Procs {
    dir: PathBuf,
    local_cluster: Option<Child>,
    others: Vec<Child>,
}

impl Procs {
    fn node_pid(&self, i: u32) -> u32 {
        let path = self.dir.join(format!("node-{i}/raftmq.pid"));
        std::fs::read_to_string(&path).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 1..=3 {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("node-{i}/raftmq.pid"))) {
                // Only a node of ours (the pid of a killed node may be reused).
                if let Ok(pid) = pid.trim().parse::<u32>() {
                    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.dir.to_string_lossy()));
                    if ours {
                        kill(pid, rustix::process::Signal::KILL);
                    }
                }
            }
        }
        for c in self.local_cluster.iter_mut().chain(self.others.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Addrs {
    mqtt: String,
    admin: String,
    cluster: String,
}

fn addrs(base: u16, i: u16) -> Addrs {
    Addrs {
        mqtt: format!("127.0.0.1:{}", base + i - 1),
        admin: format!("127.0.0.1:{}", base + 100 + i - 1),
        cluster: format!("127.0.0.1:{}", base + 200 + i - 1),
    }
}

fn ctl(admin: &str, args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("ctl")
        .arg("--url")
        .arg(format!("http://{admin}"))
        .args(args)
        .env_remove("RAFTMQ_TOKEN")
        .output()
        .expect("run raftmq ctl")
}

fn ctl_ok(admin: &str, args: &[&str]) -> String {
    let out = ctl(admin, args);
    assert!(
        out.status.success(),
        "ctl {args:?} via {admin}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn members(admin: &str) -> Option<ClusterInfo> {
    let out = ctl(admin, &["members", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `GET /health/leader` status code.
fn health_leader(admin: &str) -> Option<u16> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(raftmq::admin::client::request(
        admin,
        hyper::Method::GET,
        "/health/leader",
        None,
        &[],
        None,
        Duration::from_secs(2),
    ))
    .ok()
    .map(|r| r.status)
}

/// The single node whose /health/leader answers 200 among `nodes` (None while
/// there is none, or more than one).
fn sole_leader(base: u16, nodes: &[u16]) -> Option<u16> {
    let leading: Vec<u16> =
        nodes.iter().copied().filter(|i| health_leader(&addrs(base, *i).admin) == Some(200)).collect();
    (leading.len() == 1).then(|| leading[0])
}

/// Waits until `want` (or any node, if None) is the only serving leader of
/// `nodes` and every one of them agrees.
fn wait_leader(base: u16, nodes: &[u16], want: Option<u16>) -> u16 {
    wait_until(&format!("leader {want:?} among {nodes:?}"), DEADLINE, || {
        let l = sole_leader(base, nodes)?;
        if want.is_some_and(|w| w != l) {
            return None;
        }
        let agree = nodes
            .iter()
            .all(|i| members(&addrs(base, *i).admin).is_some_and(|m| m.leader_id == Some(u64::from(l))));
        agree.then_some(l)
    })
}

fn start_local_cluster(dir: &Path, base: u16) -> Procs {
    let log = std::fs::File::create(dir.join("local-cluster.out")).unwrap();
    let child = Command::new(EXE)
        .args(["local-cluster", "--nodes", "3", "--dir"])
        .arg(dir)
        .args(["--base-port", &base.to_string()])
        .env("RAFTMQ_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn local-cluster");
    Procs { dir: dir.to_path_buf(), local_cluster: Some(child), others: Vec::new() }
}

fn serve(config: &Path, log: &Path) -> Child {
    Command::new(EXE)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RAFTMQ_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn raftmq serve")
}

#[test]
fn local_cluster_ctl_transfer_pin_failover_and_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let base = free_base(4);
    let mut procs = start_local_cluster(&dir, base);
    let all = [1u16, 2, 3];

    // The table and the files local-cluster promises.
    let out_path = dir.join("local-cluster.out");
    wait_until("the local-cluster table", DEADLINE, || {
        let out = std::fs::read_to_string(&out_path).ok()?;
        out.contains(&addrs(base, 3).cluster).then_some(())
    });
    for i in all {
        assert!(dir.join(format!("node-{i}/raftmq.toml")).is_file());
    }

    // Exactly one leader, and the followers agree.
    let leader = wait_leader(base, &all, None);
    let follower = *all.iter().find(|i| **i != leader).unwrap();
    let fa = addrs(base, follower).admin;
    // Right after the election a node may still be catching up (openraft calls
    // it a learner until it has the membership): wait until all have settled.
    let info = wait_until("every node settled", DEADLINE, || {
        members(&fa).filter(|m| {
            m.nodes.iter().all(|n| {
                n.reachable && n.lag.is_some() && matches!(n.role.as_deref(), Some("leader" | "follower"))
            })
        })
    });
    assert_eq!(info.answered_by, u64::from(leader), "a follower asks the leader");
    assert_eq!(info.leader_id, Some(u64::from(leader)));
    assert_eq!(info.nodes.len(), 3);
    assert!(info.nodes.iter().all(|n| n.voter), "{info:?}");
    let status = ctl_ok(&fa, &["status"]);
    assert!(status.contains(&format!("node         {follower} (follower")), "{status}");
    assert!(status.contains(&format!("leader       {leader} ")), "{status}");
    assert!(status.contains("members      3 (3 voters, 0 learners), 3 reachable"), "{status}");
    let table = ctl_ok(&fa, &["members"]);
    assert!(table.contains(&format!("\n{leader}*  leader")), "{table}");

    // Transfer to a node that is neither the leader nor node 3.
    let target = *all.iter().find(|i| **i != leader && **i != 3).unwrap();
    let out = ctl_ok(&fa, &["leader", "transfer", &target.to_string()]);
    assert_eq!(out, format!("leadership moved to node {target}\n"));
    wait_leader(base, &all, Some(target));

    // Pin node 3: leadership moves there.
    ctl_ok(&addrs(base, 1).admin, &["leader", "pin", "3"]);
    wait_leader(base, &all, Some(3));
    assert_eq!(members(&addrs(base, 1).admin).unwrap().pinned_leader, Some(3));

    // kill -9 node 3: another node leads; local-cluster keeps the others.
    let pid3 = procs.node_pid(3);
    kill(pid3, rustix::process::Signal::KILL);
    wait_until("node 3 gone", DEADLINE, || (!alive(pid3)).then_some(()));
    let interim = wait_leader(base, &[1, 2], None);
    assert_ne!(interim, 3);
    wait_until("local-cluster reports node 3", DEADLINE, || {
        std::fs::read_to_string(&out_path).ok()?.contains("node 3 exited").then_some(())
    });
    assert!(alive(procs.node_pid(1)) && alive(procs.node_pid(2)));

    // Restart node 3 the documented way: leadership returns to it.
    let cfg3 = dir.join("node-3/raftmq.toml");
    procs.others.push(serve(&cfg3, &dir.join("node-3-restart.log")));
    wait_leader(base, &all, Some(3));

    // Unpin, so membership changes below do not move leadership around.
    ctl_ok(&addrs(base, 2).admin, &["leader", "unpin"]);

    // add-node 4: started with join = true, joins as learner, catches up, votes.
    let a4 = addrs(base, 4);
    let node4 = dir.join("node-4");
    std::fs::create_dir_all(&node4).unwrap();
    // The same layout as local-cluster's, with node 4 joining.
    let plan = raftmq::local_cluster::plan(4, &dir, base).unwrap();
    let cfg = raftmq::local_cluster::config_text(&plan[3], &plan)
        .replace("[cluster]\n", "[cluster]\njoin = true\n");
    std::fs::write(node4.join("raftmq.toml"), &cfg).unwrap();
    procs.others.push(serve(&node4.join("raftmq.toml"), &dir.join("node-4.log")));
    wait_until("node 4 admin up", DEADLINE, || health_leader(&a4.admin).map(|_| ()));

    let out =
        ctl_ok(&fa, &["add-node", "4", "--cluster", &a4.cluster, "--mqtt", &a4.mqtt, "--admin", &a4.admin]);
    assert!(out.starts_with("node 4 added as a voter"), "{out}");
    let info = wait_until("node 4 a voter", DEADLINE, || {
        members(&a4.admin).filter(|m| m.nodes.iter().any(|n| n.id == 4 && n.voter))
    });
    assert_eq!(info.nodes.iter().filter(|n| n.voter).count(), 4);
    let n4 = info.nodes.iter().find(|n| n.id == 4).unwrap();
    assert!(n4.reachable && n4.applied_index.is_some(), "{n4:?}");

    let out = ctl_ok(&fa, &["remove-node", "4"]);
    assert!(out.starts_with("node 4 removed"), "{out}");
    let info = members(&fa).unwrap();
    assert!(info.nodes.iter().all(|n| n.id != 4), "{info:?}");

    // Errors: an unknown node is reported with exit code 1; usage errors exit 2.
    let out = ctl(&fa, &["leader", "transfer", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a member"));
    assert_eq!(ctl(&fa, &["leader", "pin"]).status.code(), Some(2));

    // SIGTERM to local-cluster stops the nodes it started (1 and 2).
    let (p1, p2) = (procs.node_pid(1), procs.node_pid(2));
    let mut lc = procs.local_cluster.take().unwrap();
    kill(lc.id(), rustix::process::Signal::TERM);
    let status = wait_until("local-cluster exits", DEADLINE, || lc.try_wait().ok().flatten());
    assert!(status.success(), "{status}");
    assert!(!alive(p1) && !alive(p2), "nodes still running after local-cluster stopped");
}
