//! The message scenarios: p2p (N publisher/subscriber pairs), fanin
//! (N publishers -> 1 subscriber on bench/#; `--topic-prefix` replaces `bench`) and fanout (1 publisher ->
//! N subscribers). Every connection has its own task; publishers keep a window
//! of `--inflight` unacknowledged QoS 1/2 publishes and write in batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::client::{kind, Conn};
use super::conns::{close_all, open_many};
use super::latency::{encode_stamp, nanos_since, Latency, STAMP_LEN};
use super::procfs::ProcSample;
use super::report::{BenchReport, BrokerFigures};
use super::{BenchError, Plan, Scenario};
use crate::protocol::{Packet, PubResp, Publish, QoS};

/// Publishes encoded per write when the window and rate allow.
const BATCH: u64 = 32;

/// After the publishers are done, a subscriber that receives nothing for
/// this long stops waiting (QoS 0 messages may have been dropped).
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// Packet id states of a publisher's window.
const FREE: u8 = 0;
const AWAIT_ACK: u8 = 1; // PUBACK (QoS 1) or PUBREC (QoS 2)
const AWAIT_COMP: u8 = 2;

struct PubResult {
    sent: u64,
    /// PUBLISH written to PUBACK/PUBCOMP read (QoS 1/2).
    acks: Latency,
    conn: Conn,
}

struct SubResult {
    received: u64,
    latency: Latency,
    last_rx: Option<Instant>,
    conn: Conn,
}

/// Who publishes where, and how many messages each subscriber should see.
struct Topology {
    pub_topics: Vec<String>,
    pub_msgs: Vec<u64>,
    /// Subscriber filters, with the index of the counter they expect from.
    sub_filters: Vec<(String, usize)>,
    /// Counter each publisher adds its sent messages to.
    pub_counter: Vec<usize>,
    counters: usize,
}

fn topology(plan: &Plan) -> Topology {
    let n = plan.clients;
    let prefix = &plan.topic_prefix;
    let split = |total: u64, parts: usize| -> Vec<u64> {
        if total == u64::MAX {
            return vec![u64::MAX; parts];
        }
        let parts64 = parts as u64;
        (0..parts64).map(|i| total / parts64 + u64::from(i < total % parts64)).collect()
    };
    match plan.scenario {
        Scenario::Fanin => Topology {
            pub_topics: (0..n).map(|i| format!("{prefix}/{i}")).collect(),
            pub_msgs: split(plan.msgs, n),
            sub_filters: vec![(format!("{prefix}/#"), 0)],
            pub_counter: vec![0; n],
            counters: 1,
        },
        Scenario::Fanout => Topology {
            pub_topics: vec![format!("{prefix}/fanout")],
            pub_msgs: vec![plan.msgs],
            sub_filters: (0..n).map(|_| (format!("{prefix}/fanout"), 0)).collect(),
            pub_counter: vec![0],
            counters: 1,
        },
        // p2p (the connection scenarios never come here).
        _ => Topology {
            pub_topics: (0..n).map(|i| format!("{prefix}/{i}")).collect(),
            pub_msgs: split(plan.msgs, n),
            sub_filters: (0..n).map(|i| (format!("{prefix}/{i}"), i)).collect(),
            pub_counter: (0..n).collect(),
            counters: n,
        },
    }
}

fn first_failure(opened: super::conns::OpenMany, what: &str) -> Result<Vec<Conn>, BenchError> {
    match opened.first_error {
        Some(e) => Err(e),
        None if opened.failed > 0 => {
            Err(BenchError::Task(format!("{} {what} connections failed", opened.failed)))
        }
        None => Ok(opened.conns.into_iter().map(|(_, c)| c).collect()),
    }
}

