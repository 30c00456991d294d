//! The result of a run: a human report, optional JSON, and the machine-readable
//! `RESULT` line that always ends the output.

use std::fmt::Write as _;

use super::Plan;

/// What `--broker-pid` measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BrokerFigures {
    pub pid: u32,
    /// Broker CPU time (utime + stime) over the measured phase, microseconds.
    pub cpu_us: u64,
    /// Per message received by the broker (publishes), or per connection (conn-rate).
    pub cpu_us_per_op: Option<f64>,
    /// fanout: per delivery to a subscriber.
    pub cpu_us_per_delivery: Option<f64>,
    /// VmRSS before the run, kB.
    pub rss_kb_before: u64,
    /// VmRSS at the end of the measured phase, kB.
    pub rss_kb: u64,
    /// VmHWM at the end of the measured phase, kB.
    pub peak_rss_kb: u64,
}

/// Everything one run measured. Fields that do not apply are None.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub scenario: String,
    pub qos: u8,
    /// 3 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    pub size: usize,
    pub clients: usize,
    /// Requested total publish rate (0 = flat out).
    pub rate: u64,
    /// Messages the publishers sent.
    pub published: Option<u64>,
    /// Messages (deliveries, for fanout) the subscribers received.
    pub received: Option<u64>,
    /// Deliveries expected from what was published.
    pub expected: Option<u64>,
    /// Measured phase: first publish to last delivery, or first connect to last CONNACK.
    pub elapsed_s: f64,
    /// Deliveries per second at the subscribers.
    pub msgs_per_s: Option<f64>,
    /// Publishes per second at the publishers.
    pub publish_per_s: Option<f64>,
    /// End-to-end latency (message scenarios) or handshake time (conn-rate).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub connected: Option<u64>,
    pub failed: Option<u64>,
    pub first_error: Option<String>,
    pub conn_per_s: Option<f64>,
    /// idle-conns: seconds the connections were held.
    pub hold_s: Option<f64>,
    pub broker: Option<BrokerFigures>,
    /// idle-conns: broker RSS growth per held connection.
    pub bytes_per_conn: Option<f64>,
    /// QoS 1/2 publishers: PUBLISH written to PUBACK (QoS 1) or PUBCOMP (QoS 2) read.
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_max_ms: Option<f64>,
    /// reconnect-storm: seconds the setup phase took to connect and subscribe all.
    pub setup_s: Option<f64>,
    /// reconnect-storm (resume): CONNACKs with session present = 1, and the
    /// clients without (session present = 0 or not reconnected).
    pub sessions_present: Option<u64>,
    pub sessions_missing: Option<u64>,
    /// The tool's own CPU over the run, percent of one core.
    pub tool_cpu_pct: f64,
    /// Render as JSON rather than text (from --json).
    #[serde(skip)]
    pub json: bool,
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".to_string(),
    }
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| x.to_string())
}

impl BenchReport {
    pub(crate) fn new(plan: &Plan) -> BenchReport {
        BenchReport {
            scenario: plan.scenario.name().to_string(),
            qos: plan.qos as u8,
            protocol: if plan.version.is_v5() { 5 } else { 3 },
            size: plan.size,
            clients: plan.clients,
            rate: plan.rate,
            ..BenchReport::default()
        }
    }

    /// Deliveries expected but not received.
    pub fn lost(&self) -> Option<u64> {
        Some(self.expected?.saturating_sub(self.received?))
    }

