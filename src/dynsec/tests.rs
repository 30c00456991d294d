//! Tests of the dynamic-security module against the spec
//! (../shared/spec/dynsec.md) and against responses captured from a real
//! Mosquitto 2.0.11 with its plugin (testdata/).

use super::json::J;
use super::*;

fn admin() -> Dynsec {
    Dynsec::initial("admin", PasswordHash::new(b"adminpass"))
}

/// Prepares and applies one request message.
fn run(d: &mut Dynsec, payload: &str) -> ControlOutcome {
    d.apply_control(&prepare_request(payload.as_bytes()))
}

/// Applies one command object and returns its single response object.
fn one(d: &mut Dynsec, command: &str) -> String {
    let out = run(d, &format!("{{\"commands\":[{command}]}}"));
    let s = String::from_utf8(out.response).unwrap();
    s.strip_prefix("{\"responses\":[").and_then(|s| s.strip_suffix("]}")).unwrap().to_string()
}

fn ok(command: &str) -> String {
    format!("{{\"command\":\"{command}\"}}")
}

fn err(command: &str, e: &str) -> String {
    format!("{{\"command\":\"{command}\",\"error\":\"{e}\"}}")
}

fn kicks(d: &mut Dynsec, command: &str) -> Kicks {
    run(d, &format!("{{\"commands\":[{command}]}}")).kicks
}

fn users(names: &[&str]) -> Kicks {
    Kicks { usernames: names.iter().map(|s| s.to_string()).collect(), anonymous: false }
}

/// A state built with commands: roles r1..r3, clients alice/bob/carol,
/// groups g1 (alice, bob; role r2) and ganon (role r3, the anonymous group).
fn fixture() -> Dynsec {
    let mut d = admin();
    for c in [
        r#"{"command":"createRole","rolename":"r1"}"#,
        r#"{"command":"createRole","rolename":"r2"}"#,
        r#"{"command":"createRole","rolename":"r3"}"#,
        r#"{"command":"createClient","username":"alice","password":"apw","roles":[{"rolename":"r1"}]}"#,
        r#"{"command":"createClient","username":"bob","password":"bpw"}"#,
        r#"{"command":"createClient","username":"carol","password":"cpw","clientid":"carol-id"}"#,
        r#"{"command":"createGroup","groupname":"g1","roles":[{"rolename":"r2"}]}"#,
        r#"{"command":"addGroupClient","groupname":"g1","username":"alice"}"#,
        r#"{"command":"addGroupClient","groupname":"g1","username":"bob"}"#,
        r#"{"command":"createGroup","groupname":"ganon","roles":[{"rolename":"r3"}]}"#,
        r#"{"command":"setAnonymousGroup","groupname":"ganon"}"#,
    ] {
        let r = one(&mut d, c);
        assert!(!r.contains("error"), "{c}: {r}");
    }
    d
}

// ---- hashes -----------------------------------------------------------

#[test]
fn password_hash_spec_vectors() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    for (pw, salt, hash) in [
        (
            "adminpass",
            "G1zuyTtZHLJHk0e4",
            "YwFc13PEl9NPOZYW9NnrvfEXoKaMWumOu2xOhm9flQQKBdEbHX4l4v2j0oCI4qElqD4JOYFlNzfEr/OzRoa3sA==",
        ),
        (
            "alicepw2",
            "jKq3dY7KGBwFaFbK",
            "1+/xlrwL4vnfFDnTI2nX03dpBI711cXfXp5kZWGr+5S+JKOUUjWUiCZXyd6IZvcR1mJrZqfc5+WWaGN+wxcWNQ==",
        ),
    ] {
        let h = PasswordHash::from_b64(hash, salt, 101).unwrap();
        assert!(h.verify(pw.as_bytes()));
        assert!(!h.verify(b"wrong"));
        let again = PasswordHash::with_salt(pw.as_bytes(), &STANDARD.decode(salt).unwrap(), 101);
        assert_eq!(again.hash_b64(), hash);
    }
}

#[test]
fn new_hash_has_fresh_salt_and_plugin_parameters() {
    let a = PasswordHash::new(b"pw");
    let b = PasswordHash::new(b"pw");
    assert_ne!(a.salt, b.salt);
    assert_eq!((a.salt.len(), a.hash.len(), a.iterations), (12, 64, 101));
    assert_eq!(a.salt_b64().len(), 16);
    assert_eq!(a.hash_b64().len(), 88);
    assert!(a.verify(b"pw") && b.verify(b"pw"));
    assert!(!a.verify(b"pW"));
    let other_iters = PasswordHash::with_salt(b"pw", &a.salt, 1000);
    assert!(other_iters.verify(b"pw"));
    assert_ne!(other_iters.hash, a.hash);
}

// ---- envelope and transcript ------------------------------------------

