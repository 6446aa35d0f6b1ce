//! The outbox publisher: copies the committed log onto the bus, in position
//! order, each event once.
//!
//! It tails the store from its checkpoint, publishes pages of events, and
//! saves the checkpoint after the bus acknowledged them. A crash between
//! publish and checkpoint only means the next run publishes those events
//! again, which the bus refuses as already stored (ADR 0003). A node wakes
//! its publisher the moment its own commit lands (the store's in-process
//! head watch), which is the fast path; events committed by other nodes
//! arrive through LISTEN/NOTIFY.
//!
//! In cluster mode one node publishes at a time: [`publish_while_leader`]
//! holds a PostgreSQL advisory lock on a connection of its own and publishes
//! only while it holds it; the others stand by and take over within a
//! second or two of its connection dropping (a crash, a network split).
//! Two publishers at once would still be correct (ADR 0003) — the lock only
//! keeps every node from reading and publishing every event (ADR 0009).

use crate::eventstore::LogStore;
use privcomm_domain::{BusError, EventBus, Position, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Checkpoint name of the outbox publisher.
pub const CHECKPOINT: &str = "outbox";

/// Events per publish.
pub const DEFAULT_BATCH: usize = 500;

/// Why a publish step failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Reading the log or saving the checkpoint failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The bus now holds everything up to this position.
    Published(Position),
    /// Nothing after the position to publish.
    UpToDate,
    /// The bus holds less than we thought: continue from here.
    Resync(Position),
}

/// Copies the log onto a bus.
pub struct OutboxPublisher {
    store: Arc<dyn LogStore>,
    bus: Arc<dyn EventBus>,
    batch: usize,
}

impl OutboxPublisher {
    /// A publisher from `store` to `bus`.
    pub fn new(store: Arc<dyn LogStore>, bus: Arc<dyn EventBus>) -> OutboxPublisher {
        OutboxPublisher { store, bus, batch: DEFAULT_BATCH }
    }

    /// Publishes at most this many events per step.
    pub fn with_batch(mut self, batch: usize) -> OutboxPublisher {
        self.batch = batch.max(1);
        self
    }

    /// Publishes the next page of events after `after`. Does not save the checkpoint.
    pub async fn step(&self, after: Position) -> Result<Step, OutboxError> {
        let events = self.store.read_all(after, self.batch).await?;
        if events.is_empty() {
            return Ok(Step::UpToDate);
        }
        match self.bus.publish(&events).await {
            Ok(last) => Ok(Step::Published(last)),
            Err(BusError::OutOfSequence { bus_last, .. }) => Ok(Step::Resync(bus_last)),
            Err(error) => Err(error.into()),
        }
    }

    /// Where a (re)started publisher goes on: its checkpoint, or the bus's
    /// last event if the bus holds less than that (a restarted in-process
    /// bus, a JetStream stream recreated empty). Checked before waiting for
    /// new events: a publisher that trusted its checkpoint would wait with
    /// the bus behind until the next commit, and every subscriber with it.
    async fn resume_from(&self) -> Result<Position, OutboxError> {
        let checkpoint = self.store.load_checkpoint(CHECKPOINT).await?;
        let bus_last = self.bus.last_published().await?;
        if bus_last >= checkpoint {
            return Ok(checkpoint);
        }
        self.fall_back(checkpoint, bus_last).await
    }

    /// The bus holds less than `checkpoint`: continue from its last event.
    async fn fall_back(&self, checkpoint: Position, bus_last: Position) -> Result<Position, OutboxError> {
        tracing::warn!(%checkpoint, %bus_last, "bus is behind the outbox checkpoint; republishing from the bus's last event");
        self.store.save_checkpoint(CHECKPOINT, bus_last).await?;
        Ok(bus_last)
    }

    /// Runs until `shutdown` resolves: publish, checkpoint, wait for more.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut after = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let work = async {
                let from = match after {
                    Some(position) => position,
                    None => self.resume_from().await?,
                };
                match self.step(from).await? {
                    Step::Published(last) => {
                        self.store.save_checkpoint(CHECKPOINT, last).await?;
                        Ok::<_, OutboxError>(last)
                    }
                    Step::Resync(bus_last) => self.fall_back(from, bus_last).await,
                    Step::UpToDate => {
                        self.store.wait_for_events_after(from).await?;
                        Ok(from)
                    }
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                result = work => match result {
                    Ok(position) => {
                        after = Some(position);
                        backoff = Duration::from_millis(100);
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outbox publish failed");
                        after = None; // re-read the checkpoint after a failure
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// The advisory lock key of the outbox publisher ("privcomm" in ASCII).
pub const LEADER_LOCK: i64 = 0x7072_6976_636f_6d6d;

/// Runs the publisher on this node whenever it holds the outbox lock of the
/// PostgreSQL database at `database_url`, until `shutdown` resolves.
pub async fn publish_while_leader(
    database_url: String,
    store: Arc<dyn LogStore>,
    bus: Arc<dyn EventBus>,
    shutdown: impl Future<Output = ()>,
) {
    let work = move || {
        let publisher = OutboxPublisher::new(store.clone(), bus.clone());
        Box::pin(publisher.run(std::future::pending())) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    };
    crate::leader::while_leader(database_url, LEADER_LOCK, "the outbox", work, shutdown).await;
}
