//! The command pipeline: the only way the broker changes the replicated State.
//!
//! Owns a bounded queue of proposals and the batching task that drains it: one
//! `now_ms` stamp per batch, one answer per proposal. Two back ends:
//! - Raft ([`Pipeline::start_raft`], what a node runs, one member or many):
//!   each batch is one `pb::Batch` log entry proposed with
//!   `RaftNode::submit`; up to [`MAX_IN_FLIGHT`] batches are in flight
//!   while the next is built (group commit: many client operations, one
//!   entry, one fsync). Entries are submitted one after another from this
//!   one task, so they commit in proposal order, and answers go out in that
//!   order. The State is changed by the Raft state machine on every node,
//!   which also hands the `Event`s to the broker (before the proposer hears back).
//! - Local ([`Pipeline::start`], the broker's unit tests): `State::apply_batch`
//!   under the state lock, events handed to the sink here.
//!
//! A proposal that is not known to be committed (not the leader, leadership
//! lost, no commit within the timeout, outcome unknown) gets no answer: its
//! reply channel closes, so the connection closes without acknowledging.
//! Must not know about connections or MQTT packets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesOrdered, StreamExt};
use parking_lot::RwLock;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use crate::latency::LatencyHistogram;
use crate::raft::{RaftNode, MAX_ENTRY_BYTES};
use crate::state::{pb, Applied, Event, State, StateError};

use super::metrics::Metrics;

/// Proposals waiting for the batching task; beyond this, proposers wait.
const QUEUE: usize = 4096;
/// Commands per batch at most.
const MAX_BATCH: usize = 512;
/// Raft back end: batches proposed and not yet committed, at most.
pub const MAX_IN_FLIGHT: usize = 32;
/// Raft back end: beyond this many batches in flight, only a full batch
/// ([`MAX_BATCH`] commands or [`MAX_BATCH_BYTES`]) is proposed; a smaller one
/// waits for a commit and keeps filling meanwhile. Each entry costs every node
/// a fixed amount of work (append, replication, apply), so under load fewer,
/// fuller entries carry the same commands for less CPU; with few batches in
/// flight (light load) a batch still goes out at once, adding no latency.
pub const SOFT_IN_FLIGHT: usize = 4;
/// Raft back end: encoded bytes per batch at most (well below what one entry may carry).
const MAX_BATCH_BYTES: usize = MAX_ENTRY_BYTES / 2;

#[derive(thiserror::Error, Debug)]
pub enum PipelineError {
    #[error("the command pipeline is closed")]
    Closed,
    #[error("state rejected the command: {0}")]
    State(#[from] StateError),
}

/// Why [`Pipeline::try_submit`] did not queue a command.
#[derive(Debug)]
pub enum TrySubmitError {
    /// The queue is full; here is the command back.
    Full(Box<pb::Command>),
    Closed,
}

/// The answer to one proposal.
pub type Reply = Result<Applied, StateError>;

struct Proposal {
    cmd: pb::Command,
    reply: Option<oneshot::Sender<Reply>>,
}

/// Receives the events of every applied batch (called on the batching task).
pub(crate) type EventSink = Box<dyn Fn(Vec<Event>) + Send + Sync>;

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<Proposal>,
    commit: Arc<CommitStats>,
}

/// Raft back end: from submitting a batch to its commit and apply (leader),
/// as a histogram, plus failures.
#[derive(Debug, Default)]
pub struct CommitStats {
    latency: LatencyHistogram,
    /// Batches proposed but not known to be committed (leadership lost,
    /// timeout, outcome unknown). Batches a follower never proposes are not counted.
    pub failed: AtomicU64,
}

impl CommitStats {
    /// Batches committed so far.
    pub fn count(&self) -> u64 {
        self.latency.count()
    }

    /// Appends `raftmq_raft_commit_latency_seconds` (histogram) and the failure counter.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.latency.render(
            out,
            "raftmq_raft_commit_latency_seconds",
            "From proposing a batch to its commit and apply on the leader.",
        );
        let f = "raftmq_raft_proposals_failed_total";
        let _ = writeln!(
            out,
            "# HELP {f} Batches not known to be committed (not leader, timeout, outcome unknown)."
        );
        let _ = writeln!(out, "# TYPE {f} counter");
        let _ = writeln!(out, "{f} {}", self.failed.load(Ordering::Relaxed));
    }
}

