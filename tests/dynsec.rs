//! Dynamic security driven by Mosquitto's own tools: `mosquitto_ctrl dynsec`
//! administers the broker, `mosquitto_pub`/`mosquitto_sub` and a raw MQTT
//! client see the decisions. Every scenario starts from the file
//! `mosquitto_ctrl dynsec init` writes, imported with `raftmq ctl dynsec
//! import`, so `RAFTMQ_TEST_BROKER=mosquitto cargo test --test dynsec` runs the
//! same scenarios against Mosquitto 2 with its plugin (the expected outputs
//! are Mosquitto's).

mod common;

use std::time::Duration;

use common::raw::*;
use common::{against_mosquitto, args, run_tool, Broker, BrokerCfg};

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
const ADMIN: &str = "admin";
const ADMIN_PW: &str = "adminpass";

/// A broker whose dynamic security holds only what `dynsec init` creates.
async fn start_dynsec() -> Broker {
    start_dynsec_with(BrokerCfg::new()).await
}

/// [`start_dynsec`] with more configuration.
async fn start_dynsec_with(cfg: BrokerCfg) -> Broker {
    let seed = tempfile::tempdir().expect("tempdir");
    let file = seed.path().join("dynsec.json");
    let (ok, out, err) = run_tool(
        "mosquitto_ctrl",
        &args(&["dynsec", "init", &file.display().to_string(), ADMIN, ADMIN_PW]),
        TOOL_TIMEOUT,
    )
    .await;
    assert!(ok, "mosquitto_ctrl dynsec init: {out} {err}");
    let content = std::fs::read(&file).expect("dynsec init file");
    let cfg = cfg
        .file("dynsec.json", &content)
        .mosquitto("plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
        .mosquitto("plugin_opt_config_file {dir}/dynsec.json");
    let b = Broker::start_with(cfg).await;
    if !against_mosquitto() {
        let path = b.dir.path().join("dynsec.json");
        let (ok, out) = raftmq_ctl(&b, &["dynsec", "import", &path.display().to_string()]);
        assert!(ok, "raftmq ctl dynsec import: {out}");
    }
    b
}

/// `raftmq ctl --url <admin> ARGS...`: (success, stdout + stderr).
fn raftmq_ctl(b: &Broker, a: &[&str]) -> (bool, String) {
    raftmq_ctl_stdin(b, a, None)
}

fn raftmq_ctl_stdin(b: &Broker, a: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let url = format!("http://{}", b.admin);
    let mut child = Command::new(env!("CARGO_BIN_EXE_raftmq"))
        .args(["ctl", "--url", &url])
        .args(a)
        .env_remove("RAFTMQ_DYNSEC_PASSWORD")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn raftmq ctl");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().expect("raftmq ctl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `mosquitto_ctrl -u admin ... dynsec ARGS`: (stdout, stderr without
/// the warning about unencrypted connections).
async fn ctrl(b: &Broker, a: &[&str]) -> (String, String) {
    ctrl_as(b, ADMIN, ADMIN_PW, a).await
}

async fn ctrl_as(b: &Broker, user: &str, pw: &str, a: &[&str]) -> (String, String) {
    let port = b.addr.port().to_string();
    let mut full = args(&["-h", "127.0.0.1", "-p", &port, "-u", user, "-P", pw, "dynsec"]);
    full.extend(a.iter().map(|s| s.to_string()));
    let (_, out, err) = run_tool("mosquitto_ctrl", &full, TOOL_TIMEOUT).await;
    let err: String = err
        .lines()
        .filter(|l| {
            !l.starts_with("Warning: You are running mosquitto_ctrl without encryption")
                && !l.starts_with("This means all of the configuration changes you are making are visible")
                && !l.trim().is_empty()
        })
        .map(|l| format!("{l}\n"))
        .collect();
    (out, err)
}

/// A command that must succeed silently.
async fn ok(b: &Broker, a: &[&str]) {
    let (out, err) = ctrl(b, a).await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""), "mosquitto_ctrl dynsec {a:?}");
}

/// mosquitto_pub once: (exit code, stderr).
async fn mpub(
    b: &Broker,
    v5: bool,
    creds: Option<(&str, &str)>,
    extra: &[&str],
    topic: &str,
) -> (i32, String) {
    let port = b.addr.port().to_string();
    let mut a = args(&["-h", "127.0.0.1", "-p", &port, "-V", if v5 { "mqttv5" } else { "mqttv311" }]);
    if let Some((u, p)) = creds {
        a.extend(args(&["-u", u, "-P", p]));
    }
    a.extend(args(extra));
    a.extend(args(&["-t", topic, "-m", "x", "-q", "1"]));
    let mut cmd = tokio::process::Command::new(common::mosquitto_tool("mosquitto_pub"));
    cmd.args(&a).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await.expect("mosquitto_pub timed out");
    let out = out.expect("mosquitto_pub");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

#[tokio::test]
async fn mosquitto_ctrl_commands_answer_like_mosquitto() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "alice", "-p", "alicepw"]).await;
    let (_, err) = ctrl(&b, &["createClient", "alice", "-p", "x"]).await;
    assert_eq!(err, "createClient: Error: Client already exists\n");
    ok(&b, &["createRole", "r1"]).await;
    ok(&b, &["addRoleACL", "r1", "publishClientSend", "t/deny", "deny", "5"]).await;
    ok(&b, &["addRoleACL", "r1", "publishClientSend", "t/#", "allow"]).await;
    ok(&b, &["addRoleACL", "r1", "subscribePattern", "t/#", "allow"]).await;
    let (_, err) = ctrl(&b, &["addRoleACL", "r1", "publishClientSend", "t/#", "allow"]).await;
    assert_eq!(err, "addRoleACL: Error: ACL with this topic already exists\n");
    ok(&b, &["createRole", "r2"]).await;
    ok(&b, &["addClientRole", "alice", "r1", "1"]).await;
    ok(&b, &["addClientRole", "alice", "r2"]).await;
    ok(&b, &["createGroup", "g1"]).await;
    ok(&b, &["addGroupClient", "g1", "alice", "3"]).await;
    ok(&b, &["addGroupRole", "g1", "r2", "4"]).await;

    let (out, _) = ctrl(&b, &["getClient", "alice"]).await;
    assert_eq!(
        out,
        "Username: alice\nClientid:\nRoles:    r1 (priority: 1)\n          r2 (priority: -1)\nGroups:   g1 (priority: 3)\n"
    );
    let (out, _) = ctrl(&b, &["getRole", "r1"]).await;
    assert_eq!(
        out,
        "Rolename: r1\nACLs:     publishClientSend    : deny  : t/deny (priority: 5)\n          publishClientSend    : allow : t/# (priority: 0)\n          subscribePattern     : allow : t/# (priority: 0)\n"
    );
    let (out, _) = ctrl(&b, &["getGroup", "g1"]).await;
    assert_eq!(out, "Groupname: g1\nRoles:     r2 (priority: 4)\nClients:   alice\n");
    let (out, _) = ctrl(&b, &["listClients"]).await;
    assert_eq!(out, "admin\nalice\n");
    let (out, _) = ctrl(&b, &["listRoles"]).await;
    assert_eq!(out, "admin\nr1\nr2\n");
    let (out, _) = ctrl(&b, &["getDefaultACLAccess"]).await;
    assert_eq!(
        out,
        "publishClientSend    : deny\npublishClientReceive : allow\nsubscribe            : deny\nunsubscribe          : allow\n"
    );
    let (_, err) = ctrl(&b, &["deleteClient", "bob"]).await;
    assert_eq!(err, "deleteClient: Error: Client not found\n");
    let (_, err) = ctrl(&b, &["addClientRole", "alice", "nosuch"]).await;
    assert_eq!(err, "addClientRole: Error: Role not found\n");
    ok(&b, &["setAnonymousGroup", "g1"]).await;
    let (out, _) = ctrl(&b, &["getAnonymousGroup"]).await;
    assert_eq!(out, "g1\n");
    let (_, err) = ctrl(&b, &["deleteGroup", "g1"]).await;
    // Mosquitto 2.0.11 crashes here; later versions (and raftmq) refuse.
    if !against_mosquitto() {
        assert_eq!(err, "deleteGroup: Error: Deleting the anonymous group is forbidden\n");
    }
}