pub(crate) async fn run(plan: &Plan) -> Result<BenchReport, BenchError> {
    let topo = topology(plan);
    let filters: Vec<String> = topo.sub_filters.iter().map(|(f, _)| f.clone()).collect();
    let subs = first_failure(
        open_many(plan, filters.len(), "sub", |i| filters.get(i).cloned(), 64 * 1024, plan.persistent).await,
        "subscriber",
    )?;
    let pubs = first_failure(
        open_many(plan, topo.pub_topics.len(), "pub", |_| None, 64 * 1024, false).await,
        "publisher",
    )?;

    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..topo.counters).map(|_| AtomicU64::new(0)).collect());
    let (done_tx, done_rx) = watch::channel(false);
    let broker_before = plan.broker_pid.map(ProcSample::of_pid).transpose()?;
    let epoch = Instant::now();

    let mut sub_tasks = JoinSet::new();
    for (conn, (_, counter)) in subs.into_iter().zip(topo.sub_filters.iter()) {
        let ctx = SubCtx {
            counters: Arc::clone(&counters),
            counter: *counter,
            done: done_rx.clone(),
            epoch,
            deadline: plan.deadline,
        };
        sub_tasks.spawn(subscriber(conn, ctx));
    }
    let publish_until = match plan.duration {
        Some(d) => plan.deadline.min(epoch + d),
        None => plan.deadline,
    };
    let npubs = pubs.len().max(1) as f64;
    let mut pub_tasks = JoinSet::new();
    for (i, conn) in pubs.into_iter().enumerate() {
        let ctx = PubCtx {
            topic: topo.pub_topics.get(i).cloned().unwrap_or_default(),
            msgs: topo.pub_msgs.get(i).copied().unwrap_or(0),
            counters: Arc::clone(&counters),
            counter: topo.pub_counter.get(i).copied().unwrap_or(0),
            qos: plan.qos,
            size: plan.size,
            // The broker's Receive Maximum (MQTT 5) caps the window.
            window: u64::from(plan.inflight.min(conn.receive_maximum)),
            rate: plan.rate as f64 / npubs,
            epoch,
            publish_until,
            deadline: plan.deadline,
        };
        pub_tasks.spawn(publisher(conn, ctx));
    }

    let mut published = 0u64;
    let mut acks = Latency::new();
    let mut conns = Vec::new();
    let mut error = None;
    while let Some(r) = pub_tasks.join_next().await {
        match r {
            Ok(Ok(p)) => {
                published += p.sent;
                acks.merge(&p.acks);
                conns.push(p.conn);
            }
            Ok(Err(e)) => {
                error.get_or_insert(e);
            }
            Err(e) => {
                error.get_or_insert(BenchError::Task(e.to_string()));
            }
        }
    }
    let publish_end = Instant::now();
    // Publishers are done: subscribers now stop when complete or idle.
    let _ = done_tx.send(true);
    let mut received = 0u64;
    let mut latency = Latency::new();
    let mut last_rx: Option<Instant> = None;
    while let Some(r) = sub_tasks.join_next().await {
        match r {
            Ok(Ok(s)) => {
                received += s.received;
                latency.merge(&s.latency);
                last_rx = last_rx.max(s.last_rx);
                conns.push(s.conn);
            }
            Ok(Err(e)) => {
                error.get_or_insert(e);
            }
            Err(e) => {
                error.get_or_insert(BenchError::Task(e.to_string()));
            }
        }
    }
    let broker_after = plan.broker_pid.map(ProcSample::of_pid).transpose()?;
    close_all(conns).await;
    if let Some(e) = error {
        return Err(e);
    }

    let expected: u64 =
        topo.sub_filters.iter().map(|(_, c)| counters.get(*c).map_or(0, |a| a.load(Ordering::Relaxed))).sum();
    let mut report = BenchReport::new(plan);
    let elapsed = last_rx.map_or(0.0, |t| t.duration_since(epoch).as_secs_f64());
    let pub_secs = publish_end.duration_since(epoch).as_secs_f64();
    report.published = Some(published);
    report.received = Some(received);
    report.expected = Some(expected);
    report.elapsed_s = elapsed;
    report.msgs_per_s = (elapsed > 0.0).then(|| received as f64 / elapsed);
    report.publish_per_s = (pub_secs > 0.0).then(|| published as f64 / pub_secs);
    report.p50_ms = latency.quantile_ms(0.5);
    report.p99_ms = latency.quantile_ms(0.99);
    report.max_ms = latency.max_ms();
    report.ack_p50_ms = acks.quantile_ms(0.5);
    report.ack_p99_ms = acks.quantile_ms(0.99);
    report.ack_max_ms = acks.max_ms();
    if let (Some(pid), Some(b), Some(a)) = (plan.broker_pid, broker_before, broker_after) {
        let cpu_us = a.cpu_us_since(&b);
        report.broker = Some(BrokerFigures {
            pid,
            cpu_us,
            cpu_us_per_op: (published > 0).then(|| cpu_us as f64 / published as f64),
            cpu_us_per_delivery: (plan.scenario == Scenario::Fanout && received > 0)
                .then(|| cpu_us as f64 / received as f64),
            rss_kb_before: b.rss_kb,
            rss_kb: a.rss_kb,
            peak_rss_kb: a.hwm_kb,
        });
    }
    Ok(report)
}

