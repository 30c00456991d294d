//! The load tool behind `raftmq bench`: drives any MQTT 3.1.1 / 5.0 broker and
//! measures it.
//!
//! Owns the client side of the benchmarks: scenarios (p2p, fan-in, fan-out,
//! connection rate, idle connections), the lean MQTT client they use, latency
//! histograms, `/proc` sampling of the broker and of the tool itself, and the
//! report with its machine-readable `RESULT` line (the same shape as the tool
//! used for the reference Mosquitto figures in shared/spec/performance.md).
//!
//! It depends only on `crate::protocol` (the codec) and must not touch the
//! broker: it is pointed at a broker from the outside, over TCP, and only ever
//! talks to the host it is given. Every loop is bounded by a count and by the
//! `--timeout` deadline, so a run always stops by itself.

mod client;
mod conns;
#[cfg(test)]
mod e2e;
mod latency;
mod messages;
mod procfs;
mod report;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ProtocolVersion, QoS};

pub use latency::{decode_stamp, encode_stamp, Latency, STAMP_LEN};
pub use procfs::{parse_stat_cpu_ticks, parse_status_kb, ProcSample, CLOCK_TICKS_PER_SEC};
pub use report::{BenchReport, BrokerFigures};

/// Errors of the load tool. Connection-level failures in the connection
/// scenarios are counted in the report instead; these abort a run.
#[derive(thiserror::Error, Debug)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("cannot build the tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connection {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("connection {0}: closed by the broker")]
    Closed(String),
    #[error("connection {what}: cannot decode a packet from the broker: {detail}")]
    Decode { what: String, detail: String },
    #[error("cannot encode a packet: {0}")]
    Encode(String),
    #[error("connection {what}: unexpected packet from the broker: {detail}")]
    Unexpected { what: String, detail: String },
    #[error("connection {what}: refused by the broker (reason code 0x{code:02x})")]
    Refused { what: String, code: u8 },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("cannot read /proc/{pid}/{file}: {detail}")]
    Proc { pid: String, file: String, detail: String },
    #[error("a load task failed: {0}")]
    Task(String),
}

/// Which load to generate.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N publisher/subscriber pairs, topic bench/<i>.
    P2p,
    /// N publishers -> 1 subscriber on bench/#.
    Fanin,
    /// 1 publisher -> N subscribers on one topic.
    Fanout,
    /// N clients connect (at most 64 handshakes in flight), then disconnect.
    ConnRate,
    /// N connections held for --duration seconds; broker memory per connection.
    IdleConns,
    /// N persistent clients connect, subscribe and disconnect, then all
    /// reconnect (at most 64 handshakes in flight): time until every session is back.
    ReconnectStorm,
}

/// Which part of `reconnect-storm` a run does, so a script can kill the
/// leader between the two (client ids are fixed, so a second process resumes
/// the sessions of the first).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StormPhase {
    /// Setup, then resume on the same --host/--port.
    #[default]
    All,
    /// Connect, subscribe, disconnect: leaves N offline persistent sessions.
    Setup,
    /// Reconnect all N and count CONNACKs with session present.
    Resume,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::P2p => "p2p",
            Scenario::Fanin => "fanin",
            Scenario::Fanout => "fanout",
            Scenario::ConnRate => "conn-rate",
            Scenario::IdleConns => "idle-conns",
            Scenario::ReconnectStorm => "reconnect-storm",
        }
    }

    fn default_clients(self) -> usize {
        match self {
            Scenario::P2p => 1,
            Scenario::Fanin | Scenario::Fanout => 10,
            Scenario::ConnRate | Scenario::IdleConns => 1000,
            Scenario::ReconnectStorm => 10_000,
        }
    }
}

