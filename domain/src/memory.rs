//! An in-memory [`EventStore`] for fast unit tests: the reference
//! implementation of the same contract the SQL stores satisfy.

use crate::clock::Clock;
use crate::envelope::RecordedEvent;
use crate::ids::{Position, StreamId, StreamVersion};
use crate::store::{AppendOutcome, AppendRequest, ChainHead, CheckpointStore, EventStore, StoreError, plan_batch};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

#[derive(Default)]
struct Log {
    events: Vec<RecordedEvent>,
    versions: HashMap<StreamId, StreamVersion>,
    event_ids: HashSet<crate::ids::EventId>,
    checkpoints: HashMap<String, Position>,
}

/// A log held in a `Vec`, guarded by one mutex (which is its write lock).
pub struct InMemoryEventStore {
    log: Mutex<Log>,
    head: watch::Sender<Position>,
    clock: Arc<dyn Clock>,
    nonces: crate::nonces::InMemoryNonceLedger,
}

impl InMemoryEventStore {
    /// An empty log stamped by `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> InMemoryEventStore {
        InMemoryEventStore {
            log: Mutex::new(Log::default()),
            head: watch::channel(Position::START).0,
            clock,
            nonces: crate::nonces::InMemoryNonceLedger::default(),
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave a half-applied append:
        // the plan is computed before anything is pushed.
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes a stored event in place, bypassing every rule. It exists so
    /// the conformance suite can show that tampering is detected; a real
    /// deployment has no such door (an attacker with database access does).
    pub fn tamper(&self, position: Position, change: impl FnOnce(&mut RecordedEvent)) {
        let mut log = self.log();
        if let Some(event) = log.events.get_mut(position.0.saturating_sub(1) as usize) {
            change(event);
        }
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let mut log = self.log();
        let head = log.events.last().map_or(ChainHead::EMPTY, |e| ChainHead { position: e.position, hash: e.hash });
        let mut ids = HashSet::new();
        if request.events.iter().any(|e| log.event_ids.contains(&e.event_id) || !ids.insert(e.event_id)) {
            return Err(StoreError::DuplicateEventId);
        }
        let versions: HashMap<_, _> =
            log.versions.get(&request.stream_id).map(|v| (request.stream_id.clone(), *v)).into_iter().collect();
        let plan = plan_batch(head, &versions, std::slice::from_ref(&request), self.clock.now());
        let outcome = plan.outcomes.into_iter().next().unwrap_or(Err(StoreError::Closed))?;
        log.versions.insert(request.stream_id.clone(), outcome.stream_version);
        for record in plan.records {
            log.event_ids.insert(record.event_id);
            log.events.push(record);
        }
        // Announced while still holding the lock, so two appends can never
        // announce their heads out of order.
        self.head.send_replace(plan.head.position);
        drop(log);
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log();
        Ok(log
            .events
            .iter()
            .filter(|e| &e.stream_id == stream_id && e.stream_version > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log();
        let start = (after.0 as usize).min(log.events.len());
        Ok(log.events[start..].iter().take(limit).cloned().collect())
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(self.log().events.last().map_or(Position::START, |e| e.position))
    }

    async fn wait_for_events_after(&self, after: Position) -> Result<Position, StoreError> {
        let mut head = self.head.subscribe();
        let seen = head.wait_for(|h| *h > after).await.map_err(|_| StoreError::Closed)?;
        Ok(*seen)
    }

    async fn drop_payload(&self, position: Position) -> Result<(), StoreError> {
        let mut log = self.log();
        let index = position.0.checked_sub(1).ok_or(StoreError::NotFound(position))? as usize;
        let event = log.events.get_mut(index).ok_or(StoreError::NotFound(position))?;
        event.payload = None;
        Ok(())
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for InMemoryEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        Ok(self.log().checkpoints.get(name).copied().unwrap_or_default())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.log().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}

#[async_trait]
impl crate::nonces::NonceLedger for InMemoryEventStore {
    async fn consume(
        &self,
        nonce_id: [u8; 32],
        expires_at: crate::ids::Timestamp,
        now: crate::ids::Timestamp,
    ) -> Result<bool, StoreError> {
        self.nonces.consume(nonce_id, expires_at, now).await
    }
}
