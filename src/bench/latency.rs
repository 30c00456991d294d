//! End-to-end latency: the timestamp carried at the start of each payload and
//! the histogram it is recorded into.
//!
//! The stamp is nanoseconds since a run-local epoch (one `Instant` shared by
//! publishers and subscribers of the same process), 8 bytes big-endian, so it
//! needs no clock synchronisation and survives any broker unchanged.

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Bytes of the timestamp at the start of every payload.
pub const STAMP_LEN: usize = 8;

/// Writes `nanos` into the first [`STAMP_LEN`] bytes of `payload`.
/// Returns false (and writes nothing) when the payload is too short.
pub fn encode_stamp(payload: &mut [u8], nanos: u64) -> bool {
    match payload.get_mut(..STAMP_LEN) {
        Some(head) => {
            head.copy_from_slice(&nanos.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Reads the timestamp from the start of a payload; None if it is too short.
pub fn decode_stamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

/// Nanoseconds since `epoch`, saturating (a run never lasts 584 years).
pub fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Highest latency the histogram tracks exactly; larger values are clamped.
const MAX_TRACKED_NS: u64 = 3_600 * 1_000_000_000;

/// A latency histogram in nanoseconds (3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low,
        // sigfig <= 5): this cannot fail at run time.
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3).expect("valid constant histogram bounds");
        Latency { hist }
    }

    /// Records one latency in nanoseconds (clamped to the tracked range).
    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.clamp(1, MAX_TRACKED_NS));
    }

    /// Records the latency of a payload received now, from its stamp.
    /// Returns false when the payload carries no stamp.
    pub fn record_payload(&mut self, epoch: Instant, payload: &[u8]) -> bool {
        match decode_stamp(payload) {
            Some(sent) => {
                self.record_ns(nanos_since(epoch).saturating_sub(sent));
                true
            }
            None => false,
        }
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail; a failure would only
        // lose the other histogram's samples, never crash the run.
        let _ = self.hist.add(&other.hist);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; None when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.hist.is_empty() {
            return None;
        }
        Some(self.hist.value_at_quantile(q) as f64 / 1e6)
    }

    pub fn max_ms(&self) -> Option<f64> {
        if self.hist.is_empty() {
            return None;
        }
        Some(self.hist.max() as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let mut payload = vec![0xAAu8; 64];
        assert!(encode_stamp(&mut payload, 0x0102_0304_0506_0708));
        assert_eq!(&payload[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(payload[8], 0xAA, "bytes after the stamp are untouched");
        assert_eq!(decode_stamp(&payload), Some(0x0102_0304_0506_0708));
        assert_eq!(decode_stamp(&payload[..7]), None);
        let mut short = [0u8; 7];
        assert!(!encode_stamp(&mut short, 5));
        assert_eq!(short, [0u8; 7]);
    }

    #[test]
    fn histogram_quantiles_and_merge() {
        let mut a = Latency::new();
        assert_eq!(a.quantile_ms(0.5), None);
        for ms in 1..=100u64 {
            a.record_ns(ms * 1_000_000);
        }
        let p50 = a.quantile_ms(0.5).unwrap_or(0.0);
        let p99 = a.quantile_ms(0.99).unwrap_or(0.0);
        assert!((49.9..=50.1).contains(&p50), "p50 {p50}");
        assert!((98.9..=99.1).contains(&p99), "p99 {p99}");
        let mut b = Latency::new();
        b.record_ns(u64::MAX); // clamped, not lost
        a.merge(&b);
        assert_eq!(a.count(), 101);
        assert!(a.max_ms().unwrap_or(0.0) >= 3_599_000.0);
    }

    #[test]
    fn payload_latency_is_measured_from_the_stamp() {
        let epoch = Instant::now() - std::time::Duration::from_millis(20);
        let mut payload = vec![0u8; 16];
        assert!(encode_stamp(&mut payload, 0));
        let mut h = Latency::new();
        assert!(h.record_payload(epoch, &payload));
        assert!(!h.record_payload(epoch, &payload[..3]));
        assert_eq!(h.count(), 1);
        assert!(h.quantile_ms(0.5).unwrap_or(0.0) >= 20.0);
    }
}