/// Command-line options of `raftmq bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Broker host (all traffic goes to this host only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "p2p")]
    pub scenario: Scenario,
    /// QoS of publishes and subscriptions (0, 1 or 2).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 8: the payload starts with a timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Clients: pairs (p2p), publishers (fanin), subscribers (fanout),
    /// connections (conn-rate, idle-conns). Default 1 for p2p, 10 for
    /// fanin/fanout, 1000 for the connection scenarios.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Messages to publish in total, over all publishers (default 100000).
    #[arg(long)]
    pub msgs: Option<u64>,
    /// Seconds: publishing stops after this (message scenarios), or how long
    /// the connections are held (idle-conns, default 5).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds: hard cap on the whole run.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Total publish rate in messages per second over all publishers (0 = flat out).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Unacknowledged QoS 1/2 publishes allowed per publisher.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// MQTT protocol version: 3 (3.1.1; 4 is accepted too) or 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    pub protocol: u8,
    /// Bind client sockets to 127.0.0.1 .. 127.0.0.N (loopback brokers only;
    /// more than ~28k connections per source address are impossible).
    #[arg(long, default_value_t = 1)]
    pub src_ips: u8,
    /// idle-conns: each connection subscribes to one topic of its own.
    #[arg(long)]
    pub subscribe: bool,
    /// Subscribers keep their sessions: clean session 0 (3.1.1), or clean
    /// start 0 with session expiry 3600 s (MQTT 5), and fixed client ids
    /// (bench-<role>-<i>) so they can resume. reconnect-storm always is.
    #[arg(long)]
    pub persistent: bool,
    /// reconnect-storm: both phases (default), or only setup or resume.
    #[arg(long, value_enum, default_value = "all")]
    pub storm_phase: StormPhase,
    /// Broker process id: report its CPU time per operation and its memory.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Worker threads of the tool's runtime (1 = single-threaded).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Keep alive in seconds sent in CONNECT.
    #[arg(long, default_value_t = 300)]
    pub keepalive: u16,
    /// Print the report as JSON (the RESULT line still ends the output).
    #[arg(long)]
    pub json: bool,
    /// User name sent in every CONNECT; `{i}` is replaced by the
    /// connection's index within its role (publisher i and subscriber i of
    /// p2p share it), modulo --user-count when given: `--username bench-{i}`
    /// makes each client one of the dynamic-security benchmark users.
    #[arg(long)]
    pub username: Option<String>,
    /// Password sent with --username.
    #[arg(long, requires = "username")]
    pub password: Option<String>,
    /// With `{i}` in --username: cycle through this many user names.
    #[arg(long, requires = "username", value_parser = clap::value_parser!(u64).range(1..))]
    pub user_count: Option<u64>,
    /// Message scenarios: topics are <prefix>/<i> (p2p, fanin; fanin
    /// subscribes to <prefix>/#) and <prefix>/fanout.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            host: "127.0.0.1".into(),
            port: 1883,
            scenario: Scenario::P2p,
            qos: 0,
            size: 64,
            clients: None,
            msgs: None,
            duration: None,
            timeout: 300.0,
            rate: 0,
            inflight: 20,
            protocol: 3,
            src_ips: 1,
            subscribe: false,
            persistent: false,
            storm_phase: StormPhase::All,
            broker_pid: None,
            threads: 1,
            keepalive: 300,
            json: false,
            username: None,
            password: None,
            user_count: None,
            topic_prefix: "bench".into(),
        }
    }
}

/// Arguments checked and resolved; what the scenarios work from.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub addr: SocketAddr,
    pub scenario: Scenario,
    pub qos: QoS,
    pub size: usize,
    pub clients: usize,
    pub msgs: u64,
    pub duration: Option<Duration>,
    pub deadline: Instant,
    pub rate: u64,
    pub inflight: u16,
    pub version: ProtocolVersion,
    pub src_ips: u8,
    pub subscribe: bool,
    pub persistent: bool,
    pub storm_phase: StormPhase,
    pub broker_pid: Option<u32>,
    pub keepalive: u16,
    /// Distinguishes the client ids of concurrent tool processes.
    pub run_id: String,
    /// `--username` pattern (see [`Plan::username`]).
    pub username: Option<String>,
    pub password: Option<bytes::Bytes>,
    pub user_count: Option<u64>,
    pub topic_prefix: String,
}