/// Wall-clock milliseconds since the Unix epoch (the proposer's stamp).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Pipeline {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(state: Arc<RwLock<State>>, sink: EventSink, metrics: Arc<Metrics>) -> Pipeline {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, state, sink, metrics));
        Pipeline { tx, commit: Arc::default() }
    }

    /// Starts the batching task over Raft: a proposal is answered once its
    /// batch is committed and applied, or dropped (see the module docs) when
    /// that is not known within `timeout`.
    pub(crate) fn start_raft(raft: RaftNode, metrics: Arc<Metrics>, timeout: Duration) -> Pipeline {
        let (tx, rx) = mpsc::channel(QUEUE);
        let commit = Arc::new(CommitStats::default());
        tokio::spawn(run_raft(rx, raft, metrics, commit.clone(), timeout));
        Pipeline { tx, commit }
    }

    /// Commit latency and failures of the Raft back end.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.commit
    }

    /// Proposes one command; resolves when the batch containing it has been applied.
    pub async fn propose(&self, cmd: pb::Command) -> Result<Applied, PipelineError> {
        let rx = self.submit(cmd).await?;
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(PipelineError::Closed),
        }
    }

    /// Queues one command and returns at once with a receiver for its result,
    /// so a connection can keep several proposals in flight in order.
    pub async fn submit(&self, cmd: pb::Command) -> Result<oneshot::Receiver<Reply>, PipelineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Proposal { cmd, reply: Some(tx) }).await.map_err(|_| PipelineError::Closed)?;
        Ok(rx)
    }

    /// Like [`Pipeline::submit`] without waiting: gives the command back when
    /// the queue is full.
    pub fn try_submit(&self, cmd: pb::Command) -> Result<oneshot::Receiver<Reply>, TrySubmitError> {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(Proposal { cmd, reply: Some(tx) }) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(p)) => Err(TrySubmitError::Full(Box::new(p.cmd))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TrySubmitError::Closed),
        }
    }

    /// Queues a command nobody waits for (Tick, wills); waits only for queue room.
    pub async fn send(&self, cmd: pb::Command) -> Result<(), PipelineError> {
        self.tx.send(Proposal { cmd, reply: None }).await.map_err(|_| PipelineError::Closed)
    }
}

async fn run(
    mut rx: mpsc::Receiver<Proposal>,
    state: Arc<RwLock<State>>,
    sink: EventSink,
    metrics: Arc<Metrics>,
) {
    let mut buf: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let mut replies = Vec::with_capacity(buf.len());
        let mut batch = pb::Batch { now_ms: now_ms(), commands: Vec::with_capacity(buf.len()) };
        for p in buf.drain(..) {
            batch.commands.push(p.cmd);
            replies.push(p.reply);
        }
        let results = state.write().apply_batch(&batch);
        Metrics::add(&metrics.commands_applied, batch.commands.len() as u64);
        Metrics::inc(&metrics.batches_applied);
        let mut events = Vec::new();
        let mut answers = Vec::with_capacity(replies.len());
        for (reply, mut res) in replies.into_iter().zip(results) {
            if let Ok(applied) = &mut res {
                events.append(&mut applied.events);
            }
            answers.push((reply, res));
        }
        // Events first: a will published by this batch is routed before anyone
        // hears back, and connections learn about new in-flight messages.
        if !events.is_empty() {
            sink(events);
        }
        for (reply, res) in answers {
            if let Some(r) = reply {
                let _ = r.send(res);
            }
        }
    }
}

type Replies = Vec<Option<oneshot::Sender<Reply>>>;

