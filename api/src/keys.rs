//! Prekeys: `GET /v1/keys/{user_id}` hands out a PQXDH bundle (consuming one
//! one-time key of each kind), `GET /v1/keys/count` tells the caller how many
//! one-time keys it has left, `PUT /v1/keys` uploads more and rotates the
//! signed prekey and the Kyber last-resort key.

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::json::StrictJson;
use crate::validate;
use crate::wire::KeysUpdateBody;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use privcomm_domain::events::{DomainEvent, KyberClaim};
use privcomm_domain::user::{RegisteredUser, UserCommand};
use serde_json::{Value, json};

/// The key routes. `bundle` is the rate-limited one (see `limits`).
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/keys/count", get(count)).route("/v1/keys", axum::routing::put(update))
}

/// `GET /v1/keys/{user_id}`, separate so the bundle limit applies to it alone.
pub fn bundle_router() -> Router<AppState> {
    Router::new().route("/v1/keys/{user_id}", get(bundle))
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

async fn bundle(
    State(state): State<AppState>,
    AuthUser(requester): AuthUser,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = validate::user_id("user_id", &user_id)?;
    let command = UserCommand::ClaimPreKeys { claimed_by: requester };
    let bundle = state
        .users
        .execute(owner, &command, |before, events| {
            let user = before.registered.as_ref()?;
            let Some(DomainEvent::PreKeyClaimed { one_time_prekey, kyber, .. }) = events.first() else { return None };
            Some(render_bundle(user, *one_time_prekey, *kyber))
        })
        .await?;
    bundle.map(Json).ok_or(ApiError::NotFound("no such user"))
}

fn render_bundle(user: &RegisteredUser, one_time: Option<privcomm_domain::ids::PreKeyId>, kyber: KyberClaim) -> Value {
    let one_time_prekey = one_time
        .and_then(|id| user.one_time_prekeys.get(&id))
        .map(|key| json!({ "id": key.id.0, "public_key": b64(&key.public_key.0) }));
    let (kyber_key, last_resort) = match kyber {
        KyberClaim::OneTime(id) => (user.kyber_prekeys.get(&id).unwrap_or(&user.keys.kyber_last_resort), false),
        KyberClaim::LastResort(_) => (&user.keys.kyber_last_resort, true),
    };
    json!({
        "user_id": user.user_id.0,
        "registration_id": user.keys.registration_id.0,
        "identity_key": b64(&user.keys.identity_key.0),
        "signed_prekey": {
            "id": user.keys.signed_prekey.id.0,
            "public_key": b64(&user.keys.signed_prekey.public_key.0),
            "signature": b64(&user.keys.signed_prekey.signature.0),
        },
        "one_time_prekey": one_time_prekey,
        "kyber_prekey": {
            "id": kyber_key.id.0,
            "public_key": b64(&kyber_key.public_key.0),
            "signature": b64(&kyber_key.signature.0),
            "last_resort": last_resort,
        },
    })
}

async fn count(State(state): State<AppState>, AuthUser(user): AuthUser) -> Result<Json<Value>, ApiError> {
    let counts = state
        .users
        .read(user, |s| s.registered.as_ref().map(|u| (u.one_time_prekeys.len(), u.kyber_prekeys.len())))
        .await?
        .ok_or(ApiError::NotFound("no such user"))?;
    Ok(Json(json!({ "one_time": counts.0, "kyber": counts.1 })))
}

async fn update(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    StrictJson(body): StrictJson<KeysUpdateBody>,
) -> Result<StatusCode, ApiError> {
    let identity = state.users.identity_key(user).await?.ok_or(ApiError::NotFound("no such user"))?;
    let (one_time_prekeys, kyber_prekeys) =
        validate::prekey_lists(&identity, &body.one_time_prekeys, &body.kyber_prekeys)?;
    let signed_prekey =
        body.signed_prekey.as_ref().map(|k| validate::signed_prekey("signed_prekey", &identity, k)).transpose()?;
    let kyber_last_resort = body
        .kyber_last_resort
        .as_ref()
        .map(|k| validate::kyber_prekey("kyber_last_resort", &identity, k))
        .transpose()?;
    if kyber_last_resort.is_some() && signed_prekey.is_none() {
        return Err(ApiError::field("kyber_last_resort", "rotate it together with signed_prekey"));
    }
    if one_time_prekeys.is_empty() && kyber_prekeys.is_empty() && signed_prekey.is_none() {
        return Err(ApiError::field("one_time_prekeys", "nothing to upload"));
    }
    // Uploads first: they are the part the domain can refuse, so a refused
    // request changes nothing.
    if !one_time_prekeys.is_empty() || !kyber_prekeys.is_empty() {
        let command = UserCommand::UploadPreKeys { one_time_prekeys, kyber_prekeys };
        state.users.execute(user, &command, |_, _| ()).await?;
    }
    if let Some(signed_prekey) = signed_prekey {
        state
            .users
            .execute(user, &UserCommand::RotateSignedPreKey { signed_prekey, kyber_last_resort }, |_, _| ())
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