#[tokio::test]
async fn connect_and_publish_are_enforced() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "alice", "-p", "alicepw"]).await;
    ok(&b, &["createClient", "bound", "-c", "bound-id", "-p", "boundpw"]).await;
    ok(&b, &["createRole", "pub"]).await;
    ok(&b, &["addRoleACL", "pub", "publishClientSend", "ok/#", "allow"]).await;
    ok(&b, &["addClientRole", "alice", "pub"]).await;
    ok(&b, &["addClientRole", "bound", "pub"]).await;

    // Allowed, denied (v5: "Not authorized" warning, exit 0), wrong password.
    let (code, err) = mpub(&b, true, Some(("alice", "alicepw")), &[], "ok/1").await;
    assert_eq!((code, err.as_str()), (0, ""));
    let (code, err) = mpub(&b, true, Some(("alice", "alicepw")), &[], "other/1").await;
    assert_eq!(code, 0);
    assert!(err.contains("Not authorized"), "denied publish: {err}");
    for (v5, refused) in [(true, 135), (false, 5)] {
        let (code, _) = mpub(&b, v5, Some(("alice", "wrong")), &[], "ok/1").await;
        assert_eq!(code, refused, "wrong password, v5={v5}");
        let (code, _) = mpub(&b, v5, Some(("nobody", "x")), &[], "ok/1").await;
        assert_eq!(code, refused, "unknown user, v5={v5}");
    }
    // Client id binding.
    let (code, _) = mpub(&b, true, Some(("bound", "boundpw")), &["-i", "bound-id"], "ok/1").await;
    assert_eq!(code, 0);
    let (code, _) = mpub(&b, true, Some(("bound", "boundpw")), &["-i", "other-id"], "ok/1").await;
    assert_eq!(code, 135);
    // Disabled client.
    ok(&b, &["disableClient", "alice"]).await;
    let (code, _) = mpub(&b, true, Some(("alice", "alicepw")), &[], "ok/1").await;
    assert_eq!(code, 135);
    ok(&b, &["enableClient", "alice"]).await;
    let (code, _) = mpub(&b, true, Some(("alice", "alicepw")), &[], "ok/1").await;
    assert_eq!(code, 0);
    // Passwords set through the control API are hashed and checked.
    ok(&b, &["setClientPassword", "alice", "newpw"]).await;
    let (code, _) = mpub(&b, true, Some(("alice", "newpw")), &[], "ok/1").await;
    assert_eq!(code, 0);
    let (code, _) = mpub(&b, true, Some(("alice", "alicepw")), &[], "ok/1").await;
    assert_eq!(code, 135);
}

