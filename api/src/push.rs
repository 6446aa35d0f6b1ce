//! `PUT /v1/push-token`: where to send "you have mail" while offline.

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::json::StrictJson;
use crate::wire::PushTokenBody;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::put;
use privcomm_domain::user::UserCommand;

/// Platforms a push gateway can serve.
pub const PLATFORMS: [&str; 2] = ["fcm", "apns"];

/// Longest accepted device token.
pub const MAX_TOKEN_LENGTH: usize = 4096;

/// The push routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/push-token", put(register))
}

async fn register(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    StrictJson(body): StrictJson<PushTokenBody>,
) -> Result<StatusCode, ApiError> {
    if !PLATFORMS.contains(&body.platform.as_str()) {
        return Err(ApiError::field("platform", format!("one of {}", PLATFORMS.join(", "))));
    }
    if body.token.is_empty() || body.token.len() > MAX_TOKEN_LENGTH || body.token.chars().any(char::is_control) {
        return Err(ApiError::field("token", format!("1 to {MAX_TOKEN_LENGTH} printable characters")));
    }
    let command = UserCommand::RegisterPushToken { platform: body.platform, token: body.token };
    state.users.execute(user, &command, |_, _| ()).await?;
    Ok(StatusCode::NO_CONTENT)
}
