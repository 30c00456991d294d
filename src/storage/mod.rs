//! Durable storage of the Raft layer: the log, the vote, the committed and
//! last purged log ids in sled ([`LogStore`]), and snapshot files
//! ([`SnapshotStore`]). The only module that touches sled or writes Raft data
//! to disk. It knows nothing of the state machine's content: entries and
//! snapshots are opaque protobuf (proto/raft.proto).
//!
//! Durability contract (openraft's `RaftLogStorage`): `append` writes the
//! entries to sled (readable at once) and hands the completion callback to a
//! flusher thread; the flusher takes every callback queued so far, runs ONE
//! sled `flush` (write + sync of sled's log), then completes them all. That
//! is the group commit: however many entries and appends arrive meanwhile,
//! they share one flush, and no callback (the durability promise) fires
//! before its flush. A vote is flushed before `save_vote` returns.
//!
//! A follower (a store told its node id with [`LogStore::for_node`], appending
//! entries of another leader) flushes inline instead, in `append`, when no
//! earlier callback is still with the flusher: its answer waits for that
//! flush anyway, and the hand-off to the flusher thread was a context switch
//! on the critical path of every replicated commit. After an inline flush
//! slower than 20 ms (a stalling disk) the flusher takes over for a second,
//! so the Raft core is not held for every fsync while the disk is slow.
//!
//! The flusher is a dedicated OS thread calling sled's blocking `flush`, not
//! a task awaiting `flush_async`: `flush_async` runs the flush on sled's I/O
//! pool, and every job handed to that pool wakes all of its idle threads
//! (`notify_all` on one condvar, fixed in vendor/sled to wake one), so each
//! flush cost two rounds of thread wake-ups instead of one. The vendored sled
//! also writes the flushed buffer on the flusher thread itself rather than
//! on that pool (vendor/sled/PATCHED.md). Measured in docs/BENCHMARKS.md
//! (cluster section).
//!
//! Appends are one sled `insert` per entry (a `sled::Batch` takes sled's
//! global write lock and waits for every reader), and each appended entry
//! also goes, decoded, into a bounded [`TailCache`]: the leader's
//! replication streams read the newest entries from there, not from sled.
//!
//! `purge` records the purge point and leaves the removal of the entries to a
//! purger thread (see `purge`); the commit index is written at most every
//! 100 ms (a lower bound, see `save_committed`).
//!
//! Layout: log tree, key = index as big-endian u64 (so sled's order is log
//! order), value = `raft.Entry`; meta tree: `vote`, `committed`, `purged`.

mod snapshot;
mod tail;

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::latency::LatencyHistogram;
use crate::raft::convert;
use crate::raft::pb;
use crate::raft::types::{Entry, LogId, NodeId, TypeConfig, Vote};
pub use snapshot::SnapshotStore;
use tail::TailCache;

/// An inline (follower) flush slower than this means a slow disk: for
/// [`INLINE_FLUSH_PAUSE`] the flusher thread takes the appends again, so the
/// Raft core is not held for every fsync while the disk stalls.
const INLINE_FLUSH_SLOW: std::time::Duration = std::time::Duration::from_millis(20);
const INLINE_FLUSH_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Appends waiting for their flush; beyond this `append` waits (backpressure).
const FLUSH_QUEUE: usize = 1024;
/// `limited_get_log_entries` stops after this many bytes (at least one entry),
/// so an AppendEntries frame stays far below the transport's frame limit.
const MAX_READ_BYTES: usize = 8 * 1024 * 1024;

/// sled page cache per node.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Encoded bytes of the newest entries kept decoded for replication ([`TailCache`]).
const TAIL_CACHE_BYTES: usize = 8 * 1024 * 1024;
/// `save_committed` writes the commit index at most this often. It is a
/// lower bound anyway (see `save_committed`); writing it on every commit cost
/// a sled insert per entry on every node, and the garbage those rewrites of
/// one key leave keeps sled's segment cleaner busy.
const COMMITTED_SAVE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

