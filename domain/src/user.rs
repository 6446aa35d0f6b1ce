//! The user aggregate: identity, signed prekey and the one-time prekey pools
//! of one user, kept in the stream `user-<id>`.
//!
//! `decide` is a pure function of state and command that returns events or a
//! [`DomainError`]; `evolve` applies an event and cannot fail. Signatures are
//! verified before a command is built (the API holds libsignal); the domain
//! enforces the rules that need the user's history.

use crate::events::{DomainEvent, IdentityKeys, KyberClaim, KyberPreKey, OneTimePreKey, SignedPreKey};
use crate::ids::{KyberPreKeyId, PhoneHash, PreKeyId, UserId};
use std::collections::BTreeMap;

/// At most this many one-time keys of each kind in one registration or upload.
pub const MAX_PREKEYS_PER_UPLOAD: usize = 100;

/// At most this many unused one-time keys of each kind held for a user, so a
/// client cannot grow its pool (and our storage) without bound.
pub const MAX_PREKEYS_HELD: usize = 1_000;

/// Errors a user command can be refused with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The user stream already holds a registration.
    #[error("this phone hash is already registered")]
    AlreadyRegistered,
    /// The command needs a registered user.
    #[error("user is not registered")]
    NotRegistered,
    /// More keys than one request may carry.
    #[error("at most {max} {kind} prekeys per request")]
    TooManyPreKeys {
        /// `one_time` or `kyber`.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The pool would exceed [`MAX_PREKEYS_HELD`].
    #[error("at most {max} unused {kind} prekeys may be held")]
    PreKeyPoolFull {
        /// `one_time` or `kyber`.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// A key id is repeated in the request or already in the pool.
    #[error("{kind} prekey id {id} is already in use")]
    DuplicatePreKeyId {
        /// `one_time` or `kyber`.
        kind: &'static str,
        /// The id.
        id: u32,
    },
    /// An upload with nothing in it.
    #[error("nothing to upload")]
    EmptyUpload,
}

/// A registration or identity change, after its signatures were verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The user id (assigned by the server for a new user).
    pub user_id: UserId,
    /// SHA-256 of the phone number.
    pub phone_hash: PhoneHash,
    /// Identity, signed prekey and Kyber last-resort key.
    pub keys: IdentityKeys,
    /// Initial one-time EC prekeys.
    pub one_time_prekeys: Vec<OneTimePreKey>,
    /// Initial one-time Kyber prekeys.
    pub kyber_prekeys: Vec<KyberPreKey>,
}

/// Commands on one user's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserCommand {
    /// First registration of a phone hash.
    Register(Registration),
    /// Re-registration by the holder of the current identity key.
    ChangeIdentity(Registration),
    /// Add one-time keys to the pools.
    UploadPreKeys {
        /// EC keys.
        one_time_prekeys: Vec<OneTimePreKey>,
        /// Kyber keys.
        kyber_prekeys: Vec<KyberPreKey>,
    },
    /// Replace the signed prekey (and optionally the Kyber last-resort key).
    RotateSignedPreKey {
        /// New signed prekey.
        signed_prekey: SignedPreKey,
        /// New last-resort key.
        kyber_last_resort: Option<KyberPreKey>,
    },
    /// Hand out a bundle to `claimed_by`, consuming one key of each pool.
    ClaimPreKeys {
        /// The requester.
        claimed_by: UserId,
    },
    /// Register (or replace) the push token for offline notifications.
    /// Record the unused pools as they stand ([`DomainEvent::PreKeysCompacted`]),
    /// so retention may drop the payloads of the uploads before it.
    CompactPreKeys,
    RegisterPushToken {
        /// `fcm`, `apns`, …
        platform: String,
        /// The platform's device token.
        token: String,
    },
}

