//! Domain events: the stored contract. Names are past tense; each type has an
//! explicit `event_type` and `schema_version`, and decoding checks both.

use crate::envelope::{NewEvent, RecordedEvent};
use crate::ids::{
    EventId, KyberPreKeyId, MessageId, PhoneHash, Position, PreKeyId, RegistrationId, SignedPreKeyId, UserId,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Opaque bytes (public keys, signatures, ciphertext) that travel as standard
/// Base64 in JSON.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Length only: key material and ciphertext stay out of debug output and logs.
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map(Bytes).map_err(serde::de::Error::custom)
    }
}

/// A signed EC prekey as published (the server has verified its signature).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPreKey {
    /// Key id.
    pub id: SignedPreKeyId,
    /// Serialized public key.
    pub public_key: Bytes,
    /// Identity-key signature over the public key.
    pub signature: Bytes,
}

/// A Kyber prekey (one-time or last-resort), signed by the identity key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KyberPreKey {
    /// Key id.
    pub id: KyberPreKeyId,
    /// Serialized Kyber public key.
    pub public_key: Bytes,
    /// Identity-key signature over the public key.
    pub signature: Bytes,
}

/// A one-time EC prekey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePreKey {
    /// Key id.
    pub id: PreKeyId,
    /// Serialized public key.
    pub public_key: Bytes,
}

/// The identity part of a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityKeys {
    /// libsignal registration id.
    pub registration_id: RegistrationId,
    /// Serialized identity public key.
    pub identity_key: Bytes,
    /// Current signed prekey.
    pub signed_prekey: SignedPreKey,
    /// Kyber last-resort prekey, handed out when no one-time Kyber key is left.
    pub kyber_last_resort: KyberPreKey,
}

/// Which Kyber key a claim handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum KyberClaim {
    /// A one-time Kyber prekey, now used.
    OneTime(KyberPreKeyId),
    /// The last-resort key (the pool was empty).
    LastResort(KyberPreKeyId),
}

/// Every event privcomm records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainEvent {
    /// A phone hash was registered with its first identity.
    UserRegistered {
        /// The new user.
        user_id: UserId,
        /// SHA-256 of the phone number.
        phone_hash: PhoneHash,
        /// Keys.
        keys: IdentityKeys,
    },
    /// A registered user proved possession of the current identity and
    /// installed a new one; every unused one-time prekey is void.
    IdentityKeyChanged {
        /// The user.
        user_id: UserId,
        /// The new keys.
        keys: IdentityKeys,
    },
    /// The signed prekey (and possibly the Kyber last-resort key) was replaced.
    SignedPreKeyRotated {
        /// New signed prekey.
        signed_prekey: SignedPreKey,
        /// New last-resort key, if rotated too.
        kyber_last_resort: Option<KyberPreKey>,
    },
    /// One-time EC prekeys were added to the pool.
    OneTimePreKeysUploaded {
        /// The keys.
        prekeys: Vec<OneTimePreKey>,
    },
    /// One-time Kyber prekeys were added to the pool.
    KyberPreKeysUploaded {
        /// The keys.
        prekeys: Vec<KyberPreKey>,
    },
    /// A bundle was handed out, consuming at most one key of each pool.
    PreKeyClaimed {
        /// Who asked for the bundle.
        claimed_by: UserId,
        /// The one-time EC prekey handed out, if any was left.
        one_time_prekey: Option<PreKeyId>,
        /// The Kyber key handed out.
        kyber: KyberClaim,
    },
    /// The server accepted a message (ciphertext) for a recipient.
    MessageAccepted {
        /// Sender-chosen id.
        message_id: MessageId,
        /// Sender.
        sender: UserId,
        /// Recipient.
        recipient: UserId,
        /// Message kind as the client labels it (e.g. `prekey`, `whisper`).
        kind: String,
        /// Signal ciphertext; the server cannot read it.
        body: Bytes,
    },
    /// The recipient acknowledged the message.
    MessageDelivered {
        /// The message.
        message_id: MessageId,
        /// Its recipient.
        recipient: UserId,
    },
    /// The message was never delivered and its retention ran out.
    MessageExpired {
        /// The message.
        message_id: MessageId,
        /// Its recipient.
        recipient: UserId,
    },
    /// A push token was registered for offline notifications.
    PushTokenRegistered {
        /// The user.
        user_id: UserId,
        /// `fcm`, `apns`, …
        platform: String,
        /// The platform's token.
        token: String,
    },
    /// The unused prekeys of a user as they stand, recorded so that the
    /// payloads of older uploads (which hold keys since used) can be dropped:
    /// folding replaces both pools with these.
    PreKeysCompacted {
        /// Unused one-time EC prekeys.
        one_time_prekeys: Vec<OneTimePreKey>,
        /// Unused one-time Kyber prekeys.
        kyber_prekeys: Vec<KyberPreKey>,
    },
    /// A retention run is about to drop the payloads at these positions
    /// (recorded first, so every payload-less event is accounted for).
    EventsCompacted {
        /// Positions whose payloads are dropped, ascending.
        positions: Vec<Position>,
    },
}