/// Errors of the storage layer.
#[derive(thiserror::Error, Debug)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> io::Error {
        match e {
            StorageError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(format!("sled: {e}"))
}

fn corrupt(what: &'static str, detail: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {}", detail.to_string()))
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    let pb = pb::Entry::decode(bytes).map_err(|e| corrupt("log entry", e))?;
    convert::entry_from_pb(pb).map_err(|e| corrupt("log entry", e))
}

fn decode_log_id(bytes: &[u8]) -> io::Result<LogId> {
    let pb = pb::LogId::decode(bytes).map_err(|e| corrupt("log id", e))?;
    convert::log_id_from_pb(&pb).map_err(|e| corrupt("log id", e))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> io::Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| corrupt("log key", format!("{} bytes", key.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn key_range<RB: RangeBounds<u64>>(range: &RB) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    let start = match range.start_bound() {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    (start, end)
}

/// Counters of the log store, shared with whoever reports metrics.
pub struct StorageStats {
    /// fsyncs of the log (group commits).
    pub flushes: AtomicU64,
    /// `append` calls (each may carry many entries).
    pub appends: AtomicU64,
    pub entries: AtomicU64,
    /// Encoded entry bytes appended.
    pub bytes: AtomicU64,
    /// Duration of each group-commit flush, microseconds.
    flush_us: Mutex<Histogram<u64>>,
    /// From `append` to its durability callback: the flush plus the wait for
    /// the flusher (a flush already running, the thread's wake-up).
    pub append_latency: LatencyHistogram,
    /// Flushes a follower ran inline in `append` (also counted in `flushes`).
    pub inline_flushes: AtomicU64,
}

/// A copy of [`StorageStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageStatsSnapshot {
    pub flushes: u64,
    pub appends: u64,
    pub entries: u64,
    pub bytes: u64,
    pub flush_p50_us: u64,
    pub flush_p99_us: u64,
    pub flush_max_us: u64,
}

impl StorageStats {
    fn new() -> StorageStats {
        StorageStats {
            flushes: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            // 1 us .. 1 h, 2 significant digits: constant bounds hdrhistogram
            // accepts (low >= 1, high >= 2 * low), so this cannot fail.
            flush_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid constant histogram bounds"),
            ),
            append_latency: LatencyHistogram::default(),
            inline_flushes: AtomicU64::new(0),
        }
    }

    fn record_flush(&self, took: std::time::Duration) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        self.flush_us.lock().saturating_record(us);
    }

    pub fn snapshot(&self) -> StorageStatsSnapshot {
        let h = self.flush_us.lock();
        StorageStatsSnapshot {
            flushes: self.flushes.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            flush_p50_us: h.value_at_quantile(0.5),
            flush_p99_us: h.value_at_quantile(0.99),
            flush_max_us: h.max(),
        }
    }
}

/// The Raft log and metadata in sled. See the module docs.
pub struct LogStore {
    inner: Arc<Inner>,
    stats: Arc<StorageStats>,
    /// Each append's callback, with when the append handed it over.
    flusher: mpsc::Sender<(Instant, IOFlushed<TypeConfig>)>,
    /// Callbacks handed to the flusher and not yet completed.
    flusher_pending: Arc<AtomicU64>,
    /// This node's id, when known: appends of other leaders' entries (this
    /// node is a follower) are flushed inline (see `append`).
    node_id: Option<NodeId>,
    /// After a slow inline flush, appends go to the flusher until then.
    inline_paused_until: Option<Instant>,
    closed: watch::Receiver<bool>,
    /// When the commit index was last written (None: not yet).
    committed_saved_at: Option<Instant>,
    /// Purge points for the purger thread (see `purge`).
    purger: std::sync::mpsc::Sender<u64>,
}

/// Reads the log; cheap to clone.
#[derive(Clone)]
pub struct LogReader {
    inner: Arc<Inner>,
}

/// The sled handles, shared by the store, its readers and the flusher.
struct Inner {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The newest entries, what replication reads (see [`TailCache`]).
    tail: Mutex<TailCache>,
    /// Declared last, so dropped after the sled handles: announces that the
    /// directory is free.
    _closed: ClosedOnDrop,
}