/// A registered user's write-side state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredUser {
    /// The user.
    pub user_id: UserId,
    /// SHA-256 of the phone number.
    pub phone_hash: PhoneHash,
    /// Current identity and long-lived keys.
    pub keys: IdentityKeys,
    /// Unused one-time EC prekeys, handed out lowest id first.
    pub one_time_prekeys: BTreeMap<PreKeyId, OneTimePreKey>,
    /// Unused one-time Kyber prekeys, handed out lowest id first.
    pub kyber_prekeys: BTreeMap<KyberPreKeyId, KyberPreKey>,
    /// Where to send "you have mail" while the user is offline.
    pub push: Option<PushTarget>,
}

/// A device's push registration.
#[derive(Clone, PartialEq, Eq)]
pub struct PushTarget {
    /// `fcm` or `apns`.
    pub platform: String,
    /// The platform's device token.
    pub token: String,
}

impl std::fmt::Debug for PushTarget {
    // A device token addresses one phone: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushTarget").field("platform", &self.platform).field("token", &"…").finish()
    }
}

/// The state folded from a user stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserState {
    /// `None` until `UserRegistered`.
    pub registered: Option<RegisteredUser>,
}

/// Decides what a command does to a user, as events.
pub fn decide(state: &UserState, command: &UserCommand) -> Result<Vec<DomainEvent>, DomainError> {
    match (command, &state.registered) {
        (UserCommand::Register(_), Some(_)) => Err(DomainError::AlreadyRegistered),
        (UserCommand::Register(registration), None) => {
            let mut events = vec![DomainEvent::UserRegistered {
                user_id: registration.user_id,
                phone_hash: registration.phone_hash.clone(),
                keys: registration.keys.clone(),
            }];
            events.extend(upload_events(None, &registration.one_time_prekeys, &registration.kyber_prekeys)?);
            Ok(events)
        }
        (UserCommand::ChangeIdentity(registration), Some(_)) => {
            let mut events = vec![DomainEvent::IdentityKeyChanged {
                user_id: registration.user_id,
                keys: registration.keys.clone(),
            }];
            // The old pools are void after the change, so the new keys are checked against empty pools.
            events.extend(upload_events(None, &registration.one_time_prekeys, &registration.kyber_prekeys)?);
            Ok(events)
        }
        (_, None) => Err(DomainError::NotRegistered),
        (UserCommand::UploadPreKeys { one_time_prekeys, kyber_prekeys }, Some(user)) => {
            if one_time_prekeys.is_empty() && kyber_prekeys.is_empty() {
                return Err(DomainError::EmptyUpload);
            }
            upload_events(Some(user), one_time_prekeys, kyber_prekeys)
        }
        (UserCommand::RotateSignedPreKey { signed_prekey, kyber_last_resort }, Some(_)) => {
            Ok(vec![DomainEvent::SignedPreKeyRotated {
                signed_prekey: signed_prekey.clone(),
                kyber_last_resort: kyber_last_resort.clone(),
            }])
        }
        (UserCommand::RegisterPushToken { platform, token }, Some(user)) => {
            Ok(vec![DomainEvent::PushTokenRegistered {
                user_id: user.user_id,
                platform: platform.clone(),
                token: token.clone(),
            }])
        }
        (UserCommand::CompactPreKeys, Some(user)) => Ok(vec![DomainEvent::PreKeysCompacted {
            one_time_prekeys: user.one_time_prekeys.values().cloned().collect(),
            kyber_prekeys: user.kyber_prekeys.values().cloned().collect(),
        }]),
        (UserCommand::ClaimPreKeys { claimed_by }, Some(user)) => {
            let kyber = match user.kyber_prekeys.keys().next() {
                Some(id) => KyberClaim::OneTime(*id),
                None => KyberClaim::LastResort(user.keys.kyber_last_resort.id),
            };
            Ok(vec![DomainEvent::PreKeyClaimed {
                claimed_by: *claimed_by,
                one_time_prekey: user.one_time_prekeys.keys().next().copied(),
                kyber,
            }])
        }
    }
}

