//! privcomm's client core, shared by the Android app (through uniffi
//! bindings) and the desktop chat CLI.
//!
//! It holds the user's identity and prekeys, establishes libsignal (PQXDH)
//! sessions, keeps every libsignal store and the message log in an encrypted
//! local SQLite store, talks to the API and the relay with reconnect and
//! backoff, and runs str0m voice calls whose signalling travels as ordinary
//! end-to-end-encrypted messages. Encryption happens here and only here: the
//! server sees ciphertext. This crate must not depend on server-only code
//! (sqlx-postgres, async-nats, axum); `cargo tree -p privcomm-client` shows it.
//!
//! Status: the crate is in place with the domain dependency; the client lands
//! with the "Client crate for Android" issue.
