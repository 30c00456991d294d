//! Dynamic security on a three-node cluster of real `raftmq` processes: the
//! first admin comes from the `[dynsec]` configuration keys, users and rights
//! are created with Mosquitto's `mosquitto_ctrl` through the leader, and every
//! node enforces them once it leads: after a leader transfer, after kill -9 of
//! the leader, and on a node restarted from its own data.

mod cluster;

use std::process::Stdio;
use std::time::Duration;

use cluster::{wait_for, Cluster, Opts};

const LEADER_WAIT: Duration = Duration::from_secs(15);
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a Mosquitto command-line tool: (exit code, stdout, stderr).
async fn tool(name: &str, args: &[String]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(format!("/usr/bin/{name}"));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("{name}: {e}"),
        Err(_) => panic!("{name} {args:?} did not finish within {TOOL_TIMEOUT:?}"),
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `mosquitto_ctrl` as the admin against node `id`'s MQTT port; returns
/// stdout and the server's error lines.
async fn ctrl(c: &Cluster, id: u64, a: &[&str]) -> (String, String) {
    let port = c.node(id).mqtt.port().to_string();
    let mut args = strings(&["-h", "127.0.0.1", "-p", &port, "-u", "admin", "-P", "adminpass", "dynsec"]);
    args.extend(strings(a));
    let (_, out, err) = tool("mosquitto_ctrl", &args).await;
    let err = err.lines().filter(|l| l.contains("Error")).collect::<Vec<_>>().join("\n");
    (out, err)
}

/// `mosquitto_pub -q 1` as alice against node `id`: exit code and stderr.
async fn alice_pub(c: &Cluster, id: u64, password: &str, topic: &str) -> (i32, String) {
    let port = c.node(id).mqtt.port().to_string();
    let args = strings(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-V",
        "mqttv5",
        "-u",
        "alice",
        "-P",
        password,
        "-t",
        topic,
        "-m",
        "x",
        "-q",
        "1",
    ]);
    let (code, _, err) = tool("mosquitto_pub", &args).await;
    (code, err)
}

#[tokio::test]
async fn rights_follow_leadership() {
    let mut opts = Opts::three();
    for id in 1..=3 {
        opts = opts.extra(id, "[dynsec]\ninit_admin = \"admin\"\ninit_password = \"adminpass\"\n");
    }
    let mut c = Cluster::start(&opts).await;
    let leader = c.leader(LEADER_WAIT).await;

    // The admin of [dynsec] exists once the leader has bootstrapped it.
    wait_for("the configured admin to administer", LEADER_WAIT, || {
        let c = &c;
        async move { (ctrl(c, leader, &["listClients"]).await.0 == "admin\n").then_some(()) }
    })
    .await;
    for cmd in [
        &["createClient", "alice", "-p", "alicepw"][..],
        &["createRole", "writer"],
        &["addRoleACL", "writer", "publishClientSend", "w/#", "allow"],
        &["addClientRole", "alice", "writer"],
    ] {
        let (out, err) = ctrl(&c, leader, cmd).await;
        assert_eq!((out.as_str(), err.as_str()), ("", ""), "{cmd:?}");
    }
    let (code, err) = alice_pub(&c, leader, "alicepw", "w/1").await;
    assert_eq!((code, err.as_str()), (0, ""), "alice on the leader");

    // Leader transfer: the new leader enforces the same rights.
    let next = c.ids().into_iter().find(|&n| n != leader).unwrap_or(1);
    let (done, out) = c.ctl_async(next, &["leader", "transfer", &next.to_string()]).await;
    assert!(done, "leader transfer: {out}");
    c.wait_leader_is(next, LEADER_WAIT).await;
    let (code, err) = alice_pub(&c, next, "alicepw", "w/2").await;
    assert_eq!((code, err.as_str()), (0, ""), "alice on node {next}");
    let (code, err) = alice_pub(&c, next, "alicepw", "other").await;
    assert!(code == 0 && err.contains("Not authorized"), "denied topic on node {next}: {code} {err}");
    let (code, _) = alice_pub(&c, next, "wrong", "w/3").await;
    assert_eq!(code, 135, "wrong password on node {next}");

    // A change through the new leader; then kill -9 it: the third node leads
    // with the change applied.
    let (out, err) = ctrl(&c, next, &["setClientPassword", "alice", "changed"]).await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    c.kill9(next);
    let others: Vec<u64> = c.ids().into_iter().filter(|&n| n != next).collect();
    let third = c.leader_among(&others, LEADER_WAIT).await;
    let (code, _) = alice_pub(&c, third, "changed", "w/4").await;
    assert_eq!(code, 0, "new password on node {third}");
    let (code, _) = alice_pub(&c, third, "alicepw", "w/5").await;
    assert_eq!(code, 135, "old password on node {third}");

    // The killed node restarts from its own data and, once it leads again,
    // knows the change too.
    c.restart(next).await;
    c.settled(&c.ids(), LEADER_WAIT).await;
    let (done, out) = c.ctl_async(third, &["leader", "transfer", &next.to_string()]).await;
    assert!(done, "leader transfer back: {out}");
    c.wait_leader_is(next, LEADER_WAIT).await;
    let (code, _) = alice_pub(&c, next, "changed", "w/6").await;
    assert_eq!(code, 0, "restarted node {next}");
    // The exported state is Mosquitto's format, the same through any node.
    let (done, a) = c.ctl_async(leader, &["dynsec", "export"]).await;
    assert!(done, "export: {a}");
    let (done, b) = c.ctl_async(third, &["dynsec", "export"]).await;
    assert!(done && a == b, "exports differ:\n{a}\n{b}");
    assert!(a.contains("\"alice\"") && a.contains("\"writer\""), "{a}");
}
