//! Turning request fields into checked domain values. Every key must decode
//! as its libsignal type and every signature must verify against the
//! identity key; the error names the field.

use crate::error::ApiError;
use crate::wire::{OneTimeKeyBody, SignedKeyBody};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libsignal_protocol::{IdentityKey, PublicKey, kem};
use privcomm_domain::events::{Bytes, KyberPreKey, OneTimePreKey, SignedPreKey};
use privcomm_domain::ids::{KyberPreKeyId, PreKeyId, SignedPreKeyId};

/// Most one-time keys of each kind per request.
pub const MAX_PREKEYS: usize = privcomm_domain::user::MAX_PREKEYS_PER_UPLOAD;

/// Standard Base64 → bytes.
pub fn base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(text).map_err(|_| ApiError::field(field, "not standard Base64"))
}

/// Base64 → a libsignal identity key.
pub fn identity_key(field: &str, text: &str) -> Result<IdentityKey, ApiError> {
    let bytes = base64(field, text)?;
    IdentityKey::decode(&bytes).map_err(|_| ApiError::field(field, "not a serialized identity public key"))
}

/// A signature check over `message` by `identity`.
pub fn check_signature(
    field: &str,
    identity: &IdentityKey,
    message: &[u8],
    signature_b64: &str,
) -> Result<Vec<u8>, ApiError> {
    let signature = base64(field, signature_b64)?;
    if identity.public_key().verify_signature(message, &signature) {
        Ok(signature)
    } else {
        Err(ApiError::field(field, "signature does not verify against the identity key"))
    }
}

/// A signed EC prekey, verified.
pub fn signed_prekey(field: &str, identity: &IdentityKey, body: &SignedKeyBody) -> Result<SignedPreKey, ApiError> {
    let public_field = format!("{field}.public_key");
    let bytes = base64(&public_field, &body.public_key)?;
    let key =
        PublicKey::deserialize(&bytes).map_err(|_| ApiError::field(&public_field, "not a serialized EC public key"))?;
    let signature = check_signature(&format!("{field}.signature"), identity, &key.serialize(), &body.signature)?;
    Ok(SignedPreKey { id: SignedPreKeyId(body.id), public_key: Bytes(bytes), signature: Bytes(signature) })
}

/// A Kyber prekey, verified.
pub fn kyber_prekey(field: &str, identity: &IdentityKey, body: &SignedKeyBody) -> Result<KyberPreKey, ApiError> {
    let public_field = format!("{field}.public_key");
    let bytes = base64(&public_field, &body.public_key)?;
    let key = kem::PublicKey::deserialize(&bytes)
        .map_err(|_| ApiError::field(&public_field, "not a serialized Kyber public key"))?;
    let signature = check_signature(&format!("{field}.signature"), identity, &key.serialize(), &body.signature)?;
    Ok(KyberPreKey { id: KyberPreKeyId(body.id), public_key: Bytes(bytes), signature: Bytes(signature) })
}

/// A one-time EC prekey.
pub fn one_time_prekey(field: &str, body: &OneTimeKeyBody) -> Result<OneTimePreKey, ApiError> {
    let public_field = format!("{field}.public_key");
    let bytes = base64(&public_field, &body.public_key)?;
    PublicKey::deserialize(&bytes).map_err(|_| ApiError::field(&public_field, "not a serialized EC public key"))?;
    Ok(OneTimePreKey { id: PreKeyId(body.id), public_key: Bytes(bytes) })
}

/// All one-time keys of a request, at most [`MAX_PREKEYS`] of each kind.
pub fn prekey_lists(
    identity: &IdentityKey,
    one_time: &[OneTimeKeyBody],
    kyber: &[SignedKeyBody],
) -> Result<(Vec<OneTimePreKey>, Vec<KyberPreKey>), ApiError> {
    if one_time.len() > MAX_PREKEYS {
        return Err(ApiError::field("one_time_prekeys", format!("at most {MAX_PREKEYS} per request")));
    }
    if kyber.len() > MAX_PREKEYS {
        return Err(ApiError::field("kyber_prekeys", format!("at most {MAX_PREKEYS} per request")));
    }
    let one_time = one_time
        .iter()
        .enumerate()
        .map(|(i, key)| one_time_prekey(&format!("one_time_prekeys[{i}]"), key))
        .collect::<Result<Vec<_>, _>>()?;
    let kyber = kyber
        .iter()
        .enumerate()
        .map(|(i, key)| kyber_prekey(&format!("kyber_prekeys[{i}]"), identity, key))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((one_time, kyber))
}

/// A user id in a path or body.
pub fn user_id(field: &str, text: &str) -> Result<privcomm_domain::UserId, ApiError> {
    uuid::Uuid::parse_str(text).map(privcomm_domain::UserId).map_err(|_| ApiError::field(field, "not a UUID"))
}
