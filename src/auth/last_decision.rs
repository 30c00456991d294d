//! [`LastDecision`]: one remembered authorization answer, kept by whoever asks
//! the same question over and over (a connection publishing to its telemetry
//! topic, a session receiving the messages of one topic).
//!
//! A hit costs one atomic load and one string comparison, against a lookup
//! of the user's compiled roles (or a hash into the per-thread memo) for a
//! miss. Never changes an answer: it is reused only while the
//! authenticator's [`super::Authenticator::decision_epoch`] is unchanged,
//! which every change of the rules bumps. The holder fixes the other inputs
//! (client id, user name, access type) and calls [`LastDecision::forget`]
//! when they change.

/// Topics longer than this are not remembered (the entry stays small).
const MAX_TOPIC: usize = 256;

/// See the module docs. Empty (8 bytes, no allocation) until the first
/// answer that may be remembered.
#[derive(Debug, Default)]
pub struct LastDecision(Option<Box<Entry>>);

#[derive(Debug)]
struct Entry {
    epoch: u64,
    topic: String,
    allowed: bool,
}

impl LastDecision {
    /// The answer for `topic`: remembered, or `decide()` (then remembered).
    /// `epoch` is the authenticator's `decision_epoch()`, read before this
    /// call.
    pub fn check(&mut self, epoch: Option<u64>, topic: &str, decide: impl FnOnce() -> bool) -> bool {
        let Some(epoch) = epoch else { return decide() };
        if let Some(e) = &self.0 {
            if e.epoch == epoch && e.topic == topic {
                return e.allowed;
            }
        }
        let allowed = decide();
        if topic.len() <= MAX_TOPIC {
            match &mut self.0 {
                Some(e) => {
                    e.epoch = epoch;
                    e.topic.clear();
                    e.topic.push_str(topic);
                    e.allowed = allowed;
                }
                None => self.0 = Some(Box::new(Entry { epoch, topic: topic.to_owned(), allowed })),
            }
        }
        allowed
    }

    /// Drops the remembered answer (the holder's other inputs changed).
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::LastDecision;
    use std::cell::Cell;

    #[test]
    fn reuses_only_for_the_same_topic_and_epoch() {
        let calls = Cell::new(0);
        let mut last = LastDecision::default();
        let mut ask = |epoch: Option<u64>, topic: &str, answer: bool| {
            last.check(epoch, topic, || {
                calls.set(calls.get() + 1);
                answer
            })
        };
        assert!(ask(Some(1), "a/b", true));
        // Same topic and epoch: the remembered answer, not the new one.
        assert!(ask(Some(1), "a/b", false));
        assert_eq!(calls.get(), 1);
        // Another topic, then a new epoch: asked again each time.
        assert!(!ask(Some(1), "a/c", false));
        assert!(ask(Some(2), "a/c", true));
        assert_eq!(calls.get(), 3);
        // No epoch: never remembered.
        assert!(ask(None, "a/c", true));
        assert!(!ask(None, "a/c", false));
        assert_eq!(calls.get(), 5);
    }

    #[test]
    fn long_topics_are_not_kept_and_forget_clears() {
        let mut last = LastDecision::default();
        let long = "x".repeat(300);
        assert!(last.check(Some(1), &long, || true));
        assert!(!last.check(Some(1), &long, || false), "a long topic is asked every time");
        assert!(last.check(Some(1), "t", || true));
        last.forget();
        assert!(!last.check(Some(1), "t", || false));
    }
}
