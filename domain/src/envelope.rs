//! The stored envelope of an event and the hash chain that makes the log
//! tamper-evident.
//!
//! Each event's `hash` covers the previous event's hash, every header field
//! and the SHA-256 of the payload — not the payload itself. Compaction can
//! therefore drop a payload (ciphertext) and the chain still verifies, while
//! any change to a stored header byte, payload byte or hash is detected at the
//! position where it happened.

use crate::ids::{EventId, Position, StreamId, StreamVersion, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The `previous hash` of the very first event.
    pub const GENESIS: Hash = Hash([0; 32]);

    /// SHA-256 of some bytes.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(Sha256::digest(bytes).into())
    }

    /// Reads a digest from stored bytes; `None` when it is not 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Hash> {
        Some(Hash(bytes.try_into().ok()?))
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        Hash::from_slice(&bytes).ok_or_else(|| serde::de::Error::custom("hash must be 32 bytes"))
    }
}

/// An event about to be appended: everything the writer chooses. Position,
/// stream version, time and hashes are assigned by the store at commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique id (UUIDv7), chosen by the writer so a retried append can be recognised.
    pub event_id: EventId,
    /// Past-tense type name, e.g. `UserRegistered`.
    pub event_type: String,
    /// Version of the payload's schema for this type.
    pub schema_version: u16,
    /// The serialized payload (JSON for domain events).
    pub payload: Vec<u8>,
}

/// An event as stored: the envelope plus its payload, if not yet compacted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Global position (1-based, gap-free, commit order).
    pub position: Position,
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Version of the stream after this event (1-based).
    pub stream_version: StreamVersion,
    /// Unique event id (UUIDv7).
    pub event_id: EventId,
    /// Past-tense type name.
    pub event_type: String,
    /// Schema version of the payload.
    pub schema_version: u16,
    /// When the store committed the event.
    pub recorded_at: Timestamp,
    /// The payload; `None` once compaction has dropped it.
    #[serde(with = "optional_base64_bytes")]
    pub payload: Option<Vec<u8>>,
    /// SHA-256 of the payload, kept after compaction.
    pub payload_hash: Hash,
    /// Hash of the previous event (all zeros for position 1).
    pub prev_hash: Hash,
    /// Hash of this event: see [`event_hash`].
    pub hash: Hash,
}

/// The header fields of an event that the chain hash covers.
pub struct EventHeader<'a> {
    /// Global position.
    pub position: Position,
    /// Stream id.
    pub stream_id: &'a StreamId,
    /// Stream version.
    pub stream_version: StreamVersion,
    /// Event id.
    pub event_id: EventId,
    /// Type name.
    pub event_type: &'a str,
    /// Schema version.
    pub schema_version: u16,
    /// Commit time.
    pub recorded_at: Timestamp,
}

/// Domain separation, so a privcomm chain hash can never be confused with any
/// other SHA-256 of similar bytes. Bump the suffix if the layout ever changes.
const CHAIN_HASH_DOMAIN: &[u8] = b"privcomm/event-chain/v1";

/// `SHA-256(domain ‖ prev_hash ‖ header ‖ payload_hash)`, with every
/// variable-length field length-prefixed so no two headers encode alike.
pub fn event_hash(prev_hash: &Hash, header: &EventHeader<'_>, payload_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(CHAIN_HASH_DOMAIN);
    h.update(prev_hash.0);
    h.update(header.position.0.to_be_bytes());
    h.update((header.stream_id.as_str().len() as u32).to_be_bytes());
    h.update(header.stream_id.as_str().as_bytes());
    h.update(header.stream_version.0.to_be_bytes());
    h.update(header.event_id.0.as_bytes());
    h.update((header.event_type.len() as u32).to_be_bytes());
    h.update(header.event_type.as_bytes());
    h.update(header.schema_version.to_be_bytes());
    h.update(header.recorded_at.0.to_be_bytes());
    h.update(payload_hash.0);
    Hash(h.finalize().into())
}

impl RecordedEvent {
    /// The header fields covered by the chain hash.
    pub fn header(&self) -> EventHeader<'_> {
        EventHeader {
            position: self.position,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            recorded_at: self.recorded_at,
        }
    }
}

/// Why the chain does not verify at a position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainFault {
    /// The position is not the one after the previous event (a gap or a repeat).
    UnexpectedPosition {
        /// The position that should have come next.
        expected: Position,
    },
    /// The stored previous hash is not the previous event's hash.
    PrevHashMismatch,
    /// The stored payload does not hash to the stored payload hash.
    PayloadHashMismatch,
    /// The header and payload hash do not hash to the stored hash.
    HashMismatch,
}

/// The first place where the chain does not verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("hash chain broken at position {position}: {fault:?}")]
pub struct ChainBreak {
    /// Position of the first event that fails.
    pub position: Position,
    /// What is wrong there.
    pub fault: ChainFault,
}

/// The checks of one event that need no other event: its payload against
/// its payload hash, and its hash against its header. Independent from one
/// event to the next (the expensive part of verification: two SHA-256), so
/// a verifier may run them in parallel ahead of [`ChainVerifier::link`].
pub fn check_contents(event: &RecordedEvent) -> Result<(), ChainFault> {
    if let Some(payload) = &event.payload
        && Hash::of(payload) != event.payload_hash
    {
        return Err(ChainFault::PayloadHashMismatch);
    }
    if event_hash(&event.prev_hash, &event.header(), &event.payload_hash) != event.hash {
        return Err(ChainFault::HashMismatch);
    }
    Ok(())
}

/// Checks events one at a time, in position order, against the chain.
///
/// Start it with the hash of the event before the first one to check (or
/// [`Hash::GENESIS`] at position 1).
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    next_position: Position,
    prev_hash: Hash,
    checked: u64,
}

impl ChainVerifier {
    /// A verifier expecting `first` next, whose predecessor hashed to `prev_hash`.
    pub fn new(first: Position, prev_hash: Hash) -> ChainVerifier {
        ChainVerifier { next_position: first, prev_hash, checked: 0 }
    }

    /// Checks one event; the first error is the position to report.
    pub fn check(&mut self, event: &RecordedEvent) -> Result<(), ChainBreak> {
        self.link(event, check_contents(event))
    }

    /// Checks that `event` comes next and links to its predecessor, then
    /// takes `contents`, the verdict of [`check_contents`] on the same
    /// event, computed earlier (perhaps on another thread). Faults are
    /// reported in the same order as [`ChainVerifier::check`] reports them.
    pub fn link(&mut self, event: &RecordedEvent, contents: Result<(), ChainFault>) -> Result<(), ChainBreak> {
        let fail = |fault| ChainBreak { position: event.position, fault };
        if event.position != self.next_position {
            return Err(fail(ChainFault::UnexpectedPosition { expected: self.next_position }));
        }
        if event.prev_hash != self.prev_hash {
            return Err(fail(ChainFault::PrevHashMismatch));
        }
        contents.map_err(fail)?;
        self.next_position = event.position.next();
        self.prev_hash = event.hash;
        self.checked += 1;
        Ok(())
    }

    /// How many events verified so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The hash of the last verified event (the head, after a full run).
    pub fn head_hash(&self) -> Hash {
        self.prev_hash
    }
}

mod optional_base64_bytes {
    //! Payload bytes travel as standard Base64 in JSON (NATS messages, exports).
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| STANDARD.decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}
