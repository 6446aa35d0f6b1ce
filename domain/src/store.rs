//! The event-store contract, shared by the in-memory, SQLite and PostgreSQL
//! implementations, and the batch planner they all use to assign positions,
//! stream versions and hashes.
//!
//! Every store runs appends through [`plan_batch`] while it holds its write
//! lock, so the rules (optimistic concurrency, gap-free positions, the hash
//! chain) live in exactly one place and the stores only persist the plan.

use crate::envelope::{ChainBreak, ChainVerifier, EventHeader, Hash, NewEvent, RecordedEvent, event_hash};
use crate::ids::{Position, StreamId, StreamVersion, Timestamp};
use async_trait::async_trait;
use std::collections::HashMap;

/// What the writer believes the stream's version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append regardless of the current version.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must be exactly at this version.
    Exact(StreamVersion),
}

impl ExpectedVersion {
    fn admits(self, current: StreamVersion) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == StreamVersion(0),
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

/// One append: events for one stream, all or nothing.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    /// Target stream.
    pub stream_id: StreamId,
    /// Optimistic-concurrency check.
    pub expected: ExpectedVersion,
    /// At least one event.
    pub events: Vec<NewEvent>,
}

/// What a successful append wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Position of the first appended event.
    pub first_position: Position,
    /// Position of the last appended event.
    pub last_position: Position,
    /// The stream's version after the append.
    pub stream_version: StreamVersion,
    /// When the store recorded the events.
    pub recorded_at: Timestamp,
}

/// Errors of the event-store layer that callers can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version; nothing was written.
    #[error("stream {stream_id} is at version {actual}, not the expected {expected:?}")]
    Conflict {
        /// The stream.
        stream_id: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// What the stream actually is at.
        actual: StreamVersion,
    },
    /// An event id that is already stored; nothing was written.
    #[error("event id already stored")]
    DuplicateEventId,
    /// The request itself is malformed (e.g. no events).
    #[error("invalid append: {0}")]
    InvalidAppend(&'static str),
    /// No event at that position.
    #[error("no event at position {0}")]
    NotFound(Position),
    /// Stored bytes cannot be read back as an event (corruption or a foreign row).
    #[error("stored event at position {position} is unreadable: {reason}")]
    Corrupt {
        /// Where.
        position: Position,
        /// What is wrong.
        reason: String,
    },
    /// The store is shutting down or its writer has stopped.
    #[error("event store is closed")]
    Closed,
    /// The database failed; the cause is attached.
    #[error("event storage failed")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The result of checking a range of the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Events that verified.
    pub checked: u64,
    /// The first failure, if any; events after it are not checked.
    pub first_break: Option<ChainBreak>,
    /// Hash of the last verified event.
    pub last_hash: Hash,
}

/// The tip of the chain: last position and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// Last committed position (0 when empty).
    pub position: Position,
    /// Its hash ([`Hash::GENESIS`] when empty).
    pub hash: Hash,
}

impl ChainHead {
    /// The head of an empty log.
    pub const EMPTY: ChainHead = ChainHead { position: Position::START, hash: Hash::GENESIS };
}

/// What a store must write for one batch of appends.
#[derive(Debug)]
pub struct BatchPlan {
    /// One result per request, in request order.
    pub outcomes: Vec<Result<AppendOutcome, StoreError>>,
    /// The records to insert, in position order.
    pub records: Vec<RecordedEvent>,
    /// The head after the batch.
    pub head: ChainHead,
}

