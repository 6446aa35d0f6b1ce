//! The encrypted local store: one SQLite file holding every libsignal store
//! (identity, sessions, prekeys, signed prekeys, Kyber prekeys), the message
//! log and the client's own bookkeeping.
//!
//! Every value is sealed with AES-256-GCM under a key derived from the 32-byte
//! store key the platform supplies (on Android, wrapped by the Keystore); the
//! associated data binds each value to its slot, so a value moved to another
//! row fails to open. Slots are HMAC-SHA256 of `kind ‖ id` under a second
//! derived key, so the file does not show whom the user talks to. A check
//! record sealed at creation tells a wrong key apart before anything is
//! written: opening with the wrong key fails with
//! [`ClientError::WrongStoreKey`] and changes nothing.

use crate::error::{ClientError, Result};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::Sha256;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

type HmacSha256 = Hmac<Sha256>;

const CHECK_PLAINTEXT: &[u8] = b"privcomm client store v1";
const NONCE_BYTES: usize = 12;

/// What a record is. Stored in clear beside the sealed value (it says only
/// which kind of record a row is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Client settings and counters (`meta` ids).
    Meta,
    /// A contact's trusted identity key.
    Identity,
    /// A libsignal session with a contact.
    Session,
    /// One-time EC prekey.
    PreKey,
    /// Signed EC prekey.
    SignedPreKey,
    /// Kyber prekey (one-time or last resort).
    KyberPreKey,
    /// An incoming message id already decrypted (de-duplication).
    Seen,
    /// An incoming message held back: its sender's identity changed.
    Held,
    /// A message sent while disconnected, waiting to go out.
    Outbox,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Meta => "meta",
            Kind::Identity => "identity",
            Kind::Session => "session",
            Kind::PreKey => "prekey",
            Kind::SignedPreKey => "signed_prekey",
            Kind::KyberPreKey => "kyber_prekey",
            Kind::Seen => "seen",
            Kind::Held => "held",
            Kind::Outbox => "outbox",
        }
    }
}

struct Keys {
    seal: Aes256Gcm,
    slot: [u8; 32],
}

impl Keys {
    fn derive(store_key: &[u8]) -> Result<Keys> {
        if store_key.len() != 32 {
            return Err(ClientError::InvalidStoreKey(store_key.len() as u32));
        }
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut mac = <HmacSha256 as Mac>::new_from_slice(store_key).expect("HMAC takes any key length");
            mac.update(label);
            mac.finalize().into_bytes().into()
        };
        let seal_key = derive(b"privcomm/client-store/seal/v1");
        Ok(Keys {
            seal: Aes256Gcm::new_from_slice(&seal_key).expect("32-byte AES key"),
            slot: derive(b"privcomm/client-store/slot/v1"),
        })
    }

    fn slot(&self, kind: Kind, id: &[u8]) -> Vec<u8> {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.slot).expect("HMAC takes any key length");
        mac.update(kind.tag().as_bytes());
        mac.update(&[0]);
        mac.update(id);
        mac.finalize().into_bytes().to_vec()
    }

    fn seal(&self, kind: Kind, slot: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = [kind.tag().as_bytes(), slot].concat();
        let sealed = self
            .seal
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("AES-GCM seals any length this store writes");
        [&nonce[..], &sealed].concat()
    }

    fn open(&self, kind: Kind, slot: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        if value.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, sealed) = value.split_at(NONCE_BYTES);
        let aad = [kind.tag().as_bytes(), slot].concat();
        self.seal.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad }).ok()
    }
}

/// The store. Cheap to clone (one connection, shared on one thread).
#[derive(Clone)]
pub struct Store {
    inner: Rc<Inner>,
}

struct Inner {
    db: RefCell<Connection>,
    keys: Keys,
}

impl Store {
    /// Opens (creating if needed) the store at `path` with `store_key`.
    /// A wrong key fails with [`ClientError::WrongStoreKey`] before any write.
    pub fn open(path: &Path, store_key: &[u8]) -> Result<Store> {
        let keys = Keys::derive(store_key)?;
        if !path.exists() {
            // Readable by this user only (the values are sealed; the sizes and counts are not).
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(path).map_err(|e| ClientError::Store(format!("creating {}: {e}", path.display())))?;
        }
        let db = Connection::open(path)?;
        // WAL + NORMAL: a crash of the app loses nothing committed; a power
        // loss may lose the last transactions, never corrupts (SQLite's own
        // guarantee, and Android's default).
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "secure_delete", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = Store { inner: Rc::new(Inner { db: RefCell::new(db), keys }) };
        store.check_key()?;
        Ok(store)
    }

