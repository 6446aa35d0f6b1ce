//! Request and response bodies. Keys and signatures are standard Base64.
//! Unknown fields are refused, so a typo never silently drops a key.

use serde::{Deserialize, Serialize};

/// A signed EC prekey or a Kyber prekey: `{id, public_key, signature}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignedKeyBody {
    /// Key id.
    pub id: u32,
    /// Base64 of the libsignal-serialized public key.
    pub public_key: String,
    /// Base64 of the identity key's signature over the serialized public key.
    pub signature: String,
}

/// A one-time EC prekey: `{id, public_key}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OneTimeKeyBody {
    /// Key id.
    pub id: u32,
    /// Base64 of the libsignal-serialized public key.
    pub public_key: String,
}

/// Proof of the current identity key, for re-registration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProofBody {
    /// A nonce from `POST /v1/auth/challenge` for this user.
    pub nonce: String,
    /// Base64 of the current identity key's signature over the nonce's bytes.
    pub signature: String,
}

/// `POST /v1/accounts`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationBody {
    /// SHA-256 of the phone number, 64 lowercase hex characters.
    pub phone_hash: String,
    /// libsignal registration id (1..=16380).
    pub registration_id: u32,
    /// Base64 of the serialized identity public key.
    pub identity_key: String,
    /// Signed EC prekey.
    pub signed_prekey: SignedKeyBody,
    /// Kyber last-resort prekey.
    pub kyber_last_resort: SignedKeyBody,
    /// Up to 100 one-time EC prekeys.
    #[serde(default)]
    pub one_time_prekeys: Vec<OneTimeKeyBody>,
    /// Up to 100 one-time Kyber prekeys.
    #[serde(default)]
    pub kyber_prekeys: Vec<SignedKeyBody>,
    /// Present to change the identity of an already registered phone hash.
    #[serde(default)]
    pub identity_proof: Option<IdentityProofBody>,
}

/// `PUT /v1/keys`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysUpdateBody {
    /// More one-time EC prekeys (up to 100).
    #[serde(default)]
    pub one_time_prekeys: Vec<OneTimeKeyBody>,
    /// More one-time Kyber prekeys (up to 100).
    #[serde(default)]
    pub kyber_prekeys: Vec<SignedKeyBody>,
    /// A new signed prekey.
    #[serde(default)]
    pub signed_prekey: Option<SignedKeyBody>,
    /// A new Kyber last-resort key (only with a new signed prekey).
    #[serde(default)]
    pub kyber_last_resort: Option<SignedKeyBody>,
}

/// `POST /v1/auth/challenge`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeBody {
    /// The user who will sign the nonce.
    pub user_id: String,
}

/// `POST /v1/auth/token`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// The user.
    pub user_id: String,
    /// The nonce from the challenge.
    pub nonce: String,
    /// Base64 of the identity key's signature over the nonce's bytes.
    pub signature: String,
}

/// `PUT /v1/push-token`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushTokenBody {
    /// `fcm` or `apns`.
    pub platform: String,
    /// The platform's device token.
    pub token: String,
}
