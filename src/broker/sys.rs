//! `$SYS/broker/...` statistics, published every `sys_interval` seconds on the
//! fast path with the retain flag set (as Mosquitto does), never stored in State.
//!
//! Owns only the formatting of the counters into messages; the latest values
//! are kept in `Inner::sys_retained` so a new `$SYS` subscriber gets them at once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::{PublishProperties, QoS};

use super::metrics::Metrics;
use super::session::Message;
use super::Inner;

/// Exponential moving averages per minute, like Mosquitto's `load/.../1min`.
#[derive(Default)]
struct Load {
    last: [u64; 6],
    avg: [f64; 6],
}

pub(crate) async fn run(weak: Weak<Inner>) {
    let interval = match weak.upgrade() {
        // Capped at a day: a huge configured value must not overflow the timer.
        Some(i) => Duration::from_secs(i.config.sys_interval.clamp(1, 86_400)),
        None => return,
    };
    let mut iv = tokio::time::interval(interval);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load = Load::default();
    loop {
        iv.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        publish_all(&inner, &mut load, interval.as_secs_f64());
    }
}

fn publish_all(inner: &Arc<Inner>, load: &mut Load, secs: f64) {
    let m = &inner.metrics;
    let g = Metrics::get;
    let (retained, sessions) = {
        let st = inner.state.read();
        (st.retained_count(), st.session_count())
    };
    Metrics::set(&m.retained_messages, retained as u64);
    let connected = g(&m.clients_connected);
    let online_persistent_or_not = inner.registry.lock().len() as u64;
    let totals = [
        g(&m.messages_received),
        g(&m.messages_sent),
        g(&m.bytes_received),
        g(&m.bytes_sent),
        g(&m.connections_total),
        g(&m.publish_received),
    ];
    // Mosquitto's 1-minute load: exponentially damped rate per minute.
    let k = (-secs / 60.0).exp();
    for (i, &total) in totals.iter().enumerate() {
        let per_min = (total.saturating_sub(load.last[i])) as f64 * 60.0 / secs;
        load.avg[i] = load.avg[i] * k + per_min * (1.0 - k);
        load.last[i] = total;
    }
    let uptime = inner.start.elapsed().as_secs();
    let rows: Vec<(&str, String)> = vec![
        ("$SYS/broker/version", format!("raftmq version {}", env!("CARGO_PKG_VERSION"))),
        ("$SYS/broker/uptime", format!("{uptime} seconds")),
        ("$SYS/broker/clients/connected", connected.to_string()),
        ("$SYS/broker/clients/active", connected.to_string()),
        ("$SYS/broker/clients/total", online_persistent_or_not.max(connected).to_string()),
        ("$SYS/broker/clients/disconnected", online_persistent_or_not.saturating_sub(connected).to_string()),
        ("$SYS/broker/clients/maximum", g(&m.clients_maximum).to_string()),
        ("$SYS/broker/messages/received", totals[0].to_string()),
        ("$SYS/broker/messages/sent", totals[1].to_string()),
        ("$SYS/broker/publish/messages/received", totals[5].to_string()),
        ("$SYS/broker/publish/messages/sent", g(&m.publish_sent).to_string()),
        ("$SYS/broker/publish/messages/dropped", g(&m.messages_dropped_outbox).to_string()),
        ("$SYS/broker/bytes/received", totals[2].to_string()),
        ("$SYS/broker/bytes/sent", totals[3].to_string()),
        ("$SYS/broker/subscriptions/count", g(&m.subscriptions).to_string()),
        ("$SYS/broker/retained messages/count", retained.to_string()),
        ("$SYS/broker/store/sessions/count", sessions.to_string()),
        ("$SYS/broker/load/messages/received/1min", format!("{:.2}", load.avg[0])),
        ("$SYS/broker/load/messages/sent/1min", format!("{:.2}", load.avg[1])),
        ("$SYS/broker/load/bytes/received/1min", format!("{:.2}", load.avg[2])),
        ("$SYS/broker/load/bytes/sent/1min", format!("{:.2}", load.avg[3])),
        ("$SYS/broker/load/connections/1min", format!("{:.2}", load.avg[4])),
        ("$SYS/broker/load/publish/received/1min", format!("{:.2}", load.avg[5])),
    ];
    let mut latest = Vec::with_capacity(rows.len());
    for (topic, value) in rows {
        let msg = Message {
            topic: topic.to_owned(),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            props: PublishProperties::default(),
            expires_at_ms: 0,
            publisher: 0,
        };
        let msg = Arc::new(msg);
        let route = inner.router.read().route(&msg, false);
        inner.deliver(&msg, route.targets, true);
        latest.push(msg);
    }
    *inner.sys_retained.lock() = latest;
}
