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
//!
//! **Operations and group commit** (ADR 0017). Writes happen inside an
//! *operation* ([`Store::transaction`] or [`Store::stage`]): all of an
//! operation's writes become visible together when it succeeds, none when it
//! fails. A transaction is committed to the file before it returns; a staged
//! operation joins the *group* of changes that the next [`Store::flush`]
//! writes in one SQLite transaction. The hot path (encrypt, decrypt) stages,
//! and the connection flushes once per burst before anything leaves the
//! device (a frame sent, an acknowledgement): one commit for a burst instead
//! of one per message. Reads see committed, grouped and the running
//! operation's writes. Sessions, identities and settings are kept opened in
//! memory once read (sessions as libsignal objects, serialised only when
//! written), so the hot path neither reads nor opens them again.

use crate::error::{ClientError, Result};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use foldhash::{HashMap, HashSet};
use hmac::{Hmac, Mac};
use libsignal_protocol::SessionRecord;
use rand::RngCore as _;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::Sha256;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

type HmacSha256 = Hmac<Sha256>;

const CHECK_PLAINTEXT: &[u8] = b"privcomm client store v1";
const NONCE_BYTES: usize = 12;

/// What a record is. Stored in clear beside the sealed value (it says only
/// which kind of record a row is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// An incoming message id already decrypted (de-duplication; its own
    /// table, see [`Store::seen`]).
    Seen,
    /// An incoming message held back: its sender's identity changed.
    Held,
    /// A whole frame waiting to go out, as earlier versions kept the outbox
    /// (moved to the outbox record when the store is opened).
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

    /// Kept opened in memory once read: few, small, and read on every message.
    fn cached(self) -> bool {
        matches!(self, Kind::Meta | Kind::Identity | Kind::Session)
    }
}

struct Keys {
    seal: Aes256Gcm,
    /// HMAC-SHA256 keyed for slots (cloned per slot: the key schedule is done once).
    slot: HmacSha256,
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
        let slot_key = derive(b"privcomm/client-store/slot/v1");
        Ok(Keys {
            seal: Aes256Gcm::new_from_slice(&seal_key).expect("32-byte AES key"),
            slot: <HmacSha256 as Mac>::new_from_slice(&slot_key).expect("HMAC takes any key length"),
        })
    }

    fn slot(&self, kind: Kind, id: &[u8]) -> Vec<u8> {
        let mut mac = self.slot.clone();
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

    /// The slot (and associated data) of message-log entry `seq`.
    fn message_slot(seq: i64) -> Vec<u8> {
        [b"message:".as_slice(), &seq.to_be_bytes()].concat()
    }
}

/// A value in memory: bytes, or a libsignal session kept as the object
/// libsignal uses until it is written.
#[derive(Clone)]
enum Value {
    Bytes(Rc<[u8]>),
    Session(Rc<SessionRecord>),
}

impl Value {
    fn bytes(&self) -> Result<Vec<u8>> {
        match self {
            Value::Bytes(bytes) => Ok(bytes.to_vec()),
            Value::Session(record) => Ok(record.serialize()?),
        }
    }
}

type Key = (Kind, Box<[u8]>);

/// A de-duplication tag: the first 16 bytes of the HMAC slot of a message's
/// `sender/id` (the id itself is not in the file).
pub type Tag = [u8; 16];

/// How many de-duplication tags are kept, newest first (ADR 0017): a message
/// delivered again after this many newer ones is still caught by libsignal
/// (its message key was used) and dropped as a duplicate all the same.
pub const SEEN_WINDOW: usize = 100_000;

/// The first byte of a message-log chunk (an entry written one per row by an
/// earlier version is JSON, starting with `{`).
const CHUNK: u8 = 1;

/// The `meta` id of the outbox record: the log numbers of the messages not
/// confirmed sent, 8 bytes each (big-endian).
const OUTBOX: &[u8] = b"outbox";

/// The newest [`SEEN_WINDOW`] committed tags, in memory.
#[derive(Default)]
struct Recent {
    tags: HashSet<Tag>,
    order: std::collections::VecDeque<Tag>,
}

impl Recent {
    fn add(&mut self, tag: Tag) {
        if self.tags.insert(tag) {
            self.order.push_back(tag);
            if self.order.len() > SEEN_WINDOW
                && let Some(oldest) = self.order.pop_front()
            {
                self.tags.remove(&oldest);
            }
        }
    }
}

