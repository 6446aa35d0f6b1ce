//! `GET /v1/calls/turn`: short-lived TURN credentials for voice calls, in
//! coturn's REST-API scheme (`use-auth-secret`), so that the TURN server
//! checks them with the shared secret alone and privcomm keeps no state:
//!
//! - `username` = `<expiry, Unix seconds>:<user id>`
//! - `credential` = Base64(HMAC-SHA1(`TURN_SECRET`, `username`))
//!
//! The TURN server refuses a username whose expiry has passed. Media never
//! touches privcomm; the relay only carries the calls' encrypted signalling.

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::time::Duration;

/// Where calls find TURN and STUN, and how credentials are made.
#[derive(Clone, Default)]
pub struct TurnConfig {
    /// `TURN_URLS`: `turn:`, `turns:` and `stun:` URLs handed to clients; none = calls not configured.
    pub urls: Vec<String>,
    /// `TURN_SECRET`: coturn's `static-auth-secret`.
    pub secret: Vec<u8>,
    /// `TURN_TTL`: how long a credential is valid.
    pub ttl: Duration,
}

impl std::fmt::Debug for TurnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret mints credentials: never in a log line.
        f.debug_struct("TurnConfig")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The call routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/calls/turn", get(turn_credentials))
}

/// The credential for `username` under `secret`: Base64(HMAC-SHA1(secret, username)).
pub fn credential(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

async fn turn_credentials(State(state): State<AppState>, AuthUser(user): AuthUser) -> Result<Json<Value>, ApiError> {
    let turn = &state.turn;
    if turn.urls.is_empty() {
        return Err(ApiError::NotConfigured("calls are not configured on this server (TURN_URLS is empty)"));
    }
    let expires = state.clock.now().unix_seconds() + turn.ttl.as_secs() as i64;
    let username = format!("{expires}:{}", user.0);
    Ok(Json(json!({
        "urls": turn.urls,
        "credential": credential(&turn.secret, &username),
        "username": username,
        "ttl": turn.ttl.as_secs(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_is_coturns_hmac_sha1_of_the_username() {
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?").
        let expected = base64::engine::general_purpose::STANDARD
            .encode(hex::decode("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79").expect("hex"));
        assert_eq!(credential(b"Jefe", "what do ya want for nothing?"), expected);
    }

    #[test]
    fn the_secret_stays_out_of_debug_output() {
        let config = TurnConfig { urls: vec!["stun:x".into()], secret: b"s3cret-value".to_vec(), ttl: Duration::ZERO };
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
