//! Login: `POST /v1/auth/challenge` → a single-use nonce valid 60 s;
//! `POST /v1/auth/token` with the identity key's signature over it → a JWT
//! valid 5 minutes. [`AuthUser`] is the extractor protected routes use.

use crate::AppState;
use crate::error::ApiError;
use crate::json::StrictJson;
use crate::validate;
use crate::wire::{ChallengeBody, TokenBody};
use axum::extract::{FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router};
use libsignal_protocol::IdentityKey;
use privcomm_domain::UserId;
use serde_json::{Value, json};

/// The auth routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/auth/challenge", post(challenge)).route("/v1/auth/token", post(token))
}

async fn challenge(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<ChallengeBody>,
) -> Result<Json<Value>, ApiError> {
    let user = validate::user_id("user_id", &body.user_id)?;
    // Unknown users get a nonce too, so the endpoint does not tell who is registered.
    let (nonce, expires_in) = state.tokens.challenge(user, state.clock.now());
    Ok(Json(json!({ "nonce": nonce, "expires_in": expires_in })))
}

/// Checks a signed challenge: ours, for `user`, unexpired, unused, and
/// signed by `identity`. Consumes the nonce.
pub(crate) async fn redeem_challenge(
    state: &AppState,
    user: UserId,
    identity: &IdentityKey,
    nonce: &str,
    signature_b64: &str,
) -> Result<(), ApiError> {
    let now = state.clock.now();
    let checked = state.tokens.check_challenge(nonce, user, now)?;
    let signature =
        validate::base64("signature", signature_b64).map_err(|_| ApiError::Unauthorized("bad signature"))?;
    if !identity.public_key().verify_signature(nonce.as_bytes(), &signature) {
        return Err(ApiError::Unauthorized("bad signature"));
    }
    // Consumed only once the signature checked out, so nobody can burn
    // another user's nonce without their key.
    if !state.nonces.consume(checked.id, checked.expires_at, now).await? {
        return Err(ApiError::Unauthorized("challenge already used"));
    }
    Ok(())
}

async fn token(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<TokenBody>,
) -> Result<Json<Value>, ApiError> {
    let user = validate::user_id("user_id", &body.user_id)?;
    state.limits.check_token_issue(user)?;
    let identity = state.users.identity_key(user).await?.ok_or(ApiError::Unauthorized("unknown user"))?;
    redeem_challenge(&state, user, &identity, &body.nonce, &body.signature).await?;
    let token = state.tokens.issue(user, state.clock.now())?;
    Ok(Json(json!({ "token": token, "token_type": "Bearer", "expires_in": state.tokens.token_lifetime_s() })))
}

/// A request authenticated by a login token of a registered user.
#[derive(Clone, Copy, Debug)]
pub struct AuthUser(pub UserId);

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let user = state.tokens.verify(token, state.clock.now())?;
        let registered = state.users.read(user, |s| s.registered.is_some()).await?;
        if !registered {
            return Err(ApiError::Unauthorized("unknown user"));
        }
        tracing::Span::current().record("user_id", tracing::field::display(user.0));
        Ok(AuthUser(user))
    }
}
