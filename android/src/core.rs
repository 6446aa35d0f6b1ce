//! The client's logic, on its own thread (libsignal's stores are not `Send`):
//! registration, login tokens, sessions, encryption and decryption, the
//! message log, held messages of contacts whose identity changed, and prekey
//! maintenance. [`crate::Client`] is the thread-safe face of it.

use crate::api::Api;
use crate::call::engine::CallSignal;
use crate::error::{ClientError, Result, invalid, protocol};
use crate::signal::{KeyMaker, Stores, meta, now_ms};
use crate::store::{Kind, Store};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libsignal_protocol::{
    CiphertextMessage, DeviceId, Fingerprint, IdentityKey, IdentityKeyPair, KyberPreKeyId, PreKeyBundle, PreKeyId,
    PreKeySignalMessage, ProtocolAddress, PublicKey, SignalMessage, SignalProtocolError, SignedPreKeyId, kem,
    message_decrypt, message_encrypt, process_prekey_bundle,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest as _;
use std::cell::RefCell;
use std::time::SystemTime;

/// One-time keys uploaded when the server holds fewer than [`REFILL_BELOW`].
pub const REFILL_COUNT: u32 = 100;
/// The threshold of [`REFILL_COUNT`].
pub const REFILL_BELOW: u64 = 20;
/// A signed prekey older than this is rotated.
pub const SIGNED_PREKEY_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// A message as the app sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct ChatMessage {
    /// The message id (UUID), the same on both sides.
    pub id: String,
    /// The other party's user id.
    pub peer: String,
    /// Sent by this client (`true`) or received.
    pub outgoing: bool,
    /// The text.
    pub text: String,
    /// When the sender sent it (ms since the epoch, the sender's clock).
    pub sent_at_ms: u64,
}

/// The first byte of a message-log entry in binary form (JSON ones, written
/// by earlier versions or for ids that are not UUIDs, start with `{`).
const ENTRY_V1: u8 = 1;

impl ChatMessage {
    /// As the message log keeps it: `1`, id and peer as 16-byte UUIDs,
    /// direction, send time (u64 ms, big-endian), the text; JSON for an id
    /// that is not a UUID in its usual spelling.
    fn encode(&self) -> Result<Vec<u8>> {
        // Only the usual spelling (36 characters, lower case) comes back the same.
        let uuid = |text: &str| {
            uuid::Uuid::parse_str(text)
                .ok()
                .filter(|_| text.len() == 36 && !text.bytes().any(|b| b.is_ascii_uppercase()))
        };
        let (Some(id), Some(peer)) = (uuid(&self.id), uuid(&self.peer)) else {
            return to_json(self);
        };
        let mut out = Vec::with_capacity(42 + self.text.len());
        out.push(ENTRY_V1);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(peer.as_bytes());
        out.push(u8::from(self.outgoing));
        out.extend_from_slice(&self.sent_at_ms.to_be_bytes());
        out.extend_from_slice(self.text.as_bytes());
        Ok(out)
    }

    fn decode(entry: &[u8]) -> Result<ChatMessage> {
        let corrupt = || ClientError::Corrupt("a message-log entry".into());
        if entry.first() != Some(&ENTRY_V1) {
            return serde_json::from_slice(entry).map_err(|_| corrupt());
        }
        if entry.len() < 42 {
            return Err(corrupt());
        }
        let uuid = |bytes: &[u8]| uuid::Uuid::from_slice(bytes).map(|u| u.to_string()).map_err(|_| corrupt());
        Ok(ChatMessage {
            id: uuid(&entry[1..17])?,
            peer: uuid(&entry[17..33])?,
            outgoing: entry[33] != 0,
            sent_at_ms: u64::from_be_bytes(entry[34..42].try_into().expect("8 bytes")),
            text: String::from_utf8(entry[42..].to_vec()).map_err(|_| corrupt())?,
        })
    }
}

/// What `maintain_prekeys` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, uniffi::Record)]
pub struct PrekeyReport {
    /// One-time EC keys on the server before.
    pub one_time_before: u64,
    /// One-time Kyber keys on the server before.
    pub kyber_before: u64,
    /// One-time EC keys uploaded.
    pub one_time_uploaded: u32,
    /// One-time Kyber keys uploaded.
    pub kyber_uploaded: u32,
    /// Whether the signed prekey was rotated.
    pub signed_prekey_rotated: bool,
}

/// What a contact's message turned into.
pub enum Incoming {
    /// Decrypted and stored: show it, then ack.
    Stored(ChatMessage),
    /// Seen before: ack again, show nothing.
    Duplicate,
    /// Held: the sender's identity key changed. Not acked.
    Held {
        /// The sender.
        from: String,
    },
    /// A call signal: for the call engine, not the message log.
    Call {
        /// The sender.
        from: String,
        /// The signal.
        signal: CallSignal,
        /// When the sender sent it (ms since the epoch, their clock).
        sent_at_ms: u64,
    },
    /// Cannot ever be decrypted (corrupt, or not for this session). Acked
    /// so it is not delivered forever; reported.
    Undecryptable {
        /// The sender.
        from: String,
        /// Why.
        reason: String,
    },
}

/// The body of a relay `send` frame.
#[derive(Clone, Debug)]
pub struct OutgoingFrame {
    /// Message id.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// `prekey` or `whisper`.
    pub kind: String,
    /// The ciphertext (Base64 in the frame).
    pub body: Vec<u8>,
}

