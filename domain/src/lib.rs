//! privcomm's pure core.
//!
//! - [`ids`]: newtype identifiers (`UserId`, `MessageId`, `Position`, `StreamId`…).
//! - [`events`]: the stored event contract ([`events::DomainEvent`]), versioned per type.
//! - [`envelope`]: the stored envelope and the hash chain that makes the log
//!   tamper-evident while allowing payloads to be compacted.
//! - [`user`]: the user aggregate, `decide`/`evolve` for registration and prekeys.
//! - [`mailbox`]: the mailbox aggregate: accept a message once per
//!   `(sender, id)`, acknowledge it once, pending messages in log order.
//! - [`store`] and [`bus`]: the event-store and event-bus traits every adapter
//!   implements, and [`store::plan_batch`], the one place where positions,
//!   stream versions and hashes are assigned.
//! - [`memory`]: an in-memory event store for fast tests.
//!
//! Architecture invariant: this crate does no I/O — no sockets, no SQL, no
//! clock reads. Time comes in through [`clock::Clock`]; ids are chosen by the
//! caller.

pub mod bus;
pub mod clock;
pub mod envelope;
pub mod events;
pub mod ids;
pub mod mailbox;
pub mod memory;
pub mod nonces;
pub mod store;
pub mod user;

pub use bus::{BusError, EventBus};
pub use clock::Clock;
pub use envelope::{ChainBreak, ChainFault, Hash, NewEvent, RecordedEvent};
pub use ids::{EventId, MessageId, Position, StreamId, StreamVersion, Timestamp, UserId};
pub use store::{AppendOutcome, AppendRequest, CheckpointStore, EventStore, ExpectedVersion, StoreError};