/// Writes not in the file yet: a running operation's, or the group's.
#[derive(Default)]
struct Changes {
    /// `None`: removed.
    writes: HashMap<Key, Option<Value>>,
    /// Kinds whose every record was removed (before `writes`).
    cleared: HashSet<Kind>,
    /// Message-log entries `(seq, entry)`, consecutive.
    log: Vec<(i64, Vec<u8>)>,
    /// De-duplication tags, in the order received.
    seen: Vec<Tag>,
    /// Log numbers that joined the outbox.
    queued: Vec<i64>,
    /// Log numbers that left it.
    dequeued: Vec<i64>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.cleared.is_empty()
            && self.log.is_empty()
            && self.seen.is_empty()
            && self.queued.is_empty()
            && self.dequeued.is_empty()
    }

    /// What these changes say about `key`: `None` if nothing.
    fn lookup(&self, key: &Key) -> Option<Option<Value>> {
        match self.writes.get(key) {
            Some(value) => Some(value.clone()),
            None if self.cleared.contains(&key.0) => Some(None),
            None => None,
        }
    }

    /// Moves `later` on top of these changes, leaving it empty (its
    /// buffers are kept for the next operation).
    fn absorb(&mut self, later: &mut Changes) {
        for kind in &later.cleared {
            self.writes.retain(|key, _| key.0 != *kind);
        }
        self.cleared.extend(later.cleared.drain());
        self.writes.extend(later.writes.drain());
        self.log.append(&mut later.log);
        self.seen.append(&mut later.seen);
        self.queued.append(&mut later.queued);
        self.dequeued.append(&mut later.dequeued);
    }

    fn clear(&mut self) {
        self.writes.clear();
        self.cleared.clear();
        self.log.clear();
        self.seen.clear();
        self.queued.clear();
        self.dequeued.clear();
    }

    /// `outbox` with these changes (a number leaves only after it joined).
    fn apply_outbox(&self, outbox: &mut std::collections::BTreeSet<i64>) {
        outbox.extend(&self.queued);
        for seq in &self.dequeued {
            outbox.remove(seq);
        }
    }
}

struct Operation {
    depth: u32,
    changes: Changes,
    /// The log's next sequence number when the operation began (restored if it fails).
    next_seq: i64,
}

#[derive(Default)]
struct State {
    /// Committed values (and known absences) of [`Kind::cached`] kinds.
    cache: HashMap<Key, Option<Value>>,
    /// Staged by finished operations; written by the next flush.
    group: Changes,
    /// The running operation, if any.
    operation: Option<Operation>,
    /// The next message-log sequence number.
    next_seq: i64,
    /// Committed de-duplication tags.
    recent: Recent,
    /// Committed outbox: log numbers of the messages not confirmed sent.
    outbox: std::collections::BTreeSet<i64>,
    /// An empty `Changes` whose buffers the next operation reuses.
    spare: Changes,
}

/// The store. Cheap to clone (one connection, shared on one thread).
#[derive(Clone)]
pub struct Store {
    inner: Rc<Inner>,
}

struct Inner {
    db: RefCell<Connection>,
    keys: Keys,
    state: RefCell<State>,
    checkpointer: Checkpointer,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // What is staged goes to the file when the store closes.
        if let Err(error) = self.flush() {
            tracing::warn!(%error, "the client store could not write its last changes when closing");
        }
        self.checkpointer.stop();
    }
}

/// At most one background checkpoint per this long (commits in between share it).
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The WAL grows to this many pages before the committing thread checkpoints
/// it itself (only if the background checkpoints cannot keep up).
const CHECKPOINT_BACKSTOP_PAGES: i64 = 10_000;

