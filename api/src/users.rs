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
    /// Applies an event whose payload retention dropped (only types it may
    /// drop reach here): by default there is nothing left to apply.
    fn evolve_compacted(_state: &mut Self::State, _recorded: &privcomm_domain::RecordedEvent) {}
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
    /// Caught up at least once (a new entry knows nothing yet).
    loaded: bool,
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
        let entry = Arc::new(tokio::sync::Mutex::new(Folded {
            state: A::State::default(),
            version: StreamVersion(0),
            loaded: false,
        }));
        cache.entries.insert(id, entry.clone());
        cache.order.push_back(id);
        entry
    }

    async fn catch_up(&self, id: A::Id, folded: &mut Folded<A::State>) -> Result<(), ApiError> {
        let stream = A::stream(id);
        loop {
            let page = self.store.read_stream(&stream, folded.version, PAGE).await?;
            for recorded in &page {
                match DomainEvent::for_fold(recorded).map_err(ApiError::internal)? {
                    Some(event) => A::evolve(&mut folded.state, recorded.stream_version, recorded.recorded_at, &event),
                    None => A::evolve_compacted(&mut folded.state, recorded),
                }
                folded.version = recorded.stream_version;
            }
            if page.len() < PAGE {
                folded.loaded = true;
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

    /// Reads from the cached state when `read` finds what it needs there
    /// without a trip to the store — for facts that never change back, such
    /// as "is registered"; otherwise catches up and reads again.
    pub async fn read_cached<R>(
        &self,
        id: A::Id,
        read: impl Fn(&A::State) -> Option<R>,
    ) -> Result<Option<R>, ApiError> {
        let entry = self.entry(id);
        let mut folded = entry.lock().await;
        if folded.loaded
            && let Some(found) = read(&folded.state)
        {
            return Ok(Some(found));
        }
        self.catch_up(id, &mut folded).await?;
        Ok(read(&folded.state))
    }

    /// Decides on the current state and appends the events at the version
    /// decided on; on a conflict, catches up and decides again. `respond`
    /// sees the state the decision was made on, the events (none when the
    /// decision was that nothing needs doing) and, if they were appended,
    /// when the store recorded them.
    ///
    /// A cached instance is decided on optimistically, without reading the
    /// store first: an append made on a stale state conflicts and is decided
    /// again after catching up, and a refusal or a "nothing to do" is only
    /// returned once confirmed on the caught-up state.
    pub async fn decide_and_append<R>(
        &self,
        id: A::Id,
        decide: impl Fn(&A::State) -> Result<Vec<DomainEvent>, ApiError>,
        respond: impl FnOnce(&A::State, &[DomainEvent], Option<Timestamp>) -> R,
    ) -> Result<R, ApiError> {
        self.decide_and_write(id, decide, Write::Versioned::<fn(&DomainEvent) -> Option<EventId>>, respond).await
    }

    /// Decides and appends without a stream-version check, for decisions
    /// that stay right whatever else the stream gains meanwhile, made
    /// idempotent by `event_id`: a deterministic id per event, so that the
    /// same fact decided twice (here and on another node) is refused by the
    /// store as a reused id. On that refusal it catches up and decides again.
    /// Refusals and "nothing to do" are confirmed on the caught-up state, as
    /// in [`Directory::decide_and_append`]; `respond` sees the state with the
    /// appended events applied.
    pub async fn append_idempotent<R>(
        &self,
        id: A::Id,
        decide: impl Fn(&A::State) -> Result<Vec<DomainEvent>, ApiError>,
        event_id: impl Fn(&DomainEvent) -> Option<EventId>,
        respond: impl FnOnce(&A::State, &[DomainEvent], Option<Timestamp>) -> R,
    ) -> Result<R, ApiError> {
        self.decide_and_write(id, decide, Write::Idempotent(event_id), respond).await
    }

    /// The loop behind both: decide on the cached state, confirm refusals and
    /// no-ops on the caught-up state, append, and on the store's "someone was
    /// first" (a version conflict, or a reused derived id) catch up and decide again.
    async fn decide_and_write<R, F: Fn(&DomainEvent) -> Option<EventId>>(
        &self,
        id: A::Id,
        decide: impl Fn(&A::State) -> Result<Vec<DomainEvent>, ApiError>,
        write: Write<F>,
        respond: impl FnOnce(&A::State, &[DomainEvent], Option<Timestamp>) -> R,
    ) -> Result<R, ApiError> {
        let entry = self.entry(id);
        let mut folded = entry.lock().await;
        let mut caught_up = false;
        for _ in 0..MAX_ATTEMPTS {
            if !folded.loaded {
                self.catch_up(id, &mut folded).await?;
                caught_up = true;
            }
            let decided = decide(&folded.state);
            if !caught_up && decided.as_ref().map_or(true, Vec::is_empty) {
                // Possibly stale: confirm on the current state.
                let before = folded.version;
                self.catch_up(id, &mut folded).await?;
                caught_up = true;
                if folded.version != before {
                    continue;
                }
            }
            let events = decided?;
            if events.is_empty() {
                return Ok(respond(&folded.state, &events, None));
            }
            let expected = match (&write, folded.version) {
                (Write::Idempotent(_), _) => ExpectedVersion::Any,
                (Write::Versioned, StreamVersion(0)) => ExpectedVersion::NoStream,
                (Write::Versioned, version) => ExpectedVersion::Exact(version),
            };
            let new_events = events
                .iter()
                .map(|event| {
                    let event_id = match &write {
                        Write::Versioned => EventId(Uuid::now_v7()),
                        Write::Idempotent(derive) => derive(event).ok_or_else(|| {
                            ApiError::internal(StoreError::InvalidAppend(
                                "an idempotent append needs derived event ids",
                            ))
                        })?,
                    };
                    event.to_new_event(event_id).map_err(ApiError::internal)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let request = AppendRequest { stream_id: A::stream(id), expected, events: new_events };
            match self.store.append(request).await {
                Ok(outcome) => {
                    self.metrics.events_appended(events.len());
                    let at = Some(outcome.recorded_at);
                    if let Write::Versioned = write {
                        // A versioned append answers on the state it was decided on.
                        let response = respond(&folded.state, &events, at);
                        self.apply_appended(id, &mut folded, &events, &outcome).await?;
                        return Ok(response);
                    }
                    self.apply_appended(id, &mut folded, &events, &outcome).await?;
                    return Ok(respond(&folded.state, &events, at));
                }
                // Another node (or an earlier try) wrote first: catch up, decide again.
                Err(error)
                    if matches!(
                        (&write, &error),
                        (Write::Versioned, StoreError::Conflict { .. })
                            | (Write::Idempotent(_), StoreError::DuplicateEventId)
                    ) =>
                {
                    self.catch_up(id, &mut folded).await?;
                    caught_up = true;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ApiError::internal(StoreError::Storage("stream too contended; gave up after retries".into())))
    }
}

impl<A: Aggregate> Directory<A> {
    /// Brings the cached state past our own append: applied directly when it
    /// follows the cached version, else (others appended in between, which
    /// only an append without a version check allows) read back in order.
    async fn apply_appended(
        &self,
        id: A::Id,
        folded: &mut Folded<A::State>,
        events: &[DomainEvent],
        outcome: &privcomm_domain::AppendOutcome,
    ) -> Result<(), ApiError> {
        let first = outcome.stream_version.0 + 1 - events.len() as u64;
        if first != folded.version.0 + 1 {
            return self.catch_up(id, folded).await;
        }
        for (offset, event) in events.iter().enumerate() {
            A::evolve(&mut folded.state, StreamVersion(first + offset as u64), outcome.recorded_at, event);
        }
        folded.version = outcome.stream_version;
        Ok(())
    }
}

/// How [`Directory::decide_and_write`] appends.
enum Write<F> {
    /// At the version decided on; a conflict means decide again.
    Versioned,
    /// Without a version check, with these derived event ids; a reused id means decide again.
    Idempotent(F),
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

#[cfg(test)]
mod tests {
    //! Two directories over one store stand for two nodes with their own caches.
    use super::*;
    use privcomm_domain::clock::ManualClock;
    use privcomm_domain::memory::InMemoryEventStore;

    /// The push tokens registered on a user stream, in order.
    struct TokenLog;

    impl Aggregate for TokenLog {
        type Id = UserId;
        type State = Vec<String>;
        fn stream(id: UserId) -> StreamId {
            StreamId::for_user(id)
        }
        fn evolve(state: &mut Vec<String>, _: StreamVersion, _: Timestamp, event: &DomainEvent) {
            if let DomainEvent::PushTokenRegistered { token, .. } = event {
                state.push(token.clone());
            }
        }
    }

    fn token(user: UserId, token: String) -> DomainEvent {
        DomainEvent::PushTokenRegistered { user_id: user, platform: "fcm".into(), token }
    }

    fn nodes() -> (Directory<TokenLog>, Directory<TokenLog>) {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new(Arc::new(ManualClock::new(Timestamp(0)))));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        (Directory::new(store.clone(), 10, metrics.clone()), Directory::new(store, 10, metrics))
    }

    /// Appends the next token, numbered after those the state holds.
    async fn append_next(node: &Directory<TokenLog>, user: UserId) -> Vec<String> {
        node.decide_and_append(user, |s| Ok(vec![token(user, format!("t{}", s.len() + 1))]), |_, e, _| e.to_vec())
            .await
            .expect("appends")
            .into_iter()
            .filter_map(|e| match e {
                DomainEvent::PushTokenRegistered { token, .. } => Some(token),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_decision_on_a_stale_cache_conflicts_and_is_made_again_on_the_current_state() {
        let (a, b) = nodes();
        let user = UserId(Uuid::from_u128(7));
        assert!(b.read(user, Vec::is_empty).await.expect("reads"), "b caches the empty stream");
        assert_eq!(append_next(&a, user).await, ["t1"]);
        // b still holds the empty state; its optimistic "t1" must not land.
        assert_eq!(append_next(&b, user).await, ["t2"]);
        assert_eq!(a.read(user, Clone::clone).await.expect("reads"), ["t1", "t2"]);
    }

    /// Registers `name` once: the event id is derived from it.
    async fn register_once(node: &Directory<TokenLog>, user: UserId, name: &str) -> (Vec<String>, bool) {
        node.append_idempotent(
            user,
            |s| Ok(if s.contains(&name.to_owned()) { vec![] } else { vec![token(user, name.to_owned())] }),
            |e| match e {
                DomainEvent::PushTokenRegistered { token, .. } => {
                    Some(EventId(Uuid::new_v5(&Uuid::NAMESPACE_OID, token.as_bytes())))
                }
                _ => None,
            },
            |s, _, at| (s.clone(), at.is_some()),
        )
        .await
        .expect("appends or finds it done")
    }

    #[tokio::test]
    async fn idempotent_appends_do_not_conflict_and_land_once() {
        let (a, b) = nodes();
        let user = UserId(Uuid::from_u128(9));
        assert!(b.read(user, Vec::is_empty).await.expect("reads"));
        // a appends twice; b's cache is stale but its append needs no version check.
        assert_eq!(register_once(&a, user, "x").await, (vec!["x".to_owned()], true));
        assert_eq!(append_next(&a, user).await, ["t2"]);
        assert_eq!(register_once(&b, user, "y").await, (vec!["x".to_owned(), "t2".to_owned(), "y".to_owned()], true));
        // The same fact decided on a's stale cache: the store refuses the id, a catches up, nothing to do.
        assert!(!register_once(&a, user, "y").await.1, "nothing appended");
        assert_eq!(a.read(user, Clone::clone).await.expect("reads"), ["x", "t2", "y"]);
    }

    #[tokio::test]
    async fn refusals_and_no_ops_are_confirmed_on_the_current_state() {
        let (a, b) = nodes();
        let user = UserId(Uuid::from_u128(8));
        assert!(b.read(user, Vec::is_empty).await.expect("reads"));
        assert_eq!(append_next(&a, user).await, ["t1"]);
        // On b's stale cache "t1" is missing; the answer must come from the store.
        let found = b
            .decide_and_append(
                user,
                |s| if s.contains(&"t1".to_owned()) { Ok(vec![]) } else { Err(ApiError::field("token", "missing")) },
                |s, events, at| (s.len(), events.len(), at),
            )
            .await
            .expect("confirmed on the current state");
        assert_eq!(found, (1, 0, None));
        assert_eq!(append_next(&a, user).await, ["t2"]);
        let cached = b.read_cached(user, |s| s.contains(&"t2".to_owned()).then_some(s.len())).await.expect("reads");
        assert_eq!(cached, Some(2), "not in the cache, so read from the store");
    }
}
