//! Harness of the integration tests: starts the real `raftmq` binary with a
//! per-test configuration, data directory and ports, waits until it is ready,
//! and kills it on drop (printing its log when the test failed). Also: TLS
//! certificates made with rcgen, rumqttc helpers, and the raw client in `raw`.
//!
//! Every wait is "until a condition or a deadline": nothing here sleeps to
//! hide a race.
#![allow(dead_code)]

pub mod http;
pub mod raw;

#[allow(unused_imports)] // not every test file polls
pub use http::wait_for;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

pub const DEADLINE: Duration = Duration::from_secs(5);

/// A listener beyond the default TCP one.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub name: String,
    pub kind: String,
    /// Extra TOML lines (cert_file = ..., path = ...).
    pub extra: Vec<String>,
}

/// What to put in the configuration file.
#[derive(Clone, Debug, Default)]
pub struct BrokerCfg {
    /// `key = value` lines of the [mqtt] section (value already TOML).
    pub mqtt: Vec<String>,
    pub listeners: Vec<ListenerSpec>,
    /// Files to write into the temp dir before start: (name, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// The node's log filter (`RUST_LOG`), when not the default.
    pub log: Option<String>,
    /// `key = value` lines of the [dynsec] section (raftmq only; value already TOML).
    pub dynsec: Vec<String>,
    /// Lines for mosquitto.conf only (reference runs, see `against_mosquitto`);
    /// `{dir}` is replaced by the broker's temp dir.
    pub mosquitto: Vec<String>,
}

impl BrokerCfg {
    pub fn new() -> BrokerCfg {
        BrokerCfg::default()
    }
    pub fn mqtt(mut self, line: &str) -> BrokerCfg {
        self.mqtt.push(line.to_string());
        self
    }
    pub fn listener(mut self, name: &str, kind: &str, extra: &[&str]) -> BrokerCfg {
        self.listeners.push(ListenerSpec {
            name: name.into(),
            kind: kind.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        });
        self
    }
    pub fn log(mut self, filter: &str) -> BrokerCfg {
        self.log = Some(filter.into());
        self
    }
    pub fn mosquitto(mut self, line: &str) -> BrokerCfg {
        self.mosquitto.push(line.to_string());
        self
    }
    pub fn dynsec(mut self, line: &str) -> BrokerCfg {
        self.dynsec.push(line.to_string());
        self
    }
    pub fn file(mut self, name: &str, contents: &[u8]) -> BrokerCfg {
        self.files.push((name.into(), contents.to_vec()));
        self
    }
}

pub struct Broker {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The default plain TCP MQTT listener.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub listeners: HashMap<String, SocketAddr>,
    log: PathBuf,
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

/// Path of a file in the broker's temp dir, as a TOML string.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Broker {
    pub async fn start() -> Broker {
        Broker::start_with(BrokerCfg::new()).await
    }

    pub async fn start_with(cfg: BrokerCfg) -> Broker {
        let mut last_log = String::new();
        // Ports are picked by binding port 0 and releasing it: another process may
        // grab one in between, so a start that fails is retried with new ports.
        for _attempt in 0..4 {
            match Broker::try_start(&cfg).await {
                Ok(b) => return b,
                Err(log) => last_log = log,
            }
        }
        panic!("broker did not start; last log:\n{last_log}");
    }