#[tokio::test]
async fn subscribe_unsubscribe_and_receive_acls() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "sub", "-p", "subpw"]).await;
    ok(&b, &["createClient", "pub", "-p", "pubpw"]).await;
    ok(&b, &["createRole", "rs"]).await;
    ok(&b, &["addRoleACL", "rs", "subscribePattern", "s/#", "allow"]).await;
    ok(&b, &["addRoleACL", "rs", "subscribeLiteral", "lit/x", "allow"]).await;
    ok(&b, &["addRoleACL", "rs", "publishClientReceive", "s/secret", "deny"]).await;
    ok(&b, &["addRoleACL", "rs", "unsubscribePattern", "s/keep", "deny"]).await;
    ok(&b, &["addClientRole", "sub", "rs"]).await;
    ok(&b, &["createRole", "rp"]).await;
    ok(&b, &["addRoleACL", "rp", "publishClientSend", "#", "allow"]).await;
    ok(&b, &["addClientRole", "pub", "rp"]).await;

    for v5 in [true, false] {
        let (mut s, _) =
            RawClient::connect_ok(b.addr, &Conn::version(v5, &format!("sub-{v5}")).creds("sub", "subpw"))
                .await;
        let denied = if v5 { 0x87 } else { 0x80 };
        let codes = s.subscribe(1, &[("s/#", 1), ("other/#", 1), ("lit/x", 0), ("lit/+", 0)], &[]).await;
        assert_eq!(codes, vec![1, denied, 0, denied], "SUBACK v5={v5}");
        // publishClientReceive deny: the secret is not delivered, the next one is.
        let (mut p, _) =
            RawClient::connect_ok(b.addr, &Conn::version(v5, &format!("pub-{v5}")).creds("pub", "pubpw"))
                .await;
        p.publish_acked(&Pub::new("s/secret", b"no", 1).pid(1)).await;
        p.publish_acked(&Pub::new("s/open", b"yes", 1).pid(2)).await;
        let m = s.recv_pub_auto().await;
        assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("s/open", &b"yes"[..]), "v5={v5}");
        // Unsubscribe denied: the subscription stays.
        s.subscribe(2, &[("s/keep", 0)], &[]).await;
        s.send(&unsubscribe(v5, 3, &["s/keep"])).await;
        match s.expect(WAIT).await {
            Pkt::UnsubAck { pid: 3, codes, .. } => {
                if v5 {
                    assert_eq!(codes, vec![0x87]);
                }
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
        p.publish_acked(&Pub::new("s/keep", b"kept", 1).pid(3)).await;
        let m = s.recv_pub_auto().await;
        assert_eq!(m.topic, "s/keep", "v5={v5}");
    }
}