/// What a Signal message carries: `{"v":1,"type":"text","text":…,"sent_at_ms":…}`
/// or `{"v":1,"type":"call","call":{"kind":"offer",…},"sent_at_ms":…}`.
#[derive(Serialize, Deserialize)]
struct Content<'a> {
    v: u32,
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "str::is_empty")]
    text: std::borrow::Cow<'a, str>,
    sent_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call: Option<CallSignal>,
}

#[derive(Serialize, Deserialize)]
struct HeldMessage {
    id: String,
    from: String,
    kind: String,
    body: String,
}

const DEVICE: u8 = 1;

/// The client's state on its thread.
pub struct Core {
    pub(crate) store: Store,
    stores: Stores,
    pub(crate) api: Api,
    token: RefCell<Option<(String, u64)>>,
    /// Serialises libsignal operations (each is one store operation).
    crypto: tokio::sync::Mutex<()>,
    /// Log numbers of the messages in the store's outbox, by message id.
    unsent: RefCell<std::collections::HashMap<String, i64>>,
}

fn address(user: &str) -> ProtocolAddress {
    ProtocolAddress::new(user.to_owned(), DeviceId::new(DEVICE).expect("device 1 is valid"))
}

fn decode_b64(field: &str, text: &str) -> Result<Vec<u8>> {
    STANDARD.decode(text).map_err(|_| invalid(field, "not standard Base64"))
}

fn user_id_checked(field: &str, user: &str) -> Result<String> {
    uuid::Uuid::parse_str(user).map(|u| u.to_string()).map_err(|_| invalid(field, "not a user id (UUID)"))
}

impl Core {
    /// Opens the store at `path` and talks to `server_url`.
    pub fn open(path: &std::path::Path, store_key: &[u8], server_url: &str) -> Result<Core> {
        let store = Store::open(path, store_key)?;
        let stores = Stores::new(&store);
        let core = Core {
            stores,
            store,
            api: Api::new(server_url)?,
            token: RefCell::new(None),
            crypto: Default::default(),
            unsent: Default::default(),
        };
        core.move_old_outbox()?;
        for (seq, message) in core.unsent_messages()? {
            core.unsent.borrow_mut().insert(message.id, seq);
        }
        Ok(core)
    }

    /// An earlier version kept the outbox as records of whole frames; the
    /// outbox now lists the log entries of the messages to send.
    fn move_old_outbox(&self) -> Result<()> {
        #[derive(Deserialize)]
        struct OldFrame {
            id: String,
        }
        let old = self.store.all(Kind::Outbox)?;
        if old.is_empty() {
            return Ok(());
        }
        let mut ids = std::collections::HashSet::new();
        for value in old {
            let old: OldFrame =
                serde_json::from_slice(&value).map_err(|_| ClientError::Corrupt("an outbox record".into()))?;
            ids.insert(old.id);
        }
        let mut seqs = Vec::new();
        for (seq, entry) in self.store.messages_numbered()? {
            let message = ChatMessage::decode(&entry)?;
            if message.outgoing && ids.contains(&message.id) {
                seqs.push(seq);
            }
        }
        self.store.transaction(|| {
            for seq in &seqs {
                self.store.queue(*seq)?;
            }
            self.store.remove_all(Kind::Outbox)
        })
    }

