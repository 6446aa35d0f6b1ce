//! `POST /v1/accounts`: registration, and identity change for a phone hash
//! that is already registered.

use crate::AppState;
use crate::auth::redeem_challenge;
use crate::error::ApiError;
use crate::json::StrictJson;
use crate::users::user_id_for;
use crate::validate;
use crate::wire::RegistrationBody;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use privcomm_domain::events::{Bytes, IdentityKeys};
use privcomm_domain::ids::{PhoneHash, RegistrationId};
use privcomm_domain::user::{DomainError, Registration, UserCommand};
use serde_json::{Value, json};

/// Highest libsignal registration id (14 bits, minus the reserved top values).
pub const MAX_REGISTRATION_ID: u32 = 16_380;

/// The account routes (the registration route carries its own rate limit; see `limits`).
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/accounts", post(register))
}

async fn register(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<RegistrationBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let phone_hash =
        PhoneHash::new(body.phone_hash.clone()).map_err(|e| ApiError::field("phone_hash", e.to_string()))?;
    if !(1..=MAX_REGISTRATION_ID).contains(&body.registration_id) {
        return Err(ApiError::field("registration_id", format!("must be between 1 and {MAX_REGISTRATION_ID}")));
    }
    let identity = validate::identity_key("identity_key", &body.identity_key)?;
    let signed_prekey = validate::signed_prekey("signed_prekey", &identity, &body.signed_prekey)?;
    let kyber_last_resort = validate::kyber_prekey("kyber_last_resort", &identity, &body.kyber_last_resort)?;
    let (one_time_prekeys, kyber_prekeys) =
        validate::prekey_lists(&identity, &body.one_time_prekeys, &body.kyber_prekeys)?;

    let user_id = user_id_for(&phone_hash);
    let registration = Registration {
        user_id,
        phone_hash,
        keys: IdentityKeys {
            registration_id: RegistrationId(body.registration_id),
            identity_key: Bytes(identity.serialize().into_vec()),
            signed_prekey,
            kyber_last_resort,
        },
        one_time_prekeys,
        kyber_prekeys,
    };
    let command = UserCommand::Register(registration.clone());
    match state.users.execute(user_id, &command, |_, _| ()).await {
        Ok(()) => {
            tracing::info!(user_id = %user_id.0, "user registered");
            Ok((StatusCode::CREATED, Json(json!({ "user_id": user_id.0 }))))
        }
        Err(ApiError::Conflict(_)) => {
            let Some(proof) = &body.identity_proof else {
                return Err(DomainError::AlreadyRegistered.into());
            };
            // Registered a moment ago (that is what the conflict said).
            let current = state
                .users
                .identity_key(user_id)
                .await?
                .ok_or(ApiError::Conflict("registration changed concurrently; retry"))?;
            redeem_challenge(&state, user_id, &current, &proof.nonce, &proof.signature).await?;
            state.users.execute(user_id, &UserCommand::ChangeIdentity(registration), |_, _| ()).await?;
            tracing::info!(user_id = %user_id.0, "identity key changed");
            Ok((StatusCode::OK, Json(json!({ "user_id": user_id.0, "identity_changed": true }))))
        }
        Err(other) => Err(other),
    }
}
