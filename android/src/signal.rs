//! libsignal's store traits over the encrypted [`Store`], and the key
//! material a client generates for itself.
//!
//! Each trait is a separate value sharing the store, because libsignal takes
//! each store as its own `&mut`. Identity trust is trust on first use: the
//! first identity key seen for a contact is remembered; a different one later
//! is *not* trusted until the user accepts it ([`Identities::trust`]), and the
//! refused key is kept as "pending" so that the app can show the new safety
//! number before accepting.

use crate::error::{ClientError, Result};
use crate::store::{Kind, Store};
use async_trait::async_trait;
use libsignal_protocol::{
    Direction, GenericSignedPreKey as _, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair,
    KyberPreKeyId, KyberPreKeyRecord, KyberPreKeyStore, PreKeyId, PreKeyRecord, PreKeyStore, ProtocolAddress,
    PublicKey, SessionRecord, SessionStore, SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord, SignedPreKeyStore,
    Timestamp, kem,
};

type SignalResult<T> = std::result::Result<T, SignalProtocolError>;

/// How a store failure travels through libsignal (and is told apart from a bad message).
pub(crate) const STORE_FAILURE: &str = "client store";

fn storage_error(error: ClientError) -> SignalProtocolError {
    SignalProtocolError::InvalidState(STORE_FAILURE, error.to_string())
}

/// Meta ids.
pub(crate) mod meta {
    pub const IDENTITY_KEY_PAIR: &str = "identity_key_pair";
    pub const REGISTRATION_ID: &str = "registration_id";
    pub const USER_ID: &str = "user_id";
    pub const PHONE_HASH: &str = "phone_hash";
    pub const PENDING_REGISTRATION: &str = "pending_registration";
    pub const NEXT_PREKEY_ID: &str = "next_prekey_id";
    pub const NEXT_KYBER_ID: &str = "next_kyber_id";
    pub const SIGNED_PREKEY_ID: &str = "signed_prekey_id";
    pub const SIGNED_PREKEY_AT_MS: &str = "signed_prekey_at_ms";
    pub const PREVIOUS_SIGNED_PREKEY_ID: &str = "previous_signed_prekey_id";
    pub const LAST_RESORT_KYBER_ID: &str = "last_resort_kyber_id";
}

/// The id of the last-resort Kyber key: never handed out as a one-time key.
pub const LAST_RESORT_KYBER_ID: u32 = 0x00FF_FFFF;

/// Contacts' identity keys and our own.
#[derive(Clone)]
pub struct Identities {
    store: Store,
}

impl Identities {
    /// Over `store`.
    pub fn new(store: Store) -> Identities {
        Identities { store }
    }

    /// Our identity key pair, if the store has one.
    pub fn own(&self) -> Result<Option<IdentityKeyPair>> {
        self.store
            .get(Kind::Meta, meta::IDENTITY_KEY_PAIR.as_bytes())?
            .map(|bytes| IdentityKeyPair::try_from(bytes.as_slice()).map_err(ClientError::from))
            .transpose()
    }

    /// The trusted identity key of `contact`.
    pub fn trusted(&self, contact: &str) -> Result<Option<IdentityKey>> {
        self.key(contact.as_bytes())
    }

    /// The identity key `contact` presented that is not trusted yet.
    pub fn pending(&self, contact: &str) -> Result<Option<IdentityKey>> {
        self.key(&pending_id(contact))
    }

    fn key(&self, id: &[u8]) -> Result<Option<IdentityKey>> {
        self.store
            .get(Kind::Identity, id)?
            .map(|bytes| IdentityKey::decode(&bytes).map_err(ClientError::from))
            .transpose()
    }

    /// Accepts `key` as `contact`'s identity from now on.
    pub fn trust(&self, contact: &str, key: &IdentityKey) -> Result<()> {
        self.store.put(Kind::Identity, contact.as_bytes(), &key.serialize())?;
        self.store.remove(Kind::Identity, &pending_id(contact))
    }

    /// Remembers `key` as the untrusted identity `contact` now presents.
    pub fn note_pending(&self, contact: &str, key: &IdentityKey) -> Result<()> {
        self.store.put(Kind::Identity, &pending_id(contact), &key.serialize())
    }
}

fn pending_id(contact: &str) -> Vec<u8> {
    [b"pending:".as_slice(), contact.as_bytes()].concat()
}

#[async_trait(?Send)]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        self.own().map_err(storage_error)?.ok_or(SignalProtocolError::InvalidState("identity", "no identity".into()))
    }

    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.store.meta_u64(meta::REGISTRATION_ID).map_err(storage_error)?.unwrap_or(0) as u32)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let previous = self.trusted(address.name()).map_err(storage_error)?;
        if previous.as_ref() == Some(identity) {
            return Ok(IdentityChange::NewOrUnchanged);
        }
        self.trust(address.name(), identity).map_err(storage_error)?;
        Ok(if previous.is_some() { IdentityChange::ReplacedExisting } else { IdentityChange::NewOrUnchanged })
    }

    async fn is_trusted_identity(
        &self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
        _direction: Direction,
    ) -> SignalResult<bool> {
        match self.trusted(address.name()).map_err(storage_error)? {
            None => Ok(true),
            Some(known) if &known == identity => Ok(true),
            Some(_) => {
                self.note_pending(address.name(), identity).map_err(storage_error)?;
                Ok(false)
            }
        }
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        self.trusted(address.name()).map_err(storage_error)
    }
}