/// The Raft batching loop (see the module docs).
async fn run_raft(
    mut rx: mpsc::Receiver<Proposal>,
    raft: RaftNode,
    metrics: Arc<Metrics>,
    commit: Arc<CommitStats>,
    timeout: Duration,
) {
    let mut buf: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    // Proposals taken from the queue but not yet in a submitted batch (a
    // batch is cut at MAX_BATCH_BYTES).
    let mut carry: std::collections::VecDeque<Proposal> = std::collections::VecDeque::new();
    // Encoded size of `carry` (as `cut_batch` counts it).
    let mut carry_bytes = 0;
    let mut inflight = FuturesOrdered::new();
    let mut open = true;
    loop {
        let room = inflight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            Some((replies, outcome)) = inflight.next(), if !inflight.is_empty() => {
                answer(replies, outcome, &metrics);
            }
            // Keep filling while a batch waits (SOFT_IN_FLIGHT), up to one full batch.
            n = rx.recv_many(&mut buf, MAX_BATCH), if room && open && carry.len() < MAX_BATCH => {
                if n == 0 {
                    open = false;
                } else {
                    carry_bytes += buf.iter().map(proposal_bytes).sum::<usize>();
                    carry.extend(buf.drain(..));
                }
            }
            else => {
                if !open && carry.is_empty() && inflight.is_empty() {
                    return;
                }
            }
        }
        // Submit what is waiting, while there is room in the window: any
        // batch below SOFT_IN_FLIGHT, only full ones above it (and all that
        // is left once the queue is closed).
        while !carry.is_empty()
            && inflight.len() < MAX_IN_FLIGHT
            && (inflight.len() < SOFT_IN_FLIGHT
                || !open
                || carry.len() >= MAX_BATCH
                || carry_bytes >= MAX_BATCH_BYTES)
        {
            let (batch, replies, taken) = cut_batch(&mut carry);
            carry_bytes -= taken;
            if !raft.is_leader() {
                // Only a leader can commit: answer at once (dropped replies)
                // instead of asking Raft (a follower's periodic Tick lands here).
                continue;
            }
            let started = tokio::time::Instant::now();
            let deadline = started + timeout;
            match raft.submit(&batch).await {
                Ok(fut) => {
                    let commit = commit.clone();
                    inflight.push_back(async move {
                        let outcome = match tokio::time::timeout_at(deadline, fut).await {
                            Ok(Ok((_, results))) => {
                                commit.latency.record(started.elapsed());
                                Some(results)
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "batch not committed");
                                commit.failed.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                            Err(_) => {
                                tracing::warn!(?timeout, "batch not committed in time");
                                commit.failed.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                        };
                        (replies, outcome)
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot propose a batch");
                    commit.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What a proposal adds to a batch's size, as [`cut_batch`] counts it.
fn proposal_bytes(p: &Proposal) -> usize {
    p.cmd.encoded_len() + 8
}

/// Takes proposals from the front of `carry` into one batch: at most
/// [`MAX_BATCH`] commands and [`MAX_BATCH_BYTES`] (but at least one command).
/// Also returns the bytes taken (by [`proposal_bytes`]).
fn cut_batch(carry: &mut std::collections::VecDeque<Proposal>) -> (pb::Batch, Replies, usize) {
    let mut batch = pb::Batch { now_ms: now_ms(), commands: Vec::new() };
    let mut replies = Vec::new();
    let mut bytes = 0;
    while let Some(p) = carry.front() {
        let len = proposal_bytes(p);
        if !batch.commands.is_empty() && (bytes + len > MAX_BATCH_BYTES || batch.commands.len() >= MAX_BATCH)
        {
            break;
        }
        let Some(p) = carry.pop_front() else { break };
        bytes += len;
        batch.commands.push(p.cmd);
        replies.push(p.reply);
    }
    (batch, replies, bytes)
}

/// Answers each proposal of a committed batch with its command's result; a
/// batch not known to be committed answers nobody (the channels close).
fn answer(replies: Replies, outcome: Option<crate::raft::ProposeResults>, metrics: &Metrics) {
    let Some(results) = outcome else { return };
    Metrics::add(&metrics.commands_applied, replies.len() as u64);
    Metrics::inc(&metrics.batches_applied);
    for (reply, mut res) in replies.into_iter().zip(results) {
        if let Ok(applied) = &mut res {
            // The state machine already handed the events to the broker.
            applied.events.clear();
        }
        if let Some(r) = reply {
            let _ = r.send(res);
        }
    }
}

#[cfg(test)]
mod raft_tests {
    //! The Raft back end over a one-member group (no cluster listener) and over
    //! a node that can never lead.

    use super::*;
    use crate::raft::{ClusterConfig, NodeInfo};
    use crate::state::Limits;

    fn retained(i: usize) -> pb::Command {
        pb::Command {
            cmd: Some(pb::command::Cmd::Publish(pb::Publish {
                message: Some(pb::Message {
                    topic: "order".into(),
                    payload: bytes::Bytes::from(i.to_string()),
                    qos: 1,
                    retain: true,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    fn one(id: u64, nodes: Vec<NodeInfo>) -> ClusterConfig {
        ClusterConfig { node_id: id, listen: nodes[0].cluster_addr.clone(), nodes, ..Default::default() }
    }

    fn info(id: u64, port: u16) -> NodeInfo {
        NodeInfo {
            id,
            cluster_addr: format!("127.0.0.1:{port}"),
            mqtt_addr: format!("127.0.0.1:{}", port + 1),
            admin_addr: format!("127.0.0.1:{}", port + 2),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_commit_in_order_in_shared_batches() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(RwLock::new(State::new(Limits::default())));
        let cfg = one(1, vec![info(1, 1)]);
        let raft = RaftNode::start_single(&cfg, dir.path(), state.clone(), Box::new(|_| {})).await.unwrap();
        raft.wait_for(Duration::from_secs(10), |m| m.serving).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let pipeline = Pipeline::start_raft(raft.clone(), metrics.clone(), Duration::from_secs(5));

        const N: usize = 3000;
        let mut rxs = Vec::with_capacity(N);
        for i in 0..N {
            rxs.push(pipeline.submit(retained(i)).await.unwrap());
        }
        for rx in rxs {
            assert!(rx.await.expect("answered").is_ok());
        }
        // The last proposal is the last applied: commit order = proposal order.
        let kept = state.read().retained("order").map(|m| m.payload.clone());
        assert_eq!(kept, Some(bytes::Bytes::from((N - 1).to_string())));
        let batches = Metrics::get(&metrics.batches_applied);
        assert_eq!(Metrics::get(&metrics.commands_applied), N as u64);
        assert!(batches < N as u64, "group commit: {batches} batches for {N} commands");
        let flushes = raft.storage_stats().flushes;
        assert!(flushes <= batches + 2, "{flushes} fsyncs for {batches} batches");
        let hist = {
            let mut out = String::new();
            pipeline.commit_stats().render_prometheus(&mut out);
            out
        };
        assert!(hist.contains(&format!("raftmq_raft_commit_latency_seconds_count {batches}")), "{hist}");
        // Every append was timed to its fsync (the last callbacks may still be
        // on their way when the last answer arrives).
        let appends = raft.storage_stats().appends;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let want = format!("raftmq_raft_append_latency_seconds_count {appends}");
        loop {
            let mut out = String::new();
            raft.render_latency_metrics(&mut out);
            if out.contains(&want) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "want {want} in\n{out}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        raft.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_is_not_leader_answers_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(RwLock::new(State::new(Limits::default())));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Node 2 of a group whose node 1 never starts: it never leads.
        let mut cfg = one(2, vec![info(2, port), info(1, 9)]);
        cfg.listen = format!("127.0.0.1:{port}");
        let raft = RaftNode::start(&cfg, dir.path(), state.clone(), Box::new(|_| {})).await.unwrap();
        let pipeline =
            Pipeline::start_raft(raft.clone(), Arc::new(Metrics::default()), Duration::from_secs(5));
        let started = std::time::Instant::now();
        let r = pipeline.propose(retained(1)).await;
        assert!(matches!(r, Err(PipelineError::Closed)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(state.read().retained("order").is_none());
        assert_eq!(pipeline.commit_stats().count(), 0);
        raft.shutdown().await.unwrap();
    }
}