fn upload_events(
    user: Option<&RegisteredUser>,
    one_time: &[OneTimePreKey],
    kyber: &[KyberPreKey],
) -> Result<Vec<DomainEvent>, DomainError> {
    let held_one_time: Vec<u32> = user.map(|u| u.one_time_prekeys.keys().map(|k| k.0).collect()).unwrap_or_default();
    let held_kyber: Vec<u32> = user.map(|u| u.kyber_prekeys.keys().map(|k| k.0).collect()).unwrap_or_default();
    check_pool("one_time", &held_one_time, one_time.iter().map(|k| k.id.0))?;
    check_pool("kyber", &held_kyber, kyber.iter().map(|k| k.id.0))?;
    let mut events = Vec::new();
    if !one_time.is_empty() {
        events.push(DomainEvent::OneTimePreKeysUploaded { prekeys: one_time.to_vec() });
    }
    if !kyber.is_empty() {
        events.push(DomainEvent::KyberPreKeysUploaded { prekeys: kyber.to_vec() });
    }
    Ok(events)
}

fn check_pool(
    kind: &'static str,
    held: &[u32],
    new_ids: impl ExactSizeIterator<Item = u32>,
) -> Result<(), DomainError> {
    if new_ids.len() > MAX_PREKEYS_PER_UPLOAD {
        return Err(DomainError::TooManyPreKeys { kind, max: MAX_PREKEYS_PER_UPLOAD });
    }
    if held.len() + new_ids.len() > MAX_PREKEYS_HELD {
        return Err(DomainError::PreKeyPoolFull { kind, max: MAX_PREKEYS_HELD });
    }
    let mut seen: std::collections::BTreeSet<u32> = held.iter().copied().collect();
    for id in new_ids {
        if !seen.insert(id) {
            return Err(DomainError::DuplicatePreKeyId { kind, id });
        }
    }
    Ok(())
}

