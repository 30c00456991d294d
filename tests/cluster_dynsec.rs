//! Dynamic security on a three-node cluster of real `raftmq` processes: the
//! first admin comes from the `[dynsec]` configuration keys, users and rights
//! are created with Mosquitto's `mosquitto_ctrl` through the leader, and every
//! node enforces them once it leads: after a leader transfer, after kill -9 of
//! the leader, and on a node restarted from its own data. Then the
//! dynsec-sync mode: every node serves, a change made through one node holds
//! on the others, each node keeps its own sessions across a restart, and the
//! switches in both directions lose no session (src/modes.rs).

mod cluster;

use std::process::Stdio;
use std::time::Duration;

use cluster::mqtt::{Client, Conn, Pkt, Pub};
use cluster::{http_get, wait_for, Cluster, Opts};

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

/// Three nodes whose `[dynsec]` keys create the admin; returns once the
/// leader has bootstrapped it (the admin can administer), with the leader.
async fn start_with_admin() -> (Cluster, u64) {
    let mut opts = Opts::three();
    for id in 1..=3 {
        opts = opts.extra(id, "[dynsec]\ninit_admin = \"admin\"\ninit_password = \"adminpass\"\n");
    }
    let c = Cluster::start(&opts).await;
    let leader = c.leader(LEADER_WAIT).await;
    wait_for("the configured admin to administer", LEADER_WAIT, || {
        let c = &c;
        async move { (ctrl(c, leader, &["listClients"]).await.0 == "admin\n").then_some(()) }
    })
    .await;
    (c, leader)
}

