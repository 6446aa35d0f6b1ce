//! Single use of login-challenge nonces.
//!
//! A challenge nonce is self-describing (it carries its user and expiry under
//! an HMAC, see the API's `tokens` module), so any node can check it; what
//! needs shared state is only "has this nonce been used?". The ledger answers
//! that for as long as a nonce could still be valid.

use crate::ids::Timestamp;
use crate::store::StoreError;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

/// Remembers consumed nonces until they expire.
#[async_trait]
pub trait NonceLedger: Send + Sync + 'static {
    /// Marks `nonce_id` used. Returns `false` if it already was. Entries that
    /// expired before `now` may be forgotten.
    async fn consume(&self, nonce_id: [u8; 32], expires_at: Timestamp, now: Timestamp) -> Result<bool, StoreError>;
}

/// An in-memory ledger for tests and single-process use.
#[derive(Default)]
pub struct InMemoryNonceLedger {
    used: Mutex<HashMap<[u8; 32], Timestamp>>,
}

#[async_trait]
impl NonceLedger for InMemoryNonceLedger {
    async fn consume(&self, nonce_id: [u8; 32], expires_at: Timestamp, now: Timestamp) -> Result<bool, StoreError> {
        let mut used = self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        used.retain(|_, expiry| *expiry >= now);
        Ok(used.insert(nonce_id, expires_at).is_none())
    }
}