/// Applies one event to the state. Events of other aggregates are ignored.
pub fn evolve(state: &mut UserState, event: &DomainEvent) {
    match event {
        DomainEvent::UserRegistered { user_id, phone_hash, keys } => {
            state.registered = Some(RegisteredUser {
                user_id: *user_id,
                phone_hash: phone_hash.clone(),
                keys: keys.clone(),
                one_time_prekeys: BTreeMap::new(),
                kyber_prekeys: BTreeMap::new(),
                push: None,
            });
        }
        DomainEvent::IdentityKeyChanged { keys, .. } => {
            if let Some(user) = &mut state.registered {
                user.keys = keys.clone();
                user.one_time_prekeys.clear();
                user.kyber_prekeys.clear();
                // A new identity is a new device: the old one's token must not ring.
                user.push = None;
            }
        }
        DomainEvent::SignedPreKeyRotated { signed_prekey, kyber_last_resort } => {
            if let Some(user) = &mut state.registered {
                user.keys.signed_prekey = signed_prekey.clone();
                if let Some(last_resort) = kyber_last_resort {
                    user.keys.kyber_last_resort = last_resort.clone();
                }
            }
        }
        DomainEvent::OneTimePreKeysUploaded { prekeys } => {
            if let Some(user) = &mut state.registered {
                user.one_time_prekeys.extend(prekeys.iter().map(|k| (k.id, k.clone())));
            }
        }
        DomainEvent::KyberPreKeysUploaded { prekeys } => {
            if let Some(user) = &mut state.registered {
                user.kyber_prekeys.extend(prekeys.iter().map(|k| (k.id, k.clone())));
            }
        }
        DomainEvent::PreKeyClaimed { one_time_prekey, kyber, .. } => {
            if let Some(user) = &mut state.registered {
                if let Some(id) = one_time_prekey {
                    user.one_time_prekeys.remove(id);
                }
                if let KyberClaim::OneTime(id) = kyber {
                    user.kyber_prekeys.remove(id);
                }
            }
        }
        DomainEvent::PreKeysCompacted { one_time_prekeys, kyber_prekeys } => {
            // Uploads before this event may have lost their payloads: the pools are exactly these.
            if let Some(user) = &mut state.registered {
                user.one_time_prekeys = one_time_prekeys.iter().map(|k| (k.id, k.clone())).collect();
                user.kyber_prekeys = kyber_prekeys.iter().map(|k| (k.id, k.clone())).collect();
            }
        }
        DomainEvent::PushTokenRegistered { platform, token, .. } => {
            if let Some(user) = &mut state.registered {
                user.push = Some(PushTarget { platform: platform.clone(), token: token.clone() });
            }
        }
        DomainEvent::MessageAccepted { .. }
        | DomainEvent::MessageDelivered { .. }
        | DomainEvent::MessageExpired { .. }
        | DomainEvent::EventsCompacted { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    //! Given events, when a command, then events or an error.
    use super::*;
    use crate::events::Bytes;
    use crate::ids::{KyberPreKeyId, RegistrationId, SignedPreKeyId};
    use uuid::Uuid;

    struct Scenario {
        state: UserState,
    }

    fn given(events: Vec<DomainEvent>) -> Scenario {
        let mut state = UserState::default();
        for event in &events {
            evolve(&mut state, event);
        }
        Scenario { state }
    }

    impl Scenario {
        fn when(&self, command: UserCommand) -> Result<Vec<DomainEvent>, DomainError> {
            decide(&self.state, &command)
        }
    }

    fn alice() -> UserId {
        UserId(Uuid::from_u128(1))
    }
    fn bob() -> UserId {
        UserId(Uuid::from_u128(2))
    }

    fn keys(seed: u8) -> IdentityKeys {
        IdentityKeys {
            registration_id: RegistrationId(u32::from(seed)),
            identity_key: Bytes(vec![seed; 33]),
            signed_prekey: SignedPreKey {
                id: SignedPreKeyId(1),
                public_key: Bytes(vec![seed; 33]),
                signature: Bytes(vec![seed; 64]),
            },
            kyber_last_resort: KyberPreKey {
                id: KyberPreKeyId(900),
                public_key: Bytes(vec![seed; 1569]),
                signature: Bytes(vec![seed; 64]),
            },
        }
    }

    fn one_time(ids: std::ops::Range<u32>) -> Vec<OneTimePreKey> {
        ids.map(|id| OneTimePreKey { id: PreKeyId(id), public_key: Bytes(vec![1; 33]) }).collect()
    }

    fn kyber(ids: std::ops::Range<u32>) -> Vec<KyberPreKey> {
        ids.map(|id| KyberPreKey {
            id: KyberPreKeyId(id),
            public_key: Bytes(vec![2; 1569]),
            signature: Bytes(vec![3; 64]),
        })
        .collect()
    }

    fn phone() -> PhoneHash {
        PhoneHash::new("ab".repeat(32)).expect("valid hash")
    }

    fn registration(one: std::ops::Range<u32>, ky: std::ops::Range<u32>) -> Registration {
        Registration {
            user_id: alice(),
            phone_hash: phone(),
            keys: keys(7),
            one_time_prekeys: one_time(one),
            kyber_prekeys: kyber(ky),
        }
    }

    fn registered(one: std::ops::Range<u32>, ky: std::ops::Range<u32>) -> Vec<DomainEvent> {
        let mut events = vec![DomainEvent::UserRegistered { user_id: alice(), phone_hash: phone(), keys: keys(7) }];
        if !one.is_empty() {
            events.push(DomainEvent::OneTimePreKeysUploaded { prekeys: one_time(one) });
        }
        if !ky.is_empty() {
            events.push(DomainEvent::KyberPreKeysUploaded { prekeys: kyber(ky) });
        }
        events
    }

    #[test]
    fn registering_a_new_user_records_identity_and_both_pools() {
        let events = given(vec![]).when(UserCommand::Register(registration(1..3, 10..12)));
        assert_eq!(events, Ok(registered(1..3, 10..12)));
    }

    #[test]
    fn a_duplicate_registration_is_rejected() {
        let result = given(registered(1..3, 10..12)).when(UserCommand::Register(registration(5..6, 20..21)));
        assert_eq!(result, Err(DomainError::AlreadyRegistered));
    }

    #[test]
    fn an_identity_change_voids_the_old_pools() {
        let mut change = registration(50..51, 60..61);
        change.keys = keys(9);
        let scenario = given(registered(1..3, 10..12));
        let events = scenario.when(UserCommand::ChangeIdentity(change)).expect("change accepted");
        assert_eq!(events[0], DomainEvent::IdentityKeyChanged { user_id: alice(), keys: keys(9) });
        let mut state = scenario.state.clone();
        events.iter().for_each(|e| evolve(&mut state, e));
        let user = state.registered.expect("still registered");
        assert_eq!(user.one_time_prekeys.keys().copied().collect::<Vec<_>>(), vec![PreKeyId(50)]);
        assert_eq!(user.kyber_prekeys.keys().copied().collect::<Vec<_>>(), vec![KyberPreKeyId(60)]);
    }

    #[test]
    fn a_claim_takes_the_lowest_one_time_key_of_each_pool() {
        let result = given(registered(5..8, 20..22)).when(UserCommand::ClaimPreKeys { claimed_by: bob() });
        assert_eq!(
            result,
            Ok(vec![DomainEvent::PreKeyClaimed {
                claimed_by: bob(),
                one_time_prekey: Some(PreKeyId(5)),
                kyber: KyberClaim::OneTime(KyberPreKeyId(20)),
            }])
        );
    }

    #[test]
    fn a_claimed_key_is_never_handed_out_again() {
        let mut history = registered(5..6, 20..21);
        history.push(DomainEvent::PreKeyClaimed {
            claimed_by: bob(),
            one_time_prekey: Some(PreKeyId(5)),
            kyber: KyberClaim::OneTime(KyberPreKeyId(20)),
        });
        let result = given(history).when(UserCommand::ClaimPreKeys { claimed_by: bob() });
        assert_eq!(
            result,
            Ok(vec![DomainEvent::PreKeyClaimed {
                claimed_by: bob(),
                one_time_prekey: None,
                kyber: KyberClaim::LastResort(KyberPreKeyId(900)),
            }])
        );
    }

    #[test]
    fn claiming_from_empty_pools_yields_the_last_resort_path() {
        let result = given(registered(0..0, 0..0)).when(UserCommand::ClaimPreKeys { claimed_by: bob() });
        assert_eq!(
            result,
            Ok(vec![DomainEvent::PreKeyClaimed {
                claimed_by: bob(),
                one_time_prekey: None,
                kyber: KyberClaim::LastResort(KyberPreKeyId(900)),
            }])
        );
    }

    #[test]
    fn claiming_from_an_unregistered_user_is_refused() {
        let result = given(vec![]).when(UserCommand::ClaimPreKeys { claimed_by: bob() });
        assert_eq!(result, Err(DomainError::NotRegistered));
    }

    #[test]
    fn uploads_refuse_repeated_ids_oversize_batches_and_emptiness() {
        let scenario = given(registered(1..3, 10..11));
        let upload = |one, ky| UserCommand::UploadPreKeys { one_time_prekeys: one, kyber_prekeys: ky };
        assert_eq!(
            scenario.when(upload(one_time(2..4), vec![])),
            Err(DomainError::DuplicatePreKeyId { kind: "one_time", id: 2 })
        );
        assert_eq!(
            scenario.when(upload(vec![], kyber(100..201))),
            Err(DomainError::TooManyPreKeys { kind: "kyber", max: 100 })
        );
        assert_eq!(scenario.when(upload(vec![], vec![])), Err(DomainError::EmptyUpload));
        assert_eq!(
            scenario.when(upload(one_time(3..5), vec![])),
            Ok(vec![DomainEvent::OneTimePreKeysUploaded { prekeys: one_time(3..5) }])
        );
    }

    #[test]
    fn the_latest_push_token_is_kept_until_the_identity_changes() {
        let token =
            |t: &str| DomainEvent::PushTokenRegistered { user_id: alice(), platform: "fcm".into(), token: t.into() };
        let mut history = registered(1..2, 1..2);
        history.extend([token("first"), token("second")]);
        let scenario = given(history.clone());
        let push = scenario.state.registered.as_ref().and_then(|u| u.push.clone());
        assert_eq!(push, Some(PushTarget { platform: "fcm".into(), token: "second".into() }));
        assert!(!format!("{push:?}").contains("second"), "a device token must not reach logs");
        history.push(DomainEvent::IdentityKeyChanged { user_id: alice(), keys: keys(3) });
        assert_eq!(given(history).state.registered.and_then(|u| u.push), None);
    }

    #[test]
    fn a_registration_with_more_than_100_prekeys_is_refused() {
        let result = given(vec![]).when(UserCommand::Register(registration(0..101, 0..0)));
        assert_eq!(result, Err(DomainError::TooManyPreKeys { kind: "one_time", max: 100 }));
    }

    #[test]
    fn compacted_pools_fold_to_the_same_state_without_the_uploads_before_them() {
        let mut history = registered(1..6, 10..13);
        history.push(DomainEvent::PreKeyClaimed {
            claimed_by: bob(),
            one_time_prekey: Some(PreKeyId(1)),
            kyber: KyberClaim::OneTime(KyberPreKeyId(10)),
        });
        let events = given(history.clone()).when(UserCommand::CompactPreKeys).expect("registered");
        assert_eq!(
            events,
            vec![DomainEvent::PreKeysCompacted { one_time_prekeys: one_time(2..6), kyber_prekeys: kyber(11..13) }]
        );
        let full = given([history.clone(), events.clone()].concat()).state;
        // Retention dropped the upload payloads: the fold skips them, and claims of keys it never saw.
        let without_uploads: Vec<DomainEvent> = history
            .into_iter()
            .filter(|e| {
                !matches!(e, DomainEvent::OneTimePreKeysUploaded { .. } | DomainEvent::KyberPreKeysUploaded { .. })
            })
            .chain(events)
            .collect();
        assert_eq!(given(without_uploads).state, full);
        assert_eq!(
            given(vec![]).when(UserCommand::CompactPreKeys),
            Err(DomainError::NotRegistered),
            "nothing to record for an unknown user"
        );
    }

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        use crate::envelope::Hash;
        use crate::ids::{EventId, MessageId, Position, StreamId, StreamVersion, Timestamp};
        let mut all = registered(1..3, 10..12);
        all.extend([
            DomainEvent::IdentityKeyChanged { user_id: alice(), keys: keys(3) },
            DomainEvent::SignedPreKeyRotated { signed_prekey: keys(4).signed_prekey, kyber_last_resort: None },
            DomainEvent::PreKeyClaimed {
                claimed_by: bob(),
                one_time_prekey: None,
                kyber: KyberClaim::LastResort(KyberPreKeyId(9)),
            },
            DomainEvent::MessageAccepted {
                message_id: MessageId(Uuid::from_u128(5)),
                sender: alice(),
                recipient: bob(),
                kind: "whisper".into(),
                body: Bytes(vec![9; 40]),
            },
            DomainEvent::MessageDelivered { message_id: MessageId(Uuid::from_u128(5)), recipient: bob() },
            DomainEvent::MessageExpired { message_id: MessageId(Uuid::from_u128(6)), recipient: bob() },
            DomainEvent::PushTokenRegistered { user_id: alice(), platform: "fcm".into(), token: "t".into() },
            DomainEvent::PreKeysCompacted { one_time_prekeys: one_time(4..6), kyber_prekeys: kyber(7..8) },
            DomainEvent::EventsCompacted { positions: vec![Position(3), Position(10)] },
        ]);
        for event in all {
            let new = event.to_new_event(EventId(Uuid::from_u128(42))).expect("serializes");
            let recorded = crate::envelope::RecordedEvent {
                position: Position(1),
                stream_id: StreamId::for_user(alice()),
                stream_version: StreamVersion(1),
                event_id: new.event_id,
                event_type: new.event_type.clone(),
                schema_version: new.schema_version,
                recorded_at: Timestamp(0),
                payload: Some(new.payload.clone()),
                payload_hash: Hash::of(&new.payload),
                prev_hash: Hash::GENESIS,
                hash: Hash::GENESIS,
            };
            assert_eq!(DomainEvent::from_recorded(&recorded).expect("decodes"), event);
        }
    }
}