    /// The account's user id, once registered.
    pub fn user_id(&self) -> Result<Option<String>> {
        Ok(self.store.get(Kind::Meta, meta::USER_ID.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn registered(&self) -> Result<(String, IdentityKeyPair)> {
        let user = self.user_id()?.ok_or(ClientError::NotRegistered)?;
        let identity = self.stores.identities.own()?.ok_or(ClientError::NotRegistered)?;
        Ok((user, identity))
    }

    /// Creates the account: identity, registration id, signed prekey, Kyber
    /// last-resort key, 100 + 100 one-time keys; only SHA-256 of `phone` leaves.
    pub async fn register(&self, phone: &str) -> Result<String> {
        if let Some(user) = self.user_id()? {
            return Err(ClientError::AlreadyRegistered(user));
        }
        let phone = phone.trim();
        if phone.is_empty() || phone.len() > 32 {
            return Err(invalid("phone", "1 to 32 characters"));
        }
        let phone_hash = hex::encode(sha2::Sha256::digest(phone.as_bytes()));
        let _guard = self.crypto.lock().await;
        // The keys are committed before the request: if its answer is lost,
        // the next attempt sends the same keys and can finish the registration.
        let pending: Option<Value> = self
            .store
            .get(Kind::Meta, meta::PENDING_REGISTRATION.as_bytes())?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .filter(|body: &Value| body["phone_hash"] == phone_hash.as_str());
        let body = match pending {
            Some(body) => body,
            None => self.store.transaction(|| {
                self.store.put(Kind::Meta, meta::PHONE_HASH.as_bytes(), phone_hash.as_bytes())?;
                let body = self.new_identity(&phone_hash)?;
                self.store.put(Kind::Meta, meta::PENDING_REGISTRATION.as_bytes(), &to_json(&body)?)?;
                Ok(body)
            })?,
        };
        let user = match self.api.register(&body).await {
            Ok(user) => user,
            Err(ClientError::Server { status: 409, message }) => {
                // Already registered: by an earlier attempt of ours whose answer
                // was lost (then the server holds our identity and we can log
                // in), or by someone else.
                let user = user_id_of(&phone_hash);
                let identity = self.stores.identities.own()?.ok_or(ClientError::NotRegistered)?;
                if self.fetch_token(&user, &identity).await.is_err() {
                    return Err(ClientError::Server { status: 409, message });
                }
                user
            }
            Err(other) => return Err(other),
        };
        self.store.transaction(|| {
            self.store.put(Kind::Meta, meta::USER_ID.as_bytes(), user.as_bytes())?;
            self.store.remove(Kind::Meta, meta::PENDING_REGISTRATION.as_bytes())
        })?;
        Ok(user)
    }

    /// Stores a new identity, registration id, signed prekey, Kyber
    /// last-resort key and 100 + 100 one-time keys; returns the registration body.
    pub(crate) fn new_identity(&self, phone_hash: &str) -> Result<Value> {
        let identity = IdentityKeyPair::generate(&mut rand::rng());
        let registration_id = rand::random_range(1..=16_380u32);
        self.store.put(Kind::Meta, meta::IDENTITY_KEY_PAIR.as_bytes(), &identity.serialize())?;
        self.store.set_meta_u64(meta::REGISTRATION_ID, u64::from(registration_id))?;
        let keys = KeyMaker::new(&self.store, &identity);
        Ok(json!({
            "phone_hash": phone_hash,
            "registration_id": registration_id,
            "identity_key": STANDARD.encode(identity.identity_key().serialize()),
            "signed_prekey": keys.signed_prekey(now_ms())?,
            "kyber_last_resort": keys.kyber_last_resort()?,
            "one_time_prekeys": keys.one_time_prekeys(REFILL_COUNT)?,
            "kyber_prekeys": keys.kyber_prekeys(REFILL_COUNT)?,
        }))
    }

    /// An account that exists only in this store (benchmarks): keys made,
    /// nothing sent.
    pub(crate) fn create_offline(&self, user_id: &str) -> Result<()> {
        self.store.transaction(|| {
            self.new_identity(&"0".repeat(64))?;
            self.store.put(Kind::Meta, meta::USER_ID.as_bytes(), user_id.as_bytes())
        })
    }

    /// A bundle of this account's keys as the server would hand it out, with
    /// one-time keys `one_time_id` (benchmarks).
    pub(crate) async fn own_bundle(&self, one_time_id: u32) -> Result<PreKeyBundle> {
        use libsignal_protocol::{
            GenericSignedPreKey as _, KyberPreKeyStore as _, PreKeyStore as _, SignedPreKeyStore as _,
        };
        let (_, identity) = self.registered()?;
        let registration_id = self.store.meta_u64(meta::REGISTRATION_ID)?.unwrap_or(0) as u32;
        let signed_id = self.store.meta_u64(meta::SIGNED_PREKEY_ID)?.ok_or(ClientError::NotRegistered)? as u32;
        let signed = self.stores.signed.get_signed_pre_key(signed_id.into()).await?;
        let one_time = self.stores.prekeys.get_pre_key(one_time_id.into()).await?;
        let kyber = self.stores.kyber.get_kyber_pre_key(one_time_id.into()).await?;
        Ok(PreKeyBundle::new(
            registration_id,
            DeviceId::new(DEVICE).expect("device 1 is valid"),
            Some((one_time_id.into(), one_time.public_key()?)),
            signed_id.into(),
            signed.public_key()?,
            signed.signature()?,
            one_time_id.into(),
            kyber.public_key()?,
            kyber.signature()?,
            *identity.identity_key(),
        )?)
    }

    /// Replaces this account's identity key (after a suspected compromise, say):
    /// a new identity, signed prekey, Kyber last-resort key and one-time keys,
    /// registered with a proof signed by the current identity. Every session
    /// goes (contacts see the new identity and must accept it).
    pub async fn reset_identity(&self) -> Result<()> {
        let (user, old) = self.registered()?;
        let phone_hash = self
            .store
            .get(Kind::Meta, meta::PHONE_HASH.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .ok_or_else(|| ClientError::Store("this store does not know its phone hash".into()))?;
        let nonce = self.api.challenge(&user).await?;
        let proof = old.private_key().calculate_signature(nonce.as_bytes(), &mut rand::rng()).map_err(protocol)?;
        let _guard = self.crypto.lock().await;
        self.store
            .transaction_async(async {
                self.store.remove_all(Kind::Session)?;
                let mut body = self.new_identity(&phone_hash)?;
                body["identity_proof"] = json!({ "nonce": nonce, "signature": STANDARD.encode(proof) });
                let again = self.api.register(&body).await?;
                if again != user {
                    return Err(ClientError::Protocol(format!("the server re-registered {again}, not {user}")));
                }
                Ok(())
            })
            .await?;
        self.forget_token();
        Ok(())
    }

    /// A login token, fetched (challenge signed with the identity key) or reused.
    pub async fn token(&self) -> Result<String> {
        if let Some((token, expires_ms)) = self.token.borrow().clone()
            && expires_ms > now_ms() + 30_000
        {
            return Ok(token);
        }
        let (user, identity) = self.registered()?;
        self.fetch_token(&user, &identity).await
    }

    /// Challenge, signature, token for `user` with `identity`; cached.
    async fn fetch_token(&self, user: &str, identity: &IdentityKeyPair) -> Result<String> {
        let nonce = self.api.challenge(user).await?;
        let signature =
            identity.private_key().calculate_signature(nonce.as_bytes(), &mut rand::rng()).map_err(protocol)?;
        let (token, lifetime_s) = self.api.token(user, &nonce, &STANDARD.encode(signature)).await?;
        *self.token.borrow_mut() = Some((token.clone(), now_ms() + lifetime_s * 1000));
        Ok(token)
    }

    /// Forgets the cached token (the relay refused it).
    pub fn forget_token(&self) {
        *self.token.borrow_mut() = None;
    }

    /// The safety number shared with `contact` (60 digits), from the trusted
    /// identity key or, if it changed, the new one.
    pub fn safety_number(&self, contact: &str) -> Result<String> {
        let contact = user_id_checked("contact", contact)?;
        let (user, identity) = self.registered()?;
        let theirs = match self.stores.identities.pending(&contact)? {
            Some(key) => key,
            None => self
                .stores
                .identities
                .trusted(&contact)?
                .ok_or_else(|| invalid("contact", "no identity key known yet: exchange a message first"))?,
        };
        safety_number(&user, identity.identity_key(), &contact, &theirs)
    }

    /// Our identity key, for showing our half of safety numbers.
    pub fn own_identity(&self) -> Result<IdentityKey> {
        Ok(*self.registered()?.1.identity_key())
    }

    /// Encrypts `text` for `to` (setting up a session from a fetched bundle if
    /// there is none), logs it and queues it; returns the frame to send.
    pub async fn prepare_text(&self, to: &str, text: &str) -> Result<(ChatMessage, OutgoingFrame)> {
        let to = user_id_checked("to", to)?;
        let (user, _) = self.registered()?;
        if to == user {
            return Err(invalid("to", "that is this account"));
        }
        if text.len() > 64 * 1024 {
            return Err(invalid("text", "at most 64 KiB"));
        }
        self.ensure_session(&to).await?;
        self.encrypt_text(&to, text).await
    }

    /// Encrypts a call signal for `to` (setting up a session if there is
    /// none); staged, not logged, not queued: a signal is sent now or never
    /// (see [`Core::durable`] before sending the frame).
    pub async fn prepare_signal(&self, to: &str, signal: &CallSignal) -> Result<OutgoingFrame> {
        let to = user_id_checked("to", to)?;
        let (user, _) = self.registered()?;
        if to == user {
            return Err(invalid("to", "that is this account"));
        }
        self.ensure_session(&to).await?;
        let content = to_json(&Content {
            v: 1,
            kind: "call".into(),
            text: "".into(),
            sent_at_ms: now_ms(),
            call: Some(signal.clone()),
        })?;
        let _guard = self.crypto.lock().await;
        self.store.stage(self.encrypt(&to, &new_message_id(), &content)).await
    }

    /// A session with `to` to encrypt on: refused while their identity
    /// change waits for the user; set up from a fetched bundle if there is none.
    async fn ensure_session(&self, to: &str) -> Result<()> {
        if self.stores.identities.pending(to)?.is_some() {
            return Err(ClientError::UntrustedIdentity(to.to_owned()));
        }
        if !self.store.has_session(to)? {
            let token = self.token().await?;
            let bundle = parse_bundle(&self.api.bundle(&token, to).await?)?;
            self.start_session(to, &bundle).await?;
        }
        Ok(())
    }

    /// Sets up a session with `to` from their `bundle` (libsignal checks
    /// every signature in it and the identity's trust).
    pub async fn start_session(&self, to: &str, bundle: &PreKeyBundle) -> Result<()> {
        let remote = address(to);
        let _guard = self.crypto.lock().await;
        let mut stores = self.stores.clone();
        let established = self
            .store
            .transaction_async(async {
                process_prekey_bundle(
                    &remote,
                    &mut stores.sessions,
                    &mut stores.identities,
                    bundle,
                    SystemTime::now(),
                    &mut rand::rng(),
                )
                .await
                .map_err(ClientError::from)
            })
            .await;
        if let Err(ClientError::UntrustedIdentity(_)) = &established {
            // Remembered outside the rolled-back transaction, for the safety number.
            self.stores.identities.note_pending(to, bundle.identity_key()?)?;
        }
        established
    }

    /// Encrypts `text` on the session with `to`, logs it and queues it, in
    /// one staged store operation; returns the frame to send once
    /// [`Core::durable`] has written it.
    pub async fn encrypt_text(&self, to: &str, text: &str) -> Result<(ChatMessage, OutgoingFrame)> {
        let message = ChatMessage {
            id: new_message_id(),
            peer: to.to_owned(),
            outgoing: true,
            text: text.to_owned(),
            sent_at_ms: now_ms(),
        };
        let _guard = self.crypto.lock().await;
        let (frame, seq) = self
            .store
            .stage(async {
                let frame = self.encrypt_message(&message).await?;
                // The outbox holds log numbers, not ciphertext: what was not
                // confirmed `sent` is encrypted again to go out.
                let seq = self.log(&message)?;
                self.store.queue(seq)?;
                Ok((frame, seq))
            })
            .await?;
        self.unsent.borrow_mut().insert(message.id.clone(), seq);
        Ok((message, frame))
    }

    /// `message` encrypted on the session with its peer (within an operation).
    async fn encrypt_message(&self, message: &ChatMessage) -> Result<OutgoingFrame> {
        let content = to_json(&Content {
            v: 1,
            kind: "text".into(),
            text: message.text.as_str().into(),
            sent_at_ms: message.sent_at_ms,
            call: None,
        })?;
        self.encrypt(&message.peer, &message.id, &content).await
    }

    /// `content` encrypted on the session with `peer` as message `id` (within an operation).
    async fn encrypt(&self, peer: &str, id: &str, content: &[u8]) -> Result<OutgoingFrame> {
        let mut stores = self.stores.clone();
        let ciphertext = message_encrypt(
            content,
            &address(peer),
            &mut stores.sessions,
            &mut stores.identities,
            SystemTime::now(),
            &mut rand::rng(),
        )
        .await?;
        let kind = match ciphertext {
            CiphertextMessage::PreKeySignalMessage(_) => "prekey",
            CiphertextMessage::SignalMessage(_) => "whisper",
            _ => return Err(ClientError::Protocol("unexpected ciphertext type".into())),
        };
        Ok(OutgoingFrame {
            id: id.to_owned(),
            to: peer.to_owned(),
            kind: kind.into(),
            body: ciphertext.serialize().to_vec(),
        })
    }

    /// Appends `message` to the log; returns its sequence number.
    fn log(&self, message: &ChatMessage) -> Result<i64> {
        self.store.append_message(&message.encode()?)
    }

    /// The messages not confirmed `sent` by the relay, oldest first, with
    /// their log numbers (read from the store).
    fn unsent_messages(&self) -> Result<Vec<(i64, ChatMessage)>> {
        let corrupt = || ClientError::Corrupt("the outbox".into());
        let mut out = Vec::new();
        for seq in self.store.queued() {
            let entry = self.store.message(seq)?.ok_or_else(corrupt)?;
            out.push((seq, ChatMessage::decode(&entry)?));
        }
        Ok(out)
    }

    /// How many messages wait for the relay's `sent`.
    pub fn unsent_count(&self) -> Result<usize> {
        Ok(self.store.queued().len())
    }

    /// The messages not confirmed `sent`, oldest first, encrypted again to
    /// go out (same ids: the relay and the recipient de-duplicate). One that
    /// cannot be encrypted now (its contact's identity changed, say) stays
    /// queued for the next connection.
    pub async fn outbox(&self) -> Result<Vec<OutgoingFrame>> {
        let mut frames = Vec::new();
        for (_, message) in self.unsent_messages()? {
            if let Err(error) = self.ensure_session(&message.peer).await {
                tracing::warn!(message_id = %message.id, %error, "a queued message cannot be sent yet");
                continue;
            }
            let _guard = self.crypto.lock().await;
            match self.store.stage(self.encrypt_message(&message)).await {
                Ok(frame) => frames.push(frame),
                Err(error) => tracing::warn!(message_id = %message.id, %error, "a queued message cannot be sent yet"),
            }
        }
        self.durable().await?;
        Ok(frames)
    }

    /// The relay accepted (or refused) message `id`: it leaves the outbox
    /// (`false`: it was not there — a call signal, or told twice).
    /// Staged: if that is lost in a crash, the message goes out again on the
    /// next connection and the relay and the recipient de-duplicate it by id.
    pub async fn mark_sent(&self, id: &str) -> Result<bool> {
        let Some(seq) = self.unsent.borrow().get(id).copied() else {
            return Ok(false);
        };
        self.store.stage(async { self.store.dequeue(seq) }).await?;
        self.unsent.borrow_mut().remove(id);
        Ok(true)
    }

    /// Writes every staged operation to the store file (group commit: the
    /// operations staged by other tasks until this one runs again share the
    /// commit). Nothing leaves the device — a frame sent, a message acked or
    /// shown — before the operation that produced it is durable.
    pub async fn durable(&self) -> Result<()> {
        if !self.store.has_staged() {
            return Ok(());
        }
        tokio::task::yield_now().await;
        self.store.flush()
    }

    /// The message log, oldest first.
    pub fn messages(&self) -> Result<Vec<ChatMessage>> {
        self.store.messages()?.iter().map(|entry| ChatMessage::decode(entry)).collect()
    }

    /// Decrypts and stores (staged: see [`Core::durable`]) a relay `message`
    /// frame's content.
    pub async fn receive(&self, id: &str, from: &str, kind: &str, bytes: &[u8]) -> Result<Incoming> {
        let from = user_id_checked("from", from)?;
        let seen = self.store.tag(&[from.as_bytes(), b"/", id.as_bytes()]);
        if self.store.seen(&seen) {
            return Ok(Incoming::Duplicate);
        }
        let ciphertext = match kind {
            "prekey" => PreKeySignalMessage::try_from(bytes).map(CiphertextMessage::PreKeySignalMessage),
            "whisper" => SignalMessage::try_from(bytes).map(CiphertextMessage::SignalMessage),
            other => {
                return Ok(Incoming::Undecryptable { from, reason: format!("unknown message kind {other:?}") });
            }
        };
        let ciphertext = match ciphertext {
            Ok(c) => c,
            Err(error) => return Ok(Incoming::Undecryptable { from, reason: error.to_string() }),
        };
        if self.stores.identities.pending(&from)?.is_some() {
            self.hold(id, &from, kind, bytes)?;
            return Ok(Incoming::Held { from });
        }
        let remote = address(&from);
        let _guard = self.crypto.lock().await;
        let mut stores = self.stores.clone();
        let result = self
            .store
            .stage(async {
                let plaintext = match message_decrypt(
                    &ciphertext,
                    &remote,
                    &mut stores.sessions,
                    &mut stores.identities,
                    &mut stores.prekeys,
                    &stores.signed,
                    &mut stores.kyber,
                    &mut rand::rng(),
                )
                .await
                {
                    Ok(plaintext) => plaintext,
                    // Its message key was used: delivered again after its
                    // tag left the de-duplication window.
                    Err(SignalProtocolError::DuplicatedMessage(..)) => return Ok(None),
                    Err(error) => return Err(error.into()),
                };
                let content: Content =
                    serde_json::from_slice(&plaintext).map_err(|e| ClientError::Protocol(format!("content: {e}")))?;
                match (content.kind.as_ref(), content.call) {
                    ("text", _) => {}
                    ("call", Some(signal)) => {
                        self.store.mark_seen(seen)?;
                        return Ok(Some(Incoming::Call { from: from.clone(), signal, sent_at_ms: content.sent_at_ms }));
                    }
                    (other, _) => return Err(ClientError::Protocol(format!("unsupported content type {other:?}"))),
                }
                let message = ChatMessage {
                    id: id.to_owned(),
                    peer: from.clone(),
                    outgoing: false,
                    text: content.text.into_owned(),
                    sent_at_ms: content.sent_at_ms,
                };
                self.log(&message)?;
                self.store.mark_seen(seen)?;
                Ok(Some(Incoming::Stored(message)))
            })
            .await;
        match result {
            Ok(Some(incoming)) => Ok(incoming),
            Ok(None) => Ok(Incoming::Duplicate),
            Err(ClientError::UntrustedIdentity(_)) => {
                // is_trusted_identity noted the new key as pending (its write was
                // rolled back with the transaction: note it again).
                if let CiphertextMessage::PreKeySignalMessage(m) = &ciphertext {
                    self.stores.identities.note_pending(&from, m.identity_key())?;
                }
                self.hold(id, &from, kind, bytes)?;
                Ok(Incoming::Held { from })
            }
            Err(ClientError::Protocol(reason)) => Ok(Incoming::Undecryptable { from, reason }),
            Err(other) => Err(other),
        }
    }

    /// [`Core::receive`] for a message held earlier: the held copy goes
    /// once it is stored, a duplicate or undecryptable (not if it is held again).
    pub async fn receive_held(&self, id: &str, from: &str, kind: &str, body: &[u8]) -> Result<Incoming> {
        let outcome = self.receive(id, from, kind, body).await?;
        if !matches!(outcome, Incoming::Held { .. }) {
            let held = [from.as_bytes(), b"/", id.as_bytes()].concat();
            self.store.stage(async { self.store.remove(Kind::Held, &held) }).await?;
        }
        Ok(outcome)
    }

    fn hold(&self, id: &str, from: &str, kind: &str, body: &[u8]) -> Result<()> {
        let held = HeldMessage { id: id.into(), from: from.into(), kind: kind.into(), body: STANDARD.encode(body) };
        self.store.put(Kind::Held, &[from.as_bytes(), b"/", id.as_bytes()].concat(), &to_json(&held)?)
    }

    /// Accepts `contact`'s new identity key; returns the held messages from
    /// them as `(id, kind, body)` to decrypt again.
    pub fn trust_identity(&self, contact: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
        let contact = user_id_checked("contact", contact)?;
        let key = self
            .stores
            .identities
            .pending(&contact)?
            .ok_or_else(|| invalid("contact", "no changed identity key is waiting for this contact"))?;
        self.store.transaction(|| {
            self.stores.identities.trust(&contact, &key)?;
            // The old session belongs to the old identity.
            self.store.remove(Kind::Session, contact.as_bytes())
        })?;
        let mut held: Vec<HeldMessage> =
            self.store.all(Kind::Held)?.iter().filter_map(|v| serde_json::from_slice(v).ok()).collect();
        held.retain(|h| h.from == contact);
        held.sort_by(|a, b| a.id.cmp(&b.id));
        held.into_iter().map(|h| Ok((h.id, h.kind, decode_b64("held", &h.body)?))).collect()
    }

    /// Refills one-time keys below [`REFILL_BELOW`] (EC and Kyber apart) and
    /// rotates a signed prekey older than 7 days (keeping the previous one).
    pub async fn maintain_prekeys(&self, now_ms: u64) -> Result<PrekeyReport> {
        let (_, identity) = self.registered()?;
        let token = self.token().await?;
        let (one_time_before, kyber_before) = self.api.key_counts(&token).await?;
        let mut report = PrekeyReport { one_time_before, kyber_before, ..Default::default() };
        let signed_at = self.store.meta_u64(meta::SIGNED_PREKEY_AT_MS)?.unwrap_or(0);
        let rotate = now_ms.saturating_sub(signed_at) > SIGNED_PREKEY_MAX_AGE_MS;
        let _guard = self.crypto.lock().await;
        let keys = KeyMaker::new(&self.store, &identity);
        for (needed, kind) in
            [(one_time_before < REFILL_BELOW, "one_time_prekeys"), (kyber_before < REFILL_BELOW, "kyber_prekeys")]
        {
            if !needed {
                continue;
            }
            // Keys are stored before the upload: a key the server hands out
            // must always be one this client can answer.
            let body = self.store.transaction(|| {
                Ok(match kind {
                    "one_time_prekeys" => json!({ "one_time_prekeys": keys.one_time_prekeys(REFILL_COUNT)? }),
                    _ => json!({ "kyber_prekeys": keys.kyber_prekeys(REFILL_COUNT)? }),
                })
            })?;
            self.api.upload_keys(&token, &body).await?;
            match kind {
                "one_time_prekeys" => report.one_time_uploaded = REFILL_COUNT,
                _ => report.kyber_uploaded = REFILL_COUNT,
            }
        }
        if rotate {
            let body = self.store.transaction(|| Ok(json!({ "signed_prekey": keys.signed_prekey(now_ms)? })))?;
            self.api.upload_keys(&token, &body).await?;
            report.signed_prekey_rotated = true;
        }
        Ok(report)
    }
}

/// The user id the server derives from a phone hash (UUIDv5 in privcomm's
/// namespace; ADR 0005 and `privcomm_api::users::user_id_for`).
pub fn user_id_of(phone_hash: &str) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x7072_6976_636f_6d6d_2d75_7365_7273_0001);
    uuid::Uuid::new_v5(&NAMESPACE, phone_hash.as_bytes()).to_string()
}

/// A new message id: a UUIDv7 (ordered by time) whose random bits come from
/// the thread's CSPRNG (not a system call per id).
fn new_message_id() -> String {
    let mut random = [0u8; 10];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    uuid::Builder::from_unix_timestamp_millis(now_ms(), &random).into_uuid().to_string()
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| ClientError::Store(e.to_string()))
}

/// The libsignal safety number of two users (version 2, 5,200 iterations, as Signal's apps use).
pub fn safety_number(local: &str, local_key: &IdentityKey, remote: &str, remote_key: &IdentityKey) -> Result<String> {
    let fingerprint = Fingerprint::new(2, 5200, local.as_bytes(), local_key, remote.as_bytes(), remote_key)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    fingerprint.display_string().map_err(|e| ClientError::Protocol(e.to_string()))
}

/// A `GET /v1/keys/{user}` answer as a libsignal bundle (every signature is
/// checked by libsignal when the session is set up).
fn parse_bundle(bundle: &Value) -> Result<PreKeyBundle> {
    let text = |pointer: &str| -> Result<&str> {
        bundle.pointer(pointer).and_then(Value::as_str).ok_or_else(|| invalid("bundle", format!("no {pointer}")))
    };
    let number = |pointer: &str| -> Result<u32> {
        bundle
            .pointer(pointer)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid("bundle", format!("no {pointer}")))
    };
    let one_time = match bundle.get("one_time_prekey") {
        Some(Value::Object(_)) => Some((
            PreKeyId::from(number("/one_time_prekey/id")?),
            PublicKey::deserialize(&decode_b64("bundle", text("/one_time_prekey/public_key")?)?).map_err(protocol)?,
        )),
        _ => None,
    };
    Ok(PreKeyBundle::new(
        number("/registration_id")?,
        DeviceId::new(DEVICE).expect("device 1 is valid"),
        one_time,
        SignedPreKeyId::from(number("/signed_prekey/id")?),
        PublicKey::deserialize(&decode_b64("bundle", text("/signed_prekey/public_key")?)?).map_err(protocol)?,
        decode_b64("bundle", text("/signed_prekey/signature")?)?,
        KyberPreKeyId::from(number("/kyber_prekey/id")?),
        kem::PublicKey::deserialize(&decode_b64("bundle", text("/kyber_prekey/public_key")?)?)?,
        decode_b64("bundle", text("/kyber_prekey/signature")?)?,
        IdentityKey::decode(&decode_b64("bundle", text("/identity_key")?)?)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("privcomm-core-{name}-{}.db", uuid::Uuid::now_v7().simple()))
    }

