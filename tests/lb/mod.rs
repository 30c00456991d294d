//! HAProxy for the tests: runs Debian's haproxy in the foreground with a
//! configuration generated from the shipped haproxy/full-sync.cfg or
//! haproxy/dynsec-sync.cfg, only
//! addresses, ports and the stats socket path substituted (so the shipped
//! file is what is tested), and the MQTT traffic of clients that connect
//! through it as users' clients do: knowing only HAProxy's address.
//!
//! Owns nothing of the broker. Dropping a [`Haproxy`] kills the process and
//! prints its log when the test failed.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// The haproxy binary: on PATH, else Debian's /usr/sbin (not on a user's PATH).
pub fn haproxy_bin() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/usr/local/sbin"]) {
        let p = Path::new(dir).join("haproxy");
        if p.is_file() {
            return p;
        }
    }
    panic!("haproxy is not installed: `apt-get install haproxy` (tests/run.sh installs it)");
}

/// The shipped configuration file `name` under haproxy/.
pub fn shipped(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("haproxy").join(name);
    match std::fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) => panic!("read {}: {e}", p.display()),
    }
}

/// One raftmq node as HAProxy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    pub mqtt: SocketAddr,
    pub admin: SocketAddr,
}

fn free_port() -> u16 {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind("127.0.0.1:0") {
            if let Ok(a) = l.local_addr() {
                return a.port();
            }
        }
    }
    panic!("no free port");
}

/// haproxy/full-sync.cfg with the frontends on `mqtt` / `mqtts`, the three
/// example servers replaced by `backends` (fewer lines when there are fewer
/// backends), `server_opts` appended to every `default-server` line (e.g.
/// `send-proxy-v2`) and the stats socket in `dir`. Panics when the shipped
/// file no longer has the lines substituted here.
pub fn full_sync_config(
    backends: &[Backend],
    mqtt: SocketAddr,
    mqtts: SocketAddr,
    server_opts: &str,
    dir: &Path,
) -> String {
    let (out, counts) =
        substitute("full-sync.cfg", &[(":1883", mqtt), (":8883", mqtts)], backends, server_opts, dir);
    assert_eq!(
        counts,
        (2, 6, 2, 1),
        "full-sync.cfg changed: update tests/lb/mod.rs (binds, servers, default-server, stats socket)"
    );
    out
}

/// haproxy/dynsec-sync.cfg with its frontend on `mqtt`, the three example
/// servers replaced by `backends` and the stats socket in `dir`; nothing
/// else changed. Panics when the shipped file no longer has the lines
/// substituted here.
pub fn dynsec_sync_config(backends: &[Backend], mqtt: SocketAddr, dir: &Path) -> String {
    let (out, counts) = substitute("dynsec-sync.cfg", &[(":1883", mqtt)], backends, "", dir);
    assert_eq!(
        counts,
        (1, 3, 1, 1),
        "dynsec-sync.cfg changed: update tests/lb/mod.rs (binds, servers, default-server, stats socket)"
    );
    out
}

/// The shipped file `name` with each `bind <from>` line bound to its
/// address, every `server nI 10.0.0.I:PORT check port 8080` line pointed at
/// `backends[I-1]` (dropped when there is none), `server_opts` appended to
/// `default-server` lines and the stats socket moved into `dir`. Returns the
/// text and how many (binds, servers, default-server, stats socket) lines
/// were substituted.
fn substitute(
    name: &str,
    binds: &[(&str, SocketAddr)],
    backends: &[Backend],
    server_opts: &str,
    dir: &Path,
) -> (String, (usize, usize, usize, usize)) {
    let src = shipped(name);
    let (mut nbinds, mut servers, mut defaults, mut sockets) = (0, 0, 0, 0);
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        let bind = t.strip_prefix("bind ").and_then(|b| binds.iter().find(|(from, _)| *from == b));
        let new = if t.starts_with("stats socket /run/haproxy/admin.sock") {
            sockets += 1;
            Some(t.replace("/run/haproxy/admin.sock", &dir.join("admin.sock").display().to_string()))
        } else if let Some((_, to)) = bind {
            nbinds += 1;
            Some(format!("bind {to}"))
        } else if t.starts_with("default-server ") {
            defaults += 1;
            Some(format!("{t} {server_opts}").trim_end().to_string())
        } else if let Some(rest) = t.strip_prefix("server n") {
            // "server nI 10.0.0.I:PORT check port 8080"
            servers += 1;
            let i: usize = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            assert!(rest.ends_with("check port 8080") && i >= 1, "{name}: unexpected server line {t:?}");
            match backends.get(i - 1) {
                // The TLS backend is pointed at the same port: HAProxy passes
                // bytes through either way.
                Some(b) => Some(format!("server n{i} {} check port {}", b.mqtt, b.admin.port())),
                None => continue,
            }
        } else {
            None
        };
        match new {
            Some(n) => {
                out.push_str(indent);
                out.push_str(&n);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    (out, (nbinds, servers, defaults, sockets))
}

pub struct Haproxy {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// Frontend of MQTT over TCP (fe_mqtt).
    pub mqtt: SocketAddr,
    /// Frontend of MQTT over TLS, passed through (fe_mqtts).
    pub mqtts: SocketAddr,
    pub config: String,
    log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy with the shipped full-sync configuration in front of
    /// `backends`; returns once its frontends accept connections.
    pub async fn full_sync(backends: &[Backend], server_opts: &str) -> Haproxy {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mqtts = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = full_sync_config(backends, mqtt, mqtts, server_opts, dir.path());
        Haproxy::start(dir, config, mqtt, mqtts).await
    }

    /// Starts HAProxy with the shipped dynsec-sync configuration (sticky by
    /// MQTT client id) in front of `backends`; `mqtts` is unused (no TLS
    /// frontend there) and equals `mqtt`.
    pub async fn dynsec_sync(backends: &[Backend]) -> Haproxy {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dynsec_sync_config(backends, mqtt, dir.path());
        Haproxy::start(dir, config, mqtt, mqtt).await
    }

    async fn start(dir: tempfile::TempDir, config: String, mqtt: SocketAddr, mqtts: SocketAddr) -> Haproxy {
        let cfg_path = dir.path().join("haproxy.cfg");
        if let Err(e) = std::fs::write(&cfg_path, &config) {
            panic!("write {}: {e}", cfg_path.display());
        }
        let log = dir.path().join("haproxy.log");
        let (out, err) = match std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok(p) => p,
            Err(e) => panic!("create {}: {e}", log.display()),
        };
        // -db: foreground, no daemon; the test owns the process.
        let child = Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => panic!("spawn haproxy: {e}"),
        };
        let mut h = Haproxy { child: Some(child), dir, mqtt, mqtts, config, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = h.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("haproxy exited ({status}):\n{}\nconfig:\n{}", h.log_text(), h.config);
                }
            }
            if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
                return h;
            }
            assert!(Instant::now() < deadline, "haproxy not listening within 10 s:\n{}", h.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            let mut err = std::io::stderr();
            let _ = writeln!(err, "---- haproxy log (last {} lines) ----", lines.len() - from);
            for l in &lines[from..] {
                let _ = writeln!(err, "{l}");
            }
        }
    }
}