struct ClosedOnDrop(watch::Sender<bool>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

impl LogStore {
    /// Opens (or creates) the store in `dir` and starts its flusher thread,
    /// which ends when the store is dropped.
    pub fn open(dir: &Path) -> Result<LogStore, StorageError> {
        // sled's default page cache is 1 GiB; the log is read mostly at its tail.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let (tx, rx) = mpsc::channel(FLUSH_QUEUE);
        let (closed_tx, closed) = watch::channel(false);
        let inner = Arc::new(Inner {
            db,
            log,
            meta,
            tail: Mutex::new(TailCache::new(TAIL_CACHE_BYTES)),
            _closed: ClosedOnDrop(closed_tx),
        });
        let stats = Arc::new(StorageStats::new());
        let flusher_pending = Arc::new(AtomicU64::new(0));
        let (flush_inner, flush_stats, flush_pending) =
            (inner.clone(), stats.clone(), flusher_pending.clone());
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_loop(flush_inner, flush_stats, flush_pending, rx))?;
        let (purger, purge_rx) = std::sync::mpsc::channel();
        let purge_inner = inner.clone();
        std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || purge_loop(purge_inner, purge_rx))?;
        Ok(LogStore {
            inner,
            stats,
            flusher: tx,
            flusher_pending,
            node_id: None,
            inline_paused_until: None,
            closed,
            committed_saved_at: None,
            purger,
        })
    }

    /// Tells the store which node it belongs to, so that a follower flushes
    /// the entries it receives inline (see `append`).
    pub fn for_node(mut self, node_id: NodeId) -> LogStore {
        self.node_id = Some(node_id);
        self
    }

    /// The store's counters (they outlive the store).
    pub fn stats(&self) -> Arc<StorageStats> {
        self.stats.clone()
    }

    /// Resolves once this store, its flusher and every reader handed out are
    /// dropped, so sled has released its directory (sled locks it: a reopen in
    /// the same process, e.g. a node restarted in a test, must wait for this).
    pub fn on_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.clone();
        async move {
            // An error means the flusher is gone: closed as well.
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    /// Bytes sled uses on disk (for metrics: sled is known to grow).
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    fn reader(&self) -> LogReader {
        LogReader { inner: self.inner.clone() }
    }

    fn put_meta(&self, key: &[u8], value: Option<Vec<u8>>) -> io::Result<()> {
        match value {
            Some(v) => self.inner.meta.insert(key, v).map_err(sled_err)?,
            None => self.inner.meta.remove(key).map_err(sled_err)?,
        };
        Ok(())
    }
}