    /// Alice and Bob in stores of their own (no server), Alice holding a session with Bob.
    async fn pair() -> Result<(Core, Core, String, String, Vec<std::path::PathBuf>)> {
        let paths = vec![temp_path("alice"), temp_path("bob")];
        let open = |path: &std::path::Path| Core::open(path, &[7u8; 32], "http://127.0.0.1:9");
        let (alice, bob) = (open(&paths[0])?, open(&paths[1])?);
        let (alice_id, bob_id) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
        alice.create_offline(&alice_id)?;
        bob.create_offline(&bob_id)?;
        alice.start_session(&bob_id, &bob.own_bundle(1).await?).await?;
        Ok((alice, bob, alice_id, bob_id, paths))
    }

    fn remove(paths: &[std::path::PathBuf]) {
        for path in paths {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }

    #[tokio::test]
    async fn a_message_not_confirmed_sent_goes_out_again_encrypted_anew_under_its_id() -> Result<()> {
        let (alice, bob, alice_id, bob_id, paths) = pair().await?;
        let (first, _) = alice.encrypt_text(&bob_id, "confirmed").await?;
        let (second, lost) = alice.encrypt_text(&bob_id, "never confirmed").await?;
        alice.durable().await?;
        alice.mark_sent(&first.id).await?;
        drop(alice); // closing writes the staged `sent`
        let alice = Core::open(&paths[0], &[7u8; 32], "http://127.0.0.1:9")?;
        assert_eq!(alice.unsent_count()?, 1);
        let again = alice.outbox().await?;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, second.id);
        assert_ne!(again[0].body, lost.body, "the same ciphertext again");
        match bob.receive(&again[0].id, &alice_id, &again[0].kind, &again[0].body).await? {
            Incoming::Stored(message) => assert_eq!(message.text, "never confirmed"),
            _ => return Err(ClientError::Protocol("not decrypted".into())),
        }
        // The first ciphertext, delivered late, is the same message: a duplicate.
        assert!(matches!(bob.receive(&lost.id, &alice_id, &lost.kind, &lost.body).await?, Incoming::Duplicate));
        alice.mark_sent(&second.id).await?;
        assert_eq!(alice.unsent_count()?, 0);
        assert_eq!(
            alice.messages()?.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["confirmed", "never confirmed"]
        );
        drop((alice, bob));
        remove(&paths);
        Ok(())
    }