/// Sessions, one per contact.
#[derive(Clone)]
pub struct Sessions(pub Store);

#[async_trait(?Send)]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        self.0.session(address.name()).map_err(storage_error)
    }

    async fn store_session(&mut self, address: &ProtocolAddress, record: &SessionRecord) -> SignalResult<()> {
        self.0.put_session(address.name(), record).map_err(storage_error)
    }
}

/// One-time EC prekeys.
#[derive(Clone)]
pub struct PreKeys(pub Store);

#[async_trait(?Send)]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        let bytes = self.0.get(Kind::PreKey, &u32::from(id).to_be_bytes()).map_err(storage_error)?;
        PreKeyRecord::deserialize(&bytes.ok_or(SignalProtocolError::InvalidPreKeyId)?)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.put(Kind::PreKey, &u32::from(id).to_be_bytes(), &record.serialize()?).map_err(storage_error)
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(Kind::PreKey, &u32::from(id).to_be_bytes()).map_err(storage_error)
    }
}

/// Signed EC prekeys (the current one and the previous one).
#[derive(Clone)]
pub struct SignedPreKeys(pub Store);

#[async_trait(?Send)]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        let bytes = self.0.get(Kind::SignedPreKey, &u32::from(id).to_be_bytes()).map_err(storage_error)?;
        SignedPreKeyRecord::deserialize(&bytes.ok_or(SignalProtocolError::InvalidSignedPreKeyId)?)
    }

    async fn save_signed_pre_key(&mut self, id: SignedPreKeyId, record: &SignedPreKeyRecord) -> SignalResult<()> {
        self.0.put(Kind::SignedPreKey, &u32::from(id).to_be_bytes(), &record.serialize()?).map_err(storage_error)
    }
}

/// Kyber prekeys: one-time ones are removed when used; the last-resort one stays.
#[derive(Clone)]
pub struct KyberPreKeys(pub Store);

#[async_trait(?Send)]
impl KyberPreKeyStore for KyberPreKeys {
    async fn get_kyber_pre_key(&self, id: KyberPreKeyId) -> SignalResult<KyberPreKeyRecord> {
        let bytes = self.0.get(Kind::KyberPreKey, &u32::from(id).to_be_bytes()).map_err(storage_error)?;
        KyberPreKeyRecord::deserialize(&bytes.ok_or(SignalProtocolError::InvalidKyberPreKeyId)?)
    }

    async fn save_kyber_pre_key(&mut self, id: KyberPreKeyId, record: &KyberPreKeyRecord) -> SignalResult<()> {
        self.0.put(Kind::KyberPreKey, &u32::from(id).to_be_bytes(), &record.serialize()?).map_err(storage_error)
    }

    async fn mark_kyber_pre_key_used(
        &mut self,
        id: KyberPreKeyId,
        ec_prekey_id: SignedPreKeyId,
        base_key: &PublicKey,
    ) -> SignalResult<()> {
        if u32::from(id) != LAST_RESORT_KYBER_ID {
            return self.0.remove(Kind::KyberPreKey, &u32::from(id).to_be_bytes()).map_err(storage_error);
        }
        // The last-resort key is reused by design; the same (signed prekey,
        // base key) pair twice would be a replayed session start.
        let used =
            [b"last-resort-used:".as_slice(), &u32::from(ec_prekey_id).to_be_bytes(), &base_key.serialize()].concat();
        if self.0.get(Kind::KyberPreKey, &used).map_err(storage_error)?.is_some() {
            return Err(SignalProtocolError::InvalidMessage(
                libsignal_protocol::CiphertextMessageType::PreKey,
                "a session start reused with the last-resort Kyber key",
            ));
        }
        self.0.put(Kind::KyberPreKey, &used, &[1]).map_err(storage_error)
    }
}

/// All of libsignal's stores over one [`Store`].
#[derive(Clone)]
pub struct Stores {
    /// Identity keys.
    pub identities: Identities,
    /// Sessions.
    pub sessions: Sessions,
    /// One-time EC prekeys.
    pub prekeys: PreKeys,
    /// Signed EC prekeys.
    pub signed: SignedPreKeys,
    /// Kyber prekeys.
    pub kyber: KyberPreKeys,
}

