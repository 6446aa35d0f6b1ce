//! The `privcomm` server: adapters and composition.
//!
//! - [`eventstore`]: the event store on PostgreSQL and SQLite (group commit,
//!   hash chain, LISTEN/NOTIFY), implementing `privcomm_domain::EventStore`.
//! - [`bus`]: the event bus in-process and on NATS JetStream.
//! - [`outbox`]: the publisher that copies the log onto the bus, exactly once
//!   and in position order.
//! - [`config`] and [`serve`]: configuration from flags and environment, and
//!   the process that runs every role (`privcomm serve`).
//! - [`migrate`]: the embedded SQL migrations.
//! - [`bench`] and [`bench_api`]: the event-store and API benchmarks
//!   (`privcomm bench-store`, `privcomm bench-api`).
//! - [`keygen`]: real libsignal key material for benchmarks and tests.
//! - [`loadgen`]: the relay load run (`privcomm loadgen`).
//! - [`sockets`]: Nagle's algorithm off on PostgreSQL connections (FFI).
//! - [`sqlite_memory`]: SQLite's allocations through mimalloc (FFI).
//!
//! The domain, API, relay and projection crates know only the traits; this
//! crate chooses implementations and wires them together.

pub mod audit;
pub mod bench;
pub mod bench_api;
pub mod bench_replay;
pub mod bus;
pub mod clock;
pub mod config;
pub mod eventstore;
pub mod keygen;
pub mod leader;
pub mod loadgen;
pub mod migrate;
pub mod outbox;
pub mod plot;
pub mod projector;
pub mod serve;
pub mod sockets;
pub mod sqlite_memory;