#[test]
fn envelope_errors() {
    let mut d = admin();
    let cases = [
        ("not json", r#"{"responses":[{"command":"Unknown command","error":"Payload not valid JSON"}]}"#),
        (r#"{"x":1}"#, r#"{"responses":[{"command":"Unknown command","error":"Invalid/missing commands"}]}"#),
        (
            r#"{"commands":5}"#,
            r#"{"responses":[{"command":"Unknown command","error":"Invalid/missing commands"}]}"#,
        ),
        (r#"[1]"#, r#"{"responses":[{"command":"Unknown command","error":"Invalid/missing commands"}]}"#),
        (r#"{"commands":[]}"#, r#"{"responses":[]}"#),
        (
            r#"{"COMMANDS":[7,{"command":"nope","correlationData":"x"},{"command":"getanonymousgroup","correlationData":"y"}]}"#,
            r#"{"responses":[{"command":"Unknown command","error":"Command not an object"},{"command":"nope","error":"Unknown command","correlationData":"x"},{"command":"getAnonymousGroup","data":{"group":{"groupname":""}},"correlationData":"y"}]}"#,
        ),
        (
            // correlationData of the wrong type stops the message.
            r#"{"commands":[{"command":"createRole","rolename":"a"},{"command":"createRole","rolename":"b","correlationData":1},{"command":"createRole","rolename":"c"}]}"#,
            r#"{"responses":[{"command":"createRole"},{"command":"createRole","error":"Invalid correlationData data type."}]}"#,
        ),
    ];
    for (req, want) in cases {
        let out = run(&mut d, req);
        assert_eq!(String::from_utf8(out.response).unwrap(), want, "{req}");
    }
    assert!(d.roles().contains_key("a"));
    assert!(!d.roles().contains_key("b") && !d.roles().contains_key("c"));
}

/// Replays requests captured from Mosquitto 2.0.11 (testdata/, made with
/// mosquitto_pub/sub as the admin of a fresh `mosquitto_ctrl dynsec init`
/// file; each file starts from such a file) and compares every response
/// byte for byte. `patches` are the deliberate deviations, each explained.
fn replay(text: &str, patches: &[(&str, &str)]) -> usize {
    let mut d = admin();
    let mut lines = text.lines();
    let mut n = 0;
    while let Some(req) = lines.next() {
        let req = req.strip_prefix("> ").unwrap();
        let mut want = lines.next().unwrap().strip_prefix("< ").unwrap().to_string();
        for (from, to) in patches {
            want = want.replace(from, to);
        }
        let got = String::from_utf8(run(&mut d, req).response).unwrap();
        assert_eq!(got, want, "request {req}");
        n += 1;
    }
    n
}

#[test]
fn matches_mosquitto_2_0_11_transcripts() {
    // 2.0.11 memory bug: after modifyClient moved u3 into g1, deleteRole
    // shows a freed name in the group's client list (use after free).
    let n = replay(
        include_str!("testdata/mosquitto-2.0.11-transcript.txt"),
        &[(r#"{"username":"getGroup"}"#, r#"{"username":"u3"}"#)],
    );
    assert_eq!(n, 52);
    // setDefaultACLAccess with mosquitto_ctrl 2.0.11's `"access":"allow"`:
    // ignored by 2.0.11, applied here (spec 2.1 recommendation).
    let n = replay(
        include_str!("testdata/mosquitto-2.0.11-transcript-2.txt"),
        &[(
            r#"{"acltype":"publishClientSend","allow":false},{"acltype":"publishClientReceive""#,
            r#"{"acltype":"publishClientSend","allow":true},{"acltype":"publishClientReceive""#,
        )],
    );
    assert_eq!(n, 12);
}

// ---- commands: success, errors, kicks ---------------------------------

#[test]
fn default_acl_access_forms() {
    let mut d = admin();
    assert_eq!(d.default_access(), DefaultAccess::INIT);
    // mosquitto_ctrl 2.0.11 sends "access"; accepted as recommended.
    let out = run(
        &mut d,
        r#"{"commands":[{"command":"setDefaultACLAccess","acls":[{"acltype":"publishClientSend","access":"allow"},{"acltype":"unsubscribe","allow":false},{"acltype":"subscribe","access":"maybe"}]}]}"#,
    );
    assert!(out.changed);
    assert_eq!(out.kicks, Kicks::default());
    let da = d.default_access();
    assert!(da.publish_client_send && da.publish_client_receive && !da.subscribe && !da.unsubscribe);
    let out = run(&mut d, r#"{"commands":[{"command":"setDefaultACLAccess","acls":[]}]}"#);
    assert!(!out.changed);
}

#[test]
fn client_commands_and_kicks() {
    let mut d = fixture();
    assert_eq!(kicks(&mut d, r#"{"command":"createClient","username":"dave"}"#), Kicks::default());
    assert!(!d.authenticate("dave", Some(b""), "x"), "created without password: cannot log in");
    assert_eq!(
        kicks(&mut d, r#"{"command":"setClientPassword","username":"dave","password":"d"}"#),
        users(&["dave"])
    );
    assert!(d.authenticate("dave", Some(b"d"), "any"));
    assert_eq!(
        kicks(&mut d, r#"{"command":"setClientId","username":"dave","clientid":"dc"}"#),
        users(&["dave"])
    );
    assert!(!d.authenticate("dave", Some(b"d"), "any"));
    assert!(d.authenticate("dave", Some(b"d"), "dc"));
    assert_eq!(kicks(&mut d, r#"{"command":"disableClient","username":"dave"}"#), users(&["dave"]));
    assert!(!d.authenticate("dave", Some(b"d"), "dc"));
    assert_eq!(kicks(&mut d, r#"{"command":"enableClient","username":"dave"}"#), Kicks::default());
    assert!(d.authenticate("dave", Some(b"d"), "dc"));
    assert_eq!(
        kicks(&mut d, r#"{"command":"addClientRole","username":"dave","rolename":"r1"}"#),
        users(&["dave"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addClientRole","username":"dave","rolename":"r1"}"#),
        Kicks::default()
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"removeClientRole","username":"dave","rolename":"r1"}"#),
        users(&["dave"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"modifyClient","username":"dave","textname":"D"}"#),
        users(&["dave"])
    );
    assert_eq!(kicks(&mut d, r#"{"command":"deleteClient","username":"dave"}"#), users(&["dave"]));
    assert!(!d.authenticate("dave", Some(b"d"), "dc"));
    assert_eq!(kicks(&mut d, r#"{"command":"getClient","username":"alice"}"#), Kicks::default());
    assert_eq!(kicks(&mut d, r#"{"command":"listClients"}"#), Kicks::default());
}

#[test]
fn create_client_error_order_and_atomicity() {
    let mut d = fixture();
    let cases = [
        (r#"{"command":"createClient","username":5}"#, "Invalid/missing username"),
        (r#"{"command":"createClient","username":"a\uFDD0"}"#, "Username not valid UTF-8"),
        (
            r#"{"command":"createClient","username":"x","password":{"pbkdf2Sha512":"x"}}"#,
            "Invalid/missing password",
        ),
        (r#"{"command":"createClient","username":"x","clientid":1}"#, "Invalid/missing client id"),
        (r#"{"command":"createClient","username":"x","clientid":"\u009f"}"#, "Client ID not valid UTF-8"),
        (r#"{"command":"createClient","username":"x","textname":true}"#, "Invalid/missing textname"),
        (
            r#"{"command":"createClient","username":"x","textdescription":null}"#,
            "Invalid/missing textdescription",
        ),
        (
            r#"{"command":"createClient","username":"alice","roles":[{"rolename":"nope"}]}"#,
            "Client already exists",
        ),
        (
            r#"{"command":"createClient","username":"x","roles":[{"rolename":"nope"},7],"groups":[{"groupname":"nope"}]}"#,
            "Role not found",
        ),
        (
            r#"{"command":"createClient","username":"x","roles":[7,{"rolename":"nope"}]}"#,
            "'roles' not an array or missing/invalid rolename",
        ),
        (
            r#"{"command":"createClient","username":"x","groups":[{"groupname":"g1"},{"groupname":"nope"}]}"#,
            "Group not found",
        ),
    ];
    for (c, e) in cases {
        assert_eq!(one(&mut d, c), err("createClient", e), "{c}");
    }
    assert!(!d.clients().contains_key("x"));
    assert!(!d.groups()["g1"].clients.contains("x"), "a failed create leaves no membership behind");
    // Roles and groups given at creation, with priorities.
    assert_eq!(
        one(
            &mut d,
            r#"{"command":"createClient","username":"x","clientid":"","roles":[{"rolename":"r2","priority":3},{"rolename":"r1"}],"groups":[{"groupname":"g1","priority":7}]}"#
        ),
        ok("createClient")
    );
    assert_eq!(
        one(&mut d, r#"{"command":"getClient","username":"x"}"#),
        r#"{"command":"getClient","data":{"client":{"username":"x","roles":[{"rolename":"r2","priority":3},{"rolename":"r1"}],"groups":[{"groupname":"g1","priority":7}]}}}"#
    );
    assert!(d.groups()["g1"].clients.contains("x"));
}

#[test]
fn modify_client_is_all_or_nothing() {
    let mut d = fixture();
    let before = d.clone();
    for (c, e) in [
        (r#"{"command":"modifyClient","username":"nobody"}"#, "Client not found"),
        (
            r#"{"command":"modifyClient","username":"alice","textname":"changed","roles":[{"rolename":"nope"}]}"#,
            "Role not found",
        ),
        (
            r#"{"command":"modifyClient","username":"alice","textname":"changed","roles":5}"#,
            "'roles' not an array or missing/invalid rolename",
        ),
        (
            r#"{"command":"modifyClient","username":"alice","textname":"changed","groups":[{"groupname":"nope"}]}"#,
            "'groups' contains an object with a 'groupname' that does not exist",
        ),
        (
            r#"{"command":"modifyClient","username":"alice","textname":"changed","groups":[{"groupname":1}]}"#,
            "'groups' contains an object with an invalid 'groupname'",
        ),
    ] {
        let out = run(&mut d, &format!("{{\"commands\":[{c}]}}"));
        assert!(String::from_utf8(out.response).unwrap().contains(e), "{c}");
        assert!(!out.changed);
        // Mosquitto kicks the user name after these errors too.
        assert!(out.kicks.usernames.len() == 1, "{c}");
    }
    assert_eq!(d, before);
    // Success: password "" ignored, clientid "" clears, lists replace.
    let out = run(
        &mut d,
        r#"{"commands":[{"command":"modifyClient","username":"carol","password":"","clientid":"","textdescription":"","roles":[{"rolename":"r3"}],"groups":[{"groupname":"ganon","priority":2}]}]}"#,
    );
    assert!(out.changed);
    assert_eq!(out.kicks, users(&["carol"]));
    assert!(d.authenticate("carol", Some(b"cpw"), "whatever"));
    assert_eq!(
        one(&mut d, r#"{"command":"getClient","username":"carol"}"#),
        r#"{"command":"getClient","data":{"client":{"username":"carol","textdescription":"","roles":[{"rolename":"r3"}],"groups":[{"groupname":"ganon","priority":2}]}}}"#
    );
    assert!(d.groups()["ganon"].clients.contains("carol"));
    // Replacing the groups removes the old membership on both sides.
    one(&mut d, r#"{"command":"modifyClient","username":"alice","groups":[],"password":"new"}"#);
    assert!(!d.groups()["g1"].clients.contains("alice"));
    assert!(d.clients()["alice"].groups.is_empty());
    assert!(d.authenticate("alice", Some(b"new"), "a"));
}

#[test]
fn group_commands_and_kicks() {
    let mut d = fixture();
    assert_eq!(kicks(&mut d, r#"{"command":"createGroup","groupname":"g2"}"#), Kicks::default());
    // addGroupClient kicks the user also after the not-found/already replies.
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupClient","groupname":"g2","username":"carol","priority":4}"#),
        users(&["carol"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupClient","groupname":"g2","username":"carol"}"#),
        users(&["carol"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupClient","groupname":"nope","username":"carol"}"#),
        users(&["carol"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupClient","groupname":"g2","username":"zed"}"#),
        users(&["zed"])
    );
    assert_eq!(kicks(&mut d, r#"{"command":"addGroupClient","groupname":"g2"}"#), Kicks::default());
    assert_eq!(
        kicks(&mut d, r#"{"command":"removeGroupClient","groupname":"nope","username":"bob"}"#),
        users(&["bob"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupRole","groupname":"g1","rolename":"r1"}"#),
        users(&["alice", "bob"])
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"addGroupRole","groupname":"g1","rolename":"r1"}"#),
        Kicks::default()
    );
    assert_eq!(
        kicks(&mut d, r#"{"command":"removeGroupRole","groupname":"g1","rolename":"r1"}"#),
        users(&["alice", "bob"])
    );
    let anon = Kicks { usernames: Default::default(), anonymous: true };
    assert_eq!(kicks(&mut d, r#"{"command":"addGroupRole","groupname":"ganon","rolename":"r1"}"#), anon);
    assert_eq!(kicks(&mut d, r#"{"command":"setAnonymousGroup","groupname":"g2"}"#), anon);
    assert_eq!(d.anonymous_group(), Some("g2"));
    assert_eq!(
        one(&mut d, r#"{"command":"deleteGroup","groupname":"g2"}"#),
        err("deleteGroup", "Deleting the anonymous group is forbidden")
    );
    assert_eq!(kicks(&mut d, r#"{"command":"deleteGroup","groupname":"g1"}"#), users(&["alice", "bob"]));
    assert!(d.clients()["alice"].groups.is_empty());
    // modifyGroup: members replaced on both sides; old and new members kicked.
    let k = kicks(
        &mut d,
        r#"{"command":"modifyGroup","groupname":"g2","textname":"two","clients":[{"username":"alice","priority":5}],"roles":[{"rolename":"r1","priority":1}]}"#,
    );
    assert_eq!(
        k,
        Kicks { usernames: ["alice", "carol"].iter().map(|s| s.to_string()).collect(), anonymous: true }
    );
    assert_eq!(d.clients()["alice"].groups.get("g2"), Some(&5));
    assert!(d.clients()["carol"].groups.is_empty());
    assert_eq!(
        one(&mut d, r#"{"command":"getGroup","groupname":"g2"}"#),
        r#"{"command":"getGroup","data":{"group":{"groupname":"g2","textname":"two","clients":[{"username":"alice"}],"roles":[{"rolename":"r1","priority":1}]}}}"#
    );
    for (c, e) in [
        (
            r#"{"command":"modifyGroup","groupname":"g2","clients":[{"username":"nobody"}]}"#,
            "'clients' contains an object with a 'username' that does not exist",
        ),
        (
            r#"{"command":"modifyGroup","groupname":"g2","clients":[{"username":3}]}"#,
            "'clients' contains an object with an invalid 'username'",
        ),
        (r#"{"command":"modifyGroup","groupname":"g2","roles":[{"rolename":"nope"}]}"#, "Role not found"),
    ] {
        assert_eq!(one(&mut d, c), err("modifyGroup", e));
    }
}

#[test]
fn role_commands_and_kicks() {
    let mut d = fixture();
    let holders =
        Kicks { usernames: ["alice", "bob"].iter().map(|s| s.to_string()).collect(), anonymous: false };
    one(&mut d, r#"{"command":"addClientRole","username":"alice","rolename":"r2"}"#);
    // r2 is held by alice directly and by g1 (alice, bob).
    assert_eq!(
        kicks(
            &mut d,
            r#"{"command":"addRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"a/#","allow":true}"#
        ),
        holders
    );
    assert_eq!(
        kicks(
            &mut d,
            r#"{"command":"addRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"a/#"}"#
        ),
        Kicks::default()
    );
    assert_eq!(kicks(&mut d, r#"{"command":"modifyRole","rolename":"r2","acls":[]}"#), Kicks::default());
    assert!(d.roles()["r2"].acls.is_empty());
    assert_eq!(
        kicks(
            &mut d,
            r#"{"command":"removeRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"a/#"}"#
        ),
        Kicks::default()
    );
    let anon = Kicks { usernames: Default::default(), anonymous: true };
    assert_eq!(
        kicks(&mut d, r#"{"command":"addRoleACL","rolename":"r3","acltype":"subscribeLiteral","topic":"x"}"#),
        anon
    );
    assert_eq!(
        kicks(
            &mut d,
            r#"{"command":"removeRoleACL","rolename":"r3","acltype":"subscribeLiteral","topic":"x"}"#
        ),
        anon
    );
    assert_eq!(kicks(&mut d, r#"{"command":"deleteRole","rolename":"r2"}"#), holders);
    assert!(!d.clients()["alice"].roles.contains_key("r2"));
    assert!(!d.groups()["g1"].roles.contains_key("r2"));
    assert_eq!(kicks(&mut d, r#"{"command":"createRole","rolename":"r2"}"#), Kicks::default());
    // ACLs with equal priority keep insertion order; addRoleACL default priority 0.
    for t in ["c", "a", "b"] {
        one(
            &mut d,
            &format!(
                r#"{{"command":"addRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"{t}","allow":true}}"#
            ),
        );
    }
    one(
        &mut d,
        r#"{"command":"addRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"z","priority":1}"#,
    );
    let topics: Vec<&str> = d.roles()["r2"].acls.iter().map(|a| a.topic.as_str()).collect();
    assert_eq!(topics, ["z", "c", "a", "b"]);
}

#[test]
fn changed_flag_and_failed_commands() {
    let mut d = fixture();
    let before = d.clone();
    for c in [
        r#"{"command":"getClient","username":"alice"}"#,
        r#"{"command":"listRoles","verbose":true}"#,
        r#"{"command":"createClient","username":"alice"}"#,
        r#"{"command":"removeClientRole","username":"bob","rolename":"r1"}"#,
        r#"{"command":"enableClient","username":"bob"}"#,
        r#"{"command":"addRoleACL","rolename":"r1","acltype":"publishClientSend","topic":"a/#/b"}"#,
    ] {
        assert!(!run(&mut d, &format!("{{\"commands\":[{c}]}}")).changed, "{c}");
    }
    assert_eq!(d, before);
    assert!(run(&mut d, r#"{"commands":[{"command":"createRole","rolename":"new"}]}"#).changed);
}

// ---- prepare ----------------------------------------------------------

#[test]
fn prepare_hashes_and_strips_smuggled_hashes() {
    let req = r#"{"commands":[{"command":"createClient","username":"u","password":"secret-pw"},{"command":"SETCLIENTPASSWORD","username":"u","Password":"other-pw","PASSWORD":{"pbkdf2Sha512":"AAAA","salt":"AAAA","iterations":1}},{"command":"getClient","username":"u","password":"untouched"}]}"#;
    let p = String::from_utf8(prepare_request(req.as_bytes())).unwrap();
    assert!(!p.contains("secret-pw") && !p.contains("other-pw"), "{p}");
    assert!(p.contains("untouched"), "other commands are left alone");
    let tree = J::parse(p.as_bytes()).unwrap();
    let cmds = tree.get("commands").unwrap().as_array().unwrap();
    let J::Obj(fields) = &cmds[1] else { panic!("not an object") };
    let upper = fields.iter().find(|(k, _)| k == "PASSWORD").map(|(_, v)| v);
    assert_eq!(upper, Some(&J::Null), "client-made hash object replaced");
    // Salts are fresh per prepare.
    assert_ne!(prepare_request(req.as_bytes()), prepare_request(req.as_bytes()));
    let mut d = admin();
    let out = d.apply_control(p.as_bytes());
    assert_eq!(
        String::from_utf8(out.response).unwrap(),
        r#"{"responses":[{"command":"createClient"},{"command":"setClientPassword"},{"command":"getClient","data":{"client":{"username":"u","roles":[],"groups":[]}}}]}"#
    );
    assert!(d.authenticate("u", Some(b"other-pw"), "id"));
    // Invalid JSON passes through unchanged.
    assert_eq!(prepare_request(b"{nope"), b"{nope");
    // A plaintext password that skipped prepare is refused by apply.
    let mut d = admin();
    let out = d.apply_control(br#"{"commands":[{"command":"createClient","username":"u","password":"pw"}]}"#);
    assert!(String::from_utf8(out.response).unwrap().contains("Invalid/missing password"));
    // A smuggled hash object without prepare is not accepted either (the
    // replicated form must come from prepare; here it reaches apply raw).
    let p = prepare_request(br#"{"commands":[{"command":"createClient","username":"v","password":{"pbkdf2Sha512":"x","salt":"y","iterations":101}}]}"#);
    assert!(String::from_utf8(d.apply_control(&p).response).unwrap().contains("Invalid/missing password"));
}

#[test]
fn authenticate_rules() {
    let mut d = fixture();
    assert!(d.authenticate("alice", Some(b"apw"), "anything"));
    assert!(!d.authenticate("alice", Some(b"apW"), "anything"));
    assert!(!d.authenticate("alice", None, "anything"));
    assert!(!d.authenticate("nobody", Some(b"apw"), "anything"));
    assert!(d.authenticate("carol", Some(b"cpw"), "carol-id"));
    assert!(!d.authenticate("carol", Some(b"cpw"), "auto-123"));
    one(&mut d, r#"{"command":"disableClient","username":"alice"}"#);
    assert!(!d.authenticate("alice", Some(b"apw"), "anything"));
    // createClient with "" stores the hash of "" (as 2.0.11 does), but an
    // empty password is refused at CONNECT (observed with a raw CONNECT).
    one(&mut d, r#"{"command":"createClient","username":"e","password":""}"#);
    let h = d.clients()["e"].password.clone().unwrap();
    assert!(h.verify(b""));
    assert!(!d.authenticate("e", Some(b""), "x"));
}

// ---- ACL decisions ----------------------------------------------------

fn acl(d: &mut Dynsec, role: &str, t: &str, topic: &str, prio: i32, allow: bool) {
    let r = one(
        d,
        &format!(
            r#"{{"command":"addRoleACL","rolename":"{role}","acltype":"{t}","topic":"{topic}","priority":{prio},"allow":{allow}}}"#
        ),
    );
    assert_eq!(r, ok("addRoleACL"));
}

#[test]
fn acl_priorities_and_client_roles_first() {
    use Access::*;
    let mut d = fixture();
    // alice: client role r1; group g1 with r2.
    acl(&mut d, "r1", "publishClientSend", "t/#", 0, true);
    acl(&mut d, "r1", "publishClientSend", "t/secret", 5, false);
    assert!(d.allowed(Some("alice"), PublishClientSend, "t/x"));
    assert!(!d.allowed(Some("alice"), PublishClientSend, "t/secret"), "higher priority first");
    // Group role with a higher priority does not beat a client role.
    acl(&mut d, "r2", "publishClientSend", "t/x", 100, false);
    one(&mut d, r#"{"command":"removeGroupRole","groupname":"g1","rolename":"r2"}"#);
    one(&mut d, r#"{"command":"addGroupRole","groupname":"g1","rolename":"r2","priority":100}"#);
    one(&mut d, r#"{"command":"removeClientRole","username":"alice","rolename":"r1"}"#);
    one(&mut d, r#"{"command":"addClientRole","username":"alice","rolename":"r1","priority":-100}"#);
    assert!(d.allowed(Some("alice"), PublishClientSend, "t/x"));
    // bob only has the group role.
    assert!(!d.allowed(Some("bob"), PublishClientSend, "t/x"));
    // Role order within a client: priority desc, then name.
    one(&mut d, r#"{"command":"createRole","rolename":"ra"}"#);
    one(&mut d, r#"{"command":"createRole","rolename":"rb"}"#);
    acl(&mut d, "ra", "publishClientReceive", "q", 0, true);
    acl(&mut d, "rb", "publishClientReceive", "q", 0, false);
    one(&mut d, r#"{"command":"addClientRole","username":"bob","rolename":"rb"}"#);
    one(&mut d, r#"{"command":"addClientRole","username":"bob","rolename":"ra"}"#);
    assert!(d.allowed(Some("bob"), PublishClientReceive, "q"), "same priority: ra before rb");
    one(&mut d, r#"{"command":"removeClientRole","username":"bob","rolename":"rb"}"#);
    one(&mut d, r#"{"command":"addClientRole","username":"bob","rolename":"rb","priority":1}"#);
    assert!(!d.allowed(Some("bob"), PublishClientReceive, "q"));
    // Group order: membership priority desc, then group name.
    one(&mut d, r#"{"command":"createGroup","groupname":"ga","roles":[{"rolename":"ra"}]}"#);
    one(&mut d, r#"{"command":"createGroup","groupname":"gb","roles":[{"rolename":"rb"}]}"#);
    one(&mut d, r#"{"command":"addGroupClient","groupname":"gb","username":"carol"}"#);
    one(&mut d, r#"{"command":"addGroupClient","groupname":"ga","username":"carol"}"#);
    assert!(d.allowed(Some("carol"), PublishClientReceive, "q"));
    one(&mut d, r#"{"command":"removeGroupClient","groupname":"gb","username":"carol"}"#);
    one(&mut d, r#"{"command":"addGroupClient","groupname":"gb","username":"carol","priority":3}"#);
    assert!(!d.allowed(Some("carol"), PublishClientReceive, "q"));
}

#[test]
fn acl_defaults_dollar_topics_and_anonymous() {
    use Access::*;
    let mut d = fixture();
    // init defaults: send deny, receive allow, subscribe deny, unsubscribe allow.
    assert!(!d.allowed(Some("bob"), PublishClientSend, "x"));
    assert!(d.allowed(Some("bob"), PublishClientReceive, "x"));
    assert!(!d.allowed(Some("bob"), Subscribe, "x"));
    assert!(d.allowed(Some("bob"), Unsubscribe, "x"));
    // Default access never allows $CONTROL.
    assert!(!d.allowed(Some("bob"), PublishClientReceive, "$CONTROL/dynamic-security/v1/response"));
    assert!(!d.allowed(Some("bob"), Unsubscribe, "$CONTROL/x"));
    assert!(d.allowed(Some("bob"), PublishClientReceive, "$SYS/x"));
    // Unknown user names are denied outright.
    assert!(!d.allowed(Some("ghost"), PublishClientReceive, "x"));
    // `#` and `+/...` do not match `$` topics for publish types.
    acl(&mut d, "r2", "publishClientReceive", "#", 0, false);
    acl(&mut d, "r2", "publishClientSend", "+/x", 0, true);
    assert!(!d.allowed(Some("bob"), PublishClientReceive, "a/b"));
    assert!(d.allowed(Some("bob"), PublishClientReceive, "$SYS/x"), "falls to the default");
    assert!(d.allowed(Some("bob"), PublishClientSend, "a/x"));
    assert!(!d.allowed(Some("bob"), PublishClientSend, "$a/x"));
    // The admin of init can administer and read everything, not publish.
    assert!(d.allowed(Some("admin"), PublishClientSend, CONTROL_TOPIC));
    assert!(d.allowed(Some("admin"), PublishClientReceive, RESPONSE_TOPIC));
    assert!(d.allowed(Some("admin"), Subscribe, RESPONSE_TOPIC));
    assert!(d.allowed(Some("admin"), Subscribe, "$SYS/#"));
    assert!(!d.allowed(Some("admin"), PublishClientSend, "a"));
    // Anonymous clients use the anonymous group (r3); named users never do.
    acl(&mut d, "r3", "publishClientSend", "anon/#", 0, true);
    assert!(d.allowed(None, PublishClientSend, "anon/1"));
    assert!(d.allowed(None, PublishClientSend, "anon"), "a/# matches a");
    assert!(!d.allowed(Some("bob"), PublishClientSend, "anon/1"));
    assert!(!d.allowed(None, PublishClientSend, "other"));
    // %u / %c are not substituted.
    acl(&mut d, "r3", "publishClientSend", "u/%u", 0, true);
    assert!(d.allowed(None, PublishClientSend, "u/%u"));
    // The empty ACL topic never matches.
    acl(&mut d, "r3", "publishClientReceive", "", 9, false);
    acl(&mut d, "r3", "subscribePattern", "", 9, true);
    assert!(d.allowed(None, PublishClientReceive, "x"));
    assert!(!d.allowed(None, Subscribe, "x"));
    // Defaults changed at run time apply at once.
    one(&mut d, r#"{"command":"setDefaultACLAccess","acls":[{"acltype":"subscribe","allow":true}]}"#);
    assert!(d.allowed(Some("bob"), Subscribe, "x"));
    assert!(!d.allowed(Some("bob"), Subscribe, "$CONTROL/dynamic-security/#"));
}

#[test]
fn acl_subscribe_literal_then_covers() {
    use Access::*;
    let mut d = fixture();
    let cov = |d: &mut Dynsec, pattern: &str, filter: &str| -> bool {
        one(d, r#"{"command":"modifyRole","rolename":"r2","acls":[]}"#);
        acl(d, "r2", "subscribePattern", pattern, 0, true);
        d.allowed(Some("bob"), Subscribe, filter)
    };
    for (p, s, want) in [
        ("#", "$SYS/#", true),
        ("#", "$CONTROL/dynamic-security/v1/response", true),
        ("a/#", "a", true),
        ("a/#", "a/b", true),
        ("a/#", "a/+/c", true),
        ("a/#", "a/#", true),
        ("a/#", "b", false),
        ("a/+", "a/#", false),
        ("a/+", "a/b", true),
        ("a/+", "a/+", true),
        ("a/+", "a/b/c", false),
        ("a/b", "a/+", false),
        ("+", "#", false),
        ("+/b", "a/b", true),
        ("a/b/c", "a/b", false),
        // Observed on Mosquitto 2.0.11 (and its sub_acl_check): `#` and `/#`
        // both reduce to one empty level.
        ("/#", "#", true),
        ("/#", "/", true),
        ("/#", "+", false),
        ("/+", "#", false),
        ("a/+/#", "a/#", false),
        ("+/+", "$SYS/x", true),
        ("+/#", "$SYS/x", true),
        ("a/b/#", "a/b/#", true),
        ("+/+", "t/t/", false),
        ("foo/+/bar/#", "foo/baz/+/#", false),
        ("/+//#", "/foo///#", true),
    ] {
        assert_eq!(cov(&mut d, p, s), want, "{p} covers {s}");
    }
    // A literal exact match decides before any pattern, whatever the priority.
    one(&mut d, r#"{"command":"modifyRole","rolename":"r2","acls":[]}"#);
    acl(&mut d, "r2", "subscribePattern", "t/#", 10, true);
    acl(&mut d, "r2", "subscribeLiteral", "t/+", -10, false);
    acl(&mut d, "r2", "unsubscribeLiteral", "t/+", 0, false);
    assert!(!d.allowed(Some("bob"), Subscribe, "t/+"));
    assert!(d.allowed(Some("bob"), Subscribe, "t/x"));
    assert!(!d.allowed(Some("bob"), Unsubscribe, "t/+"));
    assert!(d.allowed(Some("bob"), Unsubscribe, "t/x"), "unsubscribe default allow");
    // ...but only within a role: an earlier role's pattern wins over a later literal.
    acl(&mut d, "r1", "subscribePattern", "t/#", 0, true);
    one(&mut d, r#"{"command":"addClientRole","username":"bob","rolename":"r1"}"#);
    assert!(d.allowed(Some("bob"), Subscribe, "t/+"));
}

/// ACLs with `%c` / `%u` levels in every type (init defaults: send and
/// subscribe deny, receive and unsubscribe allow, so the ACLs that must be
/// seen matching are allow for the former and deny for the latter).
fn substitution_fixture() -> Dynsec {
    let mut d = fixture();
    acl(&mut d, "r2", "publishClientSend", "u/%u/c/%c", 0, true);
    acl(&mut d, "r2", "publishClientSend", "mid/x%c", 0, true);
    acl(&mut d, "r2", "publishClientSend", "pre/%u", 0, true);
    acl(&mut d, "r2", "publishClientReceive", "in/%c/#", 0, false);
    acl(&mut d, "r2", "subscribeLiteral", "lit/%u", 0, true);
    acl(&mut d, "r2", "subscribeLiteral", "cl/%c", 0, true);
    acl(&mut d, "r2", "subscribePattern", "pat/%c/+", 0, true);
    acl(&mut d, "r2", "unsubscribePattern", "un/%u/#", 0, false);
    acl(&mut d, "r2", "unsubscribeLiteral", "ul/%c", 0, false);
    acl(&mut d, "r3", "publishClientSend", "anon/%u", 0, true);
    acl(&mut d, "r3", "publishClientSend", "anonc/%c", 0, true);
    one(&mut d, r#"{"command":"createClient","username":"x/y","password":"p"}"#);
    one(&mut d, r#"{"command":"addGroupClient","groupname":"g1","username":"x/y"}"#);
    d
}

#[test]
fn acl_substitution_off_is_literal_like_2_0_11() {
    use Access::*;
    let d = substitution_fixture();
    let cases = [
        (PublishClientSend, "u/%u/c/%c", true),
        (PublishClientSend, "u/bob/c/bob-id", false),
        (PublishClientSend, "mid/x%c", true),
        (PublishClientReceive, "in/%c/x", false),
        (PublishClientReceive, "in/bob-id/x", true),
        (Subscribe, "lit/%u", true),
        (Subscribe, "lit/bob", false),
        (Subscribe, "cl/%c", true),
        (Subscribe, "pat/%c/x", true),
        (Subscribe, "pat/bob-id/x", false),
        (Unsubscribe, "un/%u", false),
        (Unsubscribe, "un/bob", true),
        (Unsubscribe, "ul/%c", false),
        (Unsubscribe, "ul/bob-id", true),
    ];
    for (access, topic, want) in cases {
        assert_eq!(d.allowed_client("bob-id", Some("bob"), access, topic, false), want, "{access:?} {topic}");
        assert_eq!(d.allowed(Some("bob"), access, topic), want, "allowed() agrees: {access:?} {topic}");
    }
    assert!(d.allowed_client("cid", None, PublishClientSend, "anon/%u", false));
    assert!(!d.allowed_client("cid", None, PublishClientSend, "anonc/cid", false));
}

#[test]
fn acl_substitution_on_replaces_whole_levels() {
    use Access::*;
    let d = substitution_fixture();
    let bob = |access: Access, topic: &str| d.allowed_client("bob-id", Some("bob"), access, topic, true);
    for (access, topic, want) in [
        (PublishClientSend, "u/bob/c/bob-id", true),
        (PublishClientSend, "u/%u/c/%c", false),
        (PublishClientSend, "u/alice/c/bob-id", false),
        (PublishClientSend, "u/bob/c/other", false),
        // Only a whole level is substituted.
        (PublishClientSend, "mid/x%c", true),
        (PublishClientSend, "mid/xbob-id", false),
        (PublishClientReceive, "in/bob-id/x", false),
        (PublishClientReceive, "in/bob-id", false),
        (PublishClientReceive, "in/%c/x", true),
        (Subscribe, "lit/bob", true),
        (Subscribe, "lit/%u", false),
        (Subscribe, "lit/+", false),
        (Subscribe, "lit/bob/x", false),
        (Subscribe, "pat/bob-id/x", true),
        (Subscribe, "pat/bob-id/+", true),
        (Subscribe, "pat/+/x", false),
        (Subscribe, "pat/%c/x", false),
        (Unsubscribe, "un/bob", false),
        (Unsubscribe, "un/bob/x/#", false),
        (Unsubscribe, "un/alice", true),
        (Unsubscribe, "ul/bob-id", false),
        (Unsubscribe, "ul/%c", true),
    ] {
        assert_eq!(bob(access, topic), want, "{access:?} {topic}");
    }
    // Another client of the same user gets its own id.
    assert!(d.allowed_client("bob-2", Some("bob"), PublishClientSend, "u/bob/c/bob-2", true));
    assert!(!d.allowed_client("bob-2", Some("bob"), PublishClientSend, "u/bob/c/bob-id", true));
    // A client id or user name with `+`, `#` or `/` never matches a substituted level.
    assert!(!d.allowed_client("+", Some("bob"), Subscribe, "pat/+/x", true));
    assert!(!d.allowed_client("+", Some("bob"), Subscribe, "cl/+", true));
    assert!(d.allowed_client("c1", Some("bob"), Subscribe, "cl/c1", true));
    assert!(!d.allowed_client("#", Some("bob"), Subscribe, "cl/#", true));
    assert!(!d.allowed_client("a/b", Some("bob"), PublishClientSend, "u/bob/c/a/b", true));
    assert!(!d.allowed_client("c1", Some("x/y"), PublishClientSend, "pre/x/y", true));
    assert!(d.allowed_client("c1", Some("x/y"), PublishClientSend, "pre/%u", false));
    // Anonymous clients: `%u` never matches, `%c` does.
    assert!(!d.allowed_client("cid", None, PublishClientSend, "anon/%u", true));
    assert!(!d.allowed_client("cid", None, PublishClientSend, "anon/", true));
    assert!(d.allowed_client("cid", None, PublishClientSend, "anonc/cid", true));
}

#[test]
fn cached_decisions_equal_uncached_ones_and_follow_changes() {
    use Access::*;
    let mut d = substitution_fixture();
    let topics = [
        "u/bob/c/bob-id",
        "u/%u/c/%c",
        "in/bob-id/x",
        "lit/bob",
        "pat/bob-id/x",
        "un/bob",
        "ul/%c",
        "anon/%u",
        "anonc/c1",
        "x",
        "$CONTROL/dynamic-security/v1",
    ];
    let who = [
        ("bob-id", Some("bob")),
        ("c1", Some("bob")),
        ("bob-id", Some("alice")),
        ("c1", None),
        ("bob-id", None),
        ("c1", Some("ghost")),
    ];
    let check_all = |d: &Dynsec| {
        // Twice: the second round answers from the memo.
        for _ in 0..2 {
            for access in [PublishClientSend, PublishClientReceive, Subscribe, Unsubscribe] {
                for topic in topics {
                    for (cid, user) in who {
                        for sub in [false, true] {
                            assert_eq!(
                                d.allowed_cached(cid, user, access, topic, sub),
                                d.allowed_client(cid, user, access, topic, sub),
                                "{access:?} {topic} {cid} {user:?} substitute={sub}"
                            );
                        }
                    }
                }
            }
        }
    };
    check_all(&d);
    // A change applies to the very next check, though the memo holds the old answer.
    assert!(d.allowed_cached("bob-id", Some("bob"), PublishClientSend, "u/bob/c/bob-id", true));
    one(
        &mut d,
        r#"{"command":"removeRoleACL","rolename":"r2","acltype":"publishClientSend","topic":"u/%u/c/%c"}"#,
    );
    assert!(!d.allowed_cached("bob-id", Some("bob"), PublishClientSend, "u/bob/c/bob-id", true));
    one(&mut d, r#"{"command":"setDefaultACLAccess","acls":[{"acltype":"publishClientSend","allow":true}]}"#);
    assert!(d.allowed_cached("bob-id", Some("bob"), PublishClientSend, "u/bob/c/bob-id", true));
    check_all(&d);
    // A clone answers from the same compiled ACLs; a state loaded from the
    // same data gets its own version and the same answers.
    let loaded = Dynsec::from_proto(&d.to_proto()).unwrap();
    check_all(&loaded);
    // Inputs too long to remember are still decided.
    let long = format!("u/bob/c/{}", "x".repeat(300));
    assert!(!d.allowed_cached("bob-id", Some("bob"), Subscribe, &long, true));
}

// ---- files, proto, merge ----------------------------------------------

#[test]
fn loads_the_file_written_by_mosquitto_ctrl_init() {
    // Written by the real `mosquitto_ctrl dynsec init FILE admin adminpass`
    // (2.0.11), with its "textName" key.
    let d = Dynsec::from_mosquitto_json(include_bytes!("testdata/mosquitto-ctrl-init.json")).unwrap();
    assert!(d.authenticate("admin", Some(b"adminpass"), "any"));
    assert!(!d.authenticate("admin", Some(b"adminpasS"), "any"));
    assert_eq!(d.clients()["admin"].textname.as_deref(), Some("Dynsec admin user"));
    // Same content as initial(), apart from the random salt.
    let mut expected = Dynsec::initial("admin", d.clients()["admin"].password.clone().unwrap());
    assert_eq!(d, expected);
    expected.rebuild();
    assert_eq!(d.to_mosquitto_json(), expected.to_mosquitto_json());
}

#[test]
fn mosquitto_json_round_trip_and_load_rules() {
    let mut d = fixture();
    one(
        &mut d,
        r#"{"command":"modifyClient","username":"alice","textname":"A","textdescription":"d","clientid":"aid"}"#,
    );
    one(&mut d, r#"{"command":"disableClient","username":"bob"}"#);
    one(&mut d, r#"{"command":"createClient","username":"nopw","groups":[{"groupname":"g1","priority":9}]}"#);
    one(
        &mut d,
        r#"{"command":"createRole","rolename":"rr","textname":"t","acls":[{"acltype":"subscribeLiteral","topic":"x","priority":2,"allow":true},{"acltype":"publishClientSend","topic":"y"}]}"#,
    );
    let bytes = d.to_mosquitto_json();
    let back = Dynsec::from_mosquitto_json(&bytes).unwrap();
    assert_eq!(back, d);
    assert_eq!(back.to_mosquitto_json(), bytes);
    assert_eq!(back.clients()["nopw"].groups.get("g1"), Some(&9));
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains("\"anonymousGroup\":\t\"ganon\""));

    let file = br#"{
      "DefaultACLAccess": {"publishClientSend": true, "SUBSCRIBE": true},
      "roles": [{"rolename":"r","acls":[{"acltype":"publishclientsend","topic":"b"},{"acltype":"bogus","topic":"x"},{"acltype":"publishClientSend","topic":"a","priority":1,"allow":true}]},
                {"rolename":"r","textname":"duplicate"}],
      "clients": [
        {"username":"ok","Password":"YwFc13PEl9NPOZYW9NnrvfEXoKaMWumOu2xOhm9flQQKBdEbHX4l4v2j0oCI4qElqD4JOYFlNzfEr/OzRoa3sA==","salt":"G1zuyTtZHLJHk0e4","iterations":101,
         "roles":[{"rolename":"r","priority":3},{"rolename":"missing"}]},
        {"username":"badsalt","password":"YwFc13PEl9NPOZYW9NnrvfEXoKaMWumOu2xOhm9flQQKBdEbHX4l4v2j0oCI4qElqD4JOYFlNzfEr/OzRoa3sA==","salt":"AAAA","iterations":101},
        {"username":"badhash","password":"AAAA","salt":"G1zuyTtZHLJHk0e4","iterations":101},
        {"username":"zeroiter","password":"YwFc13PEl9NPOZYW9NnrvfEXoKaMWumOu2xOhm9flQQKBdEbHX4l4v2j0oCI4qElqD4JOYFlNzfEr/OzRoa3sA==","salt":"G1zuyTtZHLJHk0e4","iterations":0},
        {"username":"nosalt","password":"x","iterations":101},
        {"username":""},
        {"username":"ok","textname":"duplicate"}
      ],
      "groups": [{"groupname":"g","clients":[{"username":"ok","priority":2},{"username":"ghost"}],"roles":[{"rolename":"ghost"}]}],
      "anonymousGroup": "nosuchgroup"
    }"#;
    let d = Dynsec::from_mosquitto_json(file).unwrap();
    let names: Vec<&str> = d.clients().keys().map(String::as_str).collect();
    assert_eq!(names, ["nosalt", "ok"]);
    assert!(d.clients()["nosalt"].password.is_none());
    assert!(d.authenticate("ok", Some(b"adminpass"), "x"));
    assert_eq!(d.clients()["ok"].textname, None, "first of duplicates wins");
    assert_eq!(d.clients()["ok"].roles.len(), 1);
    assert_eq!(d.clients()["ok"].groups.get("g"), Some(&2));
    assert_eq!(d.groups()["g"].clients.len(), 1);
    assert!(d.groups()["g"].roles.is_empty());
    assert_eq!(d.anonymous_group(), None);
    let topics: Vec<&str> = d.roles()["r"].acls.iter().map(|a| a.topic.as_str()).collect();
    assert_eq!(topics, ["a", "b"]);
    assert_eq!(d.roles()["r"].textname, None);
    let da = d.default_access();
    assert!(da.publish_client_send && da.subscribe && !da.publish_client_receive && !da.unsubscribe);
    assert!(d.allowed(Some("ok"), Access::PublishClientSend, "a"));
    assert!(!d.allowed(Some("ok"), Access::PublishClientSend, "b"));
    // Absent defaultACLAccess: all deny. Invalid JSON: an error.
    let d = Dynsec::from_mosquitto_json(b"{}").unwrap();
    assert_eq!(d.default_access(), DefaultAccess::default());
    assert!(Dynsec::from_mosquitto_json(b"{").is_err());
    assert!(Dynsec::from_mosquitto_json(b"[]").is_err());
}

#[test]
fn proto_round_trip_is_exact_and_deterministic() {
    use prost::Message as _;
    let mut d = fixture();
    one(
        &mut d,
        r#"{"command":"createRole","rolename":"rr","acls":[{"acltype":"unsubscribePattern","topic":"x","priority":-2},{"acltype":"publishClientSend","topic":"y","allow":true}]}"#,
    );
    one(
        &mut d,
        r#"{"command":"modifyClient","username":"alice","textname":"A","clientid":"aid","groups":[{"groupname":"g1","priority":4},{"groupname":"ganon"}]}"#,
    );
    one(&mut d, r#"{"command":"setDefaultACLAccess","acls":[{"acltype":"subscribe","allow":true}]}"#);
    let p = d.to_proto();
    let bytes = p.encode_to_vec();
    let back = Dynsec::from_proto(&pb::DynsecState::decode(bytes.as_slice()).unwrap()).unwrap();
    assert_eq!(back, d);
    assert_eq!(back.to_proto().encode_to_vec(), bytes);
    // The derived structure is rebuilt on load.
    assert_eq!(
        back.allowed(Some("alice"), Access::Subscribe, "q"),
        d.allowed(Some("alice"), Access::Subscribe, "q")
    );
    assert!(back.allowed(Some("alice"), Access::Subscribe, "q"));
    assert_eq!(Dynsec::from_proto(&Dynsec::default().to_proto()).unwrap(), Dynsec::default());
}

#[test]
fn from_proto_rejects_inconsistent_state_and_never_panics() {
    use prost::Message as _;
    let good = fixture().to_proto();
    let mut p = good.clone();
    p.clients[0].roles.push(pb::Ref { name: "ghost".into(), priority: 0 });
    assert!(Dynsec::from_proto(&p).is_err());
    let mut p = good.clone();
    p.anonymous_group = Some("ghost".into());
    assert!(Dynsec::from_proto(&p).is_err());
    let mut p = good.clone();
    p.roles.push(p.roles[0].clone());
    assert!(Dynsec::from_proto(&p).is_err());
    let mut p = good.clone();
    p.roles[0].acls.push(pb::Acl { acltype: 99, topic: "x".into(), priority: 0, allow: true });
    assert!(Dynsec::from_proto(&p).is_err());
    let mut p = good.clone();
    if let Some(pw) = p.clients[0].password.as_mut() {
        pw.salt = vec![1, 2, 3].into();
    }
    assert!(Dynsec::from_proto(&p).is_err());
    // Arbitrary bytes: decode errors or a validated state, never a panic.
    let bytes = good.encode_to_vec();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        if let Ok(p) = pb::DynsecState::decode(b.as_slice()) {
            let _ = Dynsec::from_proto(&p);
        }
        let _ = Dynsec::from_mosquitto_json(&b);
        let mut d = admin();
        let _ = d.apply_control(&b);
    }
}

#[test]
fn merge_adds_only_missing_entries() {
    let mut backup = fixture();
    one(&mut backup, r#"{"command":"createRole","rolename":"rnew"}"#);
    one(
        &mut backup,
        r#"{"command":"createGroup","groupname":"gnew","roles":[{"rolename":"rnew"},{"rolename":"r1"}]}"#,
    );
    one(
        &mut backup,
        r#"{"command":"createClient","username":"newbie","password":"np","roles":[{"rolename":"rnew"}],"groups":[{"groupname":"g1","priority":2}]}"#,
    );
    one(&mut backup, r#"{"command":"addGroupClient","groupname":"gnew","username":"alice"}"#);
    one(&mut backup, r#"{"command":"modifyClient","username":"bob","textname":"from backup"}"#);

    let mut live = admin();
    one(&mut live, r#"{"command":"createRole","rolename":"r1","textname":"live"}"#);
    one(&mut live, r#"{"command":"createClient","username":"bob","password":"live-bob"}"#);
    one(&mut live, r#"{"command":"createGroup","groupname":"g1"}"#);
    let added = live.merge_keep_existing(&backup);
    // roles r2, r3, rnew; groups ganon, gnew; clients alice, carol, newbie.
    assert_eq!(added, 8);
    assert_eq!(live.roles()["r1"].textname.as_deref(), Some("live"), "existing role kept");
    assert_eq!(live.clients()["bob"].textname, None, "existing client kept");
    assert!(live.authenticate("bob", Some(b"live-bob"), "x"));
    assert!(!live.clients()["bob"].groups.contains_key("g1"), "membership of two existing entries not added");
    assert!(live.authenticate("newbie", Some(b"np"), "x"));
    assert_eq!(live.clients()["newbie"].groups.get("g1"), Some(&2));
    assert!(live.groups()["g1"].clients.contains("newbie"));
    assert!(live.groups()["gnew"].clients.contains("alice"));
    assert_eq!(live.groups()["gnew"].roles.len(), 2);
    assert_eq!(live.anonymous_group(), Some("ganon"));
    assert_eq!(Dynsec::from_proto(&live.to_proto()).unwrap(), live, "merge keeps the invariants");
    assert_eq!(live.merge_keep_existing(&backup), 0);
    assert!(live.allowed(Some("newbie"), Access::PublishClientReceive, "x"));
}

#[test]
fn synthetic_benchmark_configuration() {
    let shape = bench::Synthetic { clients: 20, roles: 7, acls_per_role: 10, roles_per_client: 3 };
    let mut d = Dynsec::default();
    let out = d.apply_control(&prepare_request(&shape.request("pw")));
    assert!(!String::from_utf8(out.response).unwrap().contains("error"));
    assert_eq!((d.clients().len(), d.roles().len()), (20, 7));
    assert_eq!(d.roles()["bench-role-0"].acls.len(), 10);
    let u = bench::Synthetic::username(5);
    assert!(d.authenticate(&u, Some(b"pw"), "x"));
    assert!(d.allowed(Some(&u), Access::PublishClientSend, "bench/p2p/5"));
    assert!(d.allowed(Some(&u), Access::PublishClientReceive, "bench/p2p/5"));
    assert!(d.allowed(Some(&u), Access::Subscribe, "bench/p2p/5"));
    assert!(!d.allowed(Some(&u), Access::Subscribe, "bench/r5/a0/x"));
    // Client 5 holds roles 5, 6, 0 (of 7); role 1 is not among them.
    assert!(d.allowed(Some(&u), Access::PublishClientSend, "bench/r6/a0/x"));
    assert!(!d.allowed(Some(&u), Access::PublishClientSend, "bench/r1/a0/x"));
    let (_, allowed) = bench::time_allowed(&d, &u, Access::PublishClientSend, "bench/p2p/5", 10);
    assert!(allowed);
}
