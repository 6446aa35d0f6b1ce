//! Login challenges and tokens.
//!
//! A challenge nonce is `base64url(random[16] ‖ user[16] ‖ expiry[8] ‖ mac[32])`
//! with `mac = HMAC-SHA256(challenge key, random ‖ user ‖ expiry)`: any node
//! can check it without shared state; the nonce ledger makes it single-use.
//! A token is a JWT (HS256): `sub` (user id), `aud` (`privcomm`), `iat`, `exp`
//! (5 minutes), `jti`. Both keys are derived from `SECRET_KEY` with distinct
//! labels, so neither can stand in for the other.
//!
//! Rotating `SECRET_KEY`: a node started with `SECRET_KEY_PREVIOUS` signs
//! with the new key and still accepts tokens and challenges signed with the
//! previous one for one token lifetime from its start — long enough for
//! every token issued before the rotation to expire on its own, so users
//! are not all logged out at once, and short enough that a leaked old key
//! stops working by itself.

use crate::error::ApiError;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use privcomm_domain::{Timestamp, UserId};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The audience every token carries and every check requires.
pub const AUDIENCE: &str = "privcomm";

type HmacSha256 = Hmac<Sha256>;

/// Token and challenge settings.
#[derive(Clone, Debug)]
pub struct TokenSettings {
    /// Token lifetime in seconds (300).
    pub token_lifetime_s: i64,
    /// Challenge lifetime in seconds (60).
    pub challenge_lifetime_s: i64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings { token_lifetime_s: 300, challenge_lifetime_s: 60 }
    }
}

/// JWT claims.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

/// Issues and checks challenges and tokens.
pub struct Tokens {
    encoding: EncodingKey,
    current: CheckingKeys,
    previous: Option<PreviousKeys>,
    settings: TokenSettings,
}

/// What checks a token and a challenge: both derived from one secret.
struct CheckingKeys {
    decoding: DecodingKey,
    challenge_key: [u8; 32],
}

impl CheckingKeys {
    fn derive(secret: &[u8]) -> CheckingKeys {
        CheckingKeys {
            // Only an empty secret is refused; a derived key is 32 bytes.
            decoding: DecodingKey::from_secret(&derive(secret, b"privcomm/jwt/v1")).expect("32-byte HMAC key"),
            challenge_key: derive(secret, b"privcomm/challenge/v1"),
        }
    }
}

/// The previous secret's keys, and until when (Unix seconds, exclusive) they count.
struct PreviousKeys {
    keys: CheckingKeys,
    until: i64,
}

fn hmac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = hmac(secret);
    mac.update(label);
    mac.finalize().into_bytes().into()
}

/// What a valid challenge nonce says.
pub struct CheckedNonce {
    /// SHA-256 of the nonce: its identity in the ledger.
    pub id: [u8; 32],
    /// When it stops being valid.
    pub expires_at: Timestamp,
}

impl Tokens {
    /// Keys derived from `secret`.
    pub fn new(secret: &[u8], settings: TokenSettings) -> Tokens {
        let jwt_key = derive(secret, b"privcomm/jwt/v1");
        Tokens {
            // Only an empty secret is refused; a derived key is 32 bytes.
            encoding: EncodingKey::from_secret(&jwt_key).expect("32-byte HMAC key"),
            current: CheckingKeys::derive(secret),
            previous: None,
            settings,
        }
    }

    /// Also accepts tokens and challenges signed with `previous` (the secret
    /// before a rotation) for one token lifetime from `started`.
    pub fn accepting_previous(mut self, previous: &[u8], started: Timestamp) -> Tokens {
        let until = started.unix_seconds() + self.settings.token_lifetime_s;
        self.previous = Some(PreviousKeys { keys: CheckingKeys::derive(previous), until });
        self
    }

    /// Until when (Unix seconds) the previous secret's signatures are accepted, if one is configured.
    pub fn previous_accepted_until(&self) -> Option<i64> {
        self.previous.as_ref().map(|p| p.until)
    }

    /// The current keys, then the previous ones while they still count.
    fn checking_keys(&self, now: Timestamp) -> impl Iterator<Item = &CheckingKeys> {
        let previous = self.previous.as_ref().filter(|p| now.unix_seconds() < p.until).map(|p| &p.keys);
        std::iter::once(&self.current).chain(previous)
    }

    /// Token lifetime in seconds.
    pub fn token_lifetime_s(&self) -> i64 {
        self.settings.token_lifetime_s
    }

    /// A fresh challenge nonce for `user`, and its lifetime in seconds.
    pub fn challenge(&self, user: UserId, now: Timestamp) -> (String, i64) {
        let mut random = [0u8; 16];
        rand::rng().fill_bytes(&mut random);
        let expiry = now.unix_seconds() + self.settings.challenge_lifetime_s;
        let mut bytes = Vec::with_capacity(72);
        bytes.extend_from_slice(&random);
        bytes.extend_from_slice(user.0.as_bytes());
        bytes.extend_from_slice(&expiry.to_be_bytes());
        let mac = self.challenge_mac(&bytes);
        bytes.extend_from_slice(&mac);
        (URL_SAFE_NO_PAD.encode(bytes), self.settings.challenge_lifetime_s)
    }