/// A change applies to the very next operation of a connection that is not
/// kicked, even right after the same operation was allowed (raftmq remembers
/// a connection's last publish / receive answer until the rules change;
/// Mosquitto asks its plugin every time). `setDefaultACLAccess` kicks no one;
/// it is sent as JSON with `"allow"` because mosquitto_ctrl 2.0.11 sends a
/// form that Mosquitto 2.0.11 ignores.
#[tokio::test]
async fn a_change_applies_to_the_next_operation_of_an_open_connection() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "dev", "-p", "devpw"]).await;
    let (mut admin, _) = RawClient::connect_ok(b.addr, &Conn::v5("admin-raw").creds(ADMIN, ADMIN_PW)).await;
    admin.sub("$CONTROL/dynamic-security/v1/response", 0).await;
    let mut set_default = async |acltype: &str, allow: bool| {
        let json = format!(
            r#"{{"commands":[{{"command":"setDefaultACLAccess","acls":[{{"acltype":"{acltype}","allow":{allow}}}]}}]}}"#
        );
        admin.publish_acked(&Pub::new("$CONTROL/dynamic-security/v1", json.as_bytes(), 1)).await;
        let r = admin.recv_pub_auto().await;
        assert_eq!(
            String::from_utf8_lossy(&r.payload),
            r#"{"responses":[{"command":"setDefaultACLAccess"}]}"#
        );
    };
    set_default("publishClientSend", true).await;
    set_default("subscribe", true).await;
    // A clean subscriber gets its messages through its mailbox; a persistent
    // one through the replicated state: both paths remember answers.
    for persistent in [false, true] {
        let watch = Conn::v5(&format!("watch-{persistent}")).creds("dev", "devpw");
        let watch = if persistent { watch.clean(false).expiry(600) } else { watch };
        let (mut s, _) = RawClient::connect_ok(b.addr, &watch).await;
        assert_eq!(s.subscribe(1, &[("t/#", 1)], &[]).await, vec![1]);
        let (mut p, _) =
            RawClient::connect_ok(b.addr, &Conn::v5(&format!("dev-{persistent}")).creds("dev", "devpw"))
                .await;
        for pid in 1..=2 {
            p.publish_acked(&Pub::new("t/1", b"a", 1).pid(pid)).await;
            assert_eq!(s.recv_pub_auto().await.topic, "t/1");
        }
        // Receiving denied: accepted from the publisher, not delivered.
        set_default("publishClientReceive", false).await;
        p.publish_acked(&Pub::new("t/1", b"hidden", 1).pid(3)).await;
        // Sending denied: the same connection's next PUBLISH is refused.
        set_default("publishClientSend", false).await;
        p.publish(&Pub::new("t/1", b"refused", 1).pid(4)).await;
        match p.expect(WAIT).await {
            Pkt::PubAck { pid: 4, code: 0x87, .. } => {}
            other => panic!("expected PUBACK 0x87, got {other:?}"),
        }
        // Both allowed again: the next message arrives, and it is the first one
        // the subscriber sees since the denial (delivery is in order).
        set_default("publishClientSend", true).await;
        set_default("publishClientReceive", true).await;
        p.publish_acked(&Pub::new("t/1", b"again", 1).pid(5)).await;
        let m = s.recv_pub_auto().await;
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            ("t/1", &b"again"[..]),
            "persistent={persistent}"
        );
    }
}