struct PubCtx {
    topic: String,
    msgs: u64,
    counters: Arc<Vec<AtomicU64>>,
    counter: usize,
    qos: QoS,
    size: usize,
    window: u64,
    /// Messages per second for this publisher; 0 = flat out.
    rate: f64,
    epoch: Instant,
    publish_until: Instant,
    deadline: Instant,
}

impl PubCtx {
    fn add_sent(&self, n: u64) {
        if let Some(c) = self.counters.get(self.counter) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Publishes `msgs` messages (or until `publish_until`), then waits for the
/// window to drain. The timestamp is written when the message is encoded, just
/// before the write.
async fn publisher(mut conn: Conn, ctx: PubCtx) -> Result<PubResult, BenchError> {
    let mut packet = Packet::Publish(Publish {
        qos: ctx.qos,
        topic: ctx.topic.clone(),
        payload: Bytes::from(vec![0u8; ctx.size]),
        ..Publish::default()
    });
    let mut ids = vec![FREE; 65536];
    // When each in-flight packet id was written (nanoseconds since the epoch).
    let mut sent_at = vec![0u64; 65536];
    let mut acks = Latency::new();
    let mut next_id: u16 = 0;
    let mut inflight = 0u64;
    let mut sent = 0u64;
    let acked = ctx.qos != QoS::AtMostOnce;
    loop {
        let now = Instant::now();
        let stopped = sent >= ctx.msgs || now >= ctx.publish_until;
        if stopped && inflight == 0 {
            break;
        }
        if now >= ctx.deadline {
            return Err(BenchError::Timeout(format!(
                "{}: {inflight} publishes never acknowledged",
                conn.name
            )));
        }
        let mut budget = if stopped { 0 } else { (ctx.msgs - sent).min(BATCH) };
        if acked {
            budget = budget.min(ctx.window.saturating_sub(inflight));
        }
        let mut next_due = None;
        if ctx.rate > 0.0 && budget > 0 {
            let due = (now.duration_since(ctx.epoch).as_secs_f64() * ctx.rate) as u64 + 1;
            budget = budget.min(due.saturating_sub(sent));
            if budget == 0 {
                next_due = Some(ctx.epoch + Duration::from_secs_f64(sent as f64 / ctx.rate));
            }
        }
        for _ in 0..budget {
            if acked {
                let id = loop {
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    if ids[usize::from(next_id)] == FREE {
                        break next_id;
                    }
                };
                ids[usize::from(id)] = AWAIT_ACK;
                if let Packet::Publish(p) = &mut packet {
                    p.packet_id = Some(id);
                }
                inflight += 1;
            }
            conn.queue(&packet)?;
            // The payload is the last part of a PUBLISH: stamp it in place.
            let start = conn.wbuf.len() - ctx.size;
            let stamp = nanos_since(ctx.epoch);
            encode_stamp(&mut conn.wbuf[start..start + STAMP_LEN], stamp);
            if let Packet::Publish(Publish { packet_id: Some(id), .. }) = &packet {
                sent_at[usize::from(*id)] = stamp;
            }
            sent += 1;
        }
        if budget > 0 {
            ctx.add_sent(budget);
            conn.flush_by(ctx.deadline).await?;
        }
        let can_send = !stopped && (!acked || inflight < ctx.window) && next_due.is_none();
        if can_send {
            // Flat out (QoS 0, or room in the window): read only what is already there.
            if acked {
                handle_acks(&mut conn, &mut ids, &mut inflight, &mut |id| {
                    acks.record_ns(nanos_since(ctx.epoch).saturating_sub(sent_at[usize::from(id)]))
                })?;
                conn.flush_by(ctx.deadline).await?;
            }
            continue;
        }
        // Wait for acknowledgements, the next rate slot, or the end of publishing.
        let wake =
            next_due.unwrap_or(ctx.deadline).min(if stopped { ctx.deadline } else { ctx.publish_until });
        if acked && inflight > 0 {
            tokio::select! {
                r = conn.fill() => r?,
                _ = sleep_until(wake) => {}
            }
            handle_acks(&mut conn, &mut ids, &mut inflight, &mut |id| {
                acks.record_ns(nanos_since(ctx.epoch).saturating_sub(sent_at[usize::from(id)]))
            })?;
            conn.flush_by(ctx.deadline).await?;
        } else {
            sleep_until(wake).await;
        }
    }
    Ok(PubResult { sent, acks, conn })
}

/// Consumes the acknowledgements already read: PUBACK/PUBCOMP free a slot
/// (and are passed to `completed` with their packet id), PUBREC is answered
/// with PUBREL.
fn handle_acks(
    conn: &mut Conn,
    ids: &mut [u8],
    inflight: &mut u64,
    completed: &mut impl FnMut(u16),
) -> Result<(), BenchError> {
    while let Some(p) = conn.next_packet()? {
        let (r, next) = match &p {
            Packet::PubAck(r) | Packet::PubComp(r) => (r, FREE),
            Packet::PubRec(r) => (r, AWAIT_COMP),
            Packet::PingResp => continue,
            other => return Err(conn.unexpected("PUBACK/PUBREC/PUBCOMP", other)),
        };
        if r.reason_code >= 0x80 {
            return Err(BenchError::Refused {
                what: format!("{} PUBLISH {}", conn.name, r.packet_id),
                code: r.reason_code,
            });
        }
        let slot = usize::from(r.packet_id);
        let state = ids.get(slot).copied().unwrap_or(FREE);
        let expected = match (&p, state) {
            (Packet::PubAck(_), AWAIT_ACK)
            | (Packet::PubRec(_), AWAIT_ACK)
            | (Packet::PubComp(_), AWAIT_COMP) => true,
            // A repeated PUBREC: answer it again.
            (Packet::PubRec(_), AWAIT_COMP) => {
                conn.queue(&Packet::PubRel(PubResp::new(r.packet_id)))?;
                continue;
            }
            _ => false,
        };
        if !expected {
            return Err(BenchError::Unexpected {
                what: conn.name.clone(),
                detail: format!("{} for packet id {} not in flight", kind(&p), r.packet_id),
            });
        }
        if next == AWAIT_COMP {
            conn.queue(&Packet::PubRel(PubResp::new(r.packet_id)))?;
        } else {
            *inflight = inflight.saturating_sub(1);
            completed(r.packet_id);
        }
        ids[slot] = next;
    }
    Ok(())
}

struct SubCtx {
    counters: Arc<Vec<AtomicU64>>,
    counter: usize,
    done: watch::Receiver<bool>,
    epoch: Instant,
    deadline: Instant,
}

/// Receives until it has everything its publishers sent (once they are
/// done), or nothing came for [`DRAIN_IDLE`] after they are done, or the
/// deadline. Acknowledges QoS 1/2 deliveries in batches.
async fn subscriber(mut conn: Conn, mut ctx: SubCtx) -> Result<SubResult, BenchError> {
    let mut received = 0u64;
    let mut latency = Latency::new();
    let mut last_rx = None;
    let mut done_at: Option<Instant> = None;
    loop {
        let before = received;
        while let Some(p) = conn.next_packet()? {
            match p {
                Packet::Publish(p) => {
                    received += 1;
                    latency.record_payload(ctx.epoch, &p.payload);
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => conn.queue(&Packet::PubAck(PubResp::new(id)))?,
                        (QoS::ExactlyOnce, Some(id)) => conn.queue(&Packet::PubRec(PubResp::new(id)))?,
                        _ => {}
                    }
                }
                Packet::PubRel(r) => conn.queue(&Packet::PubComp(PubResp::new(r.packet_id)))?,
                Packet::PingResp => {}
                other => return Err(conn.unexpected("PUBLISH/PUBREL", &other)),
            }
        }
        if received > before {
            last_rx = Some(Instant::now());
        }
        conn.flush_by(ctx.deadline).await?;
        if done_at.is_some() {
            let expected = ctx.counters.get(ctx.counter).map_or(0, |c| c.load(Ordering::Relaxed));
            if received >= expected {
                break;
            }
        }
        let idle_until = done_at.map(|d| d.max(last_rx.unwrap_or(d)) + DRAIN_IDLE).unwrap_or(ctx.deadline);
        tokio::select! {
            r = conn.fill() => r?,
            changed = ctx.done.changed(), if done_at.is_none() => {
                // An error means the sender is gone, which also means done.
                let _ = changed;
                done_at = Some(Instant::now());
            }
            _ = sleep_until(idle_until.min(ctx.deadline)) => break,
        }
    }
    Ok(SubResult { received, latency, last_rx, conn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{plan, BenchArgs};

    #[tokio::test]
    async fn topologies_split_messages_and_counters() {
        let p = plan(&BenchArgs { clients: Some(3), msgs: Some(10), ..BenchArgs::default() }).expect("valid");
        let t = topology(&p);
        assert_eq!(t.pub_msgs, vec![4, 3, 3]);
        assert_eq!(t.sub_filters[2], ("bench/2".to_string(), 2));
        assert_eq!(t.pub_counter, vec![0, 1, 2]);
        let fanin = plan(&BenchArgs { scenario: Scenario::Fanin, clients: Some(4), ..BenchArgs::default() })
            .expect("valid");
        let t = topology(&fanin);
        assert_eq!(t.sub_filters, vec![("bench/#".to_string(), 0)]);
        assert_eq!(t.pub_msgs.iter().sum::<u64>(), 100_000);
        let fanout =
            plan(&BenchArgs { scenario: Scenario::Fanout, clients: Some(5), ..BenchArgs::default() })
                .expect("valid");
        let t = topology(&fanout);
        assert_eq!(t.pub_topics.len(), 1);
        assert_eq!(t.sub_filters.len(), 5);
        assert_eq!(t.counters, 1);
        let prefixed =
            plan(&BenchArgs { clients: Some(2), topic_prefix: "x/y".into(), ..BenchArgs::default() })
                .expect("valid");
        let t = topology(&prefixed);
        assert_eq!(t.pub_topics, vec!["x/y/0".to_string(), "x/y/1".to_string()]);
        assert_eq!(t.sub_filters[1], ("x/y/1".to_string(), 1));
    }
}
