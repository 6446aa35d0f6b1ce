//! Real libsignal key material for a would-be user, as the registration API
//! expects it, and the two HTTP steps a client takes with it (register, log
//! in). Used by `privcomm bench-api`, `privcomm loadgen` and the tests; the
//! Android client generates its own keys (and keeps the private halves).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libsignal_protocol::{IdentityKeyPair, KeyPair, kem};
use serde_json::{Value, json};
use sha2::Digest as _;

/// Id of the Kyber last-resort key in generated registrations.
pub const LAST_RESORT_KYBER_ID: u32 = 1_000_000;

/// Standard Base64.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// An identity key pair and a phone number.
pub struct KeyedUser {
    /// The identity key pair (the private half never leaves this value).
    pub identity: IdentityKeyPair,
    /// The phone number; only its SHA-256 is sent.
    pub phone: String,
}

impl KeyedUser {
    /// A fresh identity for `phone`.
    pub fn new(phone: &str) -> KeyedUser {
        KeyedUser { identity: IdentityKeyPair::generate(&mut rand::rng()), phone: phone.into() }
    }

    /// SHA-256 of the phone number, lowercase hex.
    pub fn phone_hash(&self) -> String {
        hex::encode(sha2::Sha256::digest(self.phone.as_bytes()))
    }

    /// The user id the API assigns to this phone hash (UUIDv5, ADR 0005).
    pub fn user_id(&self) -> String {
        privcomm_domain::ids::PhoneHash::new(self.phone_hash())
            .map(|hash| privcomm_api::users::user_id_for(&hash).0.to_string())
            .unwrap_or_default()
    }

    /// Base64 of the identity key's signature over `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        // XEdDSA signing only fails on an invalid private key, which a
        // generated pair never is.
        let signature = self
            .identity
            .private_key()
            .calculate_signature(message, &mut rand::rng())
            .expect("a generated identity key signs");
        b64(&signature)
    }

    /// `{id, public_key, signature}` for a new signed EC prekey.
    pub fn signed_prekey(&self, id: u32) -> Value {
        let pair = KeyPair::generate(&mut rand::rng());
        let public = pair.public_key.serialize();
        json!({ "id": id, "public_key": b64(&public), "signature": self.sign(&public) })
    }

    /// `{id, public_key, signature}` for a new Kyber-1024 prekey.
    pub fn kyber_prekey(&self, id: u32) -> Value {
        let pair = kem::KeyPair::generate(kem::KeyType::Kyber1024, &mut rand::rng());
        let public = pair.public_key.serialize();
        json!({ "id": id, "public_key": b64(&public), "signature": self.sign(&public) })
    }

    /// `{id, public_key}` for a new one-time EC prekey.
    pub fn one_time_prekey(id: u32) -> Value {
        let pair = KeyPair::generate(&mut rand::rng());
        json!({ "id": id, "public_key": b64(&pair.public_key.serialize()) })
    }

    /// A complete `POST /v1/accounts` body with `one_time` EC and `kyber` Kyber one-time keys.
    pub fn registration(&self, registration_id: u32, one_time: u32, kyber: u32) -> Value {
        json!({
            "phone_hash": self.phone_hash(),
            "registration_id": registration_id,
            "identity_key": b64(&self.identity.identity_key().serialize()),
            "signed_prekey": self.signed_prekey(1),
            "kyber_last_resort": self.kyber_prekey(LAST_RESORT_KYBER_ID),
            "one_time_prekeys": (1..=one_time).map(KeyedUser::one_time_prekey).collect::<Vec<_>>(),
            "kyber_prekeys": (1..=kyber).map(|id| self.kyber_prekey(id)).collect::<Vec<_>>(),
        })
    }
}

impl KeyedUser {
    /// `POST /v1/accounts` at `base` (e.g. `http://127.0.0.1:8080`) with no one-time keys.
    pub async fn register(&self, http: &reqwest::Client, base: &str, registration_id: u32) -> anyhow::Result<()> {
        let response =
            http.post(format!("{base}/v1/accounts")).json(&self.registration(registration_id, 0, 0)).send().await?;
        anyhow::ensure!(response.status().as_u16() == 201, "registration answered {}", response.status());
        Ok(())
    }

    /// Challenge, signature, token: returns a login token.
    pub async fn login(&self, http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
        let user_id = self.user_id();
        let challenge: Value = http
            .post(format!("{base}/v1/auth/challenge"))
            .json(&json!({ "user_id": user_id }))
            .send()
            .await?
            .json()
            .await?;
        let nonce = challenge["nonce"].as_str().ok_or_else(|| anyhow::anyhow!("no nonce in {challenge}"))?;
        let token: Value = http
            .post(format!("{base}/v1/auth/token"))
            .json(&json!({ "user_id": user_id, "nonce": nonce, "signature": self.sign(nonce.as_bytes()) }))
            .send()
            .await?
            .json()
            .await?;
        Ok(token["token"].as_str().ok_or_else(|| anyhow::anyhow!("no token in {token}"))?.to_owned())
    }
}