/// Copies the WAL into the database file on a thread and connection of its
/// own after commits (a passive checkpoint: it never blocks a commit), so
/// that the copy and its fsync are not on the message path.
struct Checkpointer {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Checkpoints run, and their time in total.
    done: std::sync::Arc<std::sync::Mutex<(u64, std::time::Duration)>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let done = std::sync::Arc::new(std::sync::Mutex::new((0, std::time::Duration::ZERO)));
        let tally = done.clone();
        let thread = std::thread::Builder::new()
            .name("privcomm-checkpoint".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                while woken.recv().is_ok() {
                    let started = std::time::Instant::now();
                    if let Err(error) = db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(%error, "a background checkpoint of the client store failed");
                    }
                    {
                        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                        tally.0 += 1;
                        tally.1 += started.elapsed();
                    }
                    let until = std::time::Instant::now() + CHECKPOINT_PAUSE;
                    loop {
                        match woken.recv_timeout(until.saturating_duration_since(std::time::Instant::now())) {
                            Ok(()) => continue,
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    // A commit during the pause asked for the next checkpoint (the
                    // channel kept that one wake-up); otherwise wait for one.
                }
            })
            .map_err(|e| ClientError::Store(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { wake: Some(wake), thread: Some(thread), done })
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    fn stop(&mut self) {
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Message-log entries `first..` packed into one chunk.
fn pack(entries: &[(i64, Vec<u8>)]) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(1 + entries.iter().map(|(_, e)| 4 + e.len()).sum::<usize>());
    chunk.push(CHUNK);
    for (_, entry) in entries {
        chunk.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        chunk.extend_from_slice(entry);
    }
    chunk
}

/// The entries of the row whose first sequence number is `first`.
fn unpack(first: i64, row: Vec<u8>) -> Result<Vec<(i64, Vec<u8>)>> {
    if row.first() != Some(&CHUNK) {
        return Ok(vec![(first, row)]);
    }
    let corrupt = || ClientError::Corrupt("a message-log chunk".into());
    let (mut rest, mut out) = (&row[1..], Vec::new());
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_be_bytes(*len) as usize;
        let entry = tail.get(..len).ok_or_else(corrupt)?;
        out.push((first + out.len() as i64, entry.to_vec()));
        rest = &tail[len..];
    }
    Ok(out)
}

impl Inner {
    /// Writes the group in one SQLite transaction. On failure nothing is
    /// written and the group stays staged (the next flush tries again).
    fn flush(&self) -> Result<()> {
        let mut state = self.state.borrow_mut();
        if state.group.is_empty() {
            return Ok(());
        }
        let group = &state.group;
        let db = self.db.borrow();
        db.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let written = (|| -> Result<()> {
            for kind in &group.cleared {
                db.prepare_cached("DELETE FROM records WHERE kind = ?1 AND note IS NULL")?
                    .execute(params![kind.tag()])?;
            }
            for ((kind, id), value) in &group.writes {
                let slot = self.keys.slot(*kind, id);
                match value {
                    Some(value) => {
                        let sealed = self.keys.seal(*kind, &slot, &value.bytes()?);
                        db.prepare_cached("INSERT OR REPLACE INTO records (kind, slot, value) VALUES (?1, ?2, ?3)")?
                            .execute(params![kind.tag(), slot, sealed])?;
                    }
                    None => {
                        db.prepare_cached("DELETE FROM records WHERE kind = ?1 AND slot = ?2")?
                            .execute(params![kind.tag(), slot])?;
                    }
                }
            }
            // The burst's log entries: one row, sealed once.
            if let Some((first, _)) = group.log.first() {
                let sealed = self.keys.seal(Kind::Meta, &Keys::message_slot(*first), &pack(&group.log));
                db.prepare_cached("INSERT INTO messages (seq, value) VALUES (?1, ?2)")?
                    .execute(params![first, sealed])?;
            }
            if !group.seen.is_empty() {
                db.prepare_cached("INSERT INTO seen (tags) VALUES (?1)")?.execute(params![group.seen.concat()])?;
            }
            if !group.queued.is_empty() || !group.dequeued.is_empty() {
                let mut outbox = state.outbox.clone();
                group.apply_outbox(&mut outbox);
                let list: Vec<u8> = outbox.iter().flat_map(|seq| seq.to_be_bytes()).collect();
                let slot = self.keys.slot(Kind::Meta, OUTBOX);
                db.prepare_cached("INSERT OR REPLACE INTO records (kind, slot, value) VALUES (?1, ?2, ?3)")?
                    .execute(params![Kind::Meta.tag(), slot, self.keys.seal(Kind::Meta, &slot, &list)])?;
            }
            db.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        if let Err(error) = written {
            let _ = db.execute_batch("ROLLBACK");
            return Err(error);
        }
        self.checkpointer.wake();
        let group = std::mem::take(&mut state.group);
        let mut outbox = std::mem::take(&mut state.outbox);
        group.apply_outbox(&mut outbox);
        state.outbox = outbox;
        for tag in group.seen {
            state.recent.add(tag);
        }
        for kind in group.cleared {
            state.cache.retain(|key, _| key.0 != kind);
        }
        for (key, value) in group.writes {
            if key.0.cached() {
                state.cache.insert(key, value);
            }
        }
        Ok(())
    }
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
        // Checkpoints run in the background (see `Checkpointer`); this is the backstop.
        db.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BACKSTOP_PAGES)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store {
            inner: Rc::new(Inner {
                db: RefCell::new(db),
                keys,
                state: RefCell::new(State::default()),
                checkpointer: Checkpointer { wake: None, thread: None, done: Default::default() },
            }),
        };
        store.check_key()?;
        store.upgrade()?;
        store.load_recent()?;
        let outbox = store.get(Kind::Meta, OUTBOX)?.unwrap_or_default();
        if outbox.len() % 8 != 0 {
            return Err(ClientError::Corrupt("the outbox".into()));
        }
        store.inner.state.borrow_mut().outbox =
            outbox.chunks_exact(8).map(|b| i64::from_be_bytes(b.try_into().expect("8-byte chunks"))).collect();
        let last = store
            .inner
            .db
            .borrow()
            .query_row("SELECT seq, value FROM messages ORDER BY seq DESC LIMIT 1", [], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .optional()?;
        let next_seq = match last {
            Some((first, value)) => first + store.open_log_row(first, &value)?.len() as i64,
            None => 1,
        };
        store.inner.state.borrow_mut().next_seq = next_seq;
        // Started once the key is known to be right and the tables exist.
        let checkpointer = Checkpointer::start(path)?;
        Rc::get_mut(&mut store.inner).expect("not shared yet").checkpointer = checkpointer;
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
             -- One row per commit: the first sequence number and its entries, sealed.
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

    /// Brings a store written by an earlier version up to date (the key is
    /// checked first): de-duplication tags moved from sealed `seen` records
    /// (whose value said nothing) to a table of tags, one row per commit.
    fn upgrade(&self) -> Result<()> {
        let db = self.inner.db.borrow();
        db.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS seen (number INTEGER PRIMARY KEY, tags BLOB NOT NULL);",
        )?;
        let moved = (|| -> Result<()> {
            let mut tags = Vec::new();
            let mut statement = db.prepare("SELECT slot FROM records WHERE kind = 'seen'")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let slot: Vec<u8> = row.get(0)?;
                tags.extend_from_slice(slot.get(..16).ok_or_else(|| ClientError::Corrupt("a seen record".into()))?);
            }
            if !tags.is_empty() {
                db.execute("INSERT INTO seen (tags) VALUES (?1)", params![tags])?;
                db.execute("DELETE FROM records WHERE kind = 'seen'", [])?;
            }
            Ok(())
        })();
        match moved {
            Ok(()) => db.execute_batch("COMMIT")?,
            Err(error) => {
                let _ = db.execute_batch("ROLLBACK");
                return Err(error);
            }
        }
        Ok(())
    }