    fn check_key(&self) -> Result<()> {
        let slot = self.inner.keys.slot(Kind::Meta, b"check");
        let tables_exist: bool = self.inner.db.borrow().query_row(
            "SELECT count(*) = 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'",
            [],
            |row| row.get(0),
        )?;
        if tables_exist {
            let any: Option<Vec<u8>> = self
                .inner
                .db
                .borrow()
                .query_row("SELECT value FROM records WHERE kind = 'meta' AND note = 'check'", [], |row| row.get(0))
                .optional()?;
            if let Some(value) = any {
                return match self.inner.keys.open(Kind::Meta, &slot, &value) {
                    Some(plain) if plain == CHECK_PLAINTEXT => Ok(()),
                    _ => Err(ClientError::WrongStoreKey(
                        "the check record does not open with this key; use the key the store was created with".into(),
                    )),
                };
            }
        }
        let db = self.inner.db.borrow();
        db.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS records (
                 kind TEXT NOT NULL,
                 slot BLOB NOT NULL,
                 value BLOB NOT NULL,
                 -- 'check' marks the key-check record; NULL elsewhere.
                 note TEXT,
                 PRIMARY KEY (kind, slot)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS messages (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 value BLOB NOT NULL
             );
             COMMIT;",
        )?;
        let sealed = self.inner.keys.seal(Kind::Meta, &slot, CHECK_PLAINTEXT);
        db.execute(
            "INSERT INTO records (kind, slot, value, note) VALUES ('meta', ?1, ?2, 'check')",
            params![slot, sealed],
        )?;
        Ok(())
    }

    /// The record `id` of `kind`, opened.
    pub fn get(&self, kind: Kind, id: &[u8]) -> Result<Option<Vec<u8>>> {
        let slot = self.inner.keys.slot(kind, id);
        let value: Option<Vec<u8>> = self
            .inner
            .db
            .borrow()
            .prepare_cached("SELECT value FROM records WHERE kind = ?1 AND slot = ?2")?
            .query_row(params![kind.tag(), slot], |row| row.get(0))
            .optional()?;
        value
            .map(|value| {
                self.inner
                    .keys
                    .open(kind, &slot, &value)
                    .ok_or_else(|| ClientError::Corrupt(format!("a {} record", kind.tag())))
            })
            .transpose()
    }

    /// Stores `value` as record `id` of `kind`, replacing any.
    pub fn put(&self, kind: Kind, id: &[u8], value: &[u8]) -> Result<()> {
        let slot = self.inner.keys.slot(kind, id);
        let sealed = self.inner.keys.seal(kind, &slot, value);
        self.inner
            .db
            .borrow()
            .prepare_cached("INSERT OR REPLACE INTO records (kind, slot, value) VALUES (?1, ?2, ?3)")?
            .execute(params![kind.tag(), slot, sealed])?;
        Ok(())
    }

    /// Removes record `id` of `kind` (no error if absent).
    pub fn remove(&self, kind: Kind, id: &[u8]) -> Result<()> {
        let slot = self.inner.keys.slot(kind, id);
        self.inner
            .db
            .borrow()
            .prepare_cached("DELETE FROM records WHERE kind = ?1 AND slot = ?2")?
            .execute(params![kind.tag(), slot])?;
        Ok(())
    }

    /// Removes every record of `kind`.
    pub fn remove_all(&self, kind: Kind) -> Result<()> {
        self.inner.db.borrow().execute("DELETE FROM records WHERE kind = ?1 AND note IS NULL", params![kind.tag()])?;
        Ok(())
    }

    /// Every record of `kind`, opened (order unspecified).
    pub fn all(&self, kind: Kind) -> Result<Vec<Vec<u8>>> {
        let db = self.inner.db.borrow();
        let mut statement = db.prepare_cached("SELECT slot, value FROM records WHERE kind = ?1 AND note IS NULL")?;
        let rows = statement.query_map(params![kind.tag()], |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (slot, value): (Vec<u8>, Vec<u8>) = row?;
            out.push(
                self.inner
                    .keys
                    .open(kind, &slot, &value)
                    .ok_or_else(|| ClientError::Corrupt(format!("a {} record", kind.tag())))?,
            );
        }
        Ok(out)
    }

    /// How many records of `kind` there are.
    pub fn count(&self, kind: Kind) -> Result<u64> {
        let db = self.inner.db.borrow();
        let count: i64 = db.query_row(
            "SELECT count(*) FROM records WHERE kind = ?1 AND note IS NULL",
            params![kind.tag()],
            |row| row.get(0),
        )?;
        Ok(count as u64)
    }

    /// Appends `value` to the message log; returns its sequence number.
    pub fn append_message(&self, value: &[u8]) -> Result<i64> {
        let db = self.inner.db.borrow();
        // The slot of a log entry is its sequence number: reserve it first.
        let seq: i64 = db.query_row("SELECT coalesce(max(seq), 0) + 1 FROM messages", [], |row| row.get(0))?;
        let slot = seq.to_be_bytes();
        let sealed = self.inner.keys.seal(Kind::Meta, &[b"message:".as_slice(), &slot].concat(), value);
        db.prepare_cached("INSERT INTO messages (seq, value) VALUES (?1, ?2)")?.execute(params![seq, sealed])?;
        Ok(seq)
    }

