//! The command pipeline: the only way the broker changes the replicated State.
//!
//! Owns a bounded queue of proposals and the batching task that drains it: one
//! `now_ms` stamp per batch, `State::apply_batch` under the state lock, one
//! answer per proposal, and the batch's `Event`s handed to the broker. On a
//! single node a batch is applied locally (group commit); the cluster issue
//! replaces the apply step with a Raft commit without changing this interface.
//! Must not know about connections or MQTT packets.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::state::{pb, Applied, Event, State, StateError};

use super::metrics::Metrics;

/// Proposals waiting for the batching task; beyond this, proposers wait.
const QUEUE: usize = 4096;
/// Commands per batch at most.
const MAX_BATCH: usize = 512;

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
        Pipeline { tx }
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