/// Group commit: one flush for every append queued before it started. Runs
/// on its own thread (see the module docs); ends when every sender is gone.
fn flush_loop(
    inner: Arc<Inner>,
    stats: Arc<StorageStats>,
    pending: Arc<AtomicU64>,
    mut rx: mpsc::Receiver<(Instant, IOFlushed<TypeConfig>)>,
) {
    let mut waiting = Vec::new();
    while let Some(cb) = rx.blocking_recv() {
        waiting.push(cb);
        while let Ok(cb) = rx.try_recv() {
            waiting.push(cb);
        }
        let started = Instant::now();
        let result = inner.db.flush().map(|_| ()).map_err(|e| e.to_string());
        stats.record_flush(started.elapsed());
        for (appended, cb) in waiting.drain(..) {
            stats.append_latency.record(appended.elapsed());
            cb.io_completed(result.clone().map_err(io::Error::other));
            pending.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Keys removed per sled batch by the purger.
const PURGE_CHUNK: usize = 1024;

/// Removes the log entries at or below each purge point it is sent, in
/// chunks, off Raft's path. Ends when the store is dropped.
fn purge_loop(inner: Arc<Inner>, rx: std::sync::mpsc::Receiver<u64>) {
    while let Ok(mut upto) = rx.recv() {
        while let Ok(later) = rx.try_recv() {
            upto = upto.max(later);
        }
        loop {
            let keys: Result<Vec<sled::IVec>, _> =
                inner.log.range(..=index_key(upto)).keys().take(PURGE_CHUNK).collect();
            let keys = match keys {
                Ok(k) if k.is_empty() => break,
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "log purge: reading keys failed; the next purge retries");
                    break;
                }
            };
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            if let Err(e) = inner.log.apply_batch(batch) {
                tracing::warn!(error = %e, "log purge failed; the next purge retries");
                break;
            }
        }
    }
}

impl LogReader {
    fn get_log_id(&self, key: &[u8]) -> io::Result<Option<LogId>> {
        match self.inner.meta.get(key).map_err(sled_err)? {
            Some(v) => Ok(Some(decode_log_id(&v)?)),
            None => Ok(None),
        }
    }

    fn last_entry(&self) -> io::Result<Option<Entry>> {
        match self.inner.log.last().map_err(sled_err)? {
            Some((_, v)) => Ok(Some(decode_entry(&v)?)),
            None => Ok(None),
        }
    }

    fn read_range<RB: RangeBounds<u64>>(&self, range: RB, max_bytes: usize) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.inner.tail.lock().read(start, end, max_bytes) {
            return Ok(entries);
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for kv in self.inner.log.range(key_range(&range)) {
            let (k, v) = kv.map_err(sled_err)?;
            let entry = decode_entry(&v)?;
            if entry.log_id.index != index_of(&k)? {
                return Err(corrupt(
                    "log",
                    format!("entry {} stored at key {}", entry.log_id, index_of(&k)?),
                ));
            }
            bytes += v.len();
            out.push(entry);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(range, usize::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.inner.meta.get(KEY_VOTE).map_err(sled_err)? {
            Some(v) => {
                let pb = pb::Vote::decode(&*v).map_err(|e| corrupt("vote", e))?;
                Ok(Some(convert::vote_from_pb(&pb).map_err(|e| corrupt("vote", e))?))
            }
            None => Ok(None),
        }
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read_range(start..end, MAX_READ_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.reader().get_log_id(KEY_PURGED)?;
        let last_log_id = match self.reader().last_entry()? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, Some(convert::vote_to_pb(vote).encode_to_vec()))?;
        // The vote must be durable before we answer anyone with it.
        self.inner.db.flush_async().await.map_err(sled_err)?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed on its own, and written at most every
        // COMMITTED_SAVE_EVERY: a stale (lower) value only makes a restart
        // apply less before the leader commits the rest again; the next
        // append's flush persists it. `raftmq recover` reads past it anyway.
        let now = Instant::now();
        if self.committed_saved_at.is_some_and(|at| now.duration_since(at) < COMMITTED_SAVE_EVERY) {
            return Ok(());
        }
        self.committed_saved_at = Some(now);
        self.put_meta(KEY_COMMITTED, committed.as_ref().map(|l| convert::log_id_to_pb(l).encode_to_vec()))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.reader().get_log_id(KEY_COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One `insert` per entry, not a `sled::Batch`: a batch takes sled's
        // global write lock, which waits for every reader (the replication
        // streams iterating the log) and spun the Raft core on sched_yield.
        // Atomicity is not needed: sled recovers its log in order, so a crash
        // midway leaves a prefix of the entries, and nothing is acknowledged
        // before the flush below.
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut last_leader = None;
        for e in entries {
            last_leader = Some(e.log_id.leader_id.node_id);
            let value = convert::entry_to_pb(&e).encode_to_vec();
            let size = value.len();
            n += 1;
            bytes += size as u64;
            self.inner.log.insert(index_key(e.log_id.index), value).map_err(sled_err)?;
            self.inner.tail.lock().push(e, size);
        }
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats.entries.fetch_add(n, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        let appended = Instant::now();
        // A follower flushes what it receives right here, as etcd's raft loop
        // does: its answer waits for this flush anyway, and waking the flusher
        // thread cost a context switch and 75-150 us on the critical path of
        // every replicated commit (docs/BENCHMARKS.md, session 7). The price:
        // the Raft core (votes, heartbeats) and this worker's other tasks wait
        // for the fsync too, so after a slow one (a stalling disk) the flusher
        // takes over for a while. Only when no earlier callback is still with
        // the flusher, so that callbacks complete in append order. A leader
        // keeps the flusher: its core must start replication while it syncs.
        let replicated = self.node_id.is_some_and(|me| last_leader.is_some_and(|l| l != me));
        let disk_slow = self.inline_paused_until.is_some_and(|until| appended < until);
        if replicated && !disk_slow && self.flusher_pending.load(Ordering::Acquire) == 0 {
            let result = self.inner.db.flush().map(|_| ()).map_err(sled_err);
            let took = appended.elapsed();
            self.stats.inline_flushes.fetch_add(1, Ordering::Relaxed);
            self.stats.record_flush(took);
            self.stats.append_latency.record(took);
            if took > INLINE_FLUSH_SLOW {
                self.inline_paused_until = Some(Instant::now() + INLINE_FLUSH_PAUSE);
            }
            callback.io_completed(result);
            return Ok(());
        }
        // Readable now; durable when the flusher calls back. `reserve` first:
        // if this future is dropped while the queue is full, nothing was
        // counted as pending.
        let Ok(permit) = self.flusher.reserve().await else {
            callback.io_completed(Err(io::Error::other("log flusher stopped")));
            return Ok(());
        };
        self.flusher_pending.fetch_add(1, Ordering::Relaxed);
        permit.send((appended, callback));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner.tail.lock().truncate_after(last_log_id.map(|l| l.index));
        let start = last_log_id.map_or(Bound::Unbounded, |l| Bound::Excluded(index_key(l.index)));
        let keys: Vec<sled::IVec> = self
            .inner
            .log
            .range((start, Bound::<[u8; 8]>::Unbounded))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(sled_err)?;
        // From the end backward: a crash midway leaves no hole.
        let mut batch = sled::Batch::default();
        for k in keys.into_iter().rev() {
            batch.remove(k);
        }
        self.inner.log.apply_batch(batch).map_err(sled_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: entries at or below it are never read
        // again, so a crash before they are removed leaves no hole.
        self.put_meta(KEY_PURGED, Some(convert::log_id_to_pb(&log_id).encode_to_vec()))?;
        self.inner.tail.lock().purge_upto(log_id.index);
        // The removal itself runs on the purger thread: after a snapshot it
        // is thousands of keys (snapshot_every - keep_after_snapshot), and
        // done here it held up Raft (heartbeats, appends) on every node at
        // once, long enough on a loaded machine for the leader to lose its
        // quorum lease. Every purge removes all keys up to its point, so
        // entries a crash left behind go with the next one.
        if self.purger.send(log_id.index).is_err() {
            return Err(io::Error::other("log purger stopped"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{EntryPayload, LeaderId};
    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderId;

    fn blank(index: u64, leader: NodeId) -> Entry {
        Entry::new(LogId::new(LeaderId::new(1, leader), index), EntryPayload::Blank)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_slow_inline_flush_a_follower_uses_the_flusher_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).unwrap().for_node(2);
        // As if the last inline flush had been slow.
        store.inline_paused_until = Some(Instant::now() + std::time::Duration::from_secs(3600));
        let (tx, rx) = TypeConfig::oneshot();
        store.append(vec![blank(1, 1)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(store.stats.inline_flushes.load(Ordering::Relaxed), 0, "paused: the flusher flushed");
        assert_eq!(store.stats.flushes.load(Ordering::Relaxed), 1);
        // The flusher counts its callback as done just after calling it back;
        // until then a follower's append must keep using it (callback order).
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while store.flusher_pending.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < deadline, "the flusher never finished its callback");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Once the pause is over, inline again.
        store.inline_paused_until = Some(Instant::now());
        let (tx, rx) = TypeConfig::oneshot();
        store.append(vec![blank(2, 1)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(store.stats.inline_flushes.load(Ordering::Relaxed), 1);
    }
}
