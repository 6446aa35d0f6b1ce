//! Signed checkpoints: the server signs (Ed25519) the log's head position
//! and hash every N events or T minutes, so auditors can hold it to a
//! history without trusting it.
//!
//! The chain makes each hash commit to everything before it. So if an
//! auditor keeps two signed checkpoints `(p1, h1)` and `(p2, h2)`, a log
//! whose chain verifies and whose hashes at `p1` and `p2` are `h1` and `h2`
//! proves the later extends the earlier; a history rewritten anywhere up to
//! `p2` — even one re-chained to verify on its own — shows as a different
//! hash at `p2` (and at `p1` if the rewrite is before it). `privcomm audit
//! verify --checkpoints` checks exactly that, with the signing key pinned by
//! the auditor.

use crate::replay::Fault;
use crate::store::{ProjectionError, ReadDb};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use privcomm_domain::{Clock, EventStore, Hash, Position, RecordedEvent, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Domain separation for checkpoint signatures.
const CHECKPOINT_DOMAIN: &[u8] = b"privcomm/checkpoint/v1";

/// A signed statement "the log's event at `position` has hash `hash`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// The head position when signed.
    pub position: Position,
    /// Its hash.
    pub hash: Hash,
    /// When it was signed.
    pub signed_at: Timestamp,
    /// The Ed25519 public key (hex).
    pub public_key: String,
    /// The signature (hex) over `privcomm/checkpoint/v1 ‖ position ‖ hash ‖ signed_at`.
    pub signature: String,
}

/// What the signature covers.
fn signed_bytes(position: Position, hash: &Hash, signed_at: Timestamp) -> Vec<u8> {
    let mut bytes = CHECKPOINT_DOMAIN.to_vec();
    bytes.extend_from_slice(&position.0.to_be_bytes());
    bytes.extend_from_slice(&hash.0);
    bytes.extend_from_slice(&signed_at.0.to_be_bytes());
    bytes
}

/// Why a checkpoint does not hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    /// The key is not 32 bytes of hex.
    #[error("a checkpoint key must be 64 hex digits (32 bytes)")]
    BadKey,
    /// The signature does not verify.
    #[error("checkpoint at position {0}: the signature does not verify")]
    BadSignature(Position),
    /// Signed by another key than the pinned one.
    #[error("checkpoint at position {0} is signed by {1}, not the pinned key")]
    WrongKey(Position, String),
}

/// The server's signing key (from `CHECKPOINT_SIGNING_KEY`).
pub struct CheckpointSigner {
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The public half only: the seed never reaches a log.
        write!(f, "CheckpointSigner({})", self.public_key_hex())
    }
}

