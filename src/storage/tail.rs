//! [`TailCache`]: the newest log entries, kept decoded in memory so that the
//! leader's replication streams read them without sled. Reading from sled
//! decodes a fresh copy of every entry for every follower, and its iterator
//! holds sled's concurrency lock, which an append had to wait for.
//!
//! Invariant: when not empty, the cache holds entries with consecutive
//! indexes ending at the last entry appended. The log store keeps it by
//! pushing every appended entry and applying every truncation and purge here
//! too; a read the cache cannot answer whole goes to sled.

use std::collections::VecDeque;

use crate::raft::types::Entry;

pub(super) struct TailCache {
    /// Entries with their encoded size, oldest first.
    entries: VecDeque<(Entry, usize)>,
    /// Sum of the encoded sizes.
    bytes: usize,
    /// Beyond this, the oldest entries are dropped (the newest always stays).
    max_bytes: usize,
}

impl TailCache {
    pub(super) fn new(max_bytes: usize) -> TailCache {
        TailCache { entries: VecDeque::new(), bytes: 0, max_bytes }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Records an appended entry of `size` encoded bytes. One that does not
    /// follow the last (the first append after a snapshot was installed)
    /// starts the cache over.
    pub(super) fn push(&mut self, entry: Entry, size: usize) {
        if self.last_index().is_some_and(|last| last.checked_add(1) != Some(entry.log_id.index)) {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Drops the entries after `index` (all of them for `None`), as the log's
    /// `truncate_after` does.
    pub(super) fn truncate_after(&mut self, index: Option<u64>) {
        while self.last_index().is_some_and(|last| index.is_none_or(|keep| last > keep)) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops the entries at or below `index`, as the log's `purge` does.
    pub(super) fn purge_upto(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries of `start..end`, stopping once `max_bytes` encoded bytes
    /// are taken (at least one entry), when the cache holds that whole range;
    /// `None` when it does not (the caller reads sled).
    pub(super) fn read(&self, start: u64, end: u64, max_bytes: usize) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start < first || end.saturating_sub(1) > last {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let skip = usize::try_from(start - first).ok()?;
        for (entry, size) in self.entries.iter().skip(skip) {
            if entry.log_id.index >= end {
                break;
            }
            out.push(entry.clone());
            bytes += size;
            if bytes >= max_bytes {
                break;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use openraft::entry::RaftEntry;
    use openraft::vote::RaftLeaderId;
    use proptest::prelude::*;

    use super::*;
    use crate::raft::types::{BatchPayload, EntryPayload, LeaderId, LogId};

    fn entry(index: u64, size: usize) -> Entry {
        Entry::new(
            LogId::new(LeaderId::new(1, 1), index),
            EntryPayload::Normal(BatchPayload(Bytes::from(vec![0u8; size]))),
        )
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn serves_the_tail_and_refuses_what_it_does_not_hold() {
        let mut c = TailCache::new(1000);
        for i in 1..=5 {
            c.push(entry(i, 100), 100);
        }
        assert_eq!(c.read(2, 5, usize::MAX).map(|v| indexes(&v)), Some(vec![2, 3, 4]));
        assert_eq!(c.read(1, 6, 250).map(|v| indexes(&v)), Some(vec![1, 2, 3]), "stops at max_bytes");
        assert_eq!(c.read(4, 5, 1).map(|v| indexes(&v)), Some(vec![4]), "at least one entry");
        assert!(c.read(0, 3, usize::MAX).is_none(), "below the cache");
        assert!(c.read(3, 7, usize::MAX).is_none(), "beyond the last entry");
        assert_eq!(c.read(3, 3, usize::MAX), Some(vec![]), "an empty range");
    }

    #[test]
    fn keeps_within_its_budget_but_always_the_newest_entry() {
        let mut c = TailCache::new(250);
        for i in 1..=5 {
            c.push(entry(i, 100), 100);
        }
        assert_eq!(c.first_index(), Some(4));
        c.push(entry(6, 1000), 1000);
        assert_eq!((c.first_index(), c.last_index()), (Some(6), Some(6)));
    }

    #[test]
    fn a_gap_starts_over_and_truncation_and_purge_follow_the_log() {
        let mut c = TailCache::new(10_000);
        for i in 1..=5 {
            c.push(entry(i, 10), 10);
        }
        c.truncate_after(Some(3));
        assert_eq!(c.last_index(), Some(3));
        c.push(entry(4, 10), 10);
        c.purge_upto(2);
        assert_eq!((c.first_index(), c.last_index()), (Some(3), Some(4)));
        c.push(entry(10, 10), 10);
        assert_eq!((c.first_index(), c.last_index()), (Some(10), Some(10)));
        c.truncate_after(None);
        assert!(c.read(10, 11, usize::MAX).is_none());
        assert_eq!(c.bytes, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8, usize),
        Truncate(u8),
        Purge(u8),
        Read(u8, u8, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..4, 1usize..300).prop_map(|(n, s)| Op::Append(n, s)),
            1 => any::<u8>().prop_map(Op::Truncate),
            1 => any::<u8>().prop_map(Op::Purge),
            4 => (any::<u8>(), any::<u8>(), 1usize..2000).prop_map(|(a, b, m)| Op::Read(a, b, m)),
        ]
    }

    proptest! {
        /// Whatever the cache answers is exactly what the log (a map of
        /// index -> entry, read as `LogReader::read_range` reads sled) holds.
        #[test]
        fn answers_agree_with_the_log(ops in proptest::collection::vec(op(), 1..80)) {
            let mut cache = TailCache::new(1000);
            let mut log: BTreeMap<u64, usize> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Append(n, size) => {
                        let next = log.keys().next_back().map_or(1, |l| l + 1);
                        for i in next..next + u64::from(n) {
                            log.insert(i, size);
                            cache.push(entry(i, size), size);
                        }
                    }
                    Op::Truncate(at) => {
                        let at = u64::from(at) % 40;
                        log.retain(|i, _| *i <= at);
                        cache.truncate_after(Some(at));
                    }
                    Op::Purge(at) => {
                        let at = u64::from(at) % 40;
                        log.retain(|i, _| *i > at);
                        cache.purge_upto(at);
                    }
                    Op::Read(a, b, max) => {
                        let (start, end) = (u64::from(a) % 60, u64::from(b) % 60);
                        if let Some(got) = cache.read(start, end, max) {
                            let mut want = Vec::new();
                            let mut bytes = 0;
                            for (i, size) in log.range(start..end.max(start)) {
                                want.push(*i);
                                bytes += size;
                                if bytes >= max {
                                    break;
                                }
                            }
                            prop_assert_eq!(indexes(&got), want);
                        }
                    }
                }
            }
        }
    }
}
