//! Tests of the password file format and the static authenticator.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use super::passwd::{PasswordFile, PasswordHash};
use super::*;

/// Written once by the real `mosquitto_passwd` 2.0.11 (`-b -c file alice 'wonder land'`,
/// then `-b file bob bobpw`).
const MOSQUITTO_FILE: &str = "\
alice:$7$101$LwLBXBrXeA+tNw6K$3TzGvmYUoIGjHX7VsJen5ZcYfw5wf57sm2KZe41Edmo3CjUJ/HgpgIBAXhsSb/U/cst0JYNq86f/w8hgPIS6nw==
bob:$7$101$9Ogbd57+197SuafI$A0ryP+KUU1q3xoXWXCzWVdzimf4Su66oYSmOVaq5LTqT75ovnNI0LRpTvCmrJdORcPTOK9chpAysayY7NM//6A==
";

/// Mosquitto 1.x form, computed independently with Python's hashlib:
/// sha512(b"secret6" + bytes(range(1, 13))).
const SHA512_LINE: &str = "carol:$6$AQIDBAUGBwgJCgsM$S0QHkjpkvtUsxmMOtsu5t2SVnAvyhCIScUsV0AOs3QSWZm8gdwUZHyp8NoB4guBGduqelpvHIWIjFXB2Gjq2fQ==";

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

fn req<'a>(username: Option<&'a str>, password: Option<&'a [u8]>) -> AuthRequest<'a> {
    AuthRequest { client_id: "c1", username, password, peer: peer() }
}

fn write_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("passwd");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

#[test]
fn verifies_hashes_written_by_mosquitto_passwd() {
    let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
    assert_eq!(file.len(), 2);
    assert!(file.verify("alice", b"wonder land"));
    assert!(file.verify("bob", b"bobpw"));
    assert!(!file.verify("alice", b"bobpw"));
    assert!(!file.verify("alice", b"wonder lanD"));
    assert!(!file.verify("alice", b""));
    assert!(!file.verify("mallory", b"wonder land"));
}

#[test]
fn dynsec_spec_vectors() {
    // spec/dynsec.md 6.3, observed from Mosquitto's dynamic security plugin.
    let h = PasswordHash::parse(
        "$7$101$G1zuyTtZHLJHk0e4$YwFc13PEl9NPOZYW9NnrvfEXoKaMWumOu2xOhm9flQQKBdEbHX4l4v2j0oCI4qElqD4JOYFlNzfEr/OzRoa3sA==",
    )
    .unwrap();
    assert!(h.verify(b"adminpass"));
    assert!(!h.verify(b"adminpasS"));
    let h = PasswordHash::parse(
        "$7$101$jKq3dY7KGBwFaFbK$1+/xlrwL4vnfFDnTI2nX03dpBI711cXfXp5kZWGr+5S+JKOUUjWUiCZXyd6IZvcR1mJrZqfc5+WWaGN+wxcWNQ==",
    )
    .unwrap();
    assert!(h.verify(b"alicepw2"));
}

#[test]
fn sha512_form_verifies() {
    let file = PasswordFile::parse(SHA512_LINE).unwrap();
    assert!(file.verify("carol", b"secret6"));
    assert!(!file.verify("carol", b"secret7"));
}

#[test]
fn hash_password_pbkdf2_round_trips_and_salts() {
    let a = hash_password_pbkdf2(b"pw", 101);
    let b = hash_password_pbkdf2(b"pw", 101);
    assert_ne!(a, b, "fresh salt each time");
    assert!(a.starts_with("$7$101$"));
    let fields: Vec<&str> = a.split('$').collect();
    assert_eq!(fields.len(), 5);
    assert_eq!(fields[3].len(), 16, "12-byte salt is 16 base64 chars");
    assert_eq!(fields[4].len(), 88, "64-byte key is 88 base64 chars");
    let parsed = PasswordHash::parse(&a).unwrap();
    assert!(parsed.verify(b"pw"));
    assert!(!parsed.verify(b"pw2"));
    assert_eq!(parsed.to_string(), a, "Display gives back the encoding");
}

#[test]
fn comments_and_blank_lines_are_skipped() {
    let text = format!("# users\n\n{SHA512_LINE}\r\n   \n# end\n");
    let file = PasswordFile::parse(&text).unwrap();
    assert_eq!(file.len(), 1);
    assert!(file.verify("carol", b"secret6"));
}

#[test]
fn bad_lines_name_their_line_number() {
    let cases = [
        ("# c\nalice\n", 2, "user:hash"),
        ("alice:plaintext\n", 1, "not hashed"),
        ("\n\nalice:$5$abc$def\n", 3, "unsupported"),
        ("alice:$7$x$AQIDBAUGBwgJCgsM$AAAA\n", 1, "iteration"),
        ("alice:$7$0$AQIDBAUGBwgJCgsM$AAAA\n", 1, "at least 1"),
        ("alice:$7$101$!!!$AAAA\n", 1, "base64"),
        ("alice:$7$101$AQIDBAUGBwgJCgsM$AAAA\n", 1, "64 bytes"),
        ("alice:$6$AQIDBAUGBwgJCgsM\n", 1, "malformed"),
        ("alice:\n", 1, "missing password hash"),
        (":$6$AQIDBAUGBwgJCgsM$AAAA\n", 1, "empty user"),
    ];
    for (text, line, needle) in cases {
        let (got_line, reason) = PasswordFile::parse(text).unwrap_err();
        assert_eq!(got_line, line, "{text:?}: {reason}");
        assert!(reason.contains(needle), "{text:?}: {reason:?} should contain {needle:?}");
    }
    let dup = format!("{SHA512_LINE}\n{SHA512_LINE}\n");
    let (line, reason) = PasswordFile::parse(&dup).unwrap_err();
    assert_eq!(line, 2);
    assert!(reason.contains("duplicate"));
}