    /// The machine-readable last line. The first fields are the shape of the
    /// reference tool (shared/spec/performance.md); `published`, `lost`,
    /// `broker_cpu_us_per_delivery`, then `ack_p50_ms`, `ack_p99_ms` (publish to
    /// PUBACK/PUBCOMP), `sessions_present`, `sessions_missing` (reconnect-storm)
    /// and `elapsed_s` (the measured phase) follow.
    pub fn result_line(&self) -> String {
        let b = self.broker.as_ref();
        format!(
            "RESULT scenario={} qos={} clients={} msgs={} msgs_per_s={} p50_ms={} p99_ms={} conn_per_s={} \
             broker_cpu_us_per_op={} broker_rss_kb={} broker_peak_rss_kb={} bytes_per_conn={} tool_cpu_pct={:.1} \
             published={} lost={} broker_cpu_us_per_delivery={} ack_p50_ms={} ack_p99_ms={} \
             sessions_present={} sessions_missing={} elapsed_s={:.3}",
            self.scenario,
            self.qos,
            self.clients,
            opt_u(self.received),
            opt(self.msgs_per_s, 0),
            opt(self.p50_ms, 3),
            opt(self.p99_ms, 3),
            opt(self.conn_per_s, 0),
            opt(b.and_then(|b| b.cpu_us_per_op), 2),
            opt_u(b.map(|b| b.rss_kb)),
            opt_u(b.map(|b| b.peak_rss_kb)),
            opt(self.bytes_per_conn, 0),
            self.tool_cpu_pct,
            opt_u(self.published),
            opt_u(self.lost()),
            opt(b.and_then(|b| b.cpu_us_per_delivery), 2),
            opt(self.ack_p50_ms, 3),
            opt(self.ack_p99_ms, 3),
            opt_u(self.sessions_present),
            opt_u(self.sessions_missing),
            self.elapsed_s,
        )
    }

    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let v = if self.protocol == 5 { "MQTT 5" } else { "MQTT 3.1.1" };
        if self.connected.is_some() {
            let _ = writeln!(s, "scenario {} ({v}), {} clients", self.scenario, self.clients);
        } else {
            let rate = if self.rate == 0 { "flat out".to_string() } else { format!("{} msg/s", self.rate) };
            let _ = writeln!(
                s,
                "scenario {} ({v}), QoS {}, {} clients, {} B payload, {rate}",
                self.scenario, self.qos, self.clients, self.size
            );
        }
        if let Some(published) = self.published {
            let _ = writeln!(
                s,
                "published {published} ({} msg/s); received {} of {} expected ({} lost) in {:.2} s: {} msg/s",
                opt(self.publish_per_s, 0),
                opt_u(self.received),
                opt_u(self.expected),
                opt_u(self.lost()),
                self.elapsed_s,
                opt(self.msgs_per_s, 0)
            );
            let _ = writeln!(
                s,
                "end-to-end latency: p50 {} ms, p99 {} ms, max {} ms",
                opt(self.p50_ms, 3),
                opt(self.p99_ms, 3),
                opt(self.max_ms, 3)
            );
            if self.ack_p50_ms.is_some() {
                let _ = writeln!(
                    s,
                    "publish to {}: p50 {} ms, p99 {} ms, max {} ms",
                    if self.qos == 2 { "PUBCOMP" } else { "PUBACK" },
                    opt(self.ack_p50_ms, 3),
                    opt(self.ack_p99_ms, 3),
                    opt(self.ack_max_ms, 3)
                );
            }
        }
        if let Some(setup) = self.setup_s {
            let _ = writeln!(s, "setup: connected and subscribed in {setup:.2} s");
        }
        if let Some(connected) = self.connected {
            let _ = writeln!(
                s,
                "connected {connected}, failed {} in {:.2} s: {} conn/s",
                opt_u(self.failed),
                self.elapsed_s,
                opt(self.conn_per_s, 0)
            );
            if self.p50_ms.is_some() && self.published.is_none() {
                let _ = writeln!(
                    s,
                    "handshake: p50 {} ms, p99 {} ms, max {} ms",
                    opt(self.p50_ms, 3),
                    opt(self.p99_ms, 3),
                    opt(self.max_ms, 3)
                );
            }
            if let (Some(present), Some(missing)) = (self.sessions_present, self.sessions_missing) {
                let _ = writeln!(s, "sessions present {present}, missing {missing}");
            }
            if let Some(hold) = self.hold_s {
                let _ = writeln!(s, "held for {hold:.1} s");
            }
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "first error: {e}");
        }
        if let Some(b) = &self.broker {
            let _ = writeln!(
                s,
                "broker pid {}: CPU {:.3} s, {} us/op{}; RSS {} -> {} kB (peak {} kB){}",
                b.pid,
                b.cpu_us as f64 / 1e6,
                opt(b.cpu_us_per_op, 2),
                b.cpu_us_per_delivery.map_or(String::new(), |d| format!(", {d:.2} us/delivery")),
                b.rss_kb_before,
                b.rss_kb,
                b.peak_rss_kb,
                self.bytes_per_conn.map_or(String::new(), |x| format!(", {x:.0} B/conn")),
            );
        }
        let _ = writeln!(s, "tool CPU {:.1}% of one core", self.tool_cpu_pct);
        s
    }

    /// The whole output: the human report (or JSON with --json), then the RESULT line.
    pub fn render(&self) -> String {
        let body = if self.json {
            serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
        } else {
            self.human()
        };
        format!("{body}{}", self.result_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_of_a_message_run() {
        let r = BenchReport {
            scenario: "p2p".into(),
            qos: 1,
            protocol: 3,
            size: 64,
            clients: 1,
            published: Some(100_000),
            received: Some(99_990),
            expected: Some(100_000),
            elapsed_s: 2.0,
            msgs_per_s: Some(49_995.4),
            p50_ms: Some(0.4504),
            p99_ms: Some(0.9),
            broker: Some(BrokerFigures {
                pid: 7,
                cpu_us: 1_980_000,
                cpu_us_per_op: Some(19.8),
                cpu_us_per_delivery: None,
                rss_kb_before: 8000,
                rss_kb: 8600,
                peak_rss_kb: 9100,
            }),
            tool_cpu_pct: 45.26,
            ack_p50_ms: Some(0.31),
            ack_p99_ms: Some(1.25),
            ack_max_ms: Some(2.0),
            ..BenchReport::default()
        };
        assert_eq!(
            r.result_line(),
            "RESULT scenario=p2p qos=1 clients=1 msgs=99990 msgs_per_s=49995 p50_ms=0.450 p99_ms=0.900 \
             conn_per_s=- broker_cpu_us_per_op=19.80 broker_rss_kb=8600 broker_peak_rss_kb=9100 \
             bytes_per_conn=- tool_cpu_pct=45.3 published=100000 lost=10 broker_cpu_us_per_delivery=- \
             ack_p50_ms=0.310 ack_p99_ms=1.250 sessions_present=- sessions_missing=- elapsed_s=2.000"
        );
        let out = r.render();
        assert!(out.contains("10 lost"), "{out}");
        assert!(out.contains("publish to PUBACK: p50 0.310 ms, p99 1.250 ms"), "{out}");
        assert!(out.lines().last().is_some_and(|l| l.starts_with("RESULT ")));
    }

    #[test]
    fn result_line_without_broker_and_json_render() {
        let r = BenchReport {
            scenario: "conn-rate".into(),
            clients: 10_000,
            connected: Some(10_000),
            failed: Some(0),
            conn_per_s: Some(16_900.2),
            p50_ms: Some(2.4),
            p99_ms: Some(14.0),
            tool_cpu_pct: 80.0,
            json: true,
            ..BenchReport::default()
        };
        let line = r.result_line();
        assert!(line.contains(" msgs=- msgs_per_s=- "), "{line}");
        assert!(line.contains(" conn_per_s=16900 "), "{line}");
        assert!(
            line.contains(" broker_cpu_us_per_op=- broker_rss_kb=- broker_peak_rss_kb=- bytes_per_conn=- ")
        );
        let storm = BenchReport {
            scenario: "reconnect-storm".into(),
            sessions_present: Some(9_990),
            sessions_missing: Some(10),
            elapsed_s: 0.5,
            ..r.clone()
        };
        let storm_line = storm.result_line();
        assert!(
            storm_line.ends_with(
                " ack_p50_ms=- ack_p99_ms=- sessions_present=9990 sessions_missing=10 elapsed_s=0.500"
            ),
            "{storm_line}"
        );
        assert!(storm.human().contains("sessions present 9990, missing 10"));
        let out = r.render();
        let (json, last) = out.rsplit_once('\n').unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json).expect("render emits valid JSON");
        assert_eq!(v["connected"], 10_000);
        assert_eq!(last, line);
    }
}