impl CheckpointSigner {
    /// A signer from a 32-byte seed in hex.
    pub fn from_hex_seed(seed: &str) -> Result<CheckpointSigner, CheckpointError> {
        let bytes = hex::decode(seed.trim()).map_err(|_| CheckpointError::BadKey)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| CheckpointError::BadKey)?;
        Ok(CheckpointSigner { key: SigningKey::from_bytes(&seed) })
    }

    /// The public key, hex.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Signs a head.
    pub fn sign(&self, position: Position, hash: Hash, signed_at: Timestamp) -> SignedCheckpoint {
        let signature = self.key.sign(&signed_bytes(position, &hash, signed_at));
        SignedCheckpoint {
            position,
            hash,
            signed_at,
            public_key: self.public_key_hex(),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

impl SignedCheckpoint {
    /// Checks the signature, against `pinned` (hex) when the auditor gives one.
    pub fn verify_signature(&self, pinned: Option<&str>) -> Result<(), CheckpointError> {
        if let Some(pinned) = pinned
            && !pinned.trim().eq_ignore_ascii_case(&self.public_key)
        {
            return Err(CheckpointError::WrongKey(self.position, self.public_key.clone()));
        }
        let bad = || CheckpointError::BadSignature(self.position);
        let key: [u8; 32] = hex::decode(&self.public_key).map_err(|_| bad())?.try_into().map_err(|_| bad())?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
        let signature: [u8; 64] = hex::decode(&self.signature).map_err(|_| bad())?.try_into().map_err(|_| bad())?;
        key.verify(&signed_bytes(self.position, &self.hash, self.signed_at), &Signature::from_bytes(&signature))
            .map_err(|_| bad())
    }
}

/// Holds a log to a set of checkpoints while it is read in order.
#[derive(Debug, Default)]
pub struct CheckpointChecker {
    pending: BTreeMap<u64, SignedCheckpoint>,
    matched: usize,
}

impl CheckpointChecker {
    /// Checks every signature first (against `pinned`, if given).
    pub fn new(checkpoints: Vec<SignedCheckpoint>, pinned: Option<&str>) -> Result<CheckpointChecker, CheckpointError> {
        let mut pending = BTreeMap::new();
        for checkpoint in checkpoints {
            checkpoint.verify_signature(pinned)?;
            pending.insert(checkpoint.position.0, checkpoint);
        }
        Ok(CheckpointChecker { pending, matched: 0 })
    }

    /// Compares a verified event with the checkpoint at its position, if any.
    pub fn observe(&mut self, event: &RecordedEvent) -> Result<(), Fault> {
        if let Some(checkpoint) = self.pending.remove(&event.position.0) {
            if checkpoint.hash != event.hash {
                return Err(Fault {
                    position: event.position,
                    reason: format!(
                        "the log's hash {} differs from the one signed at {} ({}): history was rewritten at or before this position",
                        event.hash, checkpoint.signed_at.0, checkpoint.hash
                    ),
                });
            }
            self.matched += 1;
        }
        Ok(())
    }

    /// After the last event: a checkpoint beyond the log means it was cut short.
    pub fn finish(&self, last: Position) -> Result<usize, Fault> {
        match self.pending.values().next() {
            Some(checkpoint) => Err(Fault {
                position: checkpoint.position,
                reason: format!("the log ends at {last}, before this signed checkpoint: events were removed"),
            }),
            None => Ok(self.matched),
        }
    }
}

/// Signs the log's head now and stores the checkpoint (unless the head is
/// already signed or the log is empty). Returns what it signed.
pub async fn sign_head(
    log: &dyn EventStore,
    db: &ReadDb,
    signer: &CheckpointSigner,
    clock: &dyn Clock,
) -> Result<Option<SignedCheckpoint>, ProjectionError> {
    let storage = |e: privcomm_domain::StoreError| ProjectionError::Storage(Box::new(e));
    let head = log.head().await.map_err(storage)?;
    if head == Position::START || latest(db).await?.is_some_and(|c| c.position >= head) {
        return Ok(None);
    }
    let event = log.read_all(Position(head.0 - 1), 1).await.map_err(storage)?;
    let Some(event) = event.into_iter().find(|e| e.position == head) else { return Ok(None) };
    let checkpoint = signer.sign(head, event.hash, clock.now());
    let sql = "INSERT INTO signed_checkpoints (position, hash, signed_at_us, public_key, signature) \
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT (position) DO NOTHING";
    on_db!(db, pool => {
        sqlx::query(sql)
            .bind(checkpoint.position.0 as i64)
            .bind(checkpoint.hash.0.as_slice())
            .bind(checkpoint.signed_at.0)
            .bind(checkpoint.public_key.as_str())
            .bind(checkpoint.signature.as_str())
            .execute(pool)
            .await
            .map(|_| ())?
    });
    Ok(Some(checkpoint))
}

type Row = (i64, Vec<u8>, i64, String, String);

fn from_row((position, hash, signed_at, public_key, signature): Row) -> Result<SignedCheckpoint, ProjectionError> {
    let hash = Hash::from_slice(&hash)
        .ok_or_else(|| ProjectionError::Storage("stored checkpoint hash is not 32 bytes".into()))?;
    Ok(SignedCheckpoint {
        position: Position(position as u64),
        hash,
        signed_at: Timestamp(signed_at),
        public_key,
        signature,
    })
}

/// The latest stored checkpoint.
pub async fn latest(db: &ReadDb) -> Result<Option<SignedCheckpoint>, ProjectionError> {
    let sql = "SELECT position, hash, signed_at_us, public_key, signature FROM signed_checkpoints ORDER BY position DESC LIMIT 1";
    let row: Option<Row> = on_db!(db, pool => sqlx::query_as(sql).fetch_optional(pool).await?);
    row.map(from_row).transpose()
}

/// Every stored checkpoint, oldest first.
pub async fn all(db: &ReadDb) -> Result<Vec<SignedCheckpoint>, ProjectionError> {
    let sql = "SELECT position, hash, signed_at_us, public_key, signature FROM signed_checkpoints ORDER BY position";
    let rows: Vec<Row> = on_db!(db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
    rows.into_iter().map(from_row).collect()
}

/// Signs the head every `every_events` events or every `interval`,
/// whichever comes first, until `stop` turns true.
pub async fn run_checkpointer(
    log: Arc<dyn EventStore>,
    db: ReadDb,
    signer: Arc<CheckpointSigner>,
    clock: Arc<dyn Clock>,
    every_events: u64,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!(
        public_key = signer.public_key_hex(),
        every_events,
        interval_s = interval.as_secs(),
        "signing checkpoints"
    );
    let mut last_signed = match latest(&db).await {
        Ok(latest) => latest.map_or(Position::START, |c| c.position),
        Err(_) => Position::START,
    };
    let mut since = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = crate::worker::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let Ok(head) = log.head().await else { continue };
        let due = head.0.saturating_sub(last_signed.0) >= every_events.max(1)
            || (since.elapsed() >= interval && head > last_signed);
        if !due {
            continue;
        }
        match sign_head(log.as_ref(), &db, &signer, clock.as_ref()).await {
            Ok(Some(checkpoint)) => {
                tracing::debug!(position = %checkpoint.position, "signed a checkpoint");
                last_signed = checkpoint.position;
                since = tokio::time::Instant::now();
            }
            Ok(None) => since = tokio::time::Instant::now(),
            Err(error) => tracing::warn!(%error, "cannot sign a checkpoint; trying again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_position_hash_and_time_and_the_key_can_be_pinned() {
        let signer = CheckpointSigner::from_hex_seed(&"07".repeat(32)).expect("seed");
        let checkpoint = signer.sign(Position(42), Hash([9; 32]), Timestamp(1_000));
        assert_eq!(checkpoint.verify_signature(None), Ok(()));
        assert_eq!(checkpoint.verify_signature(Some(&signer.public_key_hex())), Ok(()));
        let other = CheckpointSigner::from_hex_seed(&"08".repeat(32)).expect("seed");
        assert!(matches!(
            checkpoint.verify_signature(Some(&other.public_key_hex())),
            Err(CheckpointError::WrongKey(..))
        ));
        for forged in [
            SignedCheckpoint { position: Position(43), ..checkpoint.clone() },
            SignedCheckpoint { hash: Hash([8; 32]), ..checkpoint.clone() },
            SignedCheckpoint { signed_at: Timestamp(1_001), ..checkpoint.clone() },
        ] {
            assert!(matches!(forged.verify_signature(None), Err(CheckpointError::BadSignature(_))), "{forged:?}");
        }
        assert!(!format!("{signer:?}").contains(&"07".repeat(32)), "the seed stays out of debug output");
        assert_eq!(CheckpointSigner::from_hex_seed("abcd").err(), Some(CheckpointError::BadKey));
    }
}