    /// Loads the newest [`SEEN_WINDOW`] de-duplication tags and forgets the
    /// rows older than those.
    fn load_recent(&self) -> Result<()> {
        let db = self.inner.db.borrow();
        let mut rows: Vec<(i64, Vec<u8>)> = Vec::new();
        let mut count = 0;
        {
            let mut statement = db.prepare("SELECT number, tags FROM seen ORDER BY number DESC")?;
            let mut cursor = statement.query([])?;
            while count < SEEN_WINDOW
                && let Some(row) = cursor.next()?
            {
                let (number, tags): (i64, Vec<u8>) = (row.get(0)?, row.get(1)?);
                if tags.len() % 16 != 0 {
                    return Err(ClientError::Corrupt("a row of de-duplication tags".into()));
                }
                count += tags.len() / 16;
                rows.push((number, tags));
            }
        }
        if let Some((oldest, _)) = rows.last() {
            db.execute("DELETE FROM seen WHERE number < ?1", params![oldest])?;
        }
        let mut state = self.inner.state.borrow_mut();
        for (_, tags) in rows.iter().rev() {
            for tag in tags.chunks_exact(16) {
                state.recent.add(tag.try_into().expect("16-byte chunks"));
            }
        }
        Ok(())
    }

    /// The de-duplication tag of the id made of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> Tag {
        let mut mac = self.inner.keys.slot.clone();
        mac.update(Kind::Seen.tag().as_bytes());
        mac.update(&[0]);
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes()[..16].try_into().expect("HMAC-SHA256 has 32 bytes")
    }

    /// The entries of message-log row `first` (opened).
    fn open_log_row(&self, first: i64, value: &[u8]) -> Result<Vec<(i64, Vec<u8>)>> {
        let row = self
            .inner
            .keys
            .open(Kind::Meta, &Keys::message_slot(first), value)
            .ok_or_else(|| ClientError::Corrupt("a message".into()))?;
        unpack(first, row)
    }

    /// What the store holds for `kind`/`id`: the running operation's write,
    /// the group's, the cached committed value, or the file's.
    fn lookup(&self, kind: Kind, id: &[u8]) -> Result<Option<Value>> {
        let key: Key = (kind, id.into());
        {
            let state = self.inner.state.borrow();
            if let Some(found) = state.operation.as_ref().and_then(|op| op.changes.lookup(&key)) {
                return Ok(found);
            }
            if let Some(found) = state.group.lookup(&key) {
                return Ok(found);
            }
            if let Some(found) = state.cache.get(&key) {
                return Ok(found.clone());
            }
        }
        let slot = self.inner.keys.slot(kind, id);
        let value: Option<Vec<u8>> = self
            .inner
            .db
            .borrow()
            .prepare_cached("SELECT value FROM records WHERE kind = ?1 AND slot = ?2")?
            .query_row(params![kind.tag(), slot], |row| row.get(0))
            .optional()?;
        let value = value
            .map(|value| {
                self.inner
                    .keys
                    .open(kind, &slot, &value)
                    .map(|plain| Value::Bytes(plain.into()))
                    .ok_or_else(|| ClientError::Corrupt(format!("a {} record", kind.tag())))
            })
            .transpose()?;
        if kind.cached() {
            self.inner.state.borrow_mut().cache.insert(key, value.clone());
        }
        Ok(value)
    }

    /// The record `id` of `kind`, opened.
    pub fn get(&self, kind: Kind, id: &[u8]) -> Result<Option<Vec<u8>>> {
        self.lookup(kind, id)?.map(|value| value.bytes()).transpose()
    }