#[tokio::test]
async fn rights_follow_leadership() {
    let (mut c, leader) = start_with_admin().await;
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

const STEP: Duration = Duration::from_secs(15);

/// Node `id` answers /health/ready with `code`.
async fn wait_ready(c: &Cluster, id: u64, code: u16) {
    let admin = c.node(id).admin;
    wait_for(&format!("node {id} /health/ready {code}"), STEP, || async move {
        matches!(http_get(admin, "/health/ready").await, Some((got, _)) if got == code).then_some(())
    })
    .await;
}

/// The cluster group's entries committed on `leader` so far are applied on
/// every node of `ids`.
async fn wait_applied(c: &Cluster, leader: u64, ids: &[u64]) {
    let committed = match c.health(leader).await {
        Some((_, Some(s))) => s.commit_index,
        other => panic!("node {leader} status: {other:?}"),
    };
    for &id in ids {
        wait_for(&format!("node {id} applied index {committed}"), STEP, || async move {
            matches!(c.health(id).await, Some((_, Some(s))) if s.applied_index >= committed).then_some(())
        })
        .await;
    }
}

async fn connect(c: &Cluster, id: u64, conn: &Conn) -> (Client, bool) {
    match Client::connect(c.node(id).mqtt, conn, STEP).await {
        Ok((cl, Pkt::ConnAck { code: 0, session_present, .. })) => (cl, session_present),
        Ok((_, other)) => panic!("{} on node {id}: {other:?}", conn.client_id),
        Err(e) => panic!("{} on node {id}: {e}", conn.client_id),
    }
}

/// The next PUBLISH (acknowledged), skipping nothing else.
async fn next_pub(cl: &mut Client) -> Pub {
    match cl.recv(STEP).await {
        Ok(Some(Pkt::Publish(p))) => {
            if p.qos == 1 {
                let _ = cl.send(&cluster::mqtt::puback(p.pid.unwrap_or(0))).await;
            }
            p
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn dynsec_sync_mode_serves_everywhere_and_switches_back() {
    let (mut c, leader) = start_with_admin().await;
    // Clients without a user name may do everything (anonymous group).
    for cmd in [
        &["createRole", "all"][..],
        &["addRoleACL", "all", "publishClientSend", "#", "allow"],
        &["addRoleACL", "all", "subscribePattern", "#", "allow"],
        &["createGroup", "anon"],
        &["addGroupRole", "anon", "all"],
        &["setAnonymousGroup", "anon"],
    ] {
        let (out, err) = ctrl(&c, leader, cmd).await;
        assert_eq!((out.as_str(), err.as_str()), ("", ""), "{cmd:?}");
    }

    // Full-sync state before the switch: a persistent session with a queued
    // message, and a retained message.
    let (mut p1, _) = connect(&c, leader, &Conn::v5("p1").persistent()).await;
    p1.subscribe(1, "q/#", 1, STEP).await.expect("subscribe q/#");
    p1.disconnect().await;
    let (mut pubr, _) = connect(&c, leader, &Conn::v5("pub-1")).await;
    pubr.publish_acked(&Pub::new("q/1", b"queued", 1, 1), STEP).await.expect("publish q/1");
    pubr.publish_acked(&Pub::new("r/x", b"kept", 1, 2).retain(true), STEP).await.expect("retain r/x");
    pubr.disconnect().await;

    // Switch through a follower (forwarded to the leader).
    let follower = c.ids().into_iter().find(|&n| n != leader).unwrap_or(1);
    let (done, out) = c.ctl_async(follower, &["mode", "set", "dynsec-sync"]).await;
    assert!(done, "mode set dynsec-sync: {out}");
    for id in c.ids() {
        wait_ready(&c, id, 200).await;
    }
    let (done, out) = c.ctl_async(leader, &["mode", "get"]).await;
    assert!(done && out.trim() == "dynsec-sync", "mode get: {out}");

    // Every node takes clients; the session and the retained message are on
    // a node that was not the leader too.
    let (mut p1, present) = connect(&c, follower, &Conn::v5("p1").persistent().clean(false)).await;
    assert!(present, "p1 resumes its session on node {follower}");
    let m = next_pub(&mut p1).await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("q/1", &b"queued"[..]));
    let third = c.ids().into_iter().find(|&n| n != leader && n != follower).unwrap_or(3);
    let (mut r, _) = connect(&c, third, &Conn::v5("reader")).await;
    let (codes, early) = r.subscribe(1, "r/#", 1, STEP).await.expect("subscribe r/#");
    assert_eq!(codes, vec![1]);
    let retained = match early.into_iter().next() {
        Some(Pkt::Publish(p)) => p,
        _ => next_pub(&mut r).await,
    };
    assert_eq!((retained.topic.as_str(), retained.payload.as_slice()), ("r/x", &b"kept"[..]));
    r.disconnect().await;
    p1.disconnect().await;

    // A change made through one node holds on another.
    let (out, err) = ctrl(&c, third, &["createClient", "bob", "-p", "bobpw"]).await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    let port = c.node(leader).mqtt.port().to_string();
    let bob = strings(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-V",
        "mqttv5",
        "-u",
        "bob",
        "-P",
        "bobpw",
        "-t",
        "b",
        "-m",
        "x",
    ]);
    wait_for("bob to log in on another node", STEP, || {
        let bob = bob.clone();
        async move { (tool("mosquitto_pub", &bob).await.0 == 0).then_some(()) }
    })
    .await;

    // mosquitto_ctrl works through any node: each command through the next one.
    let ids = c.ids();
    let cmds: [&[&str]; 6] = [
        &["createRole", "r9"],
        &["addRoleACL", "r9", "publishClientSend", "x/#", "allow"],
        &["createClient", "carol", "-p", "carolpw"],
        &["addClientRole", "carol", "r9", "5"],
        &["createGroup", "g9"],
        &["addGroupClient", "g9", "carol"],
    ];
    for (i, cmd) in cmds.iter().enumerate() {
        let (out, err) = ctrl(&c, ids[i % ids.len()], cmd).await;
        assert_eq!((out.as_str(), err.as_str()), ("", ""), "{cmd:?} through node {}", ids[i % ids.len()]);
    }
    for &id in &ids {
        let (out, _) = ctrl(&c, id, &["getClient", "carol"]).await;
        assert_eq!(
            out, "Username: carol\nClientid:\nRoles:    r9 (priority: 5)\nGroups:   g9 (priority: -1)\n",
            "getClient through node {id}"
        );
    }

    // A change kicks the clients it concerns on every node: adding a role to
    // the anonymous group disconnects the anonymous client served by `third`.
    let (mut anon, _) = connect(&c, third, &Conn::v5("kick-me")).await;
    let (out, err) = ctrl(&c, leader, &["addGroupRole", "anon", "r9"]).await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    match anon.recv(STEP).await {
        Ok(Some(Pkt::Disconnect { code: 0x98, .. })) => {}
        other => panic!("expected DISCONNECT 0x98 on node {third}, got {other:?}"),
    }

    // p2 is anonymous too: before it connects, `follower` must have applied
    // the change (and kicked its own anonymous clients), or the kick may reach
    // p2 instead.
    wait_applied(&c, leader, &[follower]).await;

    // Each node keeps its own sessions on its own disk across a restart.
    let (mut p2, _) = connect(&c, follower, &Conn::v5("p2").persistent()).await;
    p2.subscribe(1, "d/#", 1, STEP).await.expect("subscribe d/#");
    p2.disconnect().await;
    c.kill9(follower);
    c.restart(follower).await;
    wait_ready(&c, follower, 200).await;
    let (p2, present) = connect(&c, follower, &Conn::v5("p2").persistent().clean(false)).await;
    assert!(present, "p2 kept on node {follower} across its restart");
    p2.disconnect().await;

    // Back to full-sync: only the leader serves, and what the nodes served
    // meanwhile is in the cluster state.
    let (done, out) = c.ctl_async(third, &["mode", "set", "full-sync"]).await;
    assert!(done, "mode set full-sync: {out}");
    let leader = c.leader(LEADER_WAIT).await;
    for id in c.ids().into_iter().filter(|&n| n != leader) {
        wait_ready(&c, id, 503).await;
    }
    // Each node merges its local state through the leader: p1's and p2's
    // subscriptions are both in the cluster state once they have.
    let admin = c.node(leader).admin;
    wait_for("the nodes' local states merged into the cluster state", STEP, || async move {
        let metrics = http_get(admin, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
        metrics.lines().any(|l| l == "raftmq_state_subscriptions 2").then_some(())
    })
    .await;
    let (mut p2, present) = connect(&c, leader, &Conn::v5("p2").persistent().clean(false)).await;
    assert!(present, "p2, created on node {follower} in dynsec-sync, resumes on the leader");
    let (mut pubr, _) = connect(&c, leader, &Conn::v5("pub-2")).await;
    pubr.publish_acked(&Pub::new("d/1", b"after", 1, 1), STEP).await.expect("publish d/1");
    let m = next_pub(&mut p2).await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("d/1", &b"after"[..]));
}