    async fn try_start(cfg: &BrokerCfg) -> Result<Broker, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        for (name, contents) in &cfg.files {
            std::fs::write(dir.path().join(name), contents).map_err(|e| e.to_string())?;
        }
        let mqtt_port = free_port();
        let admin_port = free_port();
        let mut listeners = HashMap::new();
        let mut toml = String::new();
        toml.push_str("node_id = 1\n");
        toml.push_str(&format!("data_dir = {}\n", toml_path(&dir.path().join("data"))));
        toml.push_str("\n[mqtt]\n");
        for l in &cfg.mqtt {
            toml.push_str(l);
            toml.push('\n');
        }
        if !cfg.dynsec.is_empty() {
            toml.push_str("\n[dynsec]\n");
            for l in &cfg.dynsec {
                toml.push_str(l);
                toml.push('\n');
            }
        }
        toml.push_str(&format!(
            "\n[[listeners]]\nname = \"default\"\nkind = \"tcp\"\nbind = \"127.0.0.1:{mqtt_port}\"\n"
        ));
        for l in &cfg.listeners {
            let port = free_port();
            listeners.insert(l.name.clone(), SocketAddr::from(([127, 0, 0, 1], port)));
            toml.push_str(&format!(
                "\n[[listeners]]\nname = \"{}\"\nkind = \"{}\"\nbind = \"127.0.0.1:{port}\"\n",
                l.name, l.kind
            ));
            for e in &l.extra {
                toml.push_str(e);
                toml.push('\n');
            }
        }
        toml.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"));
        let cfg_path = dir.path().join("raftmq.toml");
        std::fs::write(&cfg_path, &toml).map_err(|e| e.to_string())?;
        let log = dir.path().join("broker.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
        let reference = against_mosquitto();
        let child = if reference {
            let mut conf = mosquitto_conf(cfg, mqtt_port, &listeners);
            for line in &cfg.mosquitto {
                conf.push_str(&line.replace("{dir}", &dir.path().display().to_string()));
                conf.push('\n');
            }
            let conf_path = dir.path().join("mosquitto.conf");
            std::fs::write(&conf_path, &conf).map_err(|e| e.to_string())?;
            Command::new(mosquitto_tool("mosquitto"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err)
                .spawn()
                .map_err(|e| format!("spawn mosquitto: {e}"))?
        } else {
            Command::new(env!("CARGO_BIN_EXE_raftmq"))
                .arg("serve")
                .arg("--config")
                .arg(&cfg_path)
                .env(
                    "RUST_LOG",
                    cfg.log.clone().unwrap_or_else(|| {
                        std::env::var("RAFTMQ_TEST_LOG").unwrap_or_else(|_| "info".into())
                    }),
                )
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err)
                .spawn()
                .map_err(|e| format!("spawn: {e}"))?
        };
        let mut b = Broker {
            child: Some(child),
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            listeners,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = b.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    b.child = None;
                    return Err(format!("exited with {status}\nconfig:\n{toml}\nlog:\n{}", b.log_text()));
                }
            }
            if b.ready().await {
                return Ok(b);
            }
            if Instant::now() > deadline {
                return Err(format!("not ready in 20 s\nconfig:\n{toml}\nlog:\n{}", b.log_text()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// /health/ready answers 200 (the node is the serving leader of its
    /// one-member Raft group, so it takes clients) and every MQTT port accepts
    /// connections.
    async fn ready(&self) -> bool {
        if !against_mosquitto() {
            match http_get(self.admin, "/health/ready").await {
                Some((200, _)) => {}
                _ => return false,
            }
        }
        let mut ports = vec![self.addr];
        ports.extend(self.listeners.values().copied());
        for a in ports {
            if TcpStream::connect(a).await.is_err() {
                return false;
            }
        }
        true
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        match self.listeners.get(name) {
            Some(a) => *a,
            None => panic!("no listener {name}"),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Resident memory of the broker process in KiB (Linux /proc), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
    }

    /// Waits for the process to exit; its status, or None at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(s);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while the process runs (it must never die on bad input).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(300);
            let mut err = std::io::stderr();
            let _ = writeln!(err, "---- broker log (last {} lines) ----", lines.len() - from);
            for l in &lines[from..] {
                let _ = writeln!(err, "{l}");
            }
            let _ = writeln!(err, "---- end of broker log ----");
        }
    }
}

/// Developer aid: `RAFTMQ_TEST_BROKER=mosquitto cargo test ...` runs the same
/// tests against Debian's Mosquitto 2 (configuration translated below), to tell
/// a wrong test from a wrong broker. Not used by CI.
pub fn against_mosquitto() -> bool {
    std::env::var("RAFTMQ_TEST_BROKER").map(|v| v == "mosquitto").unwrap_or(false)
}

/// Translates the test configuration into mosquitto.conf (closest equivalents).
fn mosquitto_conf(cfg: &BrokerCfg, mqtt_port: u16, listeners: &HashMap<String, SocketAddr>) -> String {
    let mut global = vec!["allow_anonymous true".to_string(), "persistence false".to_string()];
    let mut per_listener = Vec::new();
    for line in &cfg.mqtt {
        let Some((k, v)) = line.split_once('=') else { continue };
        let (k, v) = (k.trim(), v.trim().trim_matches('"'));
        match k {
            "allow_anonymous" => global[0] = format!("allow_anonymous {v}"),
            "password_file" => global.push(format!("password_file {v}")),
            "max_packet_size" => global.push(format!("max_packet_size {v}")),
            "receive_maximum" | "max_inflight" => global.push(format!("max_inflight_messages {v}")),
            "max_queued_messages" => global.push(format!("max_queued_messages {v}")),
            "max_queued_bytes" => global.push(format!("max_queued_bytes {v}")),
            "queue_qos0_offline" => global.push(format!("queue_qos0_messages {v}")),
            "max_keep_alive" => global.push(format!("max_keepalive {v}")),
            "topic_alias_maximum" => per_listener.push(format!("max_topic_alias {v}")),
            "retain_available" => global.push(format!("retain_available {v}")),
            "sys_interval" => global.push(format!("sys_interval {v}")),
            "max_connections" => per_listener.push(format!("max_connections {v}")),
            _ => {}
        }
    }
    let mut out = global.join("\n");
    out.push_str("\nper_listener_settings false\n");
    out.push_str(&format!("\nlistener {mqtt_port} 127.0.0.1\n"));
    for l in &per_listener {
        out.push_str(&format!("{l}\n"));
    }
    for spec in &cfg.listeners {
        let Some(addr) = listeners.get(&spec.name) else { continue };
        out.push_str(&format!("\nlistener {} 127.0.0.1\n", addr.port()));
        if spec.kind == "ws" || spec.kind == "wss" {
            out.push_str("protocol websockets\n");
        }
        for l in &per_listener {
            out.push_str(&format!("{l}\n"));
        }
        for e in &spec.extra {
            let Some((k, v)) = e.split_once('=') else { continue };
            let (k, v) = (k.trim(), v.trim().trim_matches('"'));
            match k {
                "cert_file" => out.push_str(&format!("certfile {v}\n")),
                "key_file" => out.push_str(&format!("keyfile {v}\n")),
                "client_ca_file" => out.push_str(&format!("cafile {v}\n")),
                "require_client_cert" => out.push_str(&format!("require_certificate {v}\n")),
                _ => {}
            }
        }
    }
    out
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http::http_get_within(addr, path, Duration::from_secs(2)).await
}

// ---------------------------------------------------------------- TLS

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in PEM.
pub struct Certs {
    pub ca_pem: String,
    pub server_pem: String,
    pub server_key: String,
    pub client_pem: String,
    pub client_key: String,
    /// A client certificate signed by a different CA (must be refused).
    pub rogue_client_pem: String,
    pub rogue_client_key: String,
}

fn make_ca(cn: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("ca key");
    rcgen::CertifiedIssuer::self_signed(p, key).expect("ca cert")
}

fn make_leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    sans: Vec<String>,
    cn: &str,
    eku: rcgen::ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p = rcgen::CertificateParams::new(sans).expect("leaf params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let cert = p.signed_by(&key, issuer).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

pub fn make_certs() -> Certs {
    let ca = make_ca("raftmq test CA");
    let rogue = make_ca("rogue CA");
    let (server_pem, server_key) = make_leaf(
        &ca,
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) =
        make_leaf(&ca, vec![], "test-client", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let (rogue_client_pem, rogue_client_key) =
        make_leaf(&rogue, vec![], "rogue-client", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = ca.as_ref().pem();
    Certs { ca_pem, server_pem, server_key, client_pem, client_key, rogue_client_pem, rogue_client_key }
}

impl Certs {
    /// Adds the files ca.pem, server.pem, server.key to the broker's temp dir.
    pub fn add_files(&self, cfg: BrokerCfg) -> BrokerCfg {
        cfg.file("ca.pem", self.ca_pem.as_bytes())
            .file("server.pem", self.server_pem.as_bytes())
            .file("server.key", self.server_key.as_bytes())
    }
}

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------- rumqttc

/// Runs a rumqttc v3.1.1 event loop in a task and forwards its events.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub events: tokio::sync::mpsc::Receiver<Result<rumqttc::Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4 {
    pub fn start(opts: rumqttc::MqttOptions) -> V4 {
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, events) = tokio::sync::mpsc::channel(1000);
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await.map_err(|e| e.to_string());
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    return;
                }
            }
        });
        V4 { client, events, task }
    }

    pub async fn connect(addr: SocketAddr, id: &str) -> V4 {
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let mut c = V4::start(o);
        c.connack().await;
        c
    }

    /// Waits for the CONNACK; panics if the connection fails.
    pub async fn connack(&mut self) -> rumqttc::ConnAck {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))))) => return a,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("rumqttc v4 connection failed: {e}"),
                Ok(None) => panic!("event loop ended"),
                Err(_) => panic!("no CONNACK within {DEADLINE:?}"),
            }
        }
    }

    /// Waits for the first event matching `f`.
    pub async fn until<T>(&mut self, what: &str, mut f: impl FnMut(&rumqttc::Packet) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(rumqttc::Event::Incoming(p)))) => {
                    if let Some(v) = f(&p) {
                        return v;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("connection error while waiting for {what}: {e}"),
                Ok(None) => panic!("event loop ended while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        self.until("SUBACK", |p| match p {
            rumqttc::Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish(&mut self) -> rumqttc::Publish {
        self.until("PUBLISH", |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }
}

/// Runs a rumqttc v5 event loop in a task and forwards its events.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub events: tokio::sync::mpsc::Receiver<Result<rumqttc::v5::Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5 {
    pub fn start(opts: rumqttc::v5::MqttOptions) -> V5 {
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 100);
        let (tx, events) = tokio::sync::mpsc::channel(1000);
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await.map_err(|e| format!("{e:?}"));
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    return;
                }
            }
        });
        V5 { client, events, task }
    }

    pub async fn connect(addr: SocketAddr, id: &str) -> V5 {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let mut c = V5::start(o);
        c.connack().await;
        c
    }

    pub async fn connack(&mut self) -> rumqttc::v5::mqttbytes::v5::ConnAck {
        self.until("CONNACK", |p| match p {
            rumqttc::v5::mqttbytes::v5::Packet::ConnAck(a) => Some(a.clone()),
            _ => None,
        })
        .await
    }

    pub async fn until<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(rumqttc::v5::Event::Incoming(p)))) => {
                    if let Some(v) = f(&p) {
                        return v;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("connection error while waiting for {what}: {e}"),
                Ok(None) => panic!("event loop ended while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn suback(&mut self) -> Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode> {
        self.until("SUBACK", |p| match p {
            rumqttc::v5::mqttbytes::v5::Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.until("PUBLISH", |p| match p {
            rumqttc::v5::mqttbytes::v5::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }
}

// ---------------------------------------------------------------- Mosquitto clients

/// Path of a Mosquitto command-line tool, or a clear failure if it is missing
/// (the test command installs Debian's mosquitto and mosquitto-clients).
pub fn mosquitto_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's mosquitto and mosquitto-clients packages");
}

/// Writes a password file with `mosquitto_passwd -b -c`.
pub fn mosquitto_passwd(file: &Path, user: &str, pass: &str) {
    let out = Command::new(mosquitto_tool("mosquitto_passwd"))
        .arg("-b")
        .arg("-c")
        .arg(file)
        .arg(user)
        .arg(pass)
        .output()
        .expect("run mosquitto_passwd");
    assert!(out.status.success(), "mosquitto_passwd failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a Mosquitto tool to completion (with a timeout); returns (success, stdout, stderr).
pub async fn run_tool(name: &str, args: &[String], timeout: Duration) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(mosquitto_tool(name));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().expect("spawn mosquitto tool");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        ),
        Ok(Err(e)) => panic!("{name}: {e}"),
        Err(_) => panic!("{name} {args:?} did not finish within {timeout:?}"),
    }
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
