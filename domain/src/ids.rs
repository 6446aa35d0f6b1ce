//! Newtype identifiers. Every id that crosses a boundary has its own type, so
//! a `UserId` can never be passed where a `MessageId` is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// A registered user. Assigned by the server at registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

/// A message, chosen by the sender so that a retried send is accepted once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

/// One stored event (UUIDv7, so ids sort roughly by creation time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

/// A one-time elliptic-curve prekey id (libsignal `PreKeyId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PreKeyId(pub u32);

/// A signed prekey id (libsignal `SignedPreKeyId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignedPreKeyId(pub u32);

/// A Kyber prekey id, one-time or last-resort (libsignal `KyberPreKeyId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KyberPreKeyId(pub u32);

/// libsignal registration id chosen by the client (14 bits in practice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegistrationId(pub u32);

/// Global position in the event log: 1, 2, 3… gap-free, in commit order.
/// `Position(0)` means "before the first event".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// The position before any event.
    pub const START: Position = Position(0);

    /// The position after this one.
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Version of one stream: the number of events in it (0 = no stream yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StreamVersion(pub u64);

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Microseconds since the Unix epoch. The domain never reads a clock; time is
/// passed in by whoever holds a [`crate::Clock`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Whole seconds since the Unix epoch (rounded down).
    pub fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }
}

/// Name of an event stream, e.g. `user-<uuid>` or `mailbox-<uuid>`.
///
/// Restricted to ASCII letters, digits, `-`, `_` and `.` (1..=128 bytes) so a
/// stream id is safe in SQL text columns, NATS subjects and log lines alike.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// A stream id that does not follow the rules of [`StreamId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {0:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'")]
pub struct InvalidStreamId(pub String);

impl StreamId {
    /// Checks and wraps a stream name.
    pub fn new(name: impl Into<String>) -> Result<StreamId, InvalidStreamId> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid { Ok(StreamId(name)) } else { Err(InvalidStreamId(name)) }
    }

    /// The identity-and-keys stream of one user.
    pub fn for_user(user: UserId) -> StreamId {
        StreamId(format!("user-{}", user.0))
    }

    /// The mailbox stream of one recipient.
    pub fn for_mailbox(recipient: UserId) -> StreamId {
        StreamId(format!("mailbox-{}", recipient.0))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        StreamId::new(value)
    }
}

impl From<StreamId> for String {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 of a phone number: exactly 64 lowercase hex characters. The
/// number itself never reaches the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneHash(String);

/// Text that is not 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("phone hash must be exactly 64 lowercase hex characters (SHA-256 of the number)")]
pub struct InvalidPhoneHash;

impl PhoneHash {
    /// Checks and wraps a phone hash.
    pub fn new(text: impl Into<String>) -> Result<PhoneHash, InvalidPhoneHash> {
        let text = text.into();
        let valid = text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if valid { Ok(PhoneHash(text)) } else { Err(InvalidPhoneHash) }
    }

    /// The hash as hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PhoneHash {
    type Error = InvalidPhoneHash;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        PhoneHash::new(value)
    }
}

impl From<PhoneHash> for String {
    fn from(value: PhoneHash) -> Self {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_reject_characters_unsafe_for_subjects_and_sql() {
        assert!(StreamId::new("user-0190").is_ok());
        for bad in ["", "a b", "a*", "a>", "ü", &"x".repeat(129)] {
            assert!(StreamId::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn phone_hash_must_be_64_lowercase_hex() {
        assert!(PhoneHash::new("a".repeat(64)).is_ok());
        assert!(PhoneHash::new("A".repeat(64)).is_err());
        assert!(PhoneHash::new("a".repeat(63)).is_err());
        assert!(PhoneHash::new("g".repeat(64)).is_err());
    }
}