impl Plan {
    /// Local address to bind connection `idx` to, when --src-ips asks for it.
    pub fn source_ip(&self, idx: usize) -> Option<IpAddr> {
        if self.src_ips <= 1 {
            return None;
        }
        let last = 1 + (idx % usize::from(self.src_ips)) as u8;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    /// User name of connection `idx` (of any role): the --username pattern
    /// with `{i}` replaced by `idx` (modulo --user-count).
    pub fn username(&self, idx: usize) -> Option<String> {
        let pattern = self.username.as_ref()?;
        let i = match self.user_count {
            Some(n) => idx as u64 % n,
            None => idx as u64,
        };
        Some(pattern.replace("{i}", &i.to_string()))
    }

    /// Client id of connection `idx` of `role`: fixed for persistent
    /// sessions (a later run resumes them), else unique to this run.
    pub fn client_id(&self, role: &str, idx: usize, persistent: bool) -> String {
        if persistent {
            format!("bench-{role}-{idx}")
        } else {
            format!("bench-{}-{role}-{idx}", self.run_id)
        }
    }
}

/// The most connections one run handles (each is a file descriptor; the
/// machines this runs on cap a process at 20000).
const MAX_CLIENTS: usize = 1_000_000;

/// File descriptors kept for the runtime, /proc reads and stdio.
const FD_RESERVE: u64 = 32;

fn plan(args: &BenchArgs) -> Result<Plan, BenchError> {
    let bad = |m: String| Err(BenchError::InvalidArgs(m));
    let qos = match QoS::from_u8(args.qos) {
        Some(q) => q,
        None => return bad(format!("--qos {} (expected 0, 1 or 2)", args.qos)),
    };
    let version = match args.protocol {
        3 | 4 => ProtocolVersion::V311,
        5 => ProtocolVersion::V5,
        p => return bad(format!("--protocol {p} (expected 3 or 5)")),
    };
    let message_scenario = matches!(args.scenario, Scenario::P2p | Scenario::Fanin | Scenario::Fanout);
    if message_scenario && args.size < STAMP_LEN {
        return bad(format!("--size {} is below {STAMP_LEN} (the payload carries a timestamp)", args.size));
    }
    if args.size > 64 * 1024 * 1024 {
        return bad(format!("--size {} is above 64 MiB", args.size));
    }
    let clients = args.clients.unwrap_or(args.scenario.default_clients());
    if clients == 0 || clients > MAX_CLIENTS {
        return bad(format!("--clients {clients} (expected 1..={MAX_CLIENTS})"));
    }
    let msgs = args.msgs.unwrap_or(if args.duration.is_some() { u64::MAX } else { 100_000 });
    if message_scenario && msgs == 0 {
        return bad("--msgs 0".into());
    }
    let secs = |v: f64, name: &str| -> Result<Duration, BenchError> {
        if v.is_finite() && v > 0.0 && v < 1e7 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(BenchError::InvalidArgs(format!("{name} {v} (expected seconds > 0)")))
        }
    };
    let timeout = secs(args.timeout, "--timeout")?;
    let duration = match args.duration {
        Some(d) => Some(secs(d, "--duration")?),
        None if args.scenario == Scenario::IdleConns => Some(Duration::from_secs(5)),
        None => None,
    };
    if args.threads == 0 || args.threads > 256 {
        return bad(format!("--threads {} (expected 1..=256)", args.threads));
    }
    // Each connection is a file descriptor; fail early and clearly rather than
    // with thousands of "too many open files" (performance.md section 6).
    let connections = match args.scenario {
        Scenario::P2p => clients.saturating_mul(2),
        Scenario::Fanin | Scenario::Fanout => clients.saturating_add(1),
        Scenario::ConnRate | Scenario::IdleConns | Scenario::ReconnectStorm => clients,
    };
    if args.storm_phase != StormPhase::All && args.scenario != Scenario::ReconnectStorm {
        return bad("--storm-phase only applies to --scenario reconnect-storm".into());
    }
    if let Some(limit) = procfs::open_files_limit() {
        if connections as u64 + FD_RESERVE > limit {
            return bad(format!(
                "{connections} connections need more file descriptors than this process may open \
                 ({limit}, `ulimit -n`); run several tool processes"
            ));
        }
    }
    if args.password.is_some() && args.username.is_none() {
        return bad("--password needs --username".into());
    }
    let prefix = args.topic_prefix.trim_end_matches('/');
    if prefix.is_empty() || prefix.contains(['+', '#']) {
        return bad(format!(
            "--topic-prefix {:?} (expected a topic name without wildcards)",
            args.topic_prefix
        ));
    }
    let addr = resolve(&args.host, args.port)?;
    if args.src_ips > 1 && !(addr.ip().is_loopback() && addr.is_ipv4()) {
        return bad("--src-ips needs an IPv4 loopback broker address".into());
    }
    let run_id = format!(
        "{:x}{:04x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 0xffff_ffff)
            .unwrap_or(0),
        std::process::id() % 0xffff
    );
    Ok(Plan {
        addr,
        scenario: args.scenario,
        qos,
        size: args.size,
        clients,
        msgs,
        duration,
        deadline: Instant::now() + timeout,
        rate: args.rate,
        inflight: args.inflight,
        version,
        src_ips: args.src_ips.max(1),
        subscribe: args.subscribe,
        persistent: args.persistent || args.scenario == Scenario::ReconnectStorm,
        storm_phase: args.storm_phase,
        broker_pid: args.broker_pid,
        keepalive: args.keepalive,
        run_id,
        username: args.username.clone(),
        password: args.password.as_ref().map(|p| bytes::Bytes::from(p.clone().into_bytes())),
        user_count: args.user_count,
        topic_prefix: prefix.to_string(),
    })
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, BenchError> {
    use std::net::ToSocketAddrs;
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|source| BenchError::Resolve { host: host.to_string(), source })?;
    addrs.next().ok_or_else(|| BenchError::Resolve {
        host: host.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    })
}