    #[tokio::test]
    async fn a_call_signal_reaches_the_call_engine_not_the_log_and_unknown_content_is_undecryptable() -> Result<()> {
        let (alice, bob, alice_id, bob_id, paths) = pair().await?;
        let signal = CallSignal::Offer { call_id: "call".into(), sdp: "v=0 a=fingerprint:sha-256 AB".into() };
        let frame = alice.prepare_signal(&bob_id, &signal).await?;
        alice.durable().await?;
        assert_eq!(alice.unsent_count()?, 0, "a signal is not queued for later");
        match bob.receive(&frame.id, &alice_id, &frame.kind, &frame.body).await? {
            Incoming::Call { from, signal: received, sent_at_ms } => {
                assert_eq!((from.as_str(), &received), (alice_id.as_str(), &signal));
                assert!(sent_at_ms.abs_diff(now_ms()) < 60_000);
            }
            _ => return Err(ClientError::Protocol("not a call signal".into())),
        }
        assert!(matches!(bob.receive(&frame.id, &alice_id, &frame.kind, &frame.body).await?, Incoming::Duplicate));
        assert!(alice.messages()?.is_empty() && bob.messages()?.is_empty(), "a signal entered a message log");
        // Content of a type this client does not know is reported, not shown as text.
        let content = br#"{"v":1,"type":"sticker","sent_at_ms":1}"#;
        let id = new_message_id();
        let unknown = alice.store.stage(alice.encrypt(&bob_id, &id, content)).await?;
        alice.durable().await?;
        assert!(matches!(
            bob.receive(&id, &alice_id, &unknown.kind, &unknown.body).await?,
            Incoming::Undecryptable { reason, .. } if reason.contains("sticker")
        ));
        drop((alice, bob));
        remove(&paths);
        Ok(())
    }

