//! privcomm's client core, shared by the Android app (through uniffi
//! bindings) and the desktop chat CLI (`privcomm-chat`).
//!
//! It holds the user's identity and prekeys, establishes libsignal (PQXDH)
//! sessions, keeps every libsignal store and the message log in an encrypted
//! local SQLite store ([`store`]), and talks to the API and the relay with
//! reconnect and backoff ([`client`]). Encryption happens here and only here:
//! the server sees ciphertext. This crate does not depend on server-only code
//! (sqlx, async-nats, axum); `cargo tree -p privcomm-client` shows it, and
//! `scripts/test` checks it.
//!
//! The exported surface (uniffi, for Kotlin): [`Client`] (an object with
//! blocking, thread-safe methods), [`ClientConfig`], [`ChatMessage`],
//! [`PrekeyReport`], [`ConnectionState`], the [`ClientListener`] callback
//! interface and the [`ClientError`] enum; for calls [`CallInfo`],
//! [`CallState`], [`CallEndReason`], [`CallSettings`] and the
//! [`CallListener`] callback interface.

pub mod api;
pub mod bench;
pub mod call;
pub mod client;
pub mod core;
pub mod error;
pub mod signal;
pub mod store;

pub use call::engine::{CallEndReason, CallInfo, CallListener, CallSettings, CallState};
pub use client::{Client, ClientConfig, ClientListener, ConnectionState, Pause};
pub use core::{ChatMessage, PrekeyReport};
pub use error::ClientError;

uniffi::setup_scaffolding!();