/// Assigns positions, stream versions, times and hashes to a batch of
/// appends, checking each one's expected version against `versions` (the
/// current version of every stream in the batch; absent means 0).
///
/// Requests are considered in order; a later request to the same stream sees
/// the versions written by earlier ones in the batch. A rejected request
/// writes nothing and does not affect the others.
pub fn plan_batch(
    head: ChainHead,
    versions: &HashMap<StreamId, StreamVersion>,
    requests: &[AppendRequest],
    recorded_at: Timestamp,
) -> BatchPlan {
    let mut current: HashMap<&StreamId, StreamVersion> = HashMap::new();
    let mut head = head;
    let mut records = Vec::with_capacity(requests.iter().map(|r| r.events.len()).sum());
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        let actual = *current
            .entry(&request.stream_id)
            .or_insert_with(|| versions.get(&request.stream_id).copied().unwrap_or_default());
        if request.events.is_empty() {
            outcomes.push(Err(StoreError::InvalidAppend("an append needs at least one event")));
            continue;
        }
        if !request.expected.admits(actual) {
            outcomes.push(Err(StoreError::Conflict {
                stream_id: request.stream_id.clone(),
                expected: request.expected,
                actual,
            }));
            continue;
        }
        let first_position = head.position.next();
        let mut version = actual;
        for event in &request.events {
            version = StreamVersion(version.0 + 1);
            let position = head.position.next();
            let payload_hash = Hash::of(&event.payload);
            let header = EventHeader {
                position,
                stream_id: &request.stream_id,
                stream_version: version,
                event_id: event.event_id,
                event_type: &event.event_type,
                schema_version: event.schema_version,
                recorded_at,
            };
            let hash = event_hash(&head.hash, &header, &payload_hash);
            records.push(RecordedEvent {
                position,
                stream_id: request.stream_id.clone(),
                stream_version: version,
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                recorded_at,
                payload: Some(event.payload.clone()),
                payload_hash,
                prev_hash: head.hash,
                hash,
            });
            head = ChainHead { position, hash };
        }
        current.insert(&request.stream_id, version);
        outcomes.push(Ok(AppendOutcome {
            first_position,
            last_position: head.position,
            stream_version: version,
            recorded_at,
        }));
    }
    BatchPlan { outcomes, records, head }
}

/// Page size used by the provided [`EventStore::verify`].
pub const VERIFY_PAGE: usize = 2_000;

/// An append-only, hash-chained event log.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends events to one stream if it is at the expected version.
    /// Concurrent appends may be committed together in one transaction.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Events of one stream with version greater than `after`, oldest first.
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events with position greater than `after`, in position
    /// order. Never skips a position: a reader that pages through with the
    /// last position it saw sees every event exactly once.
    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The last committed position.
    async fn head(&self) -> Result<Position, StoreError>;

    /// Resolves once the log's head is past `after` (at once if it already
    /// is), without polling. Returns the head it saw.
    async fn wait_for_events_after(&self, after: Position) -> Result<Position, StoreError>;

    /// Compaction: drops the payload at `position`, keeping its hash so the
    /// chain still verifies. Dropping an already dropped payload is a no-op.
    async fn drop_payload(&self, position: Position) -> Result<(), StoreError>;

    /// Compaction of many positions at once (one transaction where the
    /// store has them). Positions that do not exist are skipped. Returns how
    /// many payloads were still there and are now dropped.
    async fn drop_payloads(&self, positions: &[Position]) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for position in positions {
            let still_there = self.read_all(Position(position.0.saturating_sub(1)), 1).await?;
            if still_there.first().is_some_and(|e| e.position == *position && e.payload.is_some()) {
                self.drop_payload(*position).await?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// A cheap round trip to the database, for health checks.
    async fn check_health(&self) -> Result<(), StoreError>;

    /// Verifies the chain from `from` (at least 1) through `to` (or the head).
    async fn verify(&self, from: Position, to: Option<Position>) -> Result<VerifyReport, StoreError> {
        let first = from.max(Position(1));
        let prev_hash = if first == Position(1) {
            Hash::GENESIS
        } else {
            let before = Position(first.0 - 2);
            match self.read_all(before, 1).await?.first() {
                Some(event) if event.position == Position(first.0 - 1) => event.hash,
                _ => return Err(StoreError::NotFound(Position(first.0 - 1))),
            }
        };
        let mut verifier = ChainVerifier::new(first, prev_hash);
        let mut after = Position(first.0 - 1);
        loop {
            let page = self.read_all(after, VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for event in &page {
                if to.is_some_and(|to| event.position > to) {
                    return Ok(report(&verifier, None));
                }
                if let Err(fault) = verifier.check(event) {
                    return Ok(report(&verifier, Some(fault)));
                }
            }
        }
        Ok(report(&verifier, None))
    }
}

fn report(verifier: &ChainVerifier, first_break: Option<ChainBreak>) -> VerifyReport {
    VerifyReport { checked: verifier.checked(), first_break, last_hash: verifier.head_hash() }
}

/// Named, persisted positions (outbox publisher, projections).
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The saved position for `name`, or [`Position::START`].
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError>;
    /// Saves the position for `name`.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;
}