    #[tokio::test]
    async fn a_message_delivered_again_after_its_tag_is_gone_is_still_a_duplicate() -> Result<()> {
        let (alice, bob, alice_id, bob_id, paths) = pair().await?;
        let (message, frame) = alice.encrypt_text(&bob_id, "once").await?;
        assert!(matches!(bob.receive(&message.id, &alice_id, &frame.kind, &frame.body).await?, Incoming::Stored(_)));
        // The same ciphertext under an id whose tag is not kept (as if it had
        // left the de-duplication window): libsignal's used message key tells.
        let other_id = uuid::Uuid::now_v7().to_string();
        assert!(matches!(bob.receive(&other_id, &alice_id, &frame.kind, &frame.body).await?, Incoming::Duplicate));
        assert_eq!(bob.messages()?.len(), 1);
        drop((alice, bob));
        remove(&paths);
        Ok(())
    }

    #[tokio::test]
    async fn staged_messages_are_in_the_file_after_durable_and_a_restart_continues_the_session() -> Result<()> {
        let (alice, bob, alice_id, bob_id, paths) = pair().await?;
        let mut frames = Vec::new();
        for n in 0..5 {
            frames.push(alice.encrypt_text(&bob_id, &format!("burst {n}")).await?);
        }
        alice.durable().await?;
        for (message, frame) in &frames {
            assert!(matches!(
                bob.receive(&message.id, &alice_id, &frame.kind, &frame.body).await?,
                Incoming::Stored(_)
            ));
        }
        bob.durable().await?;
        // Both "crash" (no closing flush): what `durable` wrote is all there is.
        std::mem::forget(alice);
        std::mem::forget(bob);
        let open = |path: &std::path::Path| Core::open(path, &[7u8; 32], "http://127.0.0.1:9");
        let (alice, bob) = (open(&paths[0])?, open(&paths[1])?);
        assert_eq!(bob.messages()?.len(), 5);
        assert_eq!(alice.unsent_count()?, 5);
        for (message, frame) in &frames {
            assert!(matches!(
                bob.receive(&message.id, &alice_id, &frame.kind, &frame.body).await?,
                Incoming::Duplicate
            ));
        }
        let (message, frame) = alice.encrypt_text(&bob_id, "after the restart").await?;
        match bob.receive(&message.id, &alice_id, &frame.kind, &frame.body).await? {
            Incoming::Stored(received) => assert_eq!(received.text, "after the restart"),
            _ => return Err(ClientError::Protocol("not decrypted".into())),
        }
        drop((alice, bob));
        remove(&paths);
        Ok(())
    }

    #[test]
    fn log_entries_round_trip_in_binary_and_json() -> Result<()> {
        let message = ChatMessage {
            id: uuid::Uuid::now_v7().to_string(),
            peer: uuid::Uuid::now_v7().to_string(),
            outgoing: true,
            text: "héllo".into(),
            sent_at_ms: 1_764_000_000_123,
        };
        let binary = message.encode()?;
        assert_eq!(binary[0], ENTRY_V1);
        assert_eq!(ChatMessage::decode(&binary)?, message);
        // An id that is not a UUID in its usual spelling is kept as JSON, exactly.
        let odd = ChatMessage { id: message.id.to_uppercase(), ..message.clone() };
        let json = odd.encode()?;
        assert_eq!(json[0], b'{');
        assert_eq!(ChatMessage::decode(&json)?, odd);
        assert!(ChatMessage::decode(&binary[..30]).is_err());
        Ok(())
    }
}
