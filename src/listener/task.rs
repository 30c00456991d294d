//! The task of one connection, and its place under the listener's
//! `max_connections`.
//!
//! An idle connection is counted in bytes, and its task is most of them
//! (docs/ARCHITECTURE.md "Memory per connection"). So the task's future is a
//! two-state enum rather than an `async` block: first the boxed set-up
//! (handshake and the handler's CONNECT phase, freed when it ends), then the
//! handler's serving future with the connection's [`Slot`], stored in place.
//! An `async` block would also keep the box pointer and its own state tag for
//! the connection's whole life.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

pin_project_lite::pin_project! {
    /// The future a listener spawns for each accepted socket.
    #[project = ConnTaskProj]
    pub(super) enum ConnTask<Setup, Serve> {
        /// Handshake and CONNECT phase; `None` when the connection ended there.
        SettingUp { setup: Pin<Box<Setup>> },
        /// The accepted connection, until it closes.
        Serving { #[pin] serve: Serve, slot: Option<Slot> },
        Done,
    }
}

impl<Setup, Serve> ConnTask<Setup, Serve> {
    pub(super) fn new(setup: Pin<Box<Setup>>) -> Self {
        ConnTask::SettingUp { setup }
    }
}

impl<Setup, Serve> Future for ConnTask<Setup, Serve>
where
    Setup: Future<Output = Option<(Serve, Option<Slot>)>>,
    Serve: Future<Output = ()>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                ConnTaskProj::SettingUp { setup } => match ready!(setup.as_mut().poll(cx)) {
                    Some((serve, slot)) => self.set(ConnTask::Serving { serve, slot }),
                    None => {
                        self.set(ConnTask::Done);
                        return Poll::Ready(());
                    }
                },
                ConnTaskProj::Serving { serve, .. } => {
                    ready!(serve.poll(cx));
                    // Drops the serving future and gives the slot back.
                    self.set(ConnTask::Done);
                    return Poll::Ready(());
                }
                ConnTaskProj::Done => return Poll::Ready(()),
            }
        }
    }
}

/// A listener's `max_connections`: how many of its connections are open.
#[derive(Debug)]
pub(super) struct ConnLimit {
    open: Arc<AtomicUsize>,
    max: usize,
}

impl ConnLimit {
    pub(super) fn new(max: usize) -> ConnLimit {
        ConnLimit { open: Arc::new(AtomicUsize::new(0)), max }
    }

    /// A slot for one more connection, or `None` at the limit.
    pub(super) fn try_take(&self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.open.clone()))
    }
}

/// One connection's place under a [`ConnLimit`], given back when dropped.
/// One pointer (a semaphore permit is two words).
#[derive(Debug)]
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_given_back() {
        let limit = ConnLimit::new(2);
        let a = limit.try_take().expect("first");
        let b = limit.try_take().expect("second");
        assert!(limit.try_take().is_none(), "third is over the limit");
        drop(a);
        let c = limit.try_take().expect("a slot was given back");
        assert!(limit.try_take().is_none());
        drop((b, c));
        assert_eq!(limit.open.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn task_runs_setup_then_serve_and_frees_the_slot() {
        let limit = ConnLimit::new(1);
        let slot = limit.try_take();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let setup = Box::pin(async move { Some((async move { tx.send(()).expect("receiver") }, slot)) });
        ConnTask::new(setup).await;
        rx.await.expect("serve ran");
        assert!(limit.try_take().is_some(), "the slot was given back");
    }

    #[tokio::test]
    async fn task_ends_when_setup_gives_nothing() {
        let setup = Box::pin(async { None::<(std::future::Ready<()>, Option<Slot>)> });
        ConnTask::new(setup).await;
    }
}
