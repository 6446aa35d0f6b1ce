//! The write side of users: load the aggregate, decide, append with the
//! version it was decided on.
//!
//! Decisions that must be exact (which one-time prekey is still free) are
//! made on the aggregate folded from the user's own stream and appended with
//! `ExpectedVersion::Exact`: if anything was appended in between — by this
//! node or another — the append conflicts, the aggregate catches up and the
//! command is decided again. Never an eventually consistent projection.
//!
//! Folded aggregates are cached (bounded) and refreshed incrementally by
//! reading only the events after the cached version. A per-user async lock
//! keeps one node from racing itself; other nodes are handled by the
//! conflict-and-retry above (ADR 0005).

use crate::error::ApiError;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::user::{UserCommand, UserState, decide, evolve};
use privcomm_domain::{
    AppendRequest, EventId, EventStore, ExpectedVersion, StoreError, StreamId, StreamVersion, UserId,
};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// How often a conflicting command is decided again before giving up.
const MAX_ATTEMPTS: usize = 16;

/// Events read per page while catching up.
const PAGE: usize = 500;

/// The namespace of user ids derived from phone hashes (UUIDv5).
const USER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7072_6976_636f_6d6d_2d75_7365_7273_0001);

/// The user id of a phone hash: deterministic, so a second registration of
/// the same phone hash lands on the same stream and conflicts exactly.
pub fn user_id_for(phone_hash: &privcomm_domain::ids::PhoneHash) -> UserId {
    UserId(Uuid::new_v5(&USER_ID_NAMESPACE, phone_hash.as_str().as_bytes()))
}

struct Folded {
    state: UserState,
    version: StreamVersion,
}

/// Bounded cache of folded user aggregates over the event store.
pub struct UserDirectory {
    store: Arc<dyn EventStore>,
    capacity: usize,
    cache: Mutex<Cache>,
    metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<UserId, Arc<tokio::sync::Mutex<Folded>>>,
    order: VecDeque<UserId>,
}

impl UserDirectory {
    /// A directory caching at most `capacity` users.
    pub fn new(store: Arc<dyn EventStore>, capacity: usize, metrics: Arc<crate::metrics::Metrics>) -> UserDirectory {
        UserDirectory { store, capacity: capacity.max(1), cache: Mutex::new(Cache::default()), metrics }
    }

    fn entry(&self, user: UserId) -> Arc<tokio::sync::Mutex<Folded>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = cache.entries.get(&user) {
            return entry.clone();
        }
        while cache.entries.len() >= self.capacity {
            let Some(oldest) = cache.order.pop_front() else { break };
            cache.entries.remove(&oldest);
        }
        let entry =
            Arc::new(tokio::sync::Mutex::new(Folded { state: UserState::default(), version: StreamVersion(0) }));
        cache.entries.insert(user, entry.clone());
        cache.order.push_back(user);
        entry
    }

    async fn catch_up(&self, user: UserId, folded: &mut Folded) -> Result<(), ApiError> {
        let stream = StreamId::for_user(user);
        loop {
            let page = self.store.read_stream(&stream, folded.version, PAGE).await?;
            for recorded in &page {
                let event = DomainEvent::from_recorded(recorded).map_err(ApiError::internal)?;
                evolve(&mut folded.state, &event);
                folded.version = recorded.stream_version;
            }
            if page.len() < PAGE {
                return Ok(());
            }
        }
    }

    /// Reads the current state of a user.
    pub async fn read<R>(&self, user: UserId, read: impl FnOnce(&UserState) -> R) -> Result<R, ApiError> {
        let entry = self.entry(user);
        let mut folded = entry.lock().await;
        self.catch_up(user, &mut folded).await?;
        Ok(read(&folded.state))
    }

    /// The user's current identity key, or `None` if not registered.
    pub async fn identity_key(&self, user: UserId) -> Result<Option<libsignal_protocol::IdentityKey>, ApiError> {
        let stored = self.read(user, |s| s.registered.as_ref().map(|u| u.keys.identity_key.0.clone())).await?;
        // Stored keys were validated on the way in; failing to decode one is corruption.
        stored.map(|bytes| libsignal_protocol::IdentityKey::decode(&bytes).map_err(ApiError::internal)).transpose()
    }

    /// Decides `command` on the user's current state and appends the result.
    /// `respond` sees the state the decision was made on and the events.
    pub async fn execute<R>(
        &self,
        user: UserId,
        command: &UserCommand,
        respond: impl FnOnce(&UserState, &[DomainEvent]) -> R,
    ) -> Result<R, ApiError> {
        let entry = self.entry(user);
        let mut folded = entry.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            self.catch_up(user, &mut folded).await?;
            let events = decide(&folded.state, command)?;
            let new_events = events
                .iter()
                .map(|event| event.to_new_event(EventId(Uuid::now_v7())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ApiError::internal)?;
            let expected = match folded.version {
                StreamVersion(0) => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
            let request = AppendRequest { stream_id: StreamId::for_user(user), expected, events: new_events };
            match self.store.append(request).await {
                Ok(outcome) => {
                    self.metrics.events_appended(events.len());
                    let response = respond(&folded.state, &events);
                    for event in &events {
                        evolve(&mut folded.state, event);
                    }
                    folded.version = outcome.stream_version;
                    return Ok(response);
                }
                Err(StoreError::Conflict { .. }) => continue, // another node wrote first: catch up, decide again
                Err(error) => return Err(error.into()),
            }
        }
        Err(ApiError::internal(StoreError::Storage("user stream too contended; gave up after retries".into())))
    }
}