#[tokio::test]
async fn a_change_kicks_the_clients_it_concerns() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "alice", "-p", "alicepw"]).await;
    ok(&b, &["createClient", "bob", "-p", "bobpw"]).await;
    let will = Will::new("will/alice", b"gone");
    let (mut a5, _) =
        RawClient::connect_ok(b.addr, &Conn::v5("alice-5").creds("alice", "alicepw").will(will)).await;
    let (mut a3, _) = RawClient::connect_ok(b.addr, &Conn::v3("alice-3").creds("alice", "alicepw")).await;
    let (mut bob, _) = RawClient::connect_ok(b.addr, &Conn::v5("bob").creds("bob", "bobpw")).await;
    ok(&b, &["disableClient", "alice"]).await;
    let got = a5.expect_closed(WAIT).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x98, .. }]),
        "v5 client: DISCONNECT 0x98, got {got:?}"
    );
    let got = a3.expect_closed(WAIT).await;
    assert!(got.is_empty(), "v3.1.1 client: closed without a packet, got {got:?}");
    // Bob is not concerned: still connected and served.
    bob.send(&pingreq()).await;
    assert_eq!(bob.expect(WAIT).await, Pkt::PingResp);
}

#[tokio::test]
async fn control_api_needs_the_acl_and_answers_raw_json() {
    let b = start_dynsec().await;
    ok(&b, &["createClient", "eve", "-p", "evepw"]).await;
    let (mut admin, _) = RawClient::connect_ok(b.addr, &Conn::v5("admin-raw").creds(ADMIN, ADMIN_PW)).await;
    admin.sub("$CONTROL/dynamic-security/v1/response", 0).await;
    // Eve may not administer: her request is refused like any publish (0x87)
    // and not executed (no response is broadcast before the admin's own).
    let (mut eve, _) = RawClient::connect_ok(b.addr, &Conn::v5("eve").creds("eve", "evepw")).await;
    let req = br#"{"commands":[{"command":"deleteClient","username":"eve"}]}"#;
    eve.publish(&Pub::new("$CONTROL/dynamic-security/v1", req, 1).pid(1)).await;
    match eve.expect(WAIT).await {
        Pkt::PubAck { pid: 1, code: 0x87, .. } => {}
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }

    // Several commands in one message, correlationData echoed, envelope errors.
    let req = br#"{"commands":[{"command":"getclient","username":"eve","correlationData":"c1"},{"command":"nope"}]}"#;
    admin.publish_acked(&Pub::new("$CONTROL/dynamic-security/v1", req, 1).pid(1)).await;
    let m = admin.recv_pub_auto().await;
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON response");
    assert_eq!(
        v,
        serde_json::json!({"responses":[
            {"command":"getClient","data":{"client":{"username":"eve","roles":[],"groups":[]}},"correlationData":"c1"},
            {"command":"nope","error":"Unknown command"}
        ]})
    );
    admin.publish_acked(&Pub::new("$CONTROL/dynamic-security/v1", b"not json", 1).pid(2)).await;
    let m = admin.recv_pub_auto().await;
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON response");
    assert_eq!(
        v,
        serde_json::json!({"responses":[{"command":"Unknown command","error":"Payload not valid JSON"}]})
    );
}

#[tokio::test]
async fn ctl_init_export_import() {
    if against_mosquitto() {
        return; // raftmq's own CLI
    }
    let b = Broker::start().await;
    // Before init the control API answers that it is off.
    let (_, err) = ctrl(&b, &["listClients"]).await;
    assert!(err.contains("listClients: Error: Dynamic security is not initialised"), "{err}");
    let (ok_init, out) =
        raftmq_ctl_stdin(&b, &["dynsec", "init", "--admin", "root", "--password-stdin"], Some("s3cret\n"));
    assert!(ok_init, "init: {out}");
    let (again, out) =
        raftmq_ctl_stdin(&b, &["dynsec", "init", "--admin", "x", "--password-stdin"], Some("y\n"));
    assert!(!again && out.contains("already initialised"), "second init: {out}");
    let (out, _) = ctrl_as(&b, "root", "s3cret", &["listClients"]).await;
    assert_eq!(out, "root\n");
    ok_as(&b, "root", "s3cret", &["createClient", "carol", "-p", "carolpw"]).await;

    // Export is Mosquitto's format: Mosquitto's tooling reads the users back
    // after an import into a fresh broker, passwords included.
    let exported = b.dir.path().join("export.json");
    let (done, out) = raftmq_ctl(&b, &["dynsec", "export", "-o", &exported.display().to_string()]);
    assert!(done, "export: {out}");
    let b2 = Broker::start().await;
    let (done, out) = raftmq_ctl(&b2, &["dynsec", "import", &exported.display().to_string()]);
    assert!(done, "import: {out}");
    let (out, _) = ctrl_as(&b2, "root", "s3cret", &["listClients"]).await;
    assert_eq!(out, "carol\nroot\n");
    // A broken file is refused and changes nothing.
    let bad = b.dir.path().join("bad.json");
    std::fs::write(&bad, b"{not json").expect("write");
    let (done, out) = raftmq_ctl(&b2, &["dynsec", "import", &bad.display().to_string()]);
    assert!(!done && out.contains("refused"), "bad import: {out}");
    let (out, _) = ctrl_as(&b2, "root", "s3cret", &["listClients"]).await;
    assert_eq!(out, "carol\nroot\n");
}