/// Event types whose payload retention may drop: delivered or expired
/// messages' ciphertext, and prekey uploads (or an earlier
/// `PreKeysCompacted`) that a later `PreKeysCompacted` supersedes. Every other payload is kept for ever, and
/// an auditor treats a missing one as tampering.
pub const COMPACTABLE_EVENT_TYPES: [&str; 4] =
    ["MessageAccepted", "OneTimePreKeysUploaded", "KyberPreKeysUploaded", "PreKeysCompacted"];

/// Whether retention may drop the payload of events of this type.
pub fn payload_may_be_compacted(event_type: &str) -> bool {
    COMPACTABLE_EVENT_TYPES.contains(&event_type)
}

// The stored JSON bodies, one per event type. Kept separate from the enum so
// that the stored shape is explicit and versioned type by type.
mod body {
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct UserRegistered {
        pub user_id: UserId,
        pub phone_hash: PhoneHash,
        #[serde(flatten)]
        pub keys: IdentityKeys,
    }
    #[derive(Serialize, Deserialize)]
    pub struct IdentityKeyChanged {
        pub user_id: UserId,
        #[serde(flatten)]
        pub keys: IdentityKeys,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SignedPreKeyRotated {
        pub signed_prekey: SignedPreKey,
        pub kyber_last_resort: Option<KyberPreKey>,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct OneTimePreKeysUploaded {
        pub prekeys: Vec<OneTimePreKey>,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct KyberPreKeysUploaded {
        pub prekeys: Vec<KyberPreKey>,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PreKeyClaimed {
        pub claimed_by: UserId,
        pub one_time_prekey: Option<PreKeyId>,
        pub kyber: KyberClaim,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MessageAccepted {
        pub message_id: MessageId,
        pub sender: UserId,
        pub recipient: UserId,
        pub kind: String,
        pub body: Bytes,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MessageSettled {
        pub message_id: MessageId,
        pub recipient: UserId,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PushTokenRegistered {
        pub user_id: UserId,
        pub platform: String,
        pub token: String,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PreKeysCompacted {
        pub one_time_prekeys: Vec<OneTimePreKey>,
        pub kyber_prekeys: Vec<KyberPreKey>,
    }
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct EventsCompacted {
        pub positions: Vec<Position>,
    }
}

/// A stored event that cannot be turned back into a [`DomainEvent`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The type/version pair is not one this build knows.
    #[error("unknown event type {event_type} v{schema_version}")]
    UnknownType {
        /// Stored type.
        event_type: String,
        /// Stored version.
        schema_version: u16,
    },
    /// The payload was dropped by compaction.
    #[error("payload of {0} was compacted")]
    Compacted(String),
    /// The payload is not valid for its type.
    #[error("malformed {event_type} payload: {source}")]
    Malformed {
        /// Stored type.
        event_type: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl DomainEvent {
    /// The stored type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            DomainEvent::UserRegistered { .. } => "UserRegistered",
            DomainEvent::IdentityKeyChanged { .. } => "IdentityKeyChanged",
            DomainEvent::SignedPreKeyRotated { .. } => "SignedPreKeyRotated",
            DomainEvent::OneTimePreKeysUploaded { .. } => "OneTimePreKeysUploaded",
            DomainEvent::KyberPreKeysUploaded { .. } => "KyberPreKeysUploaded",
            DomainEvent::PreKeyClaimed { .. } => "PreKeyClaimed",
            DomainEvent::MessageAccepted { .. } => "MessageAccepted",
            DomainEvent::MessageDelivered { .. } => "MessageDelivered",
            DomainEvent::MessageExpired { .. } => "MessageExpired",
            DomainEvent::PushTokenRegistered { .. } => "PushTokenRegistered",
            DomainEvent::PreKeysCompacted { .. } => "PreKeysCompacted",
            DomainEvent::EventsCompacted { .. } => "EventsCompacted",
        }
    }

    /// The schema version this build writes for the type.
    pub fn schema_version(&self) -> u16 {
        1
    }

    /// Serializes the event for appending under `event_id`.
    pub fn to_new_event(&self, event_id: EventId) -> Result<NewEvent, serde_json::Error> {
        use body::*;
        let json = match self.clone() {
            DomainEvent::UserRegistered { user_id, phone_hash, keys } => {
                serde_json::to_vec(&UserRegistered { user_id, phone_hash, keys })
            }
            DomainEvent::IdentityKeyChanged { user_id, keys } => {
                serde_json::to_vec(&IdentityKeyChanged { user_id, keys })
            }
            DomainEvent::SignedPreKeyRotated { signed_prekey, kyber_last_resort } => {
                serde_json::to_vec(&SignedPreKeyRotated { signed_prekey, kyber_last_resort })
            }
            DomainEvent::OneTimePreKeysUploaded { prekeys } => serde_json::to_vec(&OneTimePreKeysUploaded { prekeys }),
            DomainEvent::KyberPreKeysUploaded { prekeys } => serde_json::to_vec(&KyberPreKeysUploaded { prekeys }),
            DomainEvent::PreKeyClaimed { claimed_by, one_time_prekey, kyber } => {
                serde_json::to_vec(&PreKeyClaimed { claimed_by, one_time_prekey, kyber })
            }
            DomainEvent::MessageAccepted { message_id, sender, recipient, kind, body } => {
                serde_json::to_vec(&MessageAccepted { message_id, sender, recipient, kind, body })
            }
            DomainEvent::MessageDelivered { message_id, recipient }
            | DomainEvent::MessageExpired { message_id, recipient } => {
                serde_json::to_vec(&MessageSettled { message_id, recipient })
            }
            DomainEvent::PushTokenRegistered { user_id, platform, token } => {
                serde_json::to_vec(&PushTokenRegistered { user_id, platform, token })
            }
            DomainEvent::PreKeysCompacted { one_time_prekeys, kyber_prekeys } => {
                serde_json::to_vec(&PreKeysCompacted { one_time_prekeys, kyber_prekeys })
            }
            DomainEvent::EventsCompacted { positions } => serde_json::to_vec(&EventsCompacted { positions }),
        };
        Ok(NewEvent {
            event_id,
            event_type: self.event_type().to_owned(),
            schema_version: self.schema_version(),
            payload: json?,
        })
    }

    /// Decodes a stored event for folding: `None` when retention dropped a
    /// payload it was allowed to drop (the fold then goes without it — see
    /// [`COMPACTABLE_EVENT_TYPES`]); an error for any other missing payload.
    pub fn for_fold(event: &RecordedEvent) -> Result<Option<DomainEvent>, DecodeError> {
        if event.payload.is_none() && payload_may_be_compacted(&event.event_type) {
            return Ok(None);
        }
        DomainEvent::from_recorded(event).map(Some)
    }

    /// Decodes a stored event.
    pub fn from_recorded(event: &RecordedEvent) -> Result<DomainEvent, DecodeError> {
        use body::*;
        let payload = event.payload.as_deref().ok_or_else(|| DecodeError::Compacted(event.event_type.clone()))?;
        let malformed = |source| DecodeError::Malformed { event_type: event.event_type.clone(), source };
        macro_rules! parse {
            ($ty:ty) => {
                serde_json::from_slice::<$ty>(payload).map_err(malformed)?
            };
        }
        Ok(match (event.event_type.as_str(), event.schema_version) {
            ("UserRegistered", 1) => {
                let b = parse!(UserRegistered);
                DomainEvent::UserRegistered { user_id: b.user_id, phone_hash: b.phone_hash, keys: b.keys }
            }
            ("IdentityKeyChanged", 1) => {
                let b = parse!(IdentityKeyChanged);
                DomainEvent::IdentityKeyChanged { user_id: b.user_id, keys: b.keys }
            }
            ("SignedPreKeyRotated", 1) => {
                let b = parse!(SignedPreKeyRotated);
                DomainEvent::SignedPreKeyRotated {
                    signed_prekey: b.signed_prekey,
                    kyber_last_resort: b.kyber_last_resort,
                }
            }
            ("OneTimePreKeysUploaded", 1) => {
                DomainEvent::OneTimePreKeysUploaded { prekeys: parse!(OneTimePreKeysUploaded).prekeys }
            }
            ("KyberPreKeysUploaded", 1) => {
                DomainEvent::KyberPreKeysUploaded { prekeys: parse!(KyberPreKeysUploaded).prekeys }
            }
            ("PreKeyClaimed", 1) => {
                let b = parse!(PreKeyClaimed);
                DomainEvent::PreKeyClaimed {
                    claimed_by: b.claimed_by,
                    one_time_prekey: b.one_time_prekey,
                    kyber: b.kyber,
                }
            }
            ("MessageAccepted", 1) => {
                let b = parse!(MessageAccepted);
                DomainEvent::MessageAccepted {
                    message_id: b.message_id,
                    sender: b.sender,
                    recipient: b.recipient,
                    kind: b.kind,
                    body: b.body,
                }
            }
            ("MessageDelivered", 1) => {
                let b = parse!(MessageSettled);
                DomainEvent::MessageDelivered { message_id: b.message_id, recipient: b.recipient }
            }
            ("MessageExpired", 1) => {
                let b = parse!(MessageSettled);
                DomainEvent::MessageExpired { message_id: b.message_id, recipient: b.recipient }
            }
            ("PushTokenRegistered", 1) => {
                let b = parse!(PushTokenRegistered);
                DomainEvent::PushTokenRegistered { user_id: b.user_id, platform: b.platform, token: b.token }
            }
            ("PreKeysCompacted", 1) => {
                let b = parse!(PreKeysCompacted);
                DomainEvent::PreKeysCompacted { one_time_prekeys: b.one_time_prekeys, kyber_prekeys: b.kyber_prekeys }
            }
            ("EventsCompacted", 1) => DomainEvent::EventsCompacted { positions: parse!(EventsCompacted).positions },
            (other, version) => {
                return Err(DecodeError::UnknownType { event_type: other.to_owned(), schema_version: version });
            }
        })
    }
}