/// Runs one benchmark on a tokio runtime of its own (`--threads` workers)
/// and returns its report. Printing is the caller's: see
/// [`BenchReport::render`].
pub fn run(args: BenchArgs) -> Result<BenchReport, BenchError> {
    // The deadline is an Instant of tokio's clock, so plan inside the runtime.
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .map_err(BenchError::Runtime)?;
    runtime.block_on(run_async(args))
}

/// Runs one benchmark on the caller's runtime.
pub async fn run_async(args: BenchArgs) -> Result<BenchReport, BenchError> {
    let plan = plan(&args)?;
    let tool_before = ProcSample::of_self()?;
    let started = Instant::now();
    let mut report = match plan.scenario {
        Scenario::P2p | Scenario::Fanin | Scenario::Fanout => messages::run(&plan).await?,
        Scenario::ConnRate => conns::conn_rate(&plan).await?,
        Scenario::IdleConns => conns::idle_conns(&plan).await?,
        Scenario::ReconnectStorm => conns::reconnect_storm(&plan).await?,
    };
    let wall = started.elapsed().as_secs_f64();
    let tool_after = ProcSample::of_self()?;
    report.tool_cpu_pct = procfs::cpu_percent(&tool_before, &tool_after, wall);
    report.protocol = args.protocol;
    report.json = args.json;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_rejects_bad_arguments() {
        let small = BenchArgs { size: 4, ..BenchArgs::default() };
        assert!(matches!(plan(&small), Err(BenchError::InvalidArgs(_))));
        let none = BenchArgs { clients: Some(0), ..BenchArgs::default() };
        assert!(matches!(plan(&none), Err(BenchError::InvalidArgs(_))));
        let remote_src = BenchArgs { host: "192.0.2.1".into(), src_ips: 4, ..BenchArgs::default() };
        assert!(matches!(plan(&remote_src), Err(BenchError::InvalidArgs(_))));
        let too_many =
            BenchArgs { scenario: Scenario::IdleConns, clients: Some(999_999), ..BenchArgs::default() };
        if procfs::open_files_limit().is_some_and(|l| l < 999_999) {
            assert!(matches!(plan(&too_many), Err(BenchError::InvalidArgs(_))));
        }
        let bad_timeout = BenchArgs { timeout: -1.0, ..BenchArgs::default() };
        assert!(matches!(plan(&bad_timeout), Err(BenchError::InvalidArgs(_))));
        let phase_without_storm = BenchArgs { storm_phase: StormPhase::Resume, ..BenchArgs::default() };
        assert!(matches!(plan(&phase_without_storm), Err(BenchError::InvalidArgs(_))));
    }

    #[tokio::test]
    async fn persistent_client_ids_are_fixed_and_storms_are_persistent() {
        let p = plan(&BenchArgs { persistent: true, ..BenchArgs::default() }).expect("valid arguments");
        assert!(p.persistent);
        assert_eq!(p.client_id("sub", 3, true), "bench-sub-3");
        assert_ne!(p.client_id("sub", 3, false), "bench-sub-3");
        assert!(p.client_id("sub", 3, false).ends_with("-sub-3"));
        let storm = plan(&BenchArgs {
            scenario: Scenario::ReconnectStorm,
            storm_phase: StormPhase::Setup,
            clients: Some(100),
            ..BenchArgs::default()
        })
        .expect("valid arguments");
        assert!(storm.persistent, "reconnect-storm clients always keep their sessions");
        assert_eq!(Scenario::ReconnectStorm.default_clients(), 10_000);
        assert_eq!(storm.storm_phase, StormPhase::Setup);
        let plain = plan(&BenchArgs::default()).expect("valid arguments");
        assert!(!plain.persistent);
        assert_eq!(plain.username(3), None);
    }

    #[tokio::test]
    async fn user_names_and_topic_prefix() {
        let p = plan(&BenchArgs {
            username: Some("bench-{i}".into()),
            password: Some("pw".into()),
            user_count: Some(1000),
            topic_prefix: "bench/p2p/".into(),
            ..BenchArgs::default()
        })
        .expect("valid arguments");
        assert_eq!(p.username(7).as_deref(), Some("bench-7"));
        assert_eq!(p.username(1007).as_deref(), Some("bench-7"));
        assert_eq!(p.password.as_deref(), Some(&b"pw"[..]));
        assert_eq!(p.topic_prefix, "bench/p2p");
        let fixed = plan(&BenchArgs { username: Some("u".into()), ..BenchArgs::default() }).expect("valid");
        assert_eq!(fixed.username(5).as_deref(), Some("u"));
        let no_user = BenchArgs { password: Some("pw".into()), ..BenchArgs::default() };
        assert!(matches!(plan(&no_user), Err(BenchError::InvalidArgs(_))));
        let wild = BenchArgs { topic_prefix: "a/+".into(), ..BenchArgs::default() };
        assert!(matches!(plan(&wild), Err(BenchError::InvalidArgs(_))));
    }

    #[tokio::test]
    async fn plan_defaults_and_source_ips() {
        let p = plan(&BenchArgs { src_ips: 3, ..BenchArgs::default() }).expect("valid arguments");
        assert_eq!(p.clients, 1);
        assert_eq!(p.msgs, 100_000);
        assert_eq!(p.source_ip(0), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))));
        assert_eq!(p.source_ip(4), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        let idle = plan(&BenchArgs { scenario: Scenario::IdleConns, ..BenchArgs::default() })
            .expect("valid arguments");
        assert_eq!(idle.duration, Some(Duration::from_secs(5)));
        assert_eq!(idle.source_ip(7), None);
    }
}
