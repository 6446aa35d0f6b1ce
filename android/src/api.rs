//! The server's HTTP API, as the client uses it (docs in the README and
//! `GET /openapi.json`).

use crate::error::{ClientError, Result};
use serde_json::{Value, json};

/// An HTTP client for one server.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// For the server at `base` (`https://host` or `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Result<Api> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(crate::error::invalid("server_url", "must start with http:// or https://"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Api { http, base })
    }

    /// The relay's WebSocket URL.
    pub fn websocket_url(&self) -> String {
        let rest = self.base.strip_prefix("https://").map(|r| format!("wss://{r}"));
        rest.unwrap_or_else(|| format!("ws://{}", self.base.trim_start_matches("http://"))) + "/v1/websocket"
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Server { status, message });
        }
        if text.is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str(&text).map_err(|e| ClientError::Network(e.to_string()))
        }
    }

    /// `POST /v1/accounts` → the new user id.
    pub async fn register(&self, body: &Value) -> Result<String> {
        let answer = self.send(self.http.post(format!("{}/v1/accounts", self.base)).json(body)).await?;
        answer["user_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Network(format!("no user_id in {answer}")))
    }

    /// `POST /v1/auth/challenge` → the nonce.
    pub async fn challenge(&self, user_id: &str) -> Result<String> {
        let answer = self
            .send(self.http.post(format!("{}/v1/auth/challenge", self.base)).json(&json!({ "user_id": user_id })))
            .await?;
        answer["nonce"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Network(format!("no nonce in {answer}")))
    }

    /// `POST /v1/auth/token` → (token, lifetime in seconds).
    pub async fn token(&self, user_id: &str, nonce: &str, signature: &str) -> Result<(String, u64)> {
        let body = json!({ "user_id": user_id, "nonce": nonce, "signature": signature });
        let answer = self.send(self.http.post(format!("{}/v1/auth/token", self.base)).json(&body)).await?;
        let token = answer["token"].as_str().ok_or_else(|| ClientError::Network(format!("no token in {answer}")))?;
        Ok((token.to_owned(), answer["expires_in"].as_u64().unwrap_or(300)))
    }

    /// `GET /v1/keys/{user_id}`: a bundle (consumes one-time keys of the owner).
    pub async fn bundle(&self, token: &str, user_id: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/keys/{user_id}", self.base)).bearer_auth(token)).await
    }

    /// `GET /v1/keys/count` → (one-time EC, one-time Kyber).
    pub async fn key_counts(&self, token: &str) -> Result<(u64, u64)> {
        let answer = self.send(self.http.get(format!("{}/v1/keys/count", self.base)).bearer_auth(token)).await?;
        Ok((answer["one_time"].as_u64().unwrap_or(0), answer["kyber"].as_u64().unwrap_or(0)))
    }

    /// `GET /v1/calls/turn` → a TURN credential, or `None` where the server
    /// has no TURN relay configured (503 `not_configured`).
    pub async fn turn(&self, token: &str) -> Result<Option<crate::call::turn::TurnCredential>> {
        let answer = self.send(self.http.get(format!("{}/v1/calls/turn", self.base)).bearer_auth(token)).await;
        let answer = match answer {
            Err(ClientError::Server { status: 503, .. }) => return Ok(None),
            answer => answer?,
        };
        serde_json::from_value(answer).map(Some).map_err(|e| ClientError::Network(format!("a TURN credential: {e}")))
    }

    /// `PUT /v1/keys`.
    pub async fn upload_keys(&self, token: &str, body: &Value) -> Result<()> {
        self.send(self.http.put(format!("{}/v1/keys", self.base)).bearer_auth(token).json(body)).await.map(|_| ())
    }
}
