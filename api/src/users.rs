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
//! reading only the events after the cached version. A per-instance async
//! lock keeps one node from racing itself; other nodes are handled by the
//! conflict-and-retry above (ADR 0005). [`Directory`] does this for any
//! [`Aggregate`]; users and mailboxes are two.

use crate::error::ApiError;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::user::{UserCommand, UserState, decide, evolve};
use privcomm_domain::{
    AppendRequest, EventId, EventStore, ExpectedVersion, StoreError, StreamId, StreamVersion, Timestamp, UserId,
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

/// An aggregate folded from one stream per id.
pub trait Aggregate: Send + Sync + 'static {
    /// What names one instance (a user id, a recipient).
    type Id: Copy + Eq + std::hash::Hash + Send + Sync + 'static;
    /// The folded state.
    type State: Default + Send + 'static;
    /// The stream of an instance.
    fn stream(id: Self::Id) -> StreamId;
    /// Applies one event recorded at `version` and time `recorded_at`.
    fn evolve(state: &mut Self::State, version: StreamVersion, recorded_at: Timestamp, event: &DomainEvent);
}

/// The user aggregate (`user-<id>`).
pub struct Users;

impl Aggregate for Users {
    type Id = UserId;
    type State = UserState;
    fn stream(id: UserId) -> StreamId {
        StreamId::for_user(id)
    }
    fn evolve(state: &mut UserState, _version: StreamVersion, _recorded_at: Timestamp, event: &DomainEvent) {
        evolve(state, event);
    }
}

struct Folded<S> {
    state: S,
    version: StreamVersion,
}

/// Bounded cache of folded aggregates over the event store.
pub struct Directory<A: Aggregate> {
    store: Arc<dyn EventStore>,
    capacity: usize,
    cache: Mutex<Cache<A>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The user aggregates.
pub type UserDirectory = Directory<Users>;

/// One cached instance, locked while it is read or decided on.
type Entry<S> = Arc<tokio::sync::Mutex<Folded<S>>>;

struct Cache<A: Aggregate> {
    entries: HashMap<A::Id, Entry<A::State>>,
    order: VecDeque<A::Id>,
}

impl<A: Aggregate> Directory<A> {
    /// A directory caching at most `capacity` instances.
    pub fn new(store: Arc<dyn EventStore>, capacity: usize, metrics: Arc<crate::metrics::Metrics>) -> Directory<A> {
        let cache = Cache { entries: HashMap::new(), order: VecDeque::new() };
        Directory { store, capacity: capacity.max(1), cache: Mutex::new(cache), metrics }
    }

    fn entry(&self, id: A::Id) -> Entry<A::State> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = cache.entries.get(&id) {
            return entry.clone();
        }
        while cache.entries.len() >= self.capacity {
            let Some(oldest) = cache.order.pop_front() else { break };
            cache.entries.remove(&oldest);
        }
        let entry = Arc::new(tokio::sync::Mutex::new(Folded { state: A::State::default(), version: StreamVersion(0) }));
        cache.entries.insert(id, entry.clone());
        cache.order.push_back(id);
        entry
    }

    async fn catch_up(&self, id: A::Id, folded: &mut Folded<A::State>) -> Result<(), ApiError> {
        let stream = A::stream(id);
        loop {
            let page = self.store.read_stream(&stream, folded.version, PAGE).await?;
            for recorded in &page {
                let event = DomainEvent::from_recorded(recorded).map_err(ApiError::internal)?;
                A::evolve(&mut folded.state, recorded.stream_version, recorded.recorded_at, &event);
                folded.version = recorded.stream_version;
            }
            if page.len() < PAGE {
                return Ok(());
            }
        }
    }

    /// Reads the current state of an instance.
    pub async fn read<R>(&self, id: A::Id, read: impl FnOnce(&A::State) -> R) -> Result<R, ApiError> {
        let entry = self.entry(id);
        let mut folded = entry.lock().await;
        self.catch_up(id, &mut folded).await?;
        Ok(read(&folded.state))
    }

    /// Decides on the current state and appends the events at the version
    /// decided on; on a conflict, catches up and decides again. `respond`
    /// sees the state the decision was made on, the events (none when the
    /// decision was that nothing needs doing) and, if they were appended,
    /// when the store recorded them.
    pub async fn decide_and_append<R>(
        &self,
        id: A::Id,
        decide: impl Fn(&A::State) -> Result<Vec<DomainEvent>, ApiError>,
        respond: impl FnOnce(&A::State, &[DomainEvent], Option<Timestamp>) -> R,
    ) -> Result<R, ApiError> {
        let entry = self.entry(id);
        let mut folded = entry.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            self.catch_up(id, &mut folded).await?;
            let events = decide(&folded.state)?;
            if events.is_empty() {
                return Ok(respond(&folded.state, &events, None));
            }
            let new_events = events
                .iter()
                .map(|event| event.to_new_event(EventId(Uuid::now_v7())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ApiError::internal)?;
            let expected = match folded.version {
                StreamVersion(0) => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
            let request = AppendRequest { stream_id: A::stream(id), expected, events: new_events };
            match self.store.append(request).await {
                Ok(outcome) => {
                    self.metrics.events_appended(events.len());
                    let response = respond(&folded.state, &events, Some(outcome.recorded_at));
                    let first = outcome.stream_version.0 + 1 - events.len() as u64;
                    for (offset, event) in events.iter().enumerate() {
                        A::evolve(&mut folded.state, StreamVersion(first + offset as u64), outcome.recorded_at, event);
                    }
                    folded.version = outcome.stream_version;
                    return Ok(response);
                }
                Err(StoreError::Conflict { .. }) => continue, // another node wrote first: catch up, decide again
                Err(error) => return Err(error.into()),
            }
        }
        Err(ApiError::internal(StoreError::Storage("stream too contended; gave up after retries".into())))
    }
}

impl Directory<Users> {
    /// The user's current identity key, or `None` if not registered.
    pub async fn identity_key(&self, user: UserId) -> Result<Option<libsignal_protocol::IdentityKey>, ApiError> {
        let stored = self.read(user, |s| s.registered.as_ref().map(|u| u.keys.identity_key.0.clone())).await?;
        // Stored keys were validated on the way in; failing to decode one is corruption.
        stored.map(|bytes| libsignal_protocol::IdentityKey::decode(&bytes).map_err(ApiError::internal)).transpose()
    }

    /// Decides a user command and appends the result.
    pub async fn execute<R>(
        &self,
        user: UserId,
        command: &UserCommand,
        respond: impl FnOnce(&UserState, &[DomainEvent]) -> R,
    ) -> Result<R, ApiError> {
        self.decide_and_append(user, |state| Ok(decide(state, command)?), |state, events, _| respond(state, events))
            .await
    }
}
