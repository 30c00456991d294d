//! Opening many connections with a bounded number of handshakes in flight,
//! and the connection scenarios built on it: conn-rate, idle-conns and
//! reconnect-storm.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::client::{Conn, Dial};
use super::latency::Latency;
use super::procfs::ProcSample;
use super::report::{BenchReport, BrokerFigures};
use super::{BenchError, Plan, StormPhase};

/// Handshakes (TCP connect + CONNECT/CONNACK [+ SUBSCRIBE/SUBACK]) in flight at once.
pub(crate) const HANDSHAKES_IN_FLIGHT: usize = 64;

/// One connection may take this long to be accepted before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections closed after DISCONNECT are awaited this long at most.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct OpenMany {
    /// (index, connection), sorted by index.
    pub conns: Vec<(usize, Conn)>,
    /// TCP connect to CONNACK, per connection.
    pub handshakes: Latency,
    pub failed: u64,
    pub first_error: Option<BenchError>,
    /// From the first connect to the last handshake done.
    pub elapsed: Duration,
}

/// Opens `count` connections named `<role> <i>`, each optionally subscribing
/// to `filter(i)`, with at most [`HANDSHAKES_IN_FLIGHT`] in progress;
/// `persistent` ones keep their sessions under fixed client ids.
/// Failures are counted, not fatal: the caller decides.
pub(crate) async fn open_many<F>(
    plan: &Plan,
    count: usize,
    role: &str,
    filter: F,
    buffer: usize,
    persistent: bool,
) -> OpenMany
where
    F: Fn(usize) -> Option<String>,
{
    let mut set = JoinSet::new();
    let mut next = 0usize;
    let mut out = OpenMany {
        conns: Vec::with_capacity(count),
        handshakes: Latency::new(),
        failed: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let start = Instant::now();
    loop {
        while set.len() < HANDSHAKES_IN_FLIGHT && next < count {
            let i = next;
            next += 1;
            let deadline = plan.deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
            let dial = Dial {
                addr: plan.addr,
                source: plan.source_ip(i),
                client_id: plan.client_id(role, i, persistent),
                keepalive: plan.keepalive,
                version: plan.version,
                buffer,
                deadline,
                name: format!("{role} {i}"),
                persistent,
                username: plan.username(i),
                password: plan.password.clone(),
            };
            let filter = filter(i);
            let qos = plan.qos;
            set.spawn(async move {
                let t0 = Instant::now();
                let mut conn = Conn::open(dial).await?;
                let handshake = t0.elapsed();
                if let Some(f) = filter {
                    conn.subscribe(&f, qos, deadline).await?;
                }
                Ok::<_, BenchError>((i, conn, handshake))
            });
        }
        match set.join_next().await {
            None => break,
            Some(Ok(Ok((i, conn, handshake)))) => {
                out.handshakes.record_ns(u64::try_from(handshake.as_nanos()).unwrap_or(u64::MAX));
                out.conns.push((i, conn));
            }
            Some(Ok(Err(e))) => {
                out.failed += 1;
                out.first_error.get_or_insert(e);
            }
            Some(Err(join)) => {
                out.failed += 1;
                out.first_error.get_or_insert(BenchError::Task(join.to_string()));
            }
        }
    }
    out.elapsed = start.elapsed();
    out.conns.sort_by_key(|(i, _)| *i);
    out
}

/// DISCONNECTs every connection, then waits briefly for the broker to close them.
pub(crate) async fn close_all(conns: Vec<Conn>) {
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut conns = conns;
    for c in conns.iter_mut() {
        c.send_disconnect(deadline).await;
    }
    for c in conns {
        c.wait_closed(deadline).await;
    }
}

fn sample(pid: Option<u32>) -> Result<Option<ProcSample>, BenchError> {
    pid.map(ProcSample::of_pid).transpose()
}

/// RSS that moves less than this over [`SETTLE_STEP`] counts as settled.
const SETTLE_KB: u64 = 64;
const SETTLE_STEP: Duration = Duration::from_millis(250);
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// Samples the broker once its RSS has settled (at most [`SETTLE_MAX`]): a
/// broker started just before the run may still be allocating its start-up
/// state (several MB), which would otherwise count as connection memory.
async fn settled_sample(pid: Option<u32>) -> Result<Option<ProcSample>, BenchError> {
    let Some(pid) = pid else { return Ok(None) };
    let give_up = Instant::now() + SETTLE_MAX;
    let mut last = ProcSample::of_pid(pid)?;
    while Instant::now() < give_up {
        tokio::time::sleep(SETTLE_STEP).await;
        let now = ProcSample::of_pid(pid)?;
        let settled = now.rss_kb.abs_diff(last.rss_kb) < SETTLE_KB;
        last = now;
        if settled {
            break;
        }
    }
    Ok(Some(last))
}

/// conn-rate: N clients connect (at most 64 handshakes in flight) and are held
/// until all are done, then all disconnect. Broker CPU is per connection over
/// the connect phase.
pub(crate) async fn conn_rate(plan: &Plan) -> Result<BenchReport, BenchError> {
    let before = sample(plan.broker_pid)?;
    let opened = open_many(plan, plan.clients, "conn", |_| None, 256, false).await;
    let after = sample(plan.broker_pid)?;
    let connected = opened.conns.len() as u64;
    if connected == 0 {
        if let Some(e) = opened.first_error {
            return Err(e);
        }
    }
    let secs = opened.elapsed.as_secs_f64();
    let mut report = BenchReport::new(plan);
    report.connected = Some(connected);
    report.failed = Some(opened.failed);
    report.first_error = opened.first_error.map(|e| e.to_string());
    report.elapsed_s = secs;
    report.conn_per_s = (secs > 0.0).then(|| connected as f64 / secs);
    report.p50_ms = opened.handshakes.quantile_ms(0.5);
    report.p99_ms = opened.handshakes.quantile_ms(0.99);
    report.max_ms = opened.handshakes.max_ms();
    if let (Some(pid), Some(b), Some(a)) = (plan.broker_pid, before, after) {
        let cpu_us = a.cpu_us_since(&b);
        report.broker = Some(BrokerFigures {
            pid,
            cpu_us,
            cpu_us_per_op: (connected > 0).then(|| cpu_us as f64 / connected as f64),
            cpu_us_per_delivery: None,
            rss_kb_before: b.rss_kb,
            rss_kb: a.rss_kb,
            peak_rss_kb: a.hwm_kb,
        });
    }
    close_all(opened.conns.into_iter().map(|(_, c)| c).collect()).await;
    Ok(report)
}

/// idle-conns: opens N connections (each with one subscription if asked),
/// holds them for --duration, and reports the broker's RSS growth per
/// connection (VmRSS before connecting, once settled, and at the end of the hold).
pub(crate) async fn idle_conns(plan: &Plan) -> Result<BenchReport, BenchError> {
    let before = settled_sample(plan.broker_pid).await?;
    let subscribe = plan.subscribe;
    let opened =
        open_many(plan, plan.clients, "idle", |i| subscribe.then(|| format!("bench/idle/{i}")), 64, false)
            .await;
    let connected = opened.conns.len() as u64;
    if connected == 0 {
        if let Some(e) = opened.first_error {
            return Err(e);
        }
    }
    let mut conns: Vec<Conn> = opened.conns.into_iter().map(|(_, c)| c).collect();
    let hold = plan.duration.unwrap_or(Duration::from_secs(5));
    let hold_end = plan.deadline.min(Instant::now() + hold);
    // Keep the connections alive if the hold outlasts half the keep alive.
    let ping_every = (plan.keepalive > 0).then(|| Duration::from_secs(u64::from(plan.keepalive)) / 2);
    let mut lost = 0u64;
    loop {
        let wake = match ping_every {
            Some(p) => hold_end.min(Instant::now() + p),
            None => hold_end,
        };
        sleep_until(wake).await;
        if Instant::now() >= hold_end {
            break;
        }
        let alive = conns.len();
        conns.retain_mut(|c| c.try_ping());
        lost += (alive - conns.len()) as u64;
    }
    let after = sample(plan.broker_pid)?;
    let held = conns.len() as u64;
    let mut report = BenchReport::new(plan);
    report.connected = Some(held);
    report.failed = Some(opened.failed + lost);
    report.first_error = opened.first_error.map(|e| e.to_string());
    report.elapsed_s = opened.elapsed.as_secs_f64();
    report.conn_per_s = (report.elapsed_s > 0.0).then(|| connected as f64 / report.elapsed_s);
    report.hold_s = Some(hold.as_secs_f64());
    if let (Some(pid), Some(b), Some(a)) = (plan.broker_pid, before, after) {
        report.bytes_per_conn =
            (held > 0).then(|| (a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / held as f64);
        report.broker = Some(BrokerFigures {
            pid,
            cpu_us: a.cpu_us_since(&b),
            cpu_us_per_op: None,
            cpu_us_per_delivery: None,
            rss_kb_before: b.rss_kb,
            rss_kb: a.rss_kb,
            peak_rss_kb: a.hwm_kb,
        });
    }
    close_all(conns).await;
    Ok(report)
}

/// Client ids of the storm are `bench-storm-<i>`, topics `bench/storm/<i>`.
const STORM_ROLE: &str = "storm";

/// reconnect-storm: N persistent clients connect, subscribe (one filter each)
/// and disconnect (setup); then all reconnect to --host/--port with at most
/// [`HANDSHAKES_IN_FLIGHT`] handshakes in flight (resume). The resume figures
/// are the report: time from the first connect to the last CONNACK, conn/s,
/// handshake percentiles, and how many CONNACKs had session present = 1.
/// With `--storm-phase setup` only the setup runs (its own figures), so a
/// script can kill the leader before `--storm-phase resume`.
pub(crate) async fn reconnect_storm(plan: &Plan) -> Result<BenchReport, BenchError> {
    let mut report = BenchReport::new(plan);
    let mut failed = 0u64;
    if plan.storm_phase != StormPhase::Resume {
        let opened =
            open_many(plan, plan.clients, STORM_ROLE, |i| Some(format!("bench/storm/{i}")), 64, true).await;
        let connected = opened.conns.len() as u64;
        if connected == 0 {
            if let Some(e) = opened.first_error {
                return Err(e);
            }
        }
        failed += opened.failed;
        report.first_error = opened.first_error.map(|e| e.to_string());
        report.setup_s = Some(opened.elapsed.as_secs_f64());
        close_all(opened.conns.into_iter().map(|(_, c)| c).collect()).await;
        if plan.storm_phase == StormPhase::Setup {
            let secs = opened.elapsed.as_secs_f64();
            report.connected = Some(connected);
            report.failed = Some(failed);
            report.elapsed_s = secs;
            report.conn_per_s = (secs > 0.0).then(|| connected as f64 / secs);
            report.p50_ms = opened.handshakes.quantile_ms(0.5);
            report.p99_ms = opened.handshakes.quantile_ms(0.99);
            report.max_ms = opened.handshakes.max_ms();
            return Ok(report);
        }
    }
    let before = sample(plan.broker_pid)?;
    let opened = open_many(plan, plan.clients, STORM_ROLE, |_| None, 256, true).await;
    let after = sample(plan.broker_pid)?;
    let connected = opened.conns.len() as u64;
    if connected == 0 {
        if let Some(e) = opened.first_error {
            return Err(e);
        }
    }
    let present = opened.conns.iter().filter(|(_, c)| c.session_present).count() as u64;
    let secs = opened.elapsed.as_secs_f64();
    report.connected = Some(connected);
    report.failed = Some(failed + opened.failed);
    if let Some(e) = opened.first_error {
        report.first_error.get_or_insert(e.to_string());
    }
    report.elapsed_s = secs;
    report.conn_per_s = (secs > 0.0).then(|| connected as f64 / secs);
    report.p50_ms = opened.handshakes.quantile_ms(0.5);
    report.p99_ms = opened.handshakes.quantile_ms(0.99);
    report.max_ms = opened.handshakes.max_ms();
    report.sessions_present = Some(present);
    // Clients that failed to reconnect did not get their session back either.
    report.sessions_missing = Some(plan.clients as u64 - present);
    if let (Some(pid), Some(b), Some(a)) = (plan.broker_pid, before, after) {
        let cpu_us = a.cpu_us_since(&b);
        report.broker = Some(BrokerFigures {
            pid,
            cpu_us,
            cpu_us_per_op: (connected > 0).then(|| cpu_us as f64 / connected as f64),
            cpu_us_per_delivery: None,
            rss_kb_before: b.rss_kb,
            rss_kb: a.rss_kb,
            peak_rss_kb: a.hwm_kb,
        });
    }
    close_all(opened.conns.into_iter().map(|(_, c)| c).collect()).await;
    Ok(report)
}
