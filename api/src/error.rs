//! The one error type of the API. Every handler returns `Result<_, ApiError>`;
//! the response is JSON `{"error": <code>, "message": <text>, "field"?: <name>}`.
//! A 500 logs its cause and tells the client nothing more.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use privcomm_domain::StoreError;
use privcomm_domain::user::DomainError;
use serde_json::json;

/// What went wrong, as the client should learn it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is present and well-typed but its value is wrong (400).
    #[error("{field}: {message}")]
    InvalidField {
        /// The field, as a JSON path (`signed_prekey.signature`).
        field: String,
        /// Why.
        message: String,
    },
    /// The body is not the expected JSON shape (422).
    #[error("{message}")]
    Unprocessable {
        /// The offending field, when known.
        field: Option<String>,
        /// Why.
        message: String,
    },
    /// Missing, invalid or expired credentials (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such user (404).
    #[error("{0}")]
    NotFound(&'static str),
    /// The request conflicts with what is stored (409).
    #[error("{0}")]
    Conflict(&'static str),
    /// The server is not set up for this (503).
    #[error("{0}")]
    NotConfigured(&'static str),
    /// Over a rate limit (429).
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after: u64,
    },
    /// Something failed on our side (500); the cause is logged, not returned.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// A 400 for `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::InvalidField { field: field.into(), message: message.into() }
    }

    /// A 500 with its cause.
    pub fn internal(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
        ApiError::Internal(Box::new(error))
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::internal(error)
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        match &error {
            DomainError::AlreadyRegistered => ApiError::Conflict("this phone hash is already registered"),
            DomainError::NotRegistered => ApiError::NotFound("no such user"),
            DomainError::TooManyPreKeys { kind, .. }
            | DomainError::PreKeyPoolFull { kind, .. }
            | DomainError::DuplicatePreKeyId { kind, .. } => {
                let field = if *kind == "kyber" { "kyber_prekeys" } else { "one_time_prekeys" };
                ApiError::field(field, error.to_string())
            }
            DomainError::EmptyUpload => ApiError::field("one_time_prekeys", error.to_string()),
        }
    }
}

/// Logs the whole chain of a 500's cause.
/// An error and its causes, `outer: inner: …`, for logs.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

fn log_internal(error: &(dyn std::error::Error + 'static)) {
    tracing::error!(error = %chain(error), "request failed");
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::InvalidField { field, message } => {
                (StatusCode::BAD_REQUEST, json!({"error": "invalid_field", "field": field, "message": message}))
            }
            ApiError::Unprocessable { field, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "unprocessable_body", "field": field, "message": message}),
            ),
            ApiError::Unauthorized(message) => {
                (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized", "message": message}))
            }
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, json!({"error": "not_found", "message": message})),
            ApiError::Conflict(message) => (StatusCode::CONFLICT, json!({"error": "conflict", "message": message})),
            ApiError::NotConfigured(message) => {
                (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "not_configured", "message": message}))
            }
            ApiError::RateLimited { retry_after } => {
                (StatusCode::TOO_MANY_REQUESTS, json!({"error": "rate_limited", "retry_after": retry_after}))
            }
            ApiError::Internal(cause) => {
                log_internal(cause.as_ref());
                (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "internal", "message": "internal error"}))
            }
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::RateLimited { retry_after } = self
            && let Ok(value) = HeaderValue::from_str(&retry_after.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
