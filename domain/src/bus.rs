//! The event-bus contract: how committed events fan out to projection workers
//! and relay nodes.
//!
//! A bus holds the log's events in position order, each exactly once: an
//! event is accepted only directly after its predecessor, so publishing is
//! idempotent and safe from several publishers at once (see ADR 0003).

use crate::envelope::RecordedEvent;
use crate::ids::Position;
use async_trait::async_trait;
use futures::stream::BoxStream;

/// Errors of the bus layer that callers can act on.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus's last event is not the one before the batch: someone else
    /// published, or the publisher is behind. Re-read `last_published`.
    #[error("bus holds events up to position {bus_last}, so position {attempted} cannot be appended")]
    OutOfSequence {
        /// What the bus holds up to.
        bus_last: Position,
        /// The position that was refused.
        attempted: Position,
    },
    /// A message on the bus cannot be decoded as an event.
    #[error("undecodable bus message: {0}")]
    Decode(String),
    /// The transport failed; the cause is attached.
    #[error("event bus failed")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Fan-out of the committed log.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes a batch of consecutive events. Events the bus already holds
    /// are skipped; an event whose predecessor is missing is refused with
    /// [`BusError::OutOfSequence`]. Returns the last position the bus holds.
    async fn publish(&self, events: &[RecordedEvent]) -> Result<Position, BusError>;

    /// The last position the bus holds ([`Position::START`] when empty).
    async fn last_published(&self) -> Result<Position, BusError>;

    /// Every event after `after`, in position order, then live ones as they
    /// are published.
    async fn subscribe(&self, after: Position)
    -> Result<BoxStream<'static, Result<RecordedEvent, BusError>>, BusError>;
}