    /// The message log, oldest first.
    pub fn messages(&self) -> Result<Vec<Vec<u8>>> {
        let db = self.inner.db.borrow();
        let mut statement = db.prepare_cached("SELECT seq, value FROM messages ORDER BY seq")?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, value) = row?;
            let slot = [b"message:".as_slice(), &seq.to_be_bytes()].concat();
            out.push(
                self.inner
                    .keys
                    .open(Kind::Meta, &slot, &value)
                    .ok_or_else(|| ClientError::Corrupt("a message".into()))?,
            );
        }
        Ok(out)
    }

    /// Runs `work` in one transaction: all of its writes land, or none.
    pub fn transaction<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.begin()?;
        self.end(work())
    }

    /// Async form of [`Store::transaction`] for libsignal's store calls.
    pub async fn transaction_async<T, F: std::future::Future<Output = Result<T>>>(&self, work: F) -> Result<T> {
        self.begin()?;
        self.end(work.await)
    }

    fn begin(&self) -> Result<()> {
        Ok(self.inner.db.borrow().execute_batch("BEGIN IMMEDIATE")?)
    }

    /// Commits after `result` succeeded, rolls back after it failed.
    fn end<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => {
                self.inner.db.borrow().execute_batch("COMMIT")?;
                Ok(value)
            }
            Err(error) => {
                let _ = self.inner.db.borrow().execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// A numbered setting (counters, ids, times).
    pub fn meta_u64(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.get(Kind::Meta, name.as_bytes())?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes))
    }

    /// Sets a numbered setting.
    pub fn set_meta_u64(&self, name: &str, value: u64) -> Result<()> {
        self.put(Kind::Meta, name.as_bytes(), &value.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("privcomm-client-store-{}.db", uuid::Uuid::now_v7().simple()))
    }

    #[test]
    fn records_round_trip_and_survive_reopening() -> Result<()> {
        let path = temp_path();
        let key = [7u8; 32];
        {
            let store = Store::open(&path, &key)?;
            store.put(Kind::Session, b"alice", b"session bytes")?;
            store.append_message(b"hello")?;
            store.set_meta_u64("next_prekey_id", 42)?;
        }
        let store = Store::open(&path, &key)?;
        assert_eq!(store.get(Kind::Session, b"alice")?.as_deref(), Some(&b"session bytes"[..]));
        assert_eq!(store.get(Kind::Session, b"bob")?, None);
        assert_eq!(store.messages()?, vec![b"hello".to_vec()]);
        assert_eq!(store.meta_u64("next_prekey_id")?, Some(42));
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[test]
    fn a_wrong_key_is_refused_and_destroys_nothing() -> Result<()> {
        let path = temp_path();
        Store::open(&path, &[1u8; 32])?.put(Kind::Identity, b"bob", b"bob's key")?;
        let before = std::fs::read(&path).map_err(|e| ClientError::Store(e.to_string()))?;
        assert!(matches!(Store::open(&path, &[2u8; 32]), Err(ClientError::WrongStoreKey(_))));
        assert!(matches!(Store::open(&path, &[1u8; 31]), Err(ClientError::InvalidStoreKey(31))));
        let store = Store::open(&path, &[1u8; 32])?;
        assert_eq!(store.get(Kind::Identity, b"bob")?.as_deref(), Some(&b"bob's key"[..]));
        assert!(!before.is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).map_err(|e| ClientError::Store(e.to_string()))?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the store is readable by others");
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[test]
    fn the_file_holds_neither_values_nor_ids_in_clear_and_moved_values_do_not_open() -> Result<()> {
        let path = temp_path();
        let store = Store::open(&path, &[3u8; 32])?;
        store.put(Kind::Session, b"contact-id-0123", b"secret-session-state")?;
        store.put(Kind::Session, b"other", b"other-state")?;
        store.append_message(b"plaintext-message-text")?;
        drop(store);
        let raw = std::fs::read(&path).map_err(|e| ClientError::Store(e.to_string()))?;
        let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
        for needle in [&b"contact-id-0123"[..], b"secret-session-state", b"plaintext-message-text"] {
            for bytes in [&raw, &wal] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{:?} in clear",
                    String::from_utf8_lossy(needle)
                );
            }
        }
        // Swap two sealed values: both fail their integrity check.
        let db = Connection::open(&path)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = db
            .prepare("SELECT slot, value FROM records WHERE kind = 'session'")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        assert_eq!(rows.len(), 2);
        for (i, (slot, _)) in rows.iter().enumerate() {
            let other_value = &rows[1 - i].1;
            db.execute(
                "UPDATE records SET value = ?1 WHERE kind = 'session' AND slot = ?2",
                params![other_value, slot],
            )?;
        }
        drop(db);
        let store = Store::open(&path, &[3u8; 32])?;
        assert!(matches!(store.get(Kind::Session, b"other"), Err(ClientError::Corrupt(_))));
        assert!(matches!(store.get(Kind::Session, b"contact-id-0123"), Err(ClientError::Corrupt(_))));
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}
