//! Group commit: appends that arrive while a transaction is in flight are
//! queued and written together in the next one.
//!
//! One writer task per process owns the write path. Callers hand it their
//! append and await the outcome; the task drains everything queued (up to a
//! cap), lets the backend write it in one transaction, and answers each
//! caller with its own result. Under load this turns N commits (N fsyncs)
//! into one, without adding latency when the system is idle: a lone append is
//! written as soon as it arrives.

use async_trait::async_trait;
use privcomm_domain::store::BatchPlan;
use privcomm_domain::{AppendOutcome, AppendRequest, Clock, Position, StoreError, Timestamp};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Writes one planned batch in one transaction.
#[async_trait]
pub(crate) trait BatchWriter: Send + 'static {
    /// Locks the head, plans the batch with `plan_batch`, persists the plan
    /// and commits. Returns the plan only after the commit succeeded.
    async fn write_batch(
        &mut self,
        requests: &[AppendRequest],
        recorded_at: Timestamp,
    ) -> Result<BatchPlan, StoreError>;
}

struct PendingAppend {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// The handle callers append through.
#[derive(Clone)]
pub(crate) struct GroupCommitter {
    queue: mpsc::Sender<PendingAppend>,
}

/// Upper bound of events written in one transaction.
pub(crate) const MAX_BATCH_EVENTS: usize = 2_000;

impl GroupCommitter {
    /// Starts the writer task. `head` is advanced after every commit.
    pub(crate) fn spawn(
        writer: impl BatchWriter,
        clock: Arc<dyn Clock>,
        head: watch::Sender<Position>,
    ) -> GroupCommitter {
        let (queue, pending) = mpsc::channel(4 * MAX_BATCH_EVENTS);
        tokio::spawn(write_loop(writer, clock, head, pending));
        GroupCommitter { queue }
    }

    /// Starts the writer on an OS thread with a runtime of its own, making
    /// the writer there with `make` (so its connections belong to that
    /// runtime). A writer that holds a lock other processes wait for across
    /// round trips should not queue behind a busy node's tasks each time its
    /// socket is ready (in the relay load run: p99 470–472 ms against
    /// 481–500 ms on the node's runtime, before ADR 0013 removed the larger
    /// delay). If the thread cannot start, appends fail with
    /// [`StoreError::Closed`].
    pub(crate) fn spawn_on_own_thread<W: BatchWriter>(
        make: impl FnOnce() -> W + Send + 'static,
        clock: Arc<dyn Clock>,
        head: watch::Sender<Position>,
    ) -> GroupCommitter {
        let (queue, pending) = mpsc::channel(4 * MAX_BATCH_EVENTS);
        let started = std::thread::Builder::new().name("privcomm-append".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                // `make` inside the runtime: a pool starts its tasks where it is made.
                Ok(runtime) => runtime.block_on(async move { write_loop(make(), clock, head, pending).await }),
                Err(error) => tracing::error!(%error, "cannot start the append writer's runtime; appends will fail"),
            }
        });
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the append writer's thread; appends will fail");
        }
        GroupCommitter { queue }
    }

    /// Queues an append and waits for its commit.
    pub(crate) async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.queue.send(PendingAppend { request, reply }).await.map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }
}

async fn write_loop(
    mut writer: impl BatchWriter,
    clock: Arc<dyn Clock>,
    head: watch::Sender<Position>,
    mut pending: mpsc::Receiver<PendingAppend>,
) {
    while let Some(first) = pending.recv().await {
        let mut events = first.request.events.len();
        let mut batch = vec![first];
        while events < MAX_BATCH_EVENTS {
            match pending.try_recv() {
                Ok(next) => {
                    events += next.request.events.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.request, p.reply)).unzip();
        match writer.write_batch(&requests, clock.now()).await {
            Ok(plan) => {
                advance(&head, plan.head.position);
                for (reply, outcome) in replies.into_iter().zip(plan.outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(error) if requests.len() == 1 => {
                let _ = replies.into_iter().next().map(|reply| reply.send(Err(error)));
            }
            Err(error) => {
                // One request can doom a shared transaction (a reused event id
                // hits a unique constraint). Write each alone, so every caller
                // gets its own verdict. Event ids are unique, so a request
                // whose batch did commit after all is refused, not doubled.
                tracing::debug!(%error, size = requests.len(), "batch failed; retrying its appends one by one");
                for (request, reply) in requests.iter().zip(replies) {
                    let outcome = match writer.write_batch(std::slice::from_ref(request), clock.now()).await {
                        Ok(plan) => {
                            advance(&head, plan.head.position);
                            plan.outcomes.into_iter().next().unwrap_or(Err(StoreError::Closed))
                        }
                        Err(error) => Err(error),
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

/// Moves the head watch forward, never back (notifications may arrive late).
pub(crate) fn advance(head: &watch::Sender<Position>, to: Position) {
    head.send_if_modified(|current| {
        let moved = to > *current;
        if moved {
            *current = to;
        }
        moved
    });
}