    /// The session with `contact` (libsignal's object, opened once and kept).
    pub fn session(&self, contact: &str) -> Result<Option<SessionRecord>> {
        match self.lookup(Kind::Session, contact.as_bytes())? {
            None => Ok(None),
            Some(Value::Session(record)) => Ok(Some(SessionRecord::clone(&record))),
            Some(Value::Bytes(bytes)) => {
                // Read from the file: kept as an object from now on.
                let record = SessionRecord::deserialize(&bytes)?;
                let key: Key = (Kind::Session, contact.as_bytes().into());
                self.inner.state.borrow_mut().cache.insert(key, Some(Value::Session(Rc::new(record.clone()))));
                Ok(Some(record))
            }
        }
    }

    /// Whether there is a session with `contact`.
    pub fn has_session(&self, contact: &str) -> Result<bool> {
        Ok(self.lookup(Kind::Session, contact.as_bytes())?.is_some())
    }

    /// Stores the session with `contact`.
    pub fn put_session(&self, contact: &str, record: &SessionRecord) -> Result<()> {
        self.write(Kind::Session, contact.as_bytes(), Some(Value::Session(Rc::new(record.clone()))))
    }

    /// Stores `value` as record `id` of `kind`, replacing any.
    pub fn put(&self, kind: Kind, id: &[u8], value: &[u8]) -> Result<()> {
        self.write(kind, id, Some(Value::Bytes(value.into())))
    }

    /// Removes record `id` of `kind` (no error if absent).
    pub fn remove(&self, kind: Kind, id: &[u8]) -> Result<()> {
        self.write(kind, id, None)
    }

    fn write(&self, kind: Kind, id: &[u8], value: Option<Value>) -> Result<()> {
        debug_assert!(kind != Kind::Seen, "de-duplication tags go through mark_seen");
        self.in_operation(|changes, _| {
            changes.writes.insert((kind, id.into()), value);
        })
    }

    /// Applies `change` to the running operation's changes (with the log's
    /// next sequence number); outside an operation, as a transaction of its
    /// own (as SQLite's autocommit was).
    fn in_operation<T>(&self, change: impl FnOnce(&mut Changes, &mut i64) -> T) -> Result<T> {
        let outermost = self.begin();
        let value = {
            let mut state = self.inner.state.borrow_mut();
            let State { operation, next_seq, .. } = &mut *state;
            let op = operation.as_mut().expect("an operation was begun");
            change(&mut op.changes, next_seq)
        };
        self.end_committed(outermost, Ok(value))
    }

    /// Removes every record of `kind`.
    pub fn remove_all(&self, kind: Kind) -> Result<()> {
        self.in_operation(|changes, _| {
            changes.writes.retain(|key, _| key.0 != kind);
            changes.cleared.insert(kind);
        })
    }