#[test]
fn from_config_refuses_a_bad_file_naming_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), &format!("{SHA512_LINE}\nbroken line\n"));
    let cfg = AuthConfig { allow_anonymous: false, password_file: Some(path.clone()) };
    let err = from_config(&cfg).err().expect("bad file must be refused");
    let msg = err.to_string();
    assert!(matches!(err, AuthError::BadLine { line: 2, .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("line 2"), "{msg}");

    let missing = dir.path().join("nope");
    let cfg = AuthConfig { allow_anonymous: false, password_file: Some(missing) };
    let err = from_config(&cfg).err().expect("missing file must be refused");
    assert!(matches!(err, AuthError::Read { .. }));
    assert!(err.to_string().contains("nope"));
}

#[test]
fn decisions_with_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), MOSQUITTO_FILE);
    for allow_anonymous in [false, true] {
        let auth = from_config(&AuthConfig { allow_anonymous, password_file: Some(path.clone()) }).unwrap();
        assert_eq!(auth.authenticate(&req(Some("alice"), Some(b"wonder land"))), AuthDecision::Allow);
        assert_eq!(auth.authenticate(&req(Some("alice"), Some(b"nope"))), AuthDecision::BadCredentials);
        assert_eq!(auth.authenticate(&req(Some("alice"), None)), AuthDecision::BadCredentials);
        assert_eq!(
            auth.authenticate(&req(Some("mallory"), Some(b"wonder land"))),
            AuthDecision::BadCredentials
        );
        let anonymous = auth.authenticate(&req(None, None));
        if allow_anonymous {
            assert_eq!(anonymous, AuthDecision::Allow);
        } else {
            assert_eq!(anonymous, AuthDecision::NotAuthorized);
        }
        // Authorization hooks default to allow.
        assert!(auth.can_publish("c1", Some("alice"), "a/b"));
        assert!(auth.can_subscribe("c1", None, "a/#"));
        assert!(auth.can_receive("c1", None, "a/b"));
    }
}

#[test]
fn decisions_without_password_file() {
    let open = from_config(&AuthConfig::default()).unwrap();
    assert_eq!(open.authenticate(&req(None, None)), AuthDecision::Allow);
    assert_eq!(open.authenticate(&req(Some("anyone"), Some(b"x"))), AuthDecision::Allow);
    let closed = from_config(&AuthConfig { allow_anonymous: false, password_file: None }).unwrap();
    assert_eq!(closed.authenticate(&req(None, None)), AuthDecision::NotAuthorized);
    assert_eq!(closed.authenticate(&req(Some("anyone"), Some(b"x"))), AuthDecision::NotAuthorized);
}

#[test]
fn decision_codes() {
    assert_eq!(AuthDecision::BadCredentials.reason_code(), 0x86);
    assert_eq!(AuthDecision::NotAuthorized.reason_code(), 0x87);
    assert_eq!(AuthDecision::BadCredentials.v311_return_code(), 4);
    assert_eq!(AuthDecision::NotAuthorized.v311_return_code(), 5);
    assert_eq!(AuthDecision::Allow.v311_return_code(), 0);
}

#[test]
fn auth_config_deserializes_from_mqtt_keys() {
    let cfg: AuthConfig =
        toml::from_str("allow_anonymous = false\npassword_file = \"/etc/raftmq/passwd\"\n").unwrap();
    assert_eq!(cfg, AuthConfig { allow_anonymous: false, password_file: Some("/etc/raftmq/passwd".into()) });
    let cfg: AuthConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, AuthConfig::default());
}

/// Runs against the real tool when it is installed (the test command installs
/// mosquitto: `apt-get install -y mosquitto`); otherwise the fixed vectors above cover it.
#[test]
fn live_mosquitto_passwd_when_installed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&path)
        .arg("dave")
        .arg("p@ss:word with spaces")
        .status();
    let Ok(status) = status else {
        eprintln!("mosquitto_passwd not installed; covered by the fixed vectors");
        return;
    };
    assert!(status.success());
    let auth = from_config(&AuthConfig { allow_anonymous: false, password_file: Some(path) }).unwrap();
    assert_eq!(auth.authenticate(&req(Some("dave"), Some(b"p@ss:word with spaces"))), AuthDecision::Allow);
    assert_eq!(auth.authenticate(&req(Some("dave"), Some(b"p@ss:word"))), AuthDecision::BadCredentials);
}
