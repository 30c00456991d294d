//! Latency histograms in Prometheus' text format, shared by the layers that
//! time something on the hot path (commit in the pipeline, durable append in
//! storage, replication round trips in the Raft network).
//!
//! Recording is a few relaxed atomic adds (no lock, no allocation), so it can
//! sit on every append and every RPC. Buckets are fixed and fine below a
//! millisecond, where a healthy cluster's figures live; `histogram_quantile`
//! in Prometheus or Grafana turns them into percentiles. Knows nothing about
//! what is timed: callers give the metric name, help and labels.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, microseconds (Prometheus `le`, inclusive).
pub const BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000, 10_000_000,
];

/// One latency series: a count per bucket (the last slot is +Inf), the sum
/// and the count of all observations.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Mean of the observations, if any.
    pub fn mean(&self) -> Option<Duration> {
        let n = self.count();
        (n > 0).then(|| Duration::from_micros(self.sum_us.load(Ordering::Relaxed) / n))
    }

    /// Writes this series' `_bucket`, `_sum` and `_count` lines. `labels` is
    /// empty or a comma-separated list such as `peer="2"`.
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        cum += self.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }

    /// Writes a whole metric with one unlabelled series.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        render_header(out, name, help);
        self.render_series(out, name, "");
    }
}

/// Writes the `# HELP` and `# TYPE ... histogram` lines of a metric; its
/// series follow with [`LatencyHistogram::render_series`].
pub fn render_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn bounds_are_inclusive_and_counts_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(100)); // exactly on a bound: in it
        h.record(Duration::from_micros(101)); // just above: the next one
        h.record(Duration::from_micros(900));
        h.record(Duration::from_secs(60)); // beyond the last bound: +Inf only
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Test.");
        assert!(out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"), "{out}");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"0.00005\"}"), "x_seconds_bucket{le=\"0.00005\"} 0");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"0.0001\"}"), "x_seconds_bucket{le=\"0.0001\"} 1");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"0.00025\"}"), "x_seconds_bucket{le=\"0.00025\"} 2");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"0.001\"}"), "x_seconds_bucket{le=\"0.001\"} 3");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"10\"}"), "x_seconds_bucket{le=\"10\"} 3");
        assert_eq!(line(&out, "x_seconds_bucket{le=\"+Inf\"}"), "x_seconds_bucket{le=\"+Inf\"} 4");
        assert_eq!(line(&out, "x_seconds_count"), "x_seconds_count 4");
        assert_eq!(line(&out, "x_seconds_sum"), "x_seconds_sum 60.001101");
        assert_eq!(h.count(), 4);
        assert_eq!(h.mean(), Some(Duration::from_micros(60_001_101 / 4)));
    }

    #[test]
    fn labelled_series_carry_their_labels_everywhere() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_millis(3));
        let mut out = String::new();
        h.render_series(&mut out, "rtt_seconds", "peer=\"2\"");
        assert_eq!(
            line(&out, "rtt_seconds_bucket{peer=\"2\",le=\"0.002\"}"),
            "rtt_seconds_bucket{peer=\"2\",le=\"0.002\"} 0"
        );
        assert_eq!(
            line(&out, "rtt_seconds_bucket{peer=\"2\",le=\"0.005\"}"),
            "rtt_seconds_bucket{peer=\"2\",le=\"0.005\"} 1"
        );
        assert_eq!(line(&out, "rtt_seconds_count{peer=\"2\"}"), "rtt_seconds_count{peer=\"2\"} 1");
        assert_eq!(line(&out, "rtt_seconds_sum{peer=\"2\"}"), "rtt_seconds_sum{peer=\"2\"} 0.003");
    }

    #[test]
    fn an_empty_histogram_renders_zeros_and_has_no_mean() {
        let h = LatencyHistogram::default();
        let mut out = String::new();
        h.render(&mut out, "e_seconds", "Empty.");
        assert_eq!(line(&out, "e_seconds_bucket{le=\"+Inf\"}"), "e_seconds_bucket{le=\"+Inf\"} 0");
        assert_eq!(line(&out, "e_seconds_count"), "e_seconds_count 0");
        assert_eq!(h.mean(), None);
    }
}