    /// Every record of `kind`, opened (order unspecified).
    pub fn all(&self, kind: Kind) -> Result<Vec<Vec<u8>>> {
        let state = self.inner.state.borrow();
        let operation = state.operation.as_ref().map(|op| &op.changes);
        let cleared = |changes: Option<&Changes>| changes.is_some_and(|c| c.cleared.contains(&kind));
        let mut by_slot: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        if !cleared(Some(&state.group)) && !cleared(operation) {
            let db = self.inner.db.borrow();
            let mut statement =
                db.prepare_cached("SELECT slot, value FROM records WHERE kind = ?1 AND note IS NULL")?;
            let rows = statement.query_map(params![kind.tag()], |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get(1)?)))?;
            for row in rows {
                let (slot, value): (Vec<u8>, Vec<u8>) = row?;
                let plain = self
                    .inner
                    .keys
                    .open(kind, &slot, &value)
                    .ok_or_else(|| ClientError::Corrupt(format!("a {} record", kind.tag())))?;
                by_slot.insert(slot, plain);
            }
        }
        for changes in [Some(&state.group), operation].into_iter().flatten() {
            if changes.cleared.contains(&kind) {
                by_slot.clear();
            }
            for ((k, id), value) in changes.writes.iter().filter(|((k, _), _)| *k == kind) {
                let slot = self.inner.keys.slot(*k, id);
                match value {
                    Some(value) => by_slot.insert(slot, value.bytes()?),
                    None => by_slot.remove(&slot),
                };
            }
        }
        Ok(by_slot.into_values().collect())
    }

    /// Whether `tag` was recorded by [`Store::mark_seen`] (among the newest
    /// [`SEEN_WINDOW`]).
    pub fn seen(&self, tag: &Tag) -> bool {
        let state = self.inner.state.borrow();
        state.recent.tags.contains(tag)
            || state.group.seen.contains(tag)
            || state.operation.as_ref().is_some_and(|op| op.changes.seen.contains(tag))
    }

    /// Records `tag` for de-duplication.
    pub fn mark_seen(&self, tag: Tag) -> Result<()> {
        self.in_operation(|changes, _| changes.seen.push(tag))
    }

    /// Appends `value` to the message log; returns its sequence number.
    pub fn append_message(&self, value: &[u8]) -> Result<i64> {
        self.in_operation(|changes, next_seq| {
            let seq = *next_seq;
            changes.log.push((seq, value.to_vec()));
            *next_seq += 1;
            seq
        })
    }

    /// Puts log entry `seq` in the outbox (a message to send).
    pub fn queue(&self, seq: i64) -> Result<()> {
        self.in_operation(|changes, _| changes.queued.push(seq))
    }

    /// Takes log entry `seq` out of the outbox (no error if absent).
    pub fn dequeue(&self, seq: i64) -> Result<()> {
        self.in_operation(|changes, _| changes.dequeued.push(seq))
    }

    /// The outbox: log numbers of the messages to send, oldest first.
    pub fn queued(&self) -> Vec<i64> {
        let state = self.inner.state.borrow();
        let mut outbox = state.outbox.clone();
        state.group.apply_outbox(&mut outbox);
        if let Some(op) = &state.operation {
            op.changes.apply_outbox(&mut outbox);
        }
        outbox.into_iter().collect()
    }

    /// The message log, oldest first.
    pub fn messages(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.messages_numbered()?.into_iter().map(|(_, value)| value).collect())
    }

    /// Message-log entry `seq`.
    pub fn message(&self, seq: i64) -> Result<Option<Vec<u8>>> {
        {
            let state = self.inner.state.borrow();
            for changes in [Some(&state.group), state.operation.as_ref().map(|op| &op.changes)].into_iter().flatten() {
                if let Some((_, entry)) = changes.log.iter().find(|(s, _)| *s == seq) {
                    return Ok(Some(entry.clone()));
                }
            }
        }
        let row: Option<(i64, Vec<u8>)> = self
            .inner
            .db
            .borrow()
            .prepare_cached("SELECT seq, value FROM messages WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1")?
            .query_row(params![seq], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((first, value)) = row else { return Ok(None) };
        Ok(self.open_log_row(first, &value)?.into_iter().find(|(s, _)| *s == seq).map(|(_, entry)| entry))
    }

    /// The message log, oldest first, with sequence numbers.
    pub fn messages_numbered(&self) -> Result<Vec<(i64, Vec<u8>)>> {
        let db = self.inner.db.borrow();
        let mut statement = db.prepare_cached("SELECT seq, value FROM messages ORDER BY seq")?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (first, value) = row?;
            out.extend(self.open_log_row(first, &value)?);
        }
        let state = self.inner.state.borrow();
        for changes in [Some(&state.group), state.operation.as_ref().map(|op| &op.changes)].into_iter().flatten() {
            out.extend(changes.log.iter().cloned());
        }
        Ok(out)
    }

    /// Runs `work` as one operation and commits it to the file (with
    /// whatever the group holds) before returning: all of its writes land,
    /// or none. Inside another operation it is part of that one. If the
    /// commit itself fails, the error is returned and the writes stay
    /// staged for the next flush.
    pub fn transaction<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let outermost = self.begin();
        self.end_committed(outermost, work())
    }

    /// Async form of [`Store::transaction`] for libsignal's store calls.
    pub async fn transaction_async<T, F: std::future::Future<Output = Result<T>>>(&self, work: F) -> Result<T> {
        let outermost = self.begin();
        self.end_committed(outermost, work.await)
    }

    /// [`Store::end`], then, for the outermost operation that succeeded, the commit.
    fn end_committed<T>(&self, outermost: bool, result: Result<T>) -> Result<T> {
        let result = self.end(result);
        if outermost && result.is_ok() {
            self.flush()?;
        }
        result
    }

    /// Runs `work` as one operation whose writes join the group: visible at
    /// once, all or none, written to the file by the next [`Store::flush`].
    pub async fn stage<T, F: std::future::Future<Output = Result<T>>>(&self, work: F) -> Result<T> {
        self.begin();
        self.end(work.await)
    }

    /// Writes every staged operation to the file in one SQLite transaction.
    /// A failure writes nothing and keeps them staged.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Background checkpoints so far: how many, and their time in total.
    pub fn checkpoints(&self) -> (u64, std::time::Duration) {
        *self.inner.checkpointer.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether staged operations wait for a flush.
    pub fn has_staged(&self) -> bool {
        !self.inner.state.borrow().group.is_empty()
    }

    /// Starts an operation (or joins the running one); true if it is the outermost.
    fn begin(&self) -> bool {
        let mut state = self.inner.state.borrow_mut();
        let next_seq = state.next_seq;
        match state.operation.as_mut() {
            Some(op) => {
                op.depth += 1;
                false
            }
            None => {
                let changes = std::mem::take(&mut state.spare);
                state.operation = Some(Operation { depth: 1, changes, next_seq });
                true
            }
        }
    }

    /// Ends an operation level: the outermost moves its writes into the
    /// group after `result` succeeded and drops them after it failed.
    fn end<T>(&self, result: Result<T>) -> Result<T> {
        let mut state = self.inner.state.borrow_mut();
        let Some(op) = state.operation.as_mut() else {
            return Err(ClientError::Store("an operation ended that had not begun".into()));
        };
        op.depth -= 1;
        if op.depth > 0 {
            return result;
        }
        let mut op = state.operation.take().expect("checked above");
        let result = match result {
            Ok(value) => {
                state.group.absorb(&mut op.changes);
                Ok(value)
            }
            Err(error) => {
                op.changes.clear();
                state.next_seq = op.next_seq;
                Err(error)
            }
        };
        state.spare = op.changes;
        result
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

    #[tokio::test]
    async fn a_staged_operation_is_visible_at_once_and_in_the_file_only_after_a_flush() -> Result<()> {
        let path = temp_path();
        let key = [8u8; 32];
        let store = Store::open(&path, &key)?;
        store.transaction(|| store.put(Kind::Identity, b"bob", b"committed"))?;
        store
            .stage(async {
                store.put(Kind::Identity, b"bob", b"staged")?;
                store.put(Kind::Session, b"carol", b"staged session")?;
                store.append_message(b"staged message")?;
                store.mark_seen(store.tag(&[b"carol/1"]))
            })
            .await?;
        assert!(store.has_staged());
        assert_eq!(store.get(Kind::Identity, b"bob")?.as_deref(), Some(&b"staged"[..]));
        assert_eq!(store.messages()?, vec![b"staged message".to_vec()]);
        assert!(store.seen(&store.tag(&[b"carol/1"])));
        // A crash now (no flush, no close): the file holds the committed state only.
        let other = Store::open(&path, &key)?;
        assert_eq!(other.get(Kind::Identity, b"bob")?.as_deref(), Some(&b"committed"[..]));
        assert_eq!(other.get(Kind::Session, b"carol")?, None);
        assert!(other.messages()?.is_empty());
        assert!(!other.seen(&other.tag(&[b"carol/1"])));
        drop(other);
        store.flush()?;
        assert!(!store.has_staged());
        std::mem::forget(store); // no flush on close: what is there came from `flush`
        let store = Store::open(&path, &key)?;
        assert_eq!(store.get(Kind::Identity, b"bob")?.as_deref(), Some(&b"staged"[..]));
        assert_eq!(store.get(Kind::Session, b"carol")?.as_deref(), Some(&b"staged session"[..]));
        assert_eq!(store.messages()?, vec![b"staged message".to_vec()]);
        assert!(store.seen(&store.tag(&[b"carol/1"])));
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_operation_leaves_nothing_behind() -> Result<()> {
        let path = temp_path();
        let store = Store::open(&path, &[9u8; 32])?;
        store.transaction(|| {
            store.put(Kind::Outbox, b"m1", b"frame 1")?;
            store.append_message(b"first")
        })?;
        let failed: Result<()> = store
            .stage(async {
                store.put(Kind::Identity, b"bob", b"new key")?;
                store.remove(Kind::Outbox, b"m1")?;
                store.remove_all(Kind::Session)?;
                store.append_message(b"never")?;
                store.mark_seen(store.tag(&[b"bob/2"]))?;
                Err(ClientError::Protocol("the message did not decrypt".into()))
            })
            .await;
        assert!(failed.is_err());
        assert!(!store.has_staged());
        assert_eq!(store.get(Kind::Identity, b"bob")?, None);
        assert_eq!(store.all(Kind::Outbox)?, vec![b"frame 1".to_vec()]);
        assert!(!store.seen(&store.tag(&[b"bob/2"])));
        // The log numbers on from where it was.
        store.transaction(|| store.append_message(b"second"))?;
        drop(store);
        let store = Store::open(&path, &[9u8; 32])?;
        assert_eq!(store.messages()?, vec![b"first".to_vec(), b"second".to_vec()]);
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[tokio::test]
    async fn removing_every_record_of_a_kind_applies_in_order_with_later_writes() -> Result<()> {
        let path = temp_path();
        let store = Store::open(&path, &[4u8; 32])?;
        store.transaction(|| {
            store.put(Kind::Session, b"a", b"1")?;
            store.put(Kind::Session, b"b", b"2")
        })?;
        assert_eq!(store.get(Kind::Session, b"a")?.as_deref(), Some(&b"1"[..])); // now cached
        store
            .stage(async {
                store.remove_all(Kind::Session)?;
                store.put(Kind::Session, b"c", b"3")
            })
            .await?;
        assert_eq!(store.get(Kind::Session, b"a")?, None);
        assert_eq!(store.all(Kind::Session)?, vec![b"3".to_vec()]);
        store.flush()?;
        assert_eq!(store.get(Kind::Session, b"a")?, None);
        drop(store);
        let store = Store::open(&path, &[4u8; 32])?;
        assert_eq!(store.all(Kind::Session)?, vec![b"3".to_vec()]);
        assert_eq!(store.get(Kind::Session, b"b")?, None);
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[test]
    fn de_duplication_records_of_an_earlier_version_move_to_the_tag_table() -> Result<()> {
        let path = temp_path();
        let key = [6u8; 32];
        drop(Store::open(&path, &key)?);
        {
            // As the previous version wrote them: a sealed record of kind `seen`.
            let keys = Keys::derive(&key)?;
            let slot = keys.slot(Kind::Seen, b"bob/7");
            let db = Connection::open(&path)?;
            db.execute(
                "INSERT INTO records (kind, slot, value) VALUES ('seen', ?1, ?2)",
                params![slot, keys.seal(Kind::Seen, &slot, &[1])],
            )?;
        }
        let store = Store::open(&path, &key)?;
        assert!(store.seen(&store.tag(&[b"bob/7"])));
        assert!(!store.seen(&store.tag(&[b"bob/8"])));
        let left: i64 =
            Connection::open(&path)?.query_row("SELECT count(*) FROM records WHERE kind = 'seen'", [], |r| r.get(0))?;
        assert_eq!(left, 0);
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[test]
    fn log_rows_of_an_earlier_version_are_read_with_the_chunks_after_them() -> Result<()> {
        let path = temp_path();
        let key = [2u8; 32];
        drop(Store::open(&path, &key)?);
        {
            // As the previous version wrote them: one sealed entry per row, keyed by its number.
            let keys = Keys::derive(&key)?;
            let db = Connection::open(&path)?;
            for (seq, entry) in [(1i64, &b"{\"old\":1}"[..]), (2, b"{\"old\":2}")] {
                db.execute(
                    "INSERT INTO messages (seq, value) VALUES (?1, ?2)",
                    params![seq, keys.seal(Kind::Meta, &Keys::message_slot(seq), entry)],
                )?;
            }
        }
        let store = Store::open(&path, &key)?;
        store.transaction(|| {
            assert_eq!(store.append_message(b"new 3")?, 3);
            assert_eq!(store.append_message(b"new 4")?, 4);
            Ok(())
        })?;
        drop(store);
        let store = Store::open(&path, &key)?;
        assert_eq!(
            store.messages_numbered()?,
            vec![
                (1, b"{\"old\":1}".to_vec()),
                (2, b"{\"old\":2}".to_vec()),
                (3, b"new 3".to_vec()),
                (4, b"new 4".to_vec())
            ]
        );
        assert_eq!(store.message(2)?.as_deref(), Some(&b"{\"old\":2}"[..]));
        assert_eq!(store.message(4)?.as_deref(), Some(&b"new 4"[..]));
        assert_eq!(store.message(5)?, None);
        assert_eq!(store.transaction(|| store.append_message(b"new 5"))?, 5);
        let rows: i64 = Connection::open(&path)?.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
        assert_eq!(rows, 4, "two old rows, one chunk of two, one of one");
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[tokio::test]
    async fn the_outbox_survives_a_restart_and_follows_its_operations() -> Result<()> {
        let path = temp_path();
        let key = [3u8; 32];
        let store = Store::open(&path, &key)?;
        store.stage(async { store.queue(7) }).await?;
        store.stage(async { store.queue(9) }).await?;
        assert!(
            store
                .stage(async {
                    store.queue(11)?;
                    Err::<(), _>(ClientError::Protocol("no".into()))
                })
                .await
                .is_err()
        );
        assert_eq!(store.queued(), vec![7, 9]);
        store.flush()?;
        store.stage(async { store.dequeue(7) }).await?;
        assert_eq!(store.queued(), vec![9]);
        std::mem::forget(store); // a crash: the staged removal is lost, the message goes out again
        let store = Store::open(&path, &key)?;
        assert_eq!(store.queued(), vec![7, 9]);
        store.transaction(|| store.dequeue(7))?;
        drop(store);
        assert_eq!(Store::open(&path, &key)?.queued(), vec![9]);
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    #[test]
    fn only_the_newest_tags_are_kept() -> Result<()> {
        let path = temp_path();
        let key = [4u8; 32];
        let store = Store::open(&path, &key)?;
        let per_row = 1_000;
        let rows = SEEN_WINDOW / per_row + 1;
        for row in 0..rows {
            store.transaction(|| {
                for n in 0..per_row {
                    store.mark_seen(store.tag(&[format!("{row}/{n}").as_bytes()]))?;
                }
                Ok(())
            })?;
        }
        assert!(!store.seen(&store.tag(&[b"0/0"])), "past the window in memory too");
        assert!(store.seen(&store.tag(&[b"1/0"])));
        drop(store);
        let store = Store::open(&path, &key)?;
        assert!(!store.seen(&store.tag(&[b"0/0"])), "the oldest row is past the window");
        assert!(store.seen(&store.tag(&[b"1/0"])));
        assert!(store.seen(&store.tag(&[format!("{}/{}", rows - 1, per_row - 1).as_bytes()])));
        let left: i64 = Connection::open(&path)?.query_row("SELECT count(*) FROM seen", [], |r| r.get(0))?;
        assert_eq!(left as usize, rows - 1);
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