    fn challenge_mac(&self, body: &[u8]) -> [u8; 32] {
        let mut mac = hmac(&self.current.challenge_key);
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// Checks that `nonce` is ours, for `user`, and not expired. (Single use
    /// is the ledger's job.)
    pub fn check_challenge(&self, nonce: &str, user: UserId, now: Timestamp) -> Result<CheckedNonce, ApiError> {
        let invalid = ApiError::Unauthorized("invalid, expired or foreign challenge");
        let bytes = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| ApiError::Unauthorized("invalid, expired or foreign challenge"))?;
        if bytes.len() != 72 {
            return Err(invalid);
        }
        let (body, mac) = bytes.split_at(40);
        let signed_by_us = self.checking_keys(now).any(|keys| {
            let mut check = hmac(&keys.challenge_key);
            check.update(body);
            check.verify_slice(mac).is_ok()
        });
        if !signed_by_us {
            return Err(invalid);
        }
        let issued_for = Uuid::from_slice(&body[16..32]).map_err(|_| ApiError::Unauthorized("invalid challenge"))?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&body[32..40]);
        let expiry = i64::from_be_bytes(expiry);
        if issued_for != user.0 || expiry <= now.unix_seconds() {
            return Err(invalid);
        }
        Ok(CheckedNonce { id: Sha256::digest(nonce.as_bytes()).into(), expires_at: Timestamp(expiry * 1_000_000) })
    }

    /// A token for `user`.
    pub fn issue(&self, user: UserId, now: Timestamp) -> Result<String, ApiError> {
        let iat = now.unix_seconds();
        let claims = Claims {
            sub: user.0.to_string(),
            aud: AUDIENCE.into(),
            iat,
            exp: iat + self.settings.token_lifetime_s,
            jti: Uuid::now_v7().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(ApiError::internal)
    }

    /// The user a token was issued to, if it is ours, for us, and unexpired at `now`.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<UserId, ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iat"]);
        // Expiry is checked below against the injected clock, not the system's.
        validation.validate_exp = false;
        validation.leeway = 0;
        let data = self
            .checking_keys(now)
            .find_map(|keys| jsonwebtoken::decode::<Claims>(token, &keys.decoding, &validation).ok())
            .ok_or(ApiError::Unauthorized("invalid token"))?;
        if data.claims.exp <= now.unix_seconds() {
            return Err(ApiError::Unauthorized("token expired"));
        }
        Uuid::parse_str(&data.claims.sub).map(UserId).map_err(|_| ApiError::Unauthorized("invalid token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &[u8] = b"the-secret-before-the-rotation-0123456789";
    const NEW: &[u8] = b"the-secret-after-the-rotation-01234567890";
    const OTHER: &[u8] = b"a-secret-this-server-never-had-0123456789";

    fn at(seconds: i64) -> Timestamp {
        Timestamp(seconds * 1_000_000)
    }

    fn rotated(started: i64) -> Tokens {
        Tokens::new(NEW, TokenSettings::default()).accepting_previous(OLD, at(started))
    }

    #[test]
    fn a_token_of_the_previous_secret_works_until_it_expires() {
        let user = UserId(Uuid::now_v7());
        // Issued 100 s before the rotation: expires at 1_000_200.
        let old_token = Tokens::new(OLD, TokenSettings::default()).issue(user, at(999_900)).expect("issued");
        let tokens = rotated(1_000_000);
        assert_eq!(tokens.verify(&old_token, at(1_000_000)).expect("accepted after the rotation"), user);
        assert_eq!(tokens.verify(&old_token, at(1_000_199)).expect("accepted until its expiry"), user);
        assert!(tokens.verify(&old_token, at(1_000_200)).is_err(), "refused once expired");
        // New tokens are signed with the new secret only.
        let new_token = tokens.issue(user, at(1_000_000)).expect("issued");
        assert!(Tokens::new(OLD, TokenSettings::default()).verify(&new_token, at(1_000_000)).is_err());
        assert_eq!(tokens.verify(&new_token, at(1_000_000)).expect("accepted"), user);
    }

    #[test]
    fn a_token_of_neither_secret_is_refused() {
        let user = UserId(Uuid::now_v7());
        let foreign = Tokens::new(OTHER, TokenSettings::default()).issue(user, at(1_000_000)).expect("issued");
        assert!(matches!(rotated(1_000_000).verify(&foreign, at(1_000_001)), Err(ApiError::Unauthorized(_))));
    }

    #[test]
    fn the_previous_secret_counts_for_one_token_lifetime_only() {
        let user = UserId(Uuid::now_v7());
        let tokens = rotated(1_000_000);
        assert_eq!(tokens.previous_accepted_until(), Some(1_000_300));
        // A token someone still holding the old secret mints later is refused once the window closed.
        let late = Tokens::new(OLD, TokenSettings::default()).issue(user, at(1_000_290)).expect("issued");
        assert!(tokens.verify(&late, at(1_000_299)).is_ok());
        assert!(tokens.verify(&late, at(1_000_300)).is_err());
    }

    #[test]
    fn a_challenge_of_the_previous_secret_is_accepted_within_the_window() {
        let user = UserId(Uuid::now_v7());
        let (nonce, _) = Tokens::new(OLD, TokenSettings::default()).challenge(user, at(1_000_000));
        let tokens = rotated(1_000_010);
        assert!(tokens.check_challenge(&nonce, user, at(1_000_020)).is_ok());
        let (foreign, _) = Tokens::new(OTHER, TokenSettings::default()).challenge(user, at(1_000_000));
        assert!(tokens.check_challenge(&foreign, user, at(1_000_020)).is_err());
        let (fresh, _) = tokens.challenge(user, at(1_000_020));
        assert!(tokens.check_challenge(&fresh, user, at(1_000_021)).is_ok());
    }
}
