//! Event-store adapters: PostgreSQL for cluster mode, SQLite for embedded
//! mode. Both implement `privcomm_domain::EventStore` on top of the same
//! group committer and the domain's `plan_batch`, so they differ only in SQL.

/// The column list of every event read, so both backends decode by index alike.
macro_rules! select_events {
    ($tail:literal) => {
        concat!(
            "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, ",
            "recorded_at_us, payload, payload_hash, prev_hash, hash FROM events ",
            $tail
        )
    };
}

pub(crate) mod group_commit;
pub mod postgres;
pub mod sqlite;

use privcomm_domain::nonces::NonceLedger;
use privcomm_domain::{
    CheckpointStore, EventId, EventStore, Hash, Position, RecordedEvent, StoreError, StreamId, StreamVersion, Timestamp,
};
use uuid::Uuid;

/// A log that also keeps checkpoints and the nonce ledger: what every role is handed.
pub trait LogStore: EventStore + CheckpointStore + NonceLedger {}
impl<T: EventStore + CheckpointStore + NonceLedger> LogStore for T {}

/// Which backend a database URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite:`.
    Sqlite,
}

impl Backend {
    /// Recognises the scheme of a database URL.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

/// A row as the databases return it, before it is checked into a
/// [`RecordedEvent`]. Anything that does not fit (a tampered stream id, a
/// hash of the wrong length) is reported as corruption at its position.
pub(crate) struct StoredRow {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub recorded_at_us: i64,
    pub payload: Option<Vec<u8>>,
    pub payload_hash: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl StoredRow {
    pub(crate) fn into_recorded(self) -> Result<RecordedEvent, StoreError> {
        let position = Position(self.position as u64);
        let corrupt = |reason: &str| StoreError::Corrupt { position, reason: reason.to_owned() };
        Ok(RecordedEvent {
            position,
            stream_id: StreamId::new(self.stream_id).map_err(|_| corrupt("stream id"))?,
            stream_version: StreamVersion(u64::try_from(self.stream_version).map_err(|_| corrupt("stream version"))?),
            event_id: EventId(self.event_id),
            event_type: self.event_type,
            schema_version: u16::try_from(self.schema_version).map_err(|_| corrupt("schema version"))?,
            recorded_at: Timestamp(self.recorded_at_us),
            payload: self.payload,
            payload_hash: Hash::from_slice(&self.payload_hash).ok_or_else(|| corrupt("payload hash length"))?,
            prev_hash: Hash::from_slice(&self.prev_hash).ok_or_else(|| corrupt("previous hash length"))?,
            hash: Hash::from_slice(&self.hash).ok_or_else(|| corrupt("hash length"))?,
        })
    }
}

/// The one place where database errors become store errors. A unique
/// violation on the event id means the event is already stored; on the
/// stream version it is a lost optimistic-concurrency race (which the head
/// lock should make impossible, but the constraint is the last word).
pub(crate) fn sql_error(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        let constraint = db.constraint().unwrap_or_default();
        let message = db.message();
        if constraint.contains("event_id") || message.contains("events.event_id") {
            return StoreError::DuplicateEventId;
        }
        if constraint.contains("stream") || message.contains("events.stream_id") {
            return StoreError::Storage("concurrent write to the same stream version".into());
        }
    }
    if matches!(error, sqlx::Error::PoolClosed) {
        return StoreError::Closed;
    }
    StoreError::Storage(Box::new(error))
}