async fn ok_as(b: &Broker, user: &str, pw: &str, a: &[&str]) {
    let (out, err) = ctrl_as(b, user, pw, a).await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""), "mosquitto_ctrl dynsec {a:?}");
}

/// `[dynsec] acl_substitution`: off (the default), `%c` / `%u` are literal
/// text as in Mosquitto 2.0.11; on, a `%c` / `%u` level is the connecting
/// client's id / user name, for publish and subscribe ACLs alike.
#[tokio::test]
async fn acl_substitution_key() {
    for substitute in [false, true] {
        // Mosquitto 2.0.11 has no substitution: only the default runs there.
        if substitute && against_mosquitto() {
            continue;
        }
        let cfg =
            if substitute { BrokerCfg::new().dynsec("acl_substitution = true") } else { BrokerCfg::new() };
        let b = start_dynsec_with(cfg).await;
        ok(&b, &["createClient", "alice", "-p", "alicepw"]).await;
        ok(&b, &["createRole", "own"]).await;
        ok(&b, &["addRoleACL", "own", "subscribePattern", "own/%u/%c/#", "allow"]).await;
        ok(&b, &["addRoleACL", "own", "publishClientSend", "own/%u/%c/#", "allow"]).await;
        ok(&b, &["addClientRole", "alice", "own"]).await;

        let (mut c, _) =
            RawClient::connect_ok(b.addr, &Conn::version(true, "dev1").creds("alice", "alicepw")).await;
        let (own, literal) = ("own/alice/dev1/t", "own/%u/%c/t");
        let codes = c.subscribe(1, &[("own/alice/dev1/#", 0), ("own/%u/%c/#", 0)], &[]).await;
        let want = if substitute { vec![0, 0x87] } else { vec![0x87, 0] };
        assert_eq!(codes, want, "SUBACK, substitute={substitute}");
        // The allowed topic is published and delivered back; the other one is
        // refused with PUBACK 0x87.
        let (allowed, denied) = if substitute { (own, literal) } else { (literal, own) };
        c.publish(&Pub::new(denied, b"m", 1).pid(1)).await;
        match c.expect(WAIT).await {
            Pkt::PubAck { pid: 1, code, .. } => assert_eq!(code, 0x87, "{denied}, substitute={substitute}"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        // The delivery (QoS 0) and the PUBACK may come in either order.
        c.publish(&Pub::new(allowed, b"m", 1).pid(2)).await;
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match c.expect(WAIT).await {
                Pkt::PubAck { pid: 2, code, .. } => {
                    assert_eq!(code, 0, "{allowed}, substitute={substitute}");
                    acked = true;
                }
                Pkt::Publish(m) => {
                    assert_eq!(m.topic, allowed, "substitute={substitute}");
                    delivered = true;
                }
                other => panic!("expected PUBACK or PUBLISH, got {other:?}"),
            }
        }
        // Another client id of the same user is not "dev1".
        let (mut other, _) =
            RawClient::connect_ok(b.addr, &Conn::version(true, "dev2").creds("alice", "alicepw")).await;
        let codes = other.subscribe(1, &[("own/alice/dev1/#", 0), ("own/alice/dev2/#", 0)], &[]).await;
        let want = if substitute { vec![0x87, 0] } else { vec![0x87, 0x87] };
        assert_eq!(codes, want, "SUBACK of dev2, substitute={substitute}");
    }
}

#[tokio::test]
async fn dynsec_sync_needs_a_cluster() {
    if against_mosquitto() {
        return; // raftmq's own CLI
    }
    let b = Broker::start().await;
    let (done, out) = raftmq_ctl(&b, &["mode", "set", "dynsec-sync"]);
    assert!(!done && out.contains("needs a cluster of several nodes"), "{out}");
    let (done, out) = raftmq_ctl(&b, &["mode", "get"]);
    assert!(done && out.trim() == "full-sync", "{out}");
}
