//! Login challenges and tokens.
//!
//! A challenge nonce is `base64url(random[16] ‖ user[16] ‖ expiry[8] ‖ mac[32])`
//! with `mac = HMAC-SHA256(challenge key, random ‖ user ‖ expiry)`: any node
//! can check it without shared state; the nonce ledger makes it single-use.
//! A token is a JWT (HS256): `sub` (user id), `aud` (`privcomm`), `iat`, `exp`
//! (5 minutes), `jti`. Both keys are derived from `SECRET_KEY` with distinct
//! labels, so neither can stand in for the other.

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
    decoding: DecodingKey,
    challenge_key: [u8; 32],
    settings: TokenSettings,
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
            decoding: DecodingKey::from_secret(&jwt_key).expect("32-byte HMAC key"),
            challenge_key: derive(secret, b"privcomm/challenge/v1"),
            settings,
        }
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
        let mut mac = hmac(&self.challenge_key);
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
        let mut check = hmac(&self.challenge_key);
        check.update(body);
        if check.verify_slice(mac).is_err() {
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| ApiError::Unauthorized("invalid token"))?;
        if data.claims.exp <= now.unix_seconds() {
            return Err(ApiError::Unauthorized("token expired"));
        }
        Uuid::parse_str(&data.claims.sub).map(UserId).map_err(|_| ApiError::Unauthorized("invalid token"))
    }
}
