//! A JSON body extractor whose rejections name the field: wrong JSON types,
//! unknown fields and missing fields become 422 with a JSON path.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

/// Largest accepted body (a registration with 100 + 100 prekeys is ~350 KiB of Base64).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// `Json<T>` with field-naming errors.
pub struct StrictJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json =
            request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !is_json {
            return Err(ApiError::Unprocessable {
                field: None,
                message: "the body must be JSON (Content-Type: application/json)".into(),
            });
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::Unprocessable { field: None, message: e.body_text() })?;
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            let path = error.path().to_string();
            let field = (path != ".").then_some(path);
            ApiError::Unprocessable { field, message: error.into_inner().to_string() }
        })?;
        deserializer
            .end()
            .map_err(|e| ApiError::Unprocessable { field: None, message: format!("trailing data after JSON: {e}") })?;
        Ok(StrictJson(value))
    }
}