impl Stores {
    /// Over `store`.
    pub fn new(store: &Store) -> Stores {
        Stores {
            identities: Identities::new(store.clone()),
            sessions: Sessions(store.clone()),
            prekeys: PreKeys(store.clone()),
            signed: SignedPreKeys(store.clone()),
            kyber: KyberPreKeys(store.clone()),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Public halves to upload, as the API's JSON bodies.
#[derive(Debug, Default)]
pub struct Upload {
    /// `{id, public_key}` each.
    pub one_time_prekeys: Vec<serde_json::Value>,
    /// `{id, public_key, signature}` each.
    pub kyber_prekeys: Vec<serde_json::Value>,
    /// A new signed prekey.
    pub signed_prekey: Option<serde_json::Value>,
    /// A new Kyber last-resort key.
    pub kyber_last_resort: Option<serde_json::Value>,
}

fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// Makes and stores key material; returns the public halves.
pub struct KeyMaker<'a> {
    store: &'a Store,
    identity: &'a IdentityKeyPair,
}

impl<'a> KeyMaker<'a> {
    /// For the account whose identity is `identity`.
    pub fn new(store: &'a Store, identity: &'a IdentityKeyPair) -> KeyMaker<'a> {
        KeyMaker { store, identity }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .identity
            .private_key()
            .calculate_signature(message, &mut rand::rng())
            .map_err(crate::error::protocol)?
            .to_vec())
    }

    /// `count` one-time EC prekeys with fresh ids.
    pub fn one_time_prekeys(&self, count: u32) -> Result<Vec<serde_json::Value>> {
        let first = self.store.meta_u64(meta::NEXT_PREKEY_ID)?.unwrap_or(1) as u32;
        let mut out = Vec::new();
        for id in first..first + count {
            let pair = KeyPair::generate(&mut rand::rng());
            let record = PreKeyRecord::new(PreKeyId::from(id), &pair);
            self.store.put(Kind::PreKey, &id.to_be_bytes(), &record.serialize()?)?;
            out.push(serde_json::json!({ "id": id, "public_key": b64(&pair.public_key.serialize()) }));
        }
        self.store.set_meta_u64(meta::NEXT_PREKEY_ID, u64::from(first + count))?;
        Ok(out)
    }

    /// `count` one-time Kyber-1024 prekeys with fresh ids.
    pub fn kyber_prekeys(&self, count: u32) -> Result<Vec<serde_json::Value>> {
        let first = self.store.meta_u64(meta::NEXT_KYBER_ID)?.unwrap_or(1) as u32;
        let mut out = Vec::new();
        for id in first..first + count {
            out.push(self.kyber(id)?);
        }
        self.store.set_meta_u64(meta::NEXT_KYBER_ID, u64::from(first + count))?;
        Ok(out)
    }

    fn kyber(&self, id: u32) -> Result<serde_json::Value> {
        let pair = kem::KeyPair::generate(kem::KeyType::Kyber1024, &mut rand::rng());
        let public = pair.public_key.serialize();
        let signature = self.sign(&public)?;
        let record =
            KyberPreKeyRecord::new(KyberPreKeyId::from(id), Timestamp::from_epoch_millis(now_ms()), &pair, &signature);
        self.store.put(Kind::KyberPreKey, &id.to_be_bytes(), &record.serialize()?)?;
        Ok(serde_json::json!({ "id": id, "public_key": b64(&public), "signature": b64(&signature) }))
    }

    /// A new signed prekey, made current; the current one becomes the
    /// previous one (kept for messages that were on their way).
    pub fn signed_prekey(&self, now_ms: u64) -> Result<serde_json::Value> {
        let current = self.store.meta_u64(meta::SIGNED_PREKEY_ID)?;
        let id = current.map_or(1, |c| c + 1) as u32;
        let pair = KeyPair::generate(&mut rand::rng());
        let public = pair.public_key.serialize();
        let signature = self.sign(&public)?;
        let record =
            SignedPreKeyRecord::new(SignedPreKeyId::from(id), Timestamp::from_epoch_millis(now_ms), &pair, &signature);
        self.store.put(Kind::SignedPreKey, &id.to_be_bytes(), &record.serialize()?)?;
        if let Some(current) = current {
            // The one before the previous goes: two generations are kept.
            if let Some(older) = self.store.meta_u64(meta::PREVIOUS_SIGNED_PREKEY_ID)? {
                self.store.remove(Kind::SignedPreKey, &(older as u32).to_be_bytes())?;
            }
            self.store.set_meta_u64(meta::PREVIOUS_SIGNED_PREKEY_ID, current)?;
        }
        self.store.set_meta_u64(meta::SIGNED_PREKEY_ID, u64::from(id))?;
        self.store.set_meta_u64(meta::SIGNED_PREKEY_AT_MS, now_ms)?;
        Ok(serde_json::json!({ "id": id, "public_key": b64(&public), "signature": b64(&signature) }))
    }

    /// The Kyber last-resort key (replaced along with the signed prekey).
    pub fn kyber_last_resort(&self) -> Result<serde_json::Value> {
        let value = self.kyber(LAST_RESORT_KYBER_ID)?;
        self.store.set_meta_u64(meta::LAST_RESORT_KYBER_ID, u64::from(LAST_RESORT_KYBER_ID))?;
        Ok(value)
    }
}
