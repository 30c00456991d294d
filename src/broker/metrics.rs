//! Broker counters, read by `$SYS` and by the Prometheus exposition.
//!
//! Owns only plain atomic counters; it knows nothing about connections. Every
//! counter is updated with relaxed atomics on the hot path (no locks).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one broker. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Clients with an open, accepted (CONNACK 0) connection.
    pub clients_connected: AtomicU64,
    /// Highest value `clients_connected` reached.
    pub clients_maximum: AtomicU64,
    /// Persistent sessions known (online or offline).
    pub sessions_persistent: AtomicU64,
    /// Network connections being served (before and after CONNECT).
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// Connections refused because of `max_connections`.
    pub connections_refused: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub publish_received: AtomicU64,
    pub publish_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Messages dropped because a client's outbox was full (slow consumer).
    pub messages_dropped_outbox: AtomicU64,
    /// Messages dropped because they exceed the client's Maximum Packet Size.
    pub messages_dropped_too_large: AtomicU64,
    /// Messages dropped because their expiry interval passed before delivery.
    pub messages_expired: AtomicU64,
    pub subscriptions: AtomicU64,
    pub retained_messages: AtomicU64,
    /// Commands applied through the pipeline, and batches.
    pub commands_applied: AtomicU64,
    pub batches_applied: AtomicU64,
}

impl Metrics {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dec(c: &AtomicU64) {
        // Saturating: a gauge never wraps below zero even if a path decrements twice.
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
    }

    pub(crate) fn client_connected(&self) {
        let now = self.clients_connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients_maximum.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Appends the Prometheus text exposition (format 0.0.4) of every counter.
    pub fn render_prometheus(&self, out: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 19] = [
            ("raftmq_clients_connected", "gauge", "Clients connected", &self.clients_connected),
            ("raftmq_clients_maximum", "gauge", "Maximum clients connected at once", &self.clients_maximum),
            ("raftmq_sessions_persistent", "gauge", "Persistent sessions", &self.sessions_persistent),
            ("raftmq_connections_open", "gauge", "Open network connections", &self.connections_open),
            ("raftmq_connections_total", "counter", "Connections accepted", &self.connections_total),
            (
                "raftmq_connections_refused_total",
                "counter",
                "Connections refused by max_connections",
                &self.connections_refused,
            ),
            ("raftmq_messages_received_total", "counter", "MQTT packets received", &self.messages_received),
            ("raftmq_messages_sent_total", "counter", "MQTT packets sent", &self.messages_sent),
            ("raftmq_publish_received_total", "counter", "PUBLISH packets received", &self.publish_received),
            ("raftmq_publish_sent_total", "counter", "PUBLISH packets sent", &self.publish_sent),
            ("raftmq_bytes_received_total", "counter", "Bytes received", &self.bytes_received),
            ("raftmq_bytes_sent_total", "counter", "Bytes sent", &self.bytes_sent),
            (
                "raftmq_messages_dropped_outbox_total",
                "counter",
                "Messages dropped for slow consumers",
                &self.messages_dropped_outbox,
            ),
            (
                "raftmq_messages_dropped_too_large_total",
                "counter",
                "Messages dropped: over the client's maximum packet size",
                &self.messages_dropped_too_large,
            ),
            (
                "raftmq_messages_expired_total",
                "counter",
                "Messages expired before delivery",
                &self.messages_expired,
            ),
            ("raftmq_subscriptions", "gauge", "Subscriptions", &self.subscriptions),
            ("raftmq_retained_messages", "gauge", "Retained messages", &self.retained_messages),
            (
                "raftmq_state_commands_applied_total",
                "counter",
                "State commands applied",
                &self.commands_applied,
            ),
            ("raftmq_state_batches_applied_total", "counter", "State batches applied", &self.batches_applied),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", Self::get(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_has_every_counter_and_values() {
        let m = Metrics::default();
        m.client_connected();
        m.client_connected();
        Metrics::dec(&m.clients_connected);
        Metrics::add(&m.bytes_received, 42);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(out.contains("raftmq_clients_connected 1\n"));
        assert!(out.contains("raftmq_clients_maximum 2\n"));
        assert!(out.contains("raftmq_bytes_received_total 42\n"));
        assert!(out.contains("# TYPE raftmq_bytes_sent_total counter"));
    }

    #[test]
    fn gauge_never_wraps() {
        let m = Metrics::default();
        Metrics::dec(&m.clients_connected);
        assert_eq!(Metrics::get(&m.clients_connected), 0);
    }
}
